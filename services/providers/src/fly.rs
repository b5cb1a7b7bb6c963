//! The Fly Machines provider: the Fly Machines REST API exactly as spec §3.16 uses it.
//!
//! | operation | call |
//! |---|---|
//! | `check_app` | `GET /apps/{app}` |
//! | `list_machines` | `GET /apps/{app}/machines` |
//! | `get_machine` | `GET /apps/{app}/machines/{id}` (not found → `None`) |
//! | `spawn` | `POST /apps/{app}/machines` `{name, region, config: {image, guest, mounts, env}}` |
//! | `cordon` / `stop` | `POST /apps/{app}/machines/{id}/cordon` / `…/stop` |
//! | `wait_for_state` | `GET /apps/{app}/machines/{id}/wait?state=<s>&timeout=<secs ≤ 60>`, repeated |
//! | `destroy` | `DELETE /apps/{app}/machines/{id}` (not found → `Ok`) |
//! | `list_volumes` / `create_volume` | `GET` / `POST /apps/{app}/volumes` `{name, region, size_gb}` |
//! | `delete_volume` | `DELETE /apps/{app}/volumes/{id}` (not found → `Ok`) |
//!
//! Every request carries `Authorization: Bearer <token>` and `Content-Type: application/json`;
//! the app and ids are percent-encoded as path segments.
//!
//! Errors (see [`ProviderError`]):
//! * 404, or a non-5xx whose body says `not found` / `unknown machine` / `does not exist` →
//!   `NotFound`. A 5xx is never `NotFound`, whatever its body says (spec §6.3 L8): the machine
//!   may still be running.
//! * 409, 412, or a body saying `failed_precondition` / `unable to destroy machine` /
//!   `not currently stopped` → `Precondition`.
//! * 429, 5xx, timeouts and network errors are retried with exponential backoff (a `Retry-After`
//!   in seconds is honoured on 429 and 503); `providers.retry_attempts` is the total number of
//!   attempts. When they are used up → `Unavailable`.
//! * anything else → `Other("Fly API <METHOD> <path> failed: <body>")`, the original's message.
//!
//! Creating a machine or a volume is not idempotent at the API, so when an attempt's outcome is
//! unknown (a 5xx or a timeout after the request went out) the provider looks for what that
//! attempt may have created (the machine by its unique name, the volume by name and region)
//! before trying again, instead of creating a second one.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use common::config::ProviderSettings;
use futures::future::BoxFuture;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use crate::{Machine, Provider, ProviderError, ProviderResult, SpawnSpec, Volume, status_of};

/// The longest `timeout` one call of the wait endpoint accepts (seconds).
const MAX_WAIT_SECS: u64 = 60;
/// The longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Shortest time a wait call is expected to block; a server answering 408 sooner is paced.
const MIN_WAIT_CALL: Duration = Duration::from_millis(200);
/// Response texts that mean the resource does not exist (spec §3.16), matched lower-cased.
const NOT_FOUND_MARKERS: [&str; 3] = ["not found", "unknown machine", "does not exist"];
/// Response texts that mean the resource is in the wrong state for the call, matched lower-cased.
const PRECONDITION_MARKERS: [&str; 3] = ["failed_precondition", "unable to destroy machine", "not currently stopped"];
/// Volume states of volumes on their way out: the API still lists them, the provider does not.
const GONE_VOLUME_STATES: [&str; 4] = ["destroyed", "destroying", "pending_destroy", "scheduling_destroy"];

/// The Fly Machines API client behind the [`Provider`] trait.
pub struct FlyProvider {
    http: Result<reqwest::Client, String>,
    base: Result<Url, String>,
    token: String,
    http_timeout: Duration,
    attempts: u32,
    base_delay: Duration,
    stop_wait: Duration,
}

impl fmt::Debug for FlyProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlyProvider")
            .field("base", &self.base.as_ref().map(Url::as_str))
            .field("token", &"<redacted>")
            .field("http_timeout", &self.http_timeout)
            .field("attempts", &self.attempts)
            .field("base_delay", &self.base_delay)
            .finish()
    }
}

