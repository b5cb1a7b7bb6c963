//! The transports of the operation catalogue ([`crate::api`]): every operation is served over
//! NATS request/reply on `af.op.<name>` and exposed by ingress as `POST /v1/ops/<name>`. Both
//! transports carry the same JSON and the same error body. Handlers are registered and calls
//! made by contract type ([`OpRegistry::handle`], [`OpClient::call`]), so the arguments and
//! results are the contract's own types on both sides.
//!
//! Requests carry `Authorization: Bearer <token>` in a NATS header, so a service authenticates
//! every call itself whether it came through ingress or straight from a worker on NATS.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Caller;
use crate::config::LimitSettings;
use crate::error::{ErrorCode, OpError};
use crate::service::ServiceContext;

pub const SUBJECT_PREFIX: &str = "af.op";
pub const HEADER_STATUS: &str = "af-status";
pub const HEADER_AUTHORIZATION: &str = "authorization";
pub const HEADER_CLOCK_REVISION: &str = "af-clock-rev";
/// On a reply: the request was not processed at all (it reached a stopping process), so
/// sending it again cannot apply it twice.
pub const HEADER_NOT_PROCESSED: &str = "af-not-processed";
/// How an unanswered request's error starts: nobody serves the operation at this moment.
const NO_RESPONDERS: &str = "no service is serving";
/// How long a service-to-service call waits out a leader failover (the leader lease lives 3 s).
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(10);

pub use crate::api::{CATALOGUE, OpSpec, Operation, SKILL_BUNDLE_MAX_BYTES, Service, find};

pub fn subject(name: &str) -> String {
    format!("{SUBJECT_PREFIX}.{name}")
}

/// Takes the request body and the size limits that apply to it; answers the reply body.
type Handler = Arc<dyn Fn(Caller, Bytes, LimitSettings) -> BoxFuture<'static, Result<Vec<u8>, OpError>> + Send + Sync>;

/// The handlers a service process serves.
#[derive(Default, Clone)]
pub struct OpRegistry {
    handlers: HashMap<&'static str, Handler>,
}

impl OpRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves operation `O`: `handler` gets its own clone of `state` (usually the
    /// `ServiceContext`), the authenticated caller and the decoded arguments, and answers the
    /// contract's result (or the result already encoded as JSON, see [`Encoded`]).
    pub fn handle<O, S, F, Fut, R>(&mut self, state: &S, handler: F) -> &mut Self
    where
        O: Operation,
        S: Clone + Send + Sync + 'static,
        F: Fn(S, Caller, O::Args) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, OpError>> + Send + 'static,
        R: Reply<O::Output> + 'static,
    {
        let state = state.clone();
        let handler = Arc::new(handler);
        let name = O::SPEC.name;
        self.handlers.insert(
            name,
            Arc::new(move |caller, body, limits| {
                let handler = handler.clone();
                let state = state.clone();
                Box::pin(async move {
                    let args: O::Args = parse_args(name, &body, &limits)?;
                    handler(state, caller, args).await?.into_body()
                })
            }),
        );
        self
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.handlers.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Serves every registered operation until `shutdown` is cancelled. Each operation is a
    /// queue-group subscription, so replicas of a service share the load.
    ///
    /// Stopping loses no request: each subscription is drained (unsubscribed, then emptied of
    /// what the server delivered before it saw that), a request that arrives meanwhile is
    /// answered "not processed" so its caller sends it again to another replica
    /// ([`OpClient::call_raw`]), and the requests already running finish, for up to
    /// [`STOP_GRACE`], before this returns (and, on the queue leader, before the dispatcher
    /// stops). Long polls are not waited for: the stopping dispatcher answers them 503.
    pub async fn serve(self, ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut subscriptions = Vec::new();
        for (name, handler) in self.handlers {
            let spec = find(name).ok_or_else(|| anyhow::anyhow!("unknown operation {name}"))?;
            let sub = ctx.nats.queue_subscribe(subject(name), format!("af-{}", spec.service.as_str())).await?;
            // The registry lookup of a labelled metric is done once per operation, not per call.
            let served = metrics::histogram!(crate::telemetry::OP_DURATION, "op" => spec.name, "status" => "200");
            subscriptions.push((spec, handler, served, sub));
        }
        // The subscriptions are registered once the server has processed them; flush so a
        // caller that starts right after `serve` is spawned finds a responder.
        ctx.nats.flush().await?;
        let running = tokio_util::task::TaskTracker::new();
        let serving = subscriptions.into_iter().map(|(spec, handler, served, mut sub)| {
            let (ctx, shutdown, running) = (ctx.clone(), shutdown.clone(), running.clone());
            async move {
                loop {
                    let msg = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        msg = sub.next() => match msg {
                            Some(msg) => msg,
                            None => return,
                        },
                    };
                    let call = handle(ctx.clone(), spec, handler.clone(), served.clone(), msg);
                    match spec.long_poll {
                        true => drop(tokio::spawn(call)),
                        false => drop(running.spawn(call)),
                    }
                }
                // A drain ends when the server confirms the unsubscribe: a connection that is
                // down never does, and nothing could be handed back over it anyway.
                if ctx.nats.connection_state() != async_nats::connection::State::Connected {
                    return;
                }
                let hand_back = async {
                    sub.drain().await?;
                    while let Some(msg) = sub.next().await {
                        not_processed(&ctx, spec, msg).await;
                    }
                    Ok::<_, async_nats::UnsubscribeError>(())
                };
                match tokio::time::timeout(STOP_GRACE, hand_back).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(op = spec.name, error = %e, "could not drain the subscription"),
                    Err(_) => tracing::warn!(op = spec.name, "the subscription did not drain in time"),
                }
            }
        });
        futures::future::join_all(serving).await;
        running.close();
        if tokio::time::timeout(STOP_GRACE, running.wait()).await.is_err() {
            tracing::warn!(requests = running.len(), "stopped with operations still running");
        }
        // The last replies sit in the client's write buffer; the connection may close next.
        if ctx.nats.connection_state() == async_nats::connection::State::Connected
            && !matches!(tokio::time::timeout(STOP_GRACE, ctx.nats.flush()).await, Ok(Ok(())))
        {
            tracing::warn!("could not flush the last replies");
        }
        Ok(())
    }
}

