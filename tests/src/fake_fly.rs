//! A stateful fake of the Fly Machines API, for tests and development only (never on a
//! production path): an axum server on `127.0.0.1:<random port>` that the `fly` provider talks
//! to through its base URL ([`FakeFly::base_url`], which ends in `/v1` like the real one).
//!
//! What it fakes, with the real API's paths and JSON shapes:
//! * bearer-token authentication (anything but `Authorization: Bearer <token>` → 401);
//! * `GET /apps/{app}` (apps are created by the test with [`FakeFly::add_app`]; an unknown app
//!   → 404 `{"error":"app not found"}`);
//! * machines: `GET/POST /apps/{app}/machines`, `GET/DELETE /apps/{app}/machines/{id}`
//!   (`?force=true` honoured), `POST …/{id}/cordon`, `POST …/{id}/stop`, and the wait endpoint
//!   `GET …/{id}/wait?state=<started|stopped|suspended|destroyed>&timeout=<secs ≤ 60>` (200
//!   `{"ok":true}` once reached, 408 when the timeout passes first). Machine names are unique
//!   per app (409 on a duplicate); destroying a machine that is not stopped → 412
//!   `failed_precondition: machine not currently stopped`; destroyed machines leave listings
//!   and answer 404;
//! * volumes: `GET/POST /apps/{app}/volumes`, `GET/DELETE /apps/{app}/volumes/{id}` (`vol_…`
//!   ids, names validated as Fly does, 404 when absent, 412 when attached to a live machine).
//!   A volume is attached by mounting it in a machine's config and detached when that machine
//!   is destroyed.
//!
//! **State transitions are driven by explicit steps, never by timers**, so tests are
//! deterministic. A machine moves along `created → starting → started` after its create and
//! `stopping → stopped` after a stop, one step at a time:
//! * by default (automatic mode) a request that *reads* a machine advances it one step first:
//!   `GET …/{id}` and each machine of `GET …/machines` move one step, and the wait endpoint
//!   steps its machine until it reaches the requested state or a resting state. Requests that
//!   act (stop, cordon, delete) never step, so "stop then delete at once" still meets 412 (L9)
//!   and "stop, wait for stopped, delete" succeeds;
//! * in manual mode ([`FakeFly::set_manual_transitions`]) only the test moves machines, with
//!   [`FakeFly::step`] (every transitional machine one step), [`FakeFly::settle`] (until none
//!   is transitional) or [`FakeFly::set_machine_state`] (any state, e.g. `failed`). The wait
//!   endpoint then blocks until a step reaches the state or its timeout passes.
//!
//! Faults are injected by the test: [`FakeFly::fail_next`] (a status such as 500, 503 or 429
//! with `Retry-After: 0` for the next matching requests, before they take effect),
//! [`FakeFly::withhold_next`] (the next matching requests take effect at once but their answer
//! never comes, so a client that times out cannot tell whether they happened) and
//! [`FakeFly::fail_create`] (machine creation fails with a 422 placement error). Every request,
//! including rejected ones, is logged for [`FakeFly::requests`].
//!
//! What it does not fake: organisations, app creation over the API, leases, metadata, services
//! and networking, machine updates/start/restart/suspend, events and logs, volume extension,
//! snapshots and forks, regions' capacity, macaroon (`FlyV1`) tokens, rate limits other than the
//! injected ones, and real time (timestamps count seconds from 2026-01-01T09:00:00Z, one per
//! change).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The token [`FakeFly::start`] accepts.
pub const FAKE_FLY_TOKEN: &str = "fake-fly-token";
/// The path prefix of the API, as at `https://api.machines.dev/v1`.
const API_PREFIX: &str = "/v1";
/// The region of a machine created without one.
const DEFAULT_REGION: &str = "ord";
/// The longest wait one call of the wait endpoint may ask for (seconds), as the real API.
const MAX_WAIT_SECS: u64 = 60;
/// 2026-01-01T09:00:00Z, the fake clock's origin (unix seconds).
const CLOCK_ORIGIN: i64 = 1_767_258_000;
/// The 422 body of a machine creation failed by [`FakeFly::fail_create`].
const CREATE_FAILURE: &str =
    "failed to launch VM: could not reserve resource for machine: insufficient memory available to fulfill request";

/// A machine's guest size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGuest {
    pub cpu_kind: String,
    pub cpus: u64,
    pub memory_mb: u64,
}

/// A volume mount of a machine's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMount {
    pub volume: String,
    pub path: String,
}