/// One API call: what to send and how long one attempt may take.
struct Call<'a> {
    method: Method,
    segments: &'a [&'a str],
    query: &'a [(&'a str, String)],
    body: Option<&'a Value>,
    timeout: Duration,
    /// Non-2xx statuses handed back to the caller instead of being classified (the wait
    /// endpoint's 408).
    pass: &'a [StatusCode],
}

impl<'a> Call<'a> {
    fn new(method: Method, segments: &'a [&'a str], timeout: Duration) -> Self {
        Self { method, segments, query: &[], body: None, timeout, pass: &[] }
    }
}

/// A successful (or passed-through) reply: its status and its JSON body, if any.
struct Reply {
    status: StatusCode,
    body: Option<Value>,
}

/// Why one attempt failed.
enum Failure {
    /// Definite: report it.
    Final(ProviderError),
    /// Worth another attempt. `ambiguous`: the request may have taken effect (5xx, timeout after
    /// sending), so a create must look for its result before trying again.
    Transient { message: String, retry_after: Option<Duration>, ambiguous: bool },
}

/// Looks for the result of an ambiguous create attempt (`Some` = it did take effect).
type Recover<'a> = &'a (dyn Fn() -> BoxFuture<'a, ProviderResult<Option<Value>>> + Send + Sync + 'a);

impl FlyProvider {
    /// A client of the Machines API at `base_url` (e.g. `https://api.machines.dev/v1`). A bad
    /// URL or client set-up is reported by every call rather than here.
    pub fn new(base_url: &str, api_token: &str, settings: &ProviderSettings) -> Self {
        common::telemetry::install_crypto_provider();
        let http_timeout = Duration::from_millis(settings.http_timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .connect_timeout(http_timeout.min(Duration::from_secs(10)))
            .timeout(http_timeout)
            .build()
            .map_err(|e| format!("building the Fly API HTTP client: {e}"));
        let base = Url::parse(base_url.trim())
            .map_err(|e| format!("invalid Fly API base URL {base_url:?}: {e}"))
            .and_then(|mut url| {
                if url.cannot_be_a_base() {
                    return Err(format!("invalid Fly API base URL {base_url:?}: it cannot take a path"));
                }
                url.set_query(None);
                url.set_fragment(None);
                Ok(url)
            });
        Self {
            http,
            base,
            token: api_token.trim().to_string(),
            http_timeout,
            attempts: settings.retry_attempts.max(1),
            base_delay: Duration::from_millis(settings.retry_base_delay_ms),
            stop_wait: Duration::from_millis(settings.stop_wait_ms),
        }
    }

    /// The configured bound (`providers.stop_wait_ms`) for waiting on `stopped` after a stop,
    /// for callers that tear machines down through this provider.
    pub fn stop_wait(&self) -> Duration {
        self.stop_wait
    }

    /// The request URL of `segments` and `query` under the base URL, and the path as error
    /// messages show it (relative to the base URL, with the query).
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> ProviderResult<(Url, String)> {
        let base = self.base.as_ref().map_err(|e| ProviderError::Other(e.clone()))?;
        // The URL encoder drops `.` and `..` segments and an empty one changes the resource:
        // such an app or id would address something else, so it is refused.
        if let Some(bad) = segments.iter().find(|s| s.is_empty() || **s == "." || **s == "..") {
            return Err(ProviderError::Other(format!("invalid Fly app or resource id {bad:?}")));
        }
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|()| ProviderError::Other(format!("invalid Fly API base URL {base}")))?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let prefix = base.path().trim_end_matches('/');
        let mut shown = url.path().strip_prefix(prefix).unwrap_or(url.path()).to_string();
        if let Some(q) = url.query() {
            shown.push('?');
            shown.push_str(q);
        }
        Ok((url, shown))
    }