/// How long a stopping service lets the requests it took finish.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Answers a request that reached a stopping process: nothing was done, send it again.
async fn not_processed(ctx: &ServiceContext, spec: &OpSpec, msg: async_nats::Message) {
    let Some(reply) = msg.reply else { return };
    let err = OpError::unavailable(format!("'{}' reached a process that is stopping; not processed", spec.name));
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_STATUS, status_text(err.http_status()));
    headers.insert(HEADER_NOT_PROCESSED, "true");
    let body = Bytes::from(serde_json::to_vec(&err.to_body()).unwrap_or_default());
    if let Err(e) = ctx.nats.publish_with_headers(reply, headers, body).await {
        tracing::warn!(op = spec.name, error = %e, "could not hand a request back");
    }
}

async fn handle(
    ctx: ServiceContext,
    spec: &'static OpSpec,
    handler: Handler,
    served: metrics::Histogram,
    msg: async_nats::Message,
) {
    let Some(reply) = msg.reply.clone() else {
        tracing::debug!(op = spec.name, "request without reply subject ignored");
        return;
    };
    let started = Instant::now();
    let span = tracing::info_span!("op", otel.name = spec.name, op = spec.name, role = tracing::field::Empty);
    crate::telemetry::set_parent_from_headers(&span, msg.headers.as_ref());
    let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
    // Set once the caller is known to be an admin calling an operation that changes something.
    let mut audited = false;
    let result = async {
        let caller = ctx.auth.authenticate(header(HEADER_AUTHORIZATION))?;
        tracing::Span::current().record("role", caller.role.as_str());
        if !spec.roles.contains(&caller.role) {
            return Err(OpError::forbidden(format!("role '{}' may not call '{}'", caller.role.as_str(), spec.name)));
        }
        audited = caller.role == crate::auth::Role::Admin && !spec.read_only;
        if let Some(rev) = header(HEADER_CLOCK_REVISION).and_then(|v| v.parse::<u64>().ok()) {
            ctx.clock.wait_for_revision(rev, Duration::from_secs(2)).await;
        }
        let limits = LimitSettings {
            max_string_bytes: spec.max_string_bytes.unwrap_or(ctx.settings.limits.max_string_bytes),
            ..ctx.settings.limits
        };
        handler(caller, msg.payload.clone(), limits).await
    }
    .instrument(span.clone())
    .await;
    // A reply NATS would refuse never arrives: the caller would wait for its timeout instead of
    // learning why. Headers take a few dozen bytes of the limit.
    let max_reply = ctx.nats.server_info().max_payload.saturating_sub(1024);
    let result = result.and_then(|body| match body.len() > max_reply {
        true => Err(OpError::new(
            ErrorCode::PayloadTooLarge,
            format!("the result ({} bytes) is larger than a NATS message may be ({max_reply} bytes)", body.len()),
        )),
        false => Ok(body),
    });
    let duration = started.elapsed();
    // Built only for an audited call: other calls (the workers' message path) pay nothing.
    let outcome = audited.then(|| match &result {
        Ok(_) => crate::api::audit::AuditOutcome { ok: true, error_code: None, error_message: None },
        Err(err) => crate::api::audit::AuditOutcome {
            ok: false,
            error_code: serde_json::to_value(err.code).ok().and_then(|v| v.as_str().map(str::to_string)),
            error_message: Some(err.message.clone()),
        },
    });
    let (status, body) = match result {
        Ok(body) => (200u16, body),
        Err(err) => {
            if err.code == ErrorCode::Internal {
                span.in_scope(|| tracing::warn!(op = spec.name, "operation failed internally"));
            }
            (err.http_status(), serde_json::to_vec(&err.to_body()).unwrap_or_default())
        }
    };
    let histogram = match status {
        200 => served,
        _ => metrics::histogram!(crate::telemetry::OP_DURATION, "op" => spec.name, "status" => status_text(status)),
    };
    histogram.record(started.elapsed().as_secs_f64());
    let status = status_text(status);
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_STATUS, status);
    if let Err(e) = ctx.nats.publish_with_headers(reply, headers, Bytes::from(body)).await {
        tracing::warn!(op = spec.name, error = %e, "could not send reply");
    }
    if let Some(mut outcome) = outcome {
        // After the reply: the caller does not wait for the audit log.
        let stored = crate::audit::stored_args(&msg.payload);
        // An error message may quote an argument: never a secret one.
        outcome.error_message = outcome.error_message.map(|m| crate::audit::scrub(&m, &stored.removed));
        let record = crate::api::audit::AuditRecord {
            sequence: None,
            at_ms: ctx.clock.now_ms(),
            role: crate::auth::Role::Admin.as_str().to_string(),
            principal: crate::audit::fingerprint(crate::audit::bearer_token(
                header(HEADER_AUTHORIZATION).unwrap_or_default(),
            )),
            operation: spec.name.to_string(),
            service: spec.service.as_str().to_string(),
            outcome,
            duration_ms: duration.as_secs_f64() * 1000.0,
            trace_id: header("traceparent").and_then(crate::audit::trace_id),
            args: stored.args,
            args_truncated: stored.truncated,
        };
        crate::audit::append(&ctx.js, &record).await;
    }
}