/// A machine as the fake holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeMachine {
    pub id: String,
    pub name: String,
    pub state: String,
    pub region: String,
    pub instance_id: String,
    pub image: String,
    pub guest: FakeGuest,
    pub mounts: Vec<FakeMount>,
    pub env: BTreeMap<String, String>,
    /// Set by `POST …/cordon`.
    pub cordoned: bool,
    pub created_at: String,
    pub updated_at: String,
    /// The config as created (the request's `config`, normalised), echoed by the API.
    pub config: Value,
}

/// A volume as the fake holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeVolume {
    pub id: String,
    pub name: String,
    pub region: String,
    pub size_gb: u64,
    pub state: String,
    pub attached_machine_id: Option<String>,
    pub created_at: String,
}

/// The fake server. Dropping it stops the server.
pub struct FakeFly {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for FakeFly {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeFly {
    /// Starts a fake with no apps on `127.0.0.1:<random port>`, accepting [`FAKE_FLY_TOKEN`].
    pub async fn start() -> FakeFly {
        let (changes, _) = watch::channel(0u64);
        let shared =
            Arc::new(Shared { token: FAKE_FLY_TOKEN.to_string(), world: Mutex::new(World::default()), changes });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake Fly API");
        let addr = listener.local_addr().expect("fake Fly API address");
        let router = router(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("fake Fly API server stopped: {e}");
            }
        });
        FakeFly { shared, addr, server }
    }