    /// Runs `call` with the bounded retries. `recover` is consulted after an ambiguous failure,
    /// before the next attempt (and before giving up).
    async fn execute(&self, call: &Call<'_>, recover: Option<Recover<'_>>) -> ProviderResult<Reply> {
        let client = self.http.as_ref().map_err(|e| ProviderError::Other(e.clone()))?;
        let (url, path) = self.url(call.segments, call.query)?;
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let (message, retry_after, ambiguous) = match self.attempt(client, call, &url, &path).await {
                Ok(reply) => return Ok(reply),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Transient { message, retry_after, ambiguous }) => (message, retry_after, ambiguous),
            };
            if attempt < self.attempts {
                let delay = retry_after.unwrap_or_else(|| self.backoff(attempt));
                tracing::warn!(attempt, attempts = self.attempts, delay_ms = delay.as_millis() as u64, error = %message, "Fly API call failed; retrying");
                // Real time on purpose: this paces requests to an external API (network
                // back-off), it is not business time and must not follow the manual clock.
                tokio::time::sleep(delay).await;
            }
            last = message;
            if ambiguous && let Some(recover) = recover {
                match recover().await {
                    Ok(Some(found)) => {
                        tracing::info!(path = %path, "a Fly API create whose outcome was unknown did take effect");
                        return Ok(Reply { status: StatusCode::OK, body: Some(found) });
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "looking for the result of an ambiguous Fly API call failed"),
                }
            }
        }
        tracing::warn!(attempts = self.attempts, error = %last, "Fly API call failed; giving up");
        Err(ProviderError::Unavailable(format!("{last} (after {} attempts)", self.attempts)))
    }

    /// One attempt of `call`.
    async fn attempt(
        &self,
        client: &reqwest::Client,
        call: &Call<'_>,
        url: &Url,
        path: &str,
    ) -> Result<Reply, Failure> {
        let method = call.method.as_str();
        let transport = |e: reqwest::Error| {
            let detail =
                if e.is_timeout() { format!("timed out after {} ms", call.timeout.as_millis()) } else { chain(&e) };
            // A connection that never opened cannot have reached the API; anything later may have.
            Failure::Transient {
                message: format!("Fly API {method} {path} failed: {detail}"),
                retry_after: None,
                ambiguous: !e.is_connect(),
            }
        };
        let mut request = client
            .request(call.method.clone(), url.clone())
            .bearer_auth(&self.token)
            .header(CONTENT_TYPE, "application/json")
            .timeout(call.timeout);
        if let Some(body) = call.body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.map_err(transport)?;
        if status.is_success() || call.pass.contains(&status) {
            let body = if call.method == Method::DELETE || status == StatusCode::NO_CONTENT || text.trim().is_empty() {
                None
            } else if status.is_success() {
                let value = serde_json::from_str(&text).map_err(|e| {
                    Failure::Final(ProviderError::Other(format!("Fly API {method} {path} returned invalid JSON: {e}")))
                })?;
                Some(value)
            } else {
                serde_json::from_str(&text).ok()
            };
            return Ok(Reply { status, body });
        }
        Err(classify(method, path, status, &text, retry_after))
    }

    /// Exponential backoff after the `attempt`-th failure, plus up to 25 % jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let delay = self.base_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(MAX_BACKOFF);
        delay + jitter(delay / 4)
    }

    async fn get_json(&self, segments: &[&str]) -> ProviderResult<Option<Value>> {
        Ok(self.execute(&Call::new(Method::GET, segments, self.http_timeout), None).await?.body)
    }

    async fn list(&self, segments: &[&str]) -> ProviderResult<Vec<Value>> {
        match self.get_json(segments).await? {
            Some(Value::Array(items)) => Ok(items),
            None => Ok(Vec::new()),
            Some(other) => Err(ProviderError::Other(format!(
                "Fly API GET /{} returned {} where a list was expected",
                segments.join("/"),
                kind_of(&other)
            ))),
        }
    }

    async fn list_machines_impl(&self, app: &str) -> ProviderResult<Vec<Machine>> {
        Ok(self.list(&["apps", app, "machines"]).await?.iter().map(map_machine).collect())
    }

    async fn get_machine_impl(&self, app: &str, machine_id: &str) -> ProviderResult<Option<Machine>> {
        match self.get_json(&["apps", app, "machines", machine_id]).await {
            Ok(Some(body)) => Ok(Some(map_machine(&body))),
            Ok(None) => Ok(None),
            Err(ProviderError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The listed machine named `name` (machine names are unique within an app).
    async fn machine_named(&self, app: &str, name: &str) -> ProviderResult<Option<Value>> {
        let machines = self.list(&["apps", app, "machines"]).await?;
        Ok(machines.into_iter().find(|m| str_field(m, "name").as_deref() == Some(name)))
    }

    async fn spawn_impl(&self, app: &str, spec: &SpawnSpec) -> ProviderResult<Machine> {
        let body = spawn_body(spec);
        let segments = ["apps", app, "machines"];
        let call = Call { body: Some(&body), ..Call::new(Method::POST, &segments, self.http_timeout) };
        let recover =
            || -> BoxFuture<'_, ProviderResult<Option<Value>>> { Box::pin(self.machine_named(app, &spec.worker_id)) };
        let created = match self.execute(&call, Some(&recover)).await {
            Ok(reply) => reply.body.unwrap_or(Value::Null),
            // The name is taken: an earlier attempt of this very spawn created it.
            Err(ProviderError::Precondition(message)) => match self.machine_named(app, &spec.worker_id).await {
                Ok(Some(existing)) => {
                    tracing::info!(app, worker_id = %spec.worker_id, "the machine to spawn already exists; reusing it");
                    existing
                }
                _ => return Err(ProviderError::Precondition(message)),
            },
            Err(e) => return Err(e),
        };
        let mut machine = map_machine(&created);
        if machine.machine_id.is_empty() {
            return Err(ProviderError::Other(format!("Fly API POST /apps/{app}/machines returned no machine id")));
        }
        if str_field(&created, "name").is_none() {
            machine.worker_id = spec.worker_id.clone();
        }
        machine.region = machine.region.or_else(|| Some(spec.region.clone()));
        machine.image = machine.image.or_else(|| Some(spec.image.clone()));
        if machine.volume_ids.is_empty() && !spec.volume_id.is_empty() {
            machine.volume_ids.push(spec.volume_id.clone());
        }
        Ok(machine)
    }

    async fn machine_action(&self, app: &str, machine_id: &str, action: &str) -> ProviderResult<()> {
        let segments = ["apps", app, "machines", machine_id, action];
        self.execute(&Call::new(Method::POST, &segments, self.http_timeout), None).await.map(|_| ())
    }

    async fn wait_impl(&self, app: &str, machine_id: &str, state: &str, timeout: Duration) -> ProviderResult<()> {
        let segments = ["apps", app, "machines", machine_id, "wait"];
        // Real time: the bound on an external system's progress, not business time.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let started = tokio::time::Instant::now();
            let remaining = deadline.saturating_duration_since(started);
            let secs = remaining.as_millis().div_ceil(1000).clamp(1, u128::from(MAX_WAIT_SECS));
            let secs = u64::try_from(secs).unwrap_or(MAX_WAIT_SECS);
            let query = [("state", state.to_string()), ("timeout", secs.to_string())];
            let call = Call {
                query: &query,
                // The server holds the request for up to `secs`; the HTTP timeout comes on top.
                timeout: Duration::from_secs(secs) + self.http_timeout,
                pass: &[StatusCode::REQUEST_TIMEOUT],
                ..Call::new(Method::GET, &segments, self.http_timeout)
            };
            match self.execute(&call, None).await {
                Ok(reply) if reply.status.is_success() => return Ok(()),
                Ok(_) => {}
                Err(ProviderError::NotFound(_)) if state == "destroyed" => return Ok(()),
                Err(e) => return Err(e),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ProviderError::Unavailable(format!(
                    "Fly machine {machine_id} did not reach state {state} within {} ms",
                    timeout.as_millis()
                )));
            }
            // A server that answers 408 at once would otherwise make this loop spin.
            let elapsed = now.duration_since(started);
            if elapsed < MIN_WAIT_CALL {
                tokio::time::sleep((MIN_WAIT_CALL - elapsed).min(deadline - now)).await;
            }
        }
    }

    async fn destroy_impl(&self, app: &str, machine_id: &str) -> ProviderResult<()> {
        // No `?force=true`: a forced destroy kills a running machine without its graceful stop
        // (and its final snapshot). Callers stop, wait for `stopped`, then destroy; a machine
        // that is not stopped yet is a `Precondition` they retry on a later pass.
        let segments = ["apps", app, "machines", machine_id];
        match self.execute(&Call::new(Method::DELETE, &segments, self.http_timeout), None).await {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_volumes_json(&self, app: &str) -> ProviderResult<Vec<Value>> {
        let volumes = self.list(&["apps", app, "volumes"]).await?;
        Ok(volumes
            .into_iter()
            .filter(|v| !str_field(v, "state").is_some_and(|s| GONE_VOLUME_STATES.contains(&s.as_str())))
            .collect())
    }

    async fn list_volumes_impl(&self, app: &str) -> ProviderResult<Vec<Volume>> {
        Ok(self.list_volumes_json(app).await?.iter().map(map_volume).collect())
    }

    async fn create_volume_impl(&self, app: &str, name: &str, region: &str, size_gb: u32) -> ProviderResult<Volume> {
        let body = json!({ "name": name, "region": region, "size_gb": size_gb });
        let segments = ["apps", app, "volumes"];
        let call = Call { body: Some(&body), ..Call::new(Method::POST, &segments, self.http_timeout) };
        // Volume names are not unique at Fly: after an ambiguous attempt, an unattached volume
        // of this name in this region is the one that attempt created.
        let recover = || -> BoxFuture<'_, ProviderResult<Option<Value>>> {
            Box::pin(async move {
                let volumes = self.list_volumes_json(app).await?;
                Ok(volumes.into_iter().find(|v| {
                    let v = map_volume(v);
                    v.name == name && v.region.as_deref() == Some(region) && v.attached_machine_id.is_none()
                }))
            })
        };
        let reply = self.execute(&call, Some(&recover)).await?;
        let created = reply.body.unwrap_or(Value::Null);
        let mut volume = map_volume(&created);
        if volume.id.is_empty() {
            return Err(ProviderError::Other(format!("Fly API POST /apps/{app}/volumes returned no volume id")));
        }
        if volume.name.is_empty() {
            volume.name = name.to_string();
        }
        volume.region = volume.region.or_else(|| Some(region.to_string()));
        Ok(volume)
    }

    async fn delete_volume_impl(&self, app: &str, volume_id: &str) -> ProviderResult<()> {
        let segments = ["apps", app, "volumes", volume_id];
        match self.execute(&Call::new(Method::DELETE, &segments, self.http_timeout), None).await {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Provider for FlyProvider {
    fn kind(&self) -> &'static str {
        "fly"
    }

    fn check_app<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(async move { self.get_json(&["apps", app]).await.map(|_| ()) })
    }

    fn list_machines<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<Vec<Machine>>> {
        Box::pin(self.list_machines_impl(app))
    }

    fn get_machine<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<Option<Machine>>> {
        Box::pin(self.get_machine_impl(app, machine_id))
    }

    fn spawn<'a>(&'a self, app: &'a str, spec: &'a SpawnSpec) -> BoxFuture<'a, ProviderResult<Machine>> {
        Box::pin(self.spawn_impl(app, spec))
    }

    fn cordon<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.machine_action(app, machine_id, "cordon"))
    }

    fn stop<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.machine_action(app, machine_id, "stop"))
    }

    fn wait_for_state<'a>(
        &'a self,
        app: &'a str,
        machine_id: &'a str,
        state: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.wait_impl(app, machine_id, state, timeout))
    }

    fn destroy<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.destroy_impl(app, machine_id))
    }

    fn list_volumes<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<Vec<Volume>>> {
        Box::pin(self.list_volumes_impl(app))
    }

    fn create_volume<'a>(
        &'a self,
        app: &'a str,
        name: &'a str,
        region: &'a str,
        size_gb: u32,
    ) -> BoxFuture<'a, ProviderResult<Volume>> {
        Box::pin(self.create_volume_impl(app, name, region, size_gb))
    }

    fn delete_volume<'a>(&'a self, app: &'a str, volume_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.delete_volume_impl(app, volume_id))
    }
}