/// The status as text without an allocation per request (`ErrorCode::http_status` is a closed
/// set).
fn status_text(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        413 => "413",
        429 => "429",
        503 => "503",
        _ => "500",
    }
}

/// Parses a request body into the arguments of operation `name`, enforcing the string and list
/// limits. An empty body is `{}`. Errors name the offending argument's path
/// (`payload.priority: invalid type: …`).
fn parse_args<A: DeserializeOwned>(name: &str, body: &[u8], limits: &LimitSettings) -> Result<A, OpError> {
    let body = body.trim_ascii();
    if body.is_empty() {
        return typed_args(name, serde_json::Value::Object(Default::default()));
    }
    if body[0] != b'{' {
        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
        return Err(OpError::invalid("request body must be a JSON object"));
    }
    // A string over the limit needs a body longer than the limit, and a list or object over
    // the item limit at least two bytes per item: a body shorter than both cannot break a
    // limit, and is read straight into the arguments (nearly every request is this small).
    // Paths are tracked only to explain a failure: the body is read again for that.
    if body.len() <= limits.max_string_bytes && body.len() < 2 * limits.max_list_items {
        if let Ok(args) = serde_json::from_slice(body) {
            return Ok(args);
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        return match serde_path_to_error::deserialize(&mut de) {
            Ok(args) => de.end().map(|()| args).map_err(not_json),
            Err(e) if e.inner().is_data() => Err(invalid_args(name, e)),
            Err(e) => Err(not_json(e.into_inner())),
        };
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(not_json)?;
    check_limits(&value, limits)?;
    typed_args(name, value)
}

fn typed_args<A: DeserializeOwned>(name: &str, value: serde_json::Value) -> Result<A, OpError> {
    if let Ok(args) = A::deserialize(&value) {
        return Ok(args);
    }
    serde_path_to_error::deserialize(value).map_err(|e| invalid_args(name, e))
}

fn invalid_args(name: &str, e: serde_path_to_error::Error<serde_json::Error>) -> OpError {
    let path = e.path().to_string();
    let at = if path == "." { String::new() } else { format!("{path}: ") };
    let inner = e.into_inner();
    // Read from the body, serde_json appends the byte position; the path already says where,
    // and the message stays the same whichever way the body was read.
    let mut message = inner.to_string();
    if inner.line() > 0 {
        let position = format!(" at line {} column {}", inner.line(), inner.column());
        if let Some(stripped) = message.strip_suffix(&position) {
            message = stripped.to_string();
        }
    }
    OpError::invalid(format!("invalid arguments for {name}: {at}{message}"))
}

fn not_json(e: serde_json::Error) -> OpError {
    OpError::invalid(format!("request body is not valid JSON: {e}"))
}

/// Checks string, list and object sizes. The JSON path of an offending value is built only
/// when there is one (every request passes through here).
fn check_limits(value: &serde_json::Value, limits: &LimitSettings) -> Result<(), OpError> {
    let mut rev_path = Vec::new();
    match find_over_limit(value, limits, &mut rev_path) {
        None => Ok(()),
        Some(problem) => {
            let at: String = std::iter::once("$".to_string()).chain(rev_path.into_iter().rev()).collect();
            Err(OpError::invalid(format!("{at}: {problem}")))
        }
    }
}

/// The first size limit `value` breaks, with the path to it pushed innermost first.
fn find_over_limit(value: &serde_json::Value, limits: &LimitSettings, rev_path: &mut Vec<String>) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.len() > limits.max_string_bytes => {
            Some(format!("string of {} bytes exceeds the limit of {} bytes", s.len(), limits.max_string_bytes))
        }
        serde_json::Value::Array(items) => {
            if items.len() > limits.max_list_items {
                return Some(format!("list of {} items exceeds the limit of {}", items.len(), limits.max_list_items));
            }
            items.iter().enumerate().find_map(|(i, item)| {
                let problem = find_over_limit(item, limits, rev_path)?;
                rev_path.push(format!("[{i}]"));
                Some(problem)
            })
        }
        serde_json::Value::Object(map) => {
            if map.len() > limits.max_list_items {
                return Some(format!("object has more than {} keys", limits.max_list_items));
            }
            map.iter().find_map(|(k, v)| {
                let problem = find_over_limit(v, limits, rev_path)?;
                rev_path.push(format!(".{k}"));
                Some(problem)
            })
        }
        _ => None,
    }
}