    /// The API base URL, `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}{API_PREFIX}", self.addr)
    }

    /// The bearer token the fake accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Creates an app (no-op when it exists).
    pub fn add_app(&self, name: &str) {
        self.shared.world().apps.entry(name.to_string()).or_default();
    }

    /// Seeds a volume directly (no request is logged), creating the app if needed.
    pub fn add_volume(&self, app: &str, name: &str, region: &str, size_gb: u64) -> FakeVolume {
        let volume = {
            let mut world = self.shared.world();
            let seq = world.next_seq();
            let volume = new_volume(seq, name, region, size_gb);
            world.apps.entry(app.to_string()).or_default().volumes.push(volume.clone());
            volume
        };
        self.shared.changed();
        volume
    }

    /// Manual mode: machines move only when the test calls [`FakeFly::step`],
    /// [`FakeFly::settle`] or [`FakeFly::set_machine_state`]. Automatic mode (the default):
    /// reads advance the machines they read (module doc).
    pub fn set_manual_transitions(&self, manual: bool) {
        self.shared.world().manual = manual;
    }

    /// Advances every transitional machine one step; returns how many moved.
    pub fn step(&self) -> usize {
        let moved = {
            let mut world = self.shared.world();
            let seq = world.next_seq();
            let now = timestamp(seq);
            world
                .apps
                .values_mut()
                .flat_map(|a| a.machines.iter_mut())
                .map(|m| m.step(&now))
                .filter(|moved| *moved)
                .count()
        };
        if moved > 0 {
            self.shared.changed();
        }
        moved
    }

    /// Steps until no machine is transitional; returns the number of steps taken.
    pub fn settle(&self) -> usize {
        let mut steps = 0;
        while self.step() > 0 {
            steps += 1;
        }
        steps
    }

    /// Puts a machine in any state (`destroyed` destroys it); `false` when it does not exist.
    pub fn set_machine_state(&self, app: &str, machine_id: &str, state: &str) -> bool {
        let found = {
            let mut world = self.shared.world();
            let seq = world.next_seq();
            let Some(app) = world.apps.get_mut(app) else { return false };
            if state == "destroyed" {
                app.destroy(machine_id, &timestamp(seq))
            } else if let Some(m) = app.machines.iter_mut().find(|m| m.id == machine_id) {
                m.set_state(state, &timestamp(seq));
                true
            } else {
                false
            }
        };
        if found {
            self.shared.changed();
        }
        found
    }

    /// The next `times` requests with this method (`*` = any; case-insensitive) whose path
    /// (relative to `/v1`, without the query) starts with `path_prefix` get `status` and a
    /// realistic `{"error": …}` body (429 adds `Retry-After: 0`), without taking effect.
    pub fn fail_next(&self, method: &str, path_prefix: &str, status: u16, times: usize) {
        self.add_rule(method, path_prefix, times, Action::Fail { status, body: None });
    }

    /// As [`FakeFly::fail_next`], with this exact response body.
    pub fn fail_next_with_body(&self, method: &str, path_prefix: &str, status: u16, body: &str, times: usize) {
        self.add_rule(method, path_prefix, times, Action::Fail { status, body: Some(body.to_string()) });
    }

    /// The next `times` matching requests (as [`FakeFly::fail_next`]) take effect at once, but
    /// their response is withheld until the client gives up and disconnects: the slowest answer
    /// there is, with no guess about how slow is slow enough.
    pub fn withhold_next(&self, method: &str, path_prefix: &str, times: usize) {
        self.add_rule(method, path_prefix, times, Action::Withhold);
    }

    /// The next `times` machine creations that pass validation fail with 422 and create nothing.
    pub fn fail_create(&self, times: usize) {
        self.shared.world().create_failures = times;
    }

    /// Forgets every pending fault, delay and create failure.
    pub fn clear_faults(&self) {
        let mut world = self.shared.world();
        world.rules.clear();
        world.create_failures = 0;
    }

    /// The app's machines that are not destroyed, in creation order.
    pub fn machines(&self, app: &str) -> Vec<FakeMachine> {
        self.shared.world().apps.get(app).map(|a| a.machines.clone()).unwrap_or_default()
    }

    /// One machine that is not destroyed.
    pub fn machine(&self, app: &str, machine_id: &str) -> Option<FakeMachine> {
        self.machines(app).into_iter().find(|m| m.id == machine_id)
    }

    /// The app's destroyed machines (state `destroyed`), in destruction order.
    pub fn destroyed_machines(&self, app: &str) -> Vec<FakeMachine> {
        self.shared.world().apps.get(app).map(|a| a.destroyed.clone()).unwrap_or_default()
    }

    /// Machines of the app that are not destroyed.
    pub fn live_machine_count(&self, app: &str) -> usize {
        self.shared.world().apps.get(app).map_or(0, |a| a.machines.len())
    }

    /// The app's volumes (deleted ones are gone), in creation order.
    pub fn volumes(&self, app: &str) -> Vec<FakeVolume> {
        self.shared.world().apps.get(app).map(|a| a.volumes.clone()).unwrap_or_default()
    }

    /// Every request so far: method and path relative to `/v1`, with the query when present
    /// (`("GET", "/apps/a/machines/m/wait?state=stopped&timeout=5")`).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.world().requests.clone()
    }

    /// How many logged requests match `method` (`*` = any) and `path_prefix`.
    pub fn count_requests(&self, method: &str, path_prefix: &str) -> usize {
        self.shared
            .world()
            .requests
            .iter()
            .filter(|(m, p)| method_matches(method, m) && p.starts_with(path_prefix))
            .count()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.world().requests.clear();
    }

    fn add_rule(&self, method: &str, path_prefix: &str, times: usize, action: Action) {
        if times > 0 {
            let rule = Rule { method: method.to_string(), prefix: path_prefix.to_string(), remaining: times, action };
            self.shared.world().rules.push(rule);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State

struct Shared {
    token: String,
    world: Mutex<World>,
    /// Bumped on every state change; the wait endpoint waits on it.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[derive(Default)]
struct World {
    apps: BTreeMap<String, App>,
    /// Ids and timestamps both count from here.
    seq: u64,
    manual: bool,
    rules: Vec<Rule>,
    create_failures: usize,
    requests: Vec<(String, String)>,
}

#[derive(Default)]
struct App {
    machines: Vec<FakeMachine>,
    destroyed: Vec<FakeMachine>,
    volumes: Vec<FakeVolume>,
}

struct Rule {
    method: String,
    prefix: String,
    remaining: usize,
    action: Action,
}

enum Action {
    Fail { status: u16, body: Option<String> },
    Withhold,
}

/// An API error: a status and the `{"error": message}` body.
struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }

    fn app_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "app not found")
    }

    fn machine_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "machine not found")
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, format!("invalid_argument: {}", message.into()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.0, json!({ "error": self.1 }))
    }
}

type ApiResult = Result<Value, ApiError>;

/// Where a machine goes next on its own, if it is transitional.
fn next_state(state: &str) -> Option<&'static str> {
    match state {
        "created" => Some("starting"),
        "starting" => Some("started"),
        "stopping" => Some("stopped"),
        _ => None,
    }
}

impl FakeMachine {
    fn set_state(&mut self, state: &str, now: &str) {
        self.state = state.to_string();
        self.updated_at = now.to_string();
    }

    /// One step along its transition; `true` when it moved.
    fn step(&mut self, now: &str) -> bool {
        match next_state(&self.state) {
            Some(next) => {
                self.set_state(next, now);
                true
            }
            None => false,
        }
    }
}