/// The create-machine body of spec §3.16; the spec's env wins over `AGENT_FACTORY_WORKER_ID`.
fn spawn_body(spec: &SpawnSpec) -> Value {
    let mut env = BTreeMap::new();
    env.insert("AGENT_FACTORY_WORKER_ID".to_string(), spec.worker_id.clone());
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mounts: Vec<Value> = if spec.volume_id.is_empty() {
        Vec::new()
    } else {
        vec![json!({ "volume": spec.volume_id, "path": spec.volume_path })]
    };
    json!({
        "name": spec.worker_id,
        "region": spec.region,
        "config": {
            "image": spec.image,
            "guest": {
                "cpu_kind": spec.guest.cpu_kind,
                "cpus": spec.guest.cpus,
                "memory_mb": spec.guest.memory_mb,
            },
            "mounts": mounts,
            "env": env,
        },
    })
}

/// Classifies a non-2xx reply (module doc).
fn classify(method: &str, path: &str, status: StatusCode, body: &str, retry_after: Option<Duration>) -> Failure {
    let text = body.trim();
    let text = if text.is_empty() { status.canonical_reason().unwrap_or("no response body") } else { text };
    let message = format!("Fly API {method} {path} failed: {text}");
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Failure::Transient { message, retry_after, ambiguous: false };
    }
    if status.is_server_error() {
        // Never NotFound (L8): the state of the resource is unknown.
        let retry_after = if status == StatusCode::SERVICE_UNAVAILABLE { retry_after } else { None };
        return Failure::Transient { message, retry_after, ambiguous: true };
    }
    let lower = text.to_lowercase();
    if status == StatusCode::NOT_FOUND || NOT_FOUND_MARKERS.iter().any(|m| lower.contains(m)) {
        return Failure::Final(ProviderError::NotFound(message));
    }
    if status == StatusCode::CONFLICT
        || status == StatusCode::PRECONDITION_FAILED
        || PRECONDITION_MARKERS.iter().any(|m| lower.contains(m))
    {
        return Failure::Final(ProviderError::Precondition(message));
    }
    Failure::Final(ProviderError::Other(message))
}