/// What a failed request is known about: whether it can be sent again safely.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unapplied {
    /// A stopping replica answered that it did not process it.
    HandedBack,
    /// It reached nobody.
    ReachedNobody,
    /// Answered, or it may have been applied.
    NotKnown,
}

/// Calls operations over NATS. Used by ingress (as a pass-through), the CLI, workers and tests.
#[derive(Clone)]
pub struct OpClient {
    nats: async_nats::Client,
    clock: Option<crate::clock::Clock>,
    timeout: Duration,
}

impl OpClient {
    pub fn new(nats: async_nats::Client, timeout: Duration) -> Self {
        Self { nats, clock: None, timeout }
    }

    /// Attaches this process's clock revision to every request, so a call made after a test
    /// clock change is served by a process that has seen the change.
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Sends raw JSON bytes and returns the HTTP-equivalent status with the raw reply body.
    ///
    /// A request answered "not processed" (it reached a replica that is stopping, see
    /// [`OpRegistry::serve`]) is sent again until the timeout, and so is one that then finds
    /// no responder while a leader takes over: neither was applied, so neither can be
    /// applied twice.
    pub async fn call_raw(
        &self,
        name: &str,
        authorization: Option<&str>,
        body: Bytes,
        extra_timeout: Duration,
    ) -> (u16, Bytes) {
        let deadline = tokio::time::Instant::now() + self.timeout + extra_timeout;
        let mut handed_back = false;
        let mut pause = Duration::from_millis(20);
        loop {
            let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (status, reply, unapplied) = self.request(name, authorization, body.clone(), timeout).await;
            handed_back |= unapplied == Unapplied::HandedBack;
            let again = match unapplied {
                Unapplied::HandedBack => true,
                Unapplied::ReachedNobody => handed_back,
                Unapplied::NotKnown => false,
            };
            if !again || tokio::time::Instant::now() + pause >= deadline {
                return (status, reply);
            }
            // Real time: this waits for another replica to take the request over.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// One request: the status, the reply body, and whether it is known not to be applied.
    async fn request(
        &self,
        name: &str,
        authorization: Option<&str>,
        body: Bytes,
        timeout: Duration,
    ) -> (u16, Bytes, Unapplied) {
        let mut headers = HeaderMap::new();
        if let Some(auth) = authorization {
            headers.insert(HEADER_AUTHORIZATION, auth);
        }
        if let Some(clock) = &self.clock {
            let rev = clock.revision();
            if rev > 0 {
                headers.insert(HEADER_CLOCK_REVISION, rev.to_string().as_str());
            }
        }
        crate::telemetry::inject_current_context(&mut headers);
        let request = async_nats::Request::new().payload(body).headers(headers).timeout(Some(timeout));
        match self.nats.send_request(subject(name), request).await {
            Ok(msg) => {
                let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
                let status = header(HEADER_STATUS).and_then(|v| v.parse().ok()).unwrap_or(200);
                let unapplied = match header(HEADER_NOT_PROCESSED) {
                    Some(_) => Unapplied::HandedBack,
                    None => Unapplied::NotKnown,
                };
                (status, msg.payload, unapplied)
            }
            Err(e) => {
                let (err, unapplied) = match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => (
                        OpError::unavailable(format!("{NO_RESPONDERS} '{name}' right now; retry shortly")),
                        Unapplied::ReachedNobody,
                    ),
                    async_nats::RequestErrorKind::TimedOut => (
                        OpError::unavailable(format!("'{name}' timed out; it may or may not have been applied")),
                        Unapplied::NotKnown,
                    ),
                    async_nats::RequestErrorKind::MaxPayloadExceeded => (
                        OpError::new(
                            ErrorCode::PayloadTooLarge,
                            format!("the request for '{name}' exceeds the NATS maximum payload"),
                        ),
                        Unapplied::NotKnown,
                    ),
                    async_nats::RequestErrorKind::InvalidSubject => {
                        (OpError::invalid(format!("'{name}' is not a valid operation name")), Unapplied::NotKnown)
                    }
                    async_nats::RequestErrorKind::Other => {
                        (OpError::unavailable(format!("'{name}' failed: {e}")), Unapplied::NotKnown)
                    }
                };
                (err.http_status(), Bytes::from(serde_json::to_vec(&err.to_body()).unwrap_or_default()), unapplied)
            }
        }
    }

    /// Like [`OpClient::call`], but rides out a failover: while no process serves `O` (a
    /// leader is being elected), it retries for up to `patience`. Only "no responders" is
    /// retried — such a request reached nobody, so a retry cannot apply it twice.
    pub async fn call_through_failover<O: Operation>(
        &self,
        token: &str,
        args: &O::Args,
        patience: Duration,
    ) -> Result<O::Output, OpError> {
        self.call_by_name_through_failover(&O::SPEC, token, args, patience).await
    }

    /// [`OpClient::call_through_failover`] with arguments and a result of the caller's choosing.
    pub async fn call_by_name_through_failover<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        spec: &OpSpec,
        token: &str,
        args: &A,
        patience: Duration,
    ) -> Result<R, OpError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.call_by_name(spec, token, args).await {
                Err(e) if e.message.starts_with(NO_RESPONDERS) && tokio::time::Instant::now() < deadline => {
                    // Real time: this waits for a process to take over, not for business time.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// Calls operation `O` with its arguments; answers its result or the error it carries.
    pub async fn call<O: Operation>(&self, token: &str, args: &O::Args) -> Result<O::Output, OpError> {
        self.call_by_name(&O::SPEC, token, args).await
    }

    /// Calls `spec`'s operation with arguments and a result of the caller's choosing, for
    /// generic tools (the CLI's `op` command, tests that send what a foreign client would).
    pub async fn call_by_name<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        spec: &OpSpec,
        token: &str,
        args: &A,
    ) -> Result<R, OpError> {
        self.call_with_authorization(spec, &format!("Bearer {token}"), args).await
    }

    /// Calls `O` with a caller's whole `Authorization` header (ingress acting for its caller).
    pub async fn call_as<O: Operation>(&self, authorization: &str, args: &O::Args) -> Result<O::Output, OpError> {
        self.call_with_authorization(&O::SPEC, authorization, args).await
    }

    async fn call_with_authorization<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        spec: &OpSpec,
        authorization: &str,
        args: &A,
    ) -> Result<R, OpError> {
        let body = serde_json::to_vec(args).map_err(|e| OpError::invalid(e.to_string()))?;
        let wait = crate::api::request_wait(spec, &body);
        let (status, reply) = self.call_raw(spec.name, Some(authorization), Bytes::from(body), wait).await;
        decode_reply(status, &reply)
    }
}