impl App {
    fn machine_mut(&mut self, id: &str) -> Result<&mut FakeMachine, ApiError> {
        self.machines.iter_mut().find(|m| m.id == id).ok_or_else(ApiError::machine_not_found)
    }

    /// Destroys a machine and detaches its volumes; `false` when it does not exist.
    fn destroy(&mut self, id: &str, now: &str) -> bool {
        let Some(index) = self.machines.iter().position(|m| m.id == id) else { return false };
        let mut machine = self.machines.remove(index);
        machine.set_state("destroyed", now);
        for volume in &mut self.volumes {
            if volume.attached_machine_id.as_deref() == Some(id) {
                volume.attached_machine_id = None;
            }
        }
        self.destroyed.push(machine);
        true
    }
}

impl World {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn app(&self, name: &str) -> Result<&App, ApiError> {
        self.apps.get(name).ok_or_else(ApiError::app_not_found)
    }

    /// Takes one use of the first rule matching the request, of the kind `pick` selects.
    fn take_rule<T>(&mut self, method: &str, path: &str, pick: impl Fn(&Action) -> Option<T>) -> Option<T> {
        let rule = self.rules.iter_mut().find(|r| {
            r.remaining > 0
                && method_matches(&r.method, method)
                && path.starts_with(&r.prefix)
                && pick(&r.action).is_some()
        })?;
        rule.remaining -= 1;
        let picked = pick(&rule.action);
        self.rules.retain(|r| r.remaining > 0);
        picked
    }

    fn get_app(&self, app: &str) -> ApiResult {
        let a = self.app(app)?;
        Ok(json!({
            "id": app,
            "name": app,
            "status": "deployed",
            "organization": { "name": "Fake Org", "slug": "fake-org" },
            "machine_count": a.machines.len(),
            "volume_count": a.volumes.len(),
        }))
    }

    /// Whether reads advance machines.
    fn auto(&self) -> bool {
        !self.manual
    }

    /// Lists the app's machines, advancing each one step in automatic mode. The flag says
    /// whether anything moved.
    fn list_machines(&mut self, app: &str) -> Result<(Value, bool), ApiError> {
        let auto = self.auto();
        let now = timestamp(self.next_seq());
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let mut moved = false;
        if auto {
            for m in &mut a.machines {
                moved |= m.step(&now);
            }
        }
        Ok((Value::Array(a.machines.iter().map(machine_json).collect()), moved))
    }

    fn get_machine(&mut self, app: &str, id: &str) -> Result<(Value, bool), ApiError> {
        let auto = self.auto();
        let now = timestamp(self.next_seq());
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let m = a.machine_mut(id)?;
        let moved = auto && m.step(&now);
        Ok((machine_json(m), moved))
    }