/// `Retry-After` in whole seconds (the HTTP-date form is ignored), capped.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// A random duration in `0..=max` (spreads the retries of concurrent callers).
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if max_ms == 0 {
        return Duration::ZERO;
    }
    // Each `RandomState` is freshly keyed, so hashing a constant gives a fresh random number.
    Duration::from_millis(RandomState::new().hash_one(0u8) % (max_ms + 1))
}

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A non-empty string field.
fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string)
}

/// A machine of the API mapped as spec §3.16 does: `workerId = name ?? id`,
/// `image = config.image_ref ?? config.image` (then the machine's own `image_ref`).
fn map_machine(v: &Value) -> Machine {
    let id = str_field(v, "id").unwrap_or_default();
    let config = v.get("config");
    let image = config
        .and_then(|c| c.get("image_ref"))
        .and_then(image_ref)
        .or_else(|| config.and_then(|c| str_field(c, "image")))
        .or_else(|| v.get("image_ref").and_then(image_ref));
    let volume_ids = config
        .and_then(|c| c.get("mounts"))
        .and_then(Value::as_array)
        .map(|mounts| mounts.iter().filter_map(|m| str_field(m, "volume")).collect())
        .unwrap_or_default();
    let raw_state = str_field(v, "state").unwrap_or_default();
    Machine {
        worker_id: str_field(v, "name").unwrap_or_else(|| id.clone()),
        machine_id: id,
        region: str_field(v, "region"),
        image,
        status: status_of(&raw_state),
        raw_state,
        volume_ids,
    }
}