/// What a handler of an operation with result `T` may answer: the value itself, or the value
/// already encoded as JSON ([`Encoded`]) by code that built it without the type at hand.
pub trait Reply<T> {
    fn into_body(self) -> Result<Vec<u8>, OpError>;
}

impl<T: Serialize> Reply<T> for T {
    fn into_body(self) -> Result<Vec<u8>, OpError> {
        serde_json::to_vec(&self).map_err(OpError::internal)
    }
}

/// A `T` already encoded as JSON. The queue dispatcher builds its answers this way inside its
/// event loop, so a reply is never decoded and encoded again on its way out.
pub struct Encoded<T>(Box<serde_json::value::RawValue>, std::marker::PhantomData<fn() -> T>);

impl<T> Encoded<T> {
    /// Takes `json` as an encoding of a `T`, as the code that produced it promises.
    pub fn trusting(json: Box<serde_json::value::RawValue>) -> Self {
        Self(json, std::marker::PhantomData)
    }
}

impl<T> Reply<T> for Encoded<T> {
    fn into_body(self) -> Result<Vec<u8>, OpError> {
        Ok(String::from(Box::<str>::from(self.0)).into_bytes())
    }
}

/// Turns a reply into the result or the error it carries.
pub fn decode_reply<R: DeserializeOwned>(status: u16, reply: &[u8]) -> Result<R, OpError> {
    if status == 200 {
        serde_json::from_slice(reply).map_err(|e| OpError::internal(format!("undecodable reply: {e}")))
    } else {
        match serde_json::from_slice::<crate::error::ErrorBody>(reply) {
            Ok(body) => Err(body.error),
            Err(_) => Err(OpError::internal(format!("status {status} with an undecodable body"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_limits_name_the_path() {
        let limits = crate::config::LimitSettings { max_string_bytes: 300, max_list_items: 3 };
        let parse = |body: &[u8]| parse_args::<serde_json::Value>("op", body, &limits);
        let long = "x".repeat(301);
        let err = parse(format!(r#"{{"payload":{{"messageText":"{long}"}}}}"#).as_bytes()).unwrap_err();
        assert!(err.message.contains("$.payload.messageText"), "{}", err.message);
        let err = parse(br#"{"a":[1,2,3,4]}"#).unwrap_err();
        assert!(err.message.contains("$.a"));
        assert_eq!(parse(b"").unwrap(), serde_json::json!({}));
        assert_eq!(parse(b" [1]").unwrap_err().message, "request body must be a JSON object");
        assert!(parse(b"{nope").unwrap_err().message.starts_with("request body is not valid JSON"));
        assert!(parse(b"nope").unwrap_err().message.starts_with("request body is not valid JSON"));
    }

    #[test]
    fn small_bodies_are_read_straight_into_the_arguments_with_the_same_errors() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Args {
            worker_id: String,
            #[serde(default)]
            wait_ms: Option<u64>,
        }
        let limits = crate::config::LimitSettings { max_string_bytes: 65536, max_list_items: 1000 };
        let parse = |body: &[u8]| parse_args::<Args>("claimNextJob", body, &limits);
        let args = parse(br#"{"workerId":"w1","waitMs":5}"#).expect("valid");
        assert_eq!((args.worker_id.as_str(), args.wait_ms), ("w1", Some(5)));
        let err = parse(br#"{"workerId":"w1","waitMs":"soon"}"#).unwrap_err();
        assert!(err.message.starts_with("invalid arguments for claimNextJob: waitMs: invalid type"), "{}", err.message);
        let err = parse(br#"{"waitMs":1}"#).unwrap_err();
        assert_eq!(err.message, "invalid arguments for claimNextJob: missing field `workerId`");
        assert!(
            parse(br#"{"workerId":"w1"} trailing"#).unwrap_err().message.starts_with("request body is not valid JSON")
        );
        assert!(parse(br#"{"workerId":"w1""#).unwrap_err().message.starts_with("request body is not valid JSON"));
    }
}