    fn create_machine(&mut self, app: &str, body: &Value) -> ApiResult {
        self.app(app)?;
        let spec = MachineSpec::parse(body)?;
        let a = self.app(app)?;
        if let Some(name) = &spec.name
            && a.machines.iter().any(|m| &m.name == name)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("already_exists: a machine named {name:?} already exists in app {app:?}"),
            ));
        }
        for mount in &spec.mounts {
            let volume = a
                .volumes
                .iter()
                .find(|v| v.id == mount.volume)
                .ok_or_else(|| ApiError::invalid(format!("volume {} not found", mount.volume)))?;
            if volume.region != spec.region {
                return Err(ApiError::invalid(format!(
                    "volume {} is in region {}, the machine is requested in {}",
                    volume.id, volume.region, spec.region
                )));
            }
            if let Some(owner) = &volume.attached_machine_id {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    format!("failed_precondition: volume {} is already attached to machine {owner}", volume.id),
                ));
            }
        }
        if self.create_failures > 0 {
            self.create_failures -= 1;
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, CREATE_FAILURE));
        }
        let seq = self.next_seq();
        let now = timestamp(seq);
        let id = format!("e784{seq:010x}");
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let mut config = spec.config;
        if let Some(mounts) = config.get_mut("mounts").and_then(Value::as_array_mut) {
            for mount in mounts.iter_mut() {
                let volume_id = mount.get("volume").and_then(Value::as_str).unwrap_or_default().to_string();
                let name = a.volumes.iter().find(|v| v.id == volume_id).map(|v| v.name.clone());
                if let (Some(obj), Some(name)) = (mount.as_object_mut(), name) {
                    obj.insert("name".to_string(), Value::String(name));
                }
            }
        }
        for volume in &mut a.volumes {
            if spec.mounts.iter().any(|m| m.volume == volume.id) {
                volume.attached_machine_id = Some(id.clone());
            }
        }
        let machine = FakeMachine {
            name: spec.name.unwrap_or_else(|| format!("machine-{seq}")),
            id,
            state: "created".to_string(),
            region: spec.region,
            instance_id: format!("01KFAKE{seq:019}"),
            image: spec.image,
            guest: spec.guest,
            mounts: spec.mounts,
            env: spec.env,
            cordoned: false,
            created_at: now.clone(),
            updated_at: now,
            config,
        };
        let body = machine_json(&machine);
        a.machines.push(machine);
        Ok(body)
    }

    fn cordon(&mut self, app: &str, id: &str) -> ApiResult {
        let now = timestamp(self.next_seq());
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let m = a.machine_mut(id)?;
        m.cordoned = true;
        m.updated_at = now;
        Ok(json!({ "ok": true }))
    }

    fn stop(&mut self, app: &str, id: &str) -> ApiResult {
        let now = timestamp(self.next_seq());
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let m = a.machine_mut(id)?;
        if matches!(m.state.as_str(), "created" | "starting" | "started" | "replacing" | "updating" | "restarting") {
            m.set_state("stopping", &now);
        }
        Ok(json!({ "ok": true }))
    }

    fn destroy_machine(&mut self, app: &str, id: &str, force: bool) -> ApiResult {
        let now = timestamp(self.next_seq());
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let state = a.machine_mut(id)?.state.clone();
        if !force && !matches!(state.as_str(), "stopped" | "suspended" | "failed") {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "failed_precondition: machine not currently stopped",
            ));
        }
        a.destroy(id, &now);
        Ok(json!({ "ok": true }))
    }

    /// Whether the machine is in `target`, stepping it toward a resting state first in
    /// automatic mode. The flag says whether anything moved.
    fn wait_check(&mut self, app: &str, id: &str, target: &str) -> Result<(bool, bool), ApiError> {
        let auto = self.auto();
        let now = timestamp(self.next_seq());
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        if target == "destroyed" && a.destroyed.iter().any(|m| m.id == id) {
            return Ok((true, false));
        }
        let m = a.machine_mut(id)?;
        let mut moved = false;
        while auto && m.state != target && m.step(&now) {
            moved = true;
        }
        Ok((m.state == target, moved))
    }

    fn list_volumes(&self, app: &str) -> ApiResult {
        Ok(Value::Array(self.app(app)?.volumes.iter().map(volume_json).collect()))
    }

    fn get_volume(&self, app: &str, id: &str) -> ApiResult {
        let a = self.app(app)?;
        let v = a.volumes.iter().find(|v| v.id == id).ok_or_else(volume_not_found)?;
        Ok(volume_json(v))
    }

    fn create_volume(&mut self, app: &str, body: &Value) -> ApiResult {
        self.app(app)?;
        let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty()
            || name.len() > 30
            || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(ApiError::invalid(format!(
                "volume name {name:?} must be 1 to 30 lowercase letters, digits or underscores"
            )));
        }
        let region = body.get("region").and_then(Value::as_str).unwrap_or_default();
        if region.is_empty() {
            return Err(ApiError::invalid("region is required"));
        }
        let size_gb = match body.get("size_gb") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=500).contains(n))
                .ok_or_else(|| ApiError::invalid(format!("size_gb must be an integer between 1 and 500, got {v}")))?,
        };
        let seq = self.next_seq();
        let volume = new_volume(seq, name, region, size_gb);
        let body = volume_json(&volume);
        self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?.volumes.push(volume);
        Ok(body)
    }

    fn delete_volume(&mut self, app: &str, id: &str) -> ApiResult {
        let a = self.apps.get_mut(app).ok_or_else(ApiError::app_not_found)?;
        let index = a.volumes.iter().position(|v| v.id == id).ok_or_else(volume_not_found)?;
        if let Some(owner) = &a.volumes[index].attached_machine_id {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                format!("failed_precondition: volume {id} is attached to machine {owner}"),
            ));
        }
        let mut volume = a.volumes.remove(index);
        volume.state = "destroyed".to_string();
        Ok(volume_json(&volume))
    }
}

fn volume_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "volume not found")
}

fn new_volume(seq: u64, name: &str, region: &str, size_gb: u64) -> FakeVolume {
    FakeVolume {
        id: format!("vol_{seq:016x}"),
        name: name.to_string(),
        region: region.to_string(),
        size_gb,
        state: "created".to_string(),
        attached_machine_id: None,
        created_at: timestamp(seq),
    }
}