/// An image reference: a string, or the API's `{registry, repository, tag, digest}` object
/// (rendered `registry/repository:tag`, or `@digest` without a tag).
fn image_ref(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(_) => {
            let repository = str_field(v, "repository")?;
            let mut out = String::new();
            if let Some(registry) = str_field(v, "registry") {
                out.push_str(&registry);
                out.push('/');
            }
            out.push_str(&repository);
            if let Some(tag) = str_field(v, "tag") {
                out.push(':');
                out.push_str(&tag);
            } else if let Some(digest) = str_field(v, "digest") {
                out.push('@');
                out.push_str(&digest);
            }
            Some(out)
        }
        _ => None,
    }
}

fn map_volume(v: &Value) -> Volume {
    Volume {
        id: str_field(v, "id").unwrap_or_default(),
        name: str_field(v, "name").unwrap_or_default(),
        region: str_field(v, "region"),
        attached_machine_id: str_field(v, "attached_machine_id"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Guest, MachineStatus};

    fn settings() -> ProviderSettings {
        ProviderSettings {
            fly_base_url: "https://api.machines.dev/v1".to_string(),
            http_timeout_ms: 1000,
            retry_attempts: 3,
            retry_base_delay_ms: 100,
            stop_wait_ms: 60_000,
            local_dir: String::new(),
            worker_binary: String::new(),
        }
    }

    fn final_error(f: Failure) -> ProviderError {
        match f {
            Failure::Final(e) => e,
            Failure::Transient { message, .. } => panic!("expected a final error, got a transient one: {message}"),
        }
    }

    #[test]
    fn urls_encode_segments_and_show_the_path_relative_to_the_base() {
        let p = FlyProvider::new("https://api.machines.dev/v1/", "t", &settings());
        let (url, shown) = p.url(&["apps", "my app/x", "machines", "m?1"], &[]).unwrap();
        assert_eq!(url.as_str(), "https://api.machines.dev/v1/apps/my%20app%2Fx/machines/m%3F1");
        assert_eq!(shown, "/apps/my%20app%2Fx/machines/m%3F1");
        let (url, shown) = p
            .url(&["apps", "a", "machines", "m", "wait"], &[("state", "stopped".into()), ("timeout", "5".into())])
            .unwrap();
        assert_eq!(url.as_str(), "https://api.machines.dev/v1/apps/a/machines/m/wait?state=stopped&timeout=5");
        assert_eq!(shown, "/apps/a/machines/m/wait?state=stopped&timeout=5");
        for bad in ["", ".", ".."] {
            assert!(matches!(p.url(&["apps", "a", "machines", bad], &[]), Err(ProviderError::Other(_))));
        }
        let root = FlyProvider::new("http://127.0.0.1:9", "t", &settings());
        assert_eq!(root.url(&["apps", "a"], &[]).unwrap().1, "/apps/a");
    }

    #[test]
    fn a_bad_base_url_is_reported_by_calls() {
        let p = FlyProvider::new("not a url", "t", &settings());
        assert!(
            matches!(p.url(&["apps"], &[]), Err(ProviderError::Other(m)) if m.contains("invalid Fly API base URL"))
        );
    }

    #[test]
    fn classification_follows_the_spec_and_never_takes_a_5xx_for_gone() {
        let c = |status: u16, body: &str| {
            classify("DELETE", "/apps/a/machines/m", StatusCode::from_u16(status).unwrap(), body, None)
        };
        assert_eq!(
            final_error(c(404, "")),
            ProviderError::NotFound("Fly API DELETE /apps/a/machines/m failed: Not Found".into())
        );
        assert!(final_error(c(400, r#"{"error":"Unknown machine m"}"#)).is_not_found());
        assert!(final_error(c(422, "volume vol_1 does not exist")).is_not_found());
        for body in [r#"{"error":"internal server error"}"#, "machine not found", "unknown machine", ""] {
            for status in [500, 502, 503, 504] {
                assert!(matches!(c(status, body), Failure::Transient { ambiguous: true, .. }), "{status} {body}");
            }
        }
        assert!(matches!(c(429, "slow down"), Failure::Transient { ambiguous: false, .. }));
        assert!(matches!(final_error(c(412, "x")), ProviderError::Precondition(_)));
        assert!(matches!(final_error(c(409, "x")), ProviderError::Precondition(_)));
        assert!(matches!(
            final_error(c(400, r#"{"error":"failed_precondition: machine not currently stopped"}"#)),
            ProviderError::Precondition(_)
        ));
        assert_eq!(
            final_error(c(401, r#"{"error":"unauthorized"}"#)),
            ProviderError::Other(r#"Fly API DELETE /apps/a/machines/m failed: {"error":"unauthorized"}"#.into())
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "0".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, " 3 ".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(RETRY_AFTER, "86400".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        let p = FlyProvider::new("https://api.machines.dev/v1", "t", &settings());
        for (attempt, base) in [(1, 100), (2, 200), (3, 400), (4, 800)] {
            let d = p.backoff(attempt).as_millis();
            assert!(d >= base && d <= base + base / 4, "attempt {attempt}: {d} ms");
        }
        assert!(p.backoff(40) <= MAX_BACKOFF + MAX_BACKOFF / 4);
    }

    #[test]
    fn machines_map_name_state_image_and_mounts() {
        let m = map_machine(&json!({
            "id": "148ed123456789", "name": "afw-1", "state": "replacing", "region": "ams",
            "config": {"image": "registry.fly.io/w:1", "mounts": [{"volume": "vol_1", "path": "/data"}, {"path": "/x"}]},
            "image_ref": {"registry": "registry.fly.io", "repository": "w", "tag": "2"},
        }));
        assert_eq!(m.worker_id, "afw-1");
        assert_eq!(m.machine_id, "148ed123456789");
        assert_eq!(m.region.as_deref(), Some("ams"));
        assert_eq!(m.image.as_deref(), Some("registry.fly.io/w:1"));
        assert_eq!(m.status, MachineStatus::Active);
        assert_eq!(m.raw_state, "replacing");
        assert_eq!(m.volume_ids, vec!["vol_1".to_string()]);

        // config.image_ref wins over config.image, as a string or as the API's object.
        let m = map_machine(&json!({"id": "m2", "state": "stopped", "config": {"image": "a:1", "image_ref": "b:2"}}));
        assert_eq!((m.worker_id.as_str(), m.image.as_deref(), m.status), ("m2", Some("b:2"), MachineStatus::Stopped));
        let m = map_machine(&json!({"id": "m3", "config": {"image": "a:1",
            "image_ref": {"registry": "docker.io", "repository": "library/nginx", "tag": "latest"}}}));
        assert_eq!(m.image.as_deref(), Some("docker.io/library/nginx:latest"));
        let m = map_machine(&json!({"id": "m4", "state": "started",
            "image_ref": {"repository": "w", "digest": "sha256:ab"}}));
        assert_eq!(m.image.as_deref(), Some("w@sha256:ab"));
        assert!(m.volume_ids.is_empty());
        assert_eq!(map_machine(&json!({"id": "m5"})).status, MachineStatus::Stopped);
    }

    #[test]
    fn the_spawn_body_is_the_spec_body_and_spec_env_wins() {
        let spec = SpawnSpec {
            worker_id: "afw-1".into(),
            image: "img:1".into(),
            region: "ams".into(),
            guest: Guest::default(),
            volume_id: "vol_1".into(),
            volume_path: "/data".into(),
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
        };
        assert_eq!(
            spawn_body(&spec),
            json!({"name": "afw-1", "region": "ams", "config": {
                "image": "img:1",
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 2048},
                "mounts": [{"volume": "vol_1", "path": "/data"}],
                "env": {"AGENT_FACTORY_WORKER_ID": "afw-1", "A": "1"},
            }})
        );
        let spec =
            SpawnSpec { env: BTreeMap::from([("AGENT_FACTORY_WORKER_ID".to_string(), "other".to_string())]), ..spec };
        assert_eq!(spawn_body(&spec)["config"]["env"]["AGENT_FACTORY_WORKER_ID"], "other");
    }

    #[test]
    fn volumes_map_and_attachment_is_optional() {
        let v = map_volume(&json!({"id": "vol_1", "name": "n", "region": "ams", "attached_machine_id": null}));
        assert_eq!(
            v,
            Volume { id: "vol_1".into(), name: "n".into(), region: Some("ams".into()), attached_machine_id: None }
        );
        let v = map_volume(&json!({"id": "vol_2", "name": "n", "attached_machine_id": "m1"}));
        assert_eq!(v.attached_machine_id.as_deref(), Some("m1"));
    }
}