/// A validated create-machine request.
struct MachineSpec {
    name: Option<String>,
    region: String,
    image: String,
    guest: FakeGuest,
    mounts: Vec<FakeMount>,
    env: BTreeMap<String, String>,
    config: Value,
}

impl MachineSpec {
    fn parse(body: &Value) -> Result<Self, ApiError> {
        let Some(config) = body.get("config").and_then(Value::as_object) else {
            return Err(ApiError::invalid("config is required"));
        };
        let name = match body.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(other) => return Err(ApiError::invalid(format!("name must be a non-empty string, got {other}"))),
        };
        let region = match body.get("region") {
            None | Some(Value::Null) => DEFAULT_REGION.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => return Err(ApiError::invalid(format!("region must be a non-empty string, got {other}"))),
        };
        let image = config.get("image").and_then(Value::as_str).filter(|s| !s.is_empty());
        let image = image.ok_or_else(|| ApiError::invalid("config.image is required"))?.to_string();
        let guest = config.get("guest").cloned().unwrap_or_else(|| json!({}));
        let guest = FakeGuest {
            cpu_kind: guest.get("cpu_kind").and_then(Value::as_str).unwrap_or("shared").to_string(),
            cpus: guest.get("cpus").and_then(Value::as_u64).unwrap_or(1),
            memory_mb: guest.get("memory_mb").and_then(Value::as_u64).unwrap_or(256),
        };
        if !matches!(guest.cpu_kind.as_str(), "shared" | "performance") || guest.cpus == 0 || guest.memory_mb < 256 {
            return Err(ApiError::invalid(format!(
                "invalid guest {}/{}/{}MB",
                guest.cpu_kind, guest.cpus, guest.memory_mb
            )));
        }
        let mut env = BTreeMap::new();
        if let Some(given) = config.get("env").filter(|v| !v.is_null()) {
            let given = given.as_object().ok_or_else(|| ApiError::invalid("config.env must be an object"))?;
            for (k, v) in given {
                let v = v.as_str().ok_or_else(|| ApiError::invalid(format!("config.env.{k} must be a string")))?;
                env.insert(k.clone(), v.to_string());
            }
        }
        let mut mounts = Vec::new();
        for mount in config.get("mounts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            let volume = mount.get("volume").and_then(Value::as_str).unwrap_or_default();
            let path = mount.get("path").and_then(Value::as_str).unwrap_or_default();
            if volume.is_empty() || !path.starts_with('/') {
                return Err(ApiError::invalid(format!("invalid mount {mount}: needs a volume and an absolute path")));
            }
            if mounts.iter().any(|m: &FakeMount| m.volume == volume) {
                return Err(ApiError::invalid(format!("volume {volume} is mounted twice")));
            }
            mounts.push(FakeMount { volume: volume.to_string(), path: path.to_string() });
        }
        let mut config: Map<String, Value> = config.clone();
        config.insert("image".to_string(), Value::String(image.clone()));
        config.insert(
            "guest".to_string(),
            json!({ "cpu_kind": guest.cpu_kind, "cpus": guest.cpus, "memory_mb": guest.memory_mb }),
        );
        config.insert("env".to_string(), json!(env));
        config.insert(
            "mounts".to_string(),
            Value::Array(mounts.iter().map(|m| json!({ "volume": m.volume, "path": m.path })).collect()),
        );
        Ok(Self { name, region, image, guest, mounts, env, config: Value::Object(config) })
    }
}

// ---------------------------------------------------------------------------------------------
// JSON shapes

fn machine_json(m: &FakeMachine) -> Value {
    json!({
        "id": m.id,
        "name": m.name,
        "state": m.state,
        "region": m.region,
        "instance_id": m.instance_id,
        "private_ip": format!("fdaa:0:fa4e:a7b:{}::2", &m.id[m.id.len().saturating_sub(4)..]),
        "config": m.config,
        "image_ref": image_ref(&m.image),
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "events": [],
    })
}

fn volume_json(v: &FakeVolume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "state": v.state,
        "region": v.region,
        "zone": "fa4e",
        "size_gb": v.size_gb,
        "encrypted": true,
        "fstype": "ext4",
        "attached_machine_id": v.attached_machine_id,
        "attached_alloc_id": null,
        "host_status": "ok",
        "snapshot_retention": 5,
        "auto_backup_enabled": true,
        "created_at": v.created_at,
    })
}

/// The API's `image_ref` object of an image reference (`registry/repository:tag@digest`).
fn image_ref(image: &str) -> Value {
    let (rest, digest) = image.split_once('@').map_or((image, ""), |(r, d)| (r, d));
    let (registry, rest) = match rest.split_once('/') {
        Some((host, path)) if host.contains('.') || host.contains(':') || host == "localhost" => (host, path),
        _ => ("docker-hub-mirror.fly.io", rest),
    };
    let (repository, tag) = match rest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (rest, "latest"),
    };
    json!({ "registry": registry, "repository": repository, "tag": tag, "digest": digest, "labels": {} })
}

/// `2026-01-01T09:00:00Z` plus `seq` seconds, as RFC 3339.
fn timestamp(seq: u64) -> String {
    let ms = (CLOCK_ORIGIN + i64::try_from(seq).unwrap_or(0)) * 1000;
    // Fly answers whole seconds.
    format!("{}Z", common::clock::iso_utc(ms).trim_end_matches('Z').trim_end_matches(".000"))
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/apps/{app}", get(get_app))
        .route("/apps/{app}/machines", get(list_machines).post(create_machine))
        .route("/apps/{app}/machines/{id}", get(get_machine).delete(delete_machine))
        .route("/apps/{app}/machines/{id}/cordon", post(cordon_machine))
        .route("/apps/{app}/machines/{id}/stop", post(stop_machine))
        .route("/apps/{app}/machines/{id}/wait", get(wait_machine))
        .route("/apps/{app}/volumes", get(list_volumes).post(create_volume))
        .route("/apps/{app}/volumes/{id}", get(get_volume).delete(delete_volume));
    Router::new()
        .nest(API_PREFIX, api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

fn method_matches(pattern: &str, method: &str) -> bool {
    pattern == "*" || pattern.eq_ignore_ascii_case(method)
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Logs the request, checks the token, and applies injected faults and delays.
async fn gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let full = request.uri().path();
    let path = full.strip_prefix(API_PREFIX).filter(|p| p.starts_with('/')).unwrap_or(full).to_string();
    let logged = match request.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let expected = format!("Bearer {}", shared.token);
    let authorized = request.headers().get(header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == expected.as_bytes());
    let (withhold, fault) = {
        let mut world = shared.world();
        world.requests.push((method.clone(), logged));
        if authorized {
            let withhold = world.take_rule(&method, &path, |a| match a {
                Action::Withhold => Some(()),
                Action::Fail { .. } => None,
            });
            let fault = world.take_rule(&method, &path, |a| match a {
                Action::Fail { status, body } => Some((*status, body.clone())),
                Action::Withhold => None,
            });
            (withhold.is_some(), fault)
        } else {
            (false, None)
        }
    };
    if !authorized {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    let response = match fault {
        Some((status, body)) => fault_response(status, body),
        None => next.run(request).await,
    };
    if withhold {
        // The request took effect; its answer never leaves. The future is dropped when the
        // client disconnects.
        std::future::pending::<()>().await;
    }
    response
}

fn fault_response(status: u16, body: Option<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match body {
        Some(body) => (status, body).into_response(),
        None => {
            let message = match status.as_u16() {
                429 => "rate limit exceeded".to_string(),
                500 => "internal server error".to_string(),
                502 => "bad gateway".to_string(),
                503 => "service unavailable: the machines API is temporarily unavailable".to_string(),
                504 => "gateway timeout".to_string(),
                _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
            };
            ApiError::new(status, message).into_response()
        }
    };
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
    }
    response
}

/// Runs `f` on the world, announces a change when `f` says something moved, and answers.
fn answer(shared: &Shared, f: impl FnOnce(&mut World) -> Result<(Value, bool), ApiError>) -> Response {
    let result = f(&mut shared.world());
    match result {
        Ok((body, changed)) => {
            if changed {
                shared.changed();
            }
            json_response(StatusCode::OK, body)
        }
        Err(e) => e.into_response(),
    }
}

/// As [`answer`] for calls that change state whenever they succeed.
fn mutate(shared: &Shared, f: impl FnOnce(&mut World) -> ApiResult) -> Response {
    answer(shared, |w| f(w).map(|body| (body, true)))
}

fn read(shared: &Shared, f: impl FnOnce(&World) -> ApiResult) -> Response {
    answer(shared, |w| f(w).map(|body| (body, false)))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

async fn get_app(State(s): State<Arc<Shared>>, Path(app): Path<String>) -> Response {
    read(&s, |w| w.get_app(&app))
}

async fn list_machines(State(s): State<Arc<Shared>>, Path(app): Path<String>) -> Response {
    answer(&s, |w| w.list_machines(&app))
}

async fn create_machine(State(s): State<Arc<Shared>>, Path(app): Path<String>, body: Bytes) -> Response {
    mutate(&s, |w| w.create_machine(&app, &parse_body(&body)?))
}

async fn get_machine(State(s): State<Arc<Shared>>, Path((app, id)): Path<(String, String)>) -> Response {
    answer(&s, |w| w.get_machine(&app, &id))
}

async fn delete_machine(
    State(s): State<Arc<Shared>>,
    Path((app, id)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let force = query.get("force").is_some_and(|v| v == "true" || v == "1");
    mutate(&s, |w| w.destroy_machine(&app, &id, force))
}

async fn cordon_machine(State(s): State<Arc<Shared>>, Path((app, id)): Path<(String, String)>) -> Response {
    mutate(&s, |w| w.cordon(&app, &id))
}

async fn stop_machine(State(s): State<Arc<Shared>>, Path((app, id)): Path<(String, String)>) -> Response {
    mutate(&s, |w| w.stop(&app, &id))
}

async fn wait_machine(
    State(s): State<Arc<Shared>>,
    Path((app, id)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let target = query.get("state").map_or("started", String::as_str).to_string();
    if !matches!(target.as_str(), "started" | "stopped" | "suspended" | "destroyed") {
        return ApiError::invalid(format!("state {target:?} must be one of started, stopped, suspended, destroyed"))
            .into_response();
    }
    let secs = match query.get("timeout").map(|t| t.parse::<u64>()) {
        None => MAX_WAIT_SECS,
        Some(Ok(secs)) => secs.min(MAX_WAIT_SECS),
        Some(Err(_)) => return ApiError::invalid("timeout must be a whole number of seconds").into_response(),
    };
    // Subscribed before the first look, so no change between a look and the wait is missed.
    let mut changes = s.changes.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let checked = s.world().wait_check(&app, &id, &target);
        match checked {
            Err(e) => return e.into_response(),
            Ok((reached, moved)) => {
                if moved {
                    s.changed();
                }
                if reached {
                    return json_response(StatusCode::OK, json!({ "ok": true }));
                }
            }
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("deadline_exceeded: machine {id} did not reach state {target} within {secs}s"),
                )
                .into_response();
            }
        }
    }
}

async fn list_volumes(State(s): State<Arc<Shared>>, Path(app): Path<String>) -> Response {
    read(&s, |w| w.list_volumes(&app))
}

async fn create_volume(State(s): State<Arc<Shared>>, Path(app): Path<String>, body: Bytes) -> Response {
    mutate(&s, |w| w.create_volume(&app, &parse_body(&body)?))
}

async fn get_volume(State(s): State<Arc<Shared>>, Path((app, id)): Path<(String, String)>) -> Response {
    read(&s, |w| w.get_volume(&app, &id))
}

async fn delete_volume(State(s): State<Arc<Shared>>, Path((app, id)): Path<(String, String)>) -> Response {
    mutate(&s, |w| w.delete_volume(&app, &id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_count_seconds_from_the_origin() {
        assert_eq!(timestamp(0), "2026-01-01T09:00:00Z");
        assert_eq!(timestamp(61), "2026-01-01T09:01:01Z");
        assert_eq!(timestamp(15 * 3600), "2026-01-02T00:00:00Z");
        assert_eq!(timestamp(59 * 86_400), "2026-03-01T09:00:00Z");
    }

    #[test]
    fn image_refs_split_registry_repository_and_tag() {
        let r = image_ref("registry.fly.io/af-worker:v1");
        assert_eq!(
            (r["registry"].as_str(), r["repository"].as_str(), r["tag"].as_str()),
            (Some("registry.fly.io"), Some("af-worker"), Some("v1"))
        );
        let r = image_ref("library/nginx");
        assert_eq!(
            (r["registry"].as_str(), r["repository"].as_str(), r["tag"].as_str()),
            (Some("docker-hub-mirror.fly.io"), Some("library/nginx"), Some("latest"))
        );
        let r = image_ref("localhost:5000/w@sha256:ab");
        assert_eq!(
            (r["registry"].as_str(), r["repository"].as_str(), r["digest"].as_str()),
            (Some("localhost:5000"), Some("w"), Some("sha256:ab"))
        );
    }

    #[test]
    fn machines_step_along_their_transitions() {
        assert_eq!(next_state("created"), Some("starting"));
        assert_eq!(next_state("starting"), Some("started"));
        assert_eq!(next_state("stopping"), Some("stopped"));
        for resting in ["started", "stopped", "failed", "suspended", "destroyed"] {
            assert_eq!(next_state(resting), None);
        }
    }
}
