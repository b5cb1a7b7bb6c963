//! The provider abstraction: where worker machines run. One trait, three implementations —
//! [`fly`] (the Fly Machines REST API), [`local`] (child processes on this machine, a directory
//! per worker as its volume) and, for tests and development only, the fake Fly server in
//! `tests/src/fake_fly.rs` that the `fly` provider talks to.
//!
//! Methods return boxed futures so the scheduler can hold a `dyn Provider` chosen from stored
//! runtime configuration at run time; [`resolve`] makes that choice, for the scheduler and for
//! cleanup alike. This is a library crate, not a service: services depend on it (and on
//! `common`), never on each other.

pub mod fly;
pub mod local;
pub mod resolve;

pub use resolve::{
    LOCAL_APP, ResolvedProvider, ValidProviderConfig, active_secret, local_provider, resolve_provider,
    validate_provider_config,
};

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// What a provider reports about a machine, mapped to the two states the scheduler reasons
/// about (spec §3.16): transient start-up states count as `Active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineStatus {
    Active,
    Stopped,
}

/// Fly machine states that map to `Active` (spec §3.16); every other state is `Stopped`.
pub const ACTIVE_STATES: [&str; 7] =
    ["creating", "created", "starting", "started", "restarting", "updating", "replacing"];

pub fn status_of(raw_state: &str) -> MachineStatus {
    if ACTIVE_STATES.contains(&raw_state) { MachineStatus::Active } else { MachineStatus::Stopped }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// The machine's name, which is the workerId for machines the scheduler spawned.
    pub worker_id: String,
    pub machine_id: String,
    pub region: Option<String>,
    pub image: Option<String>,
    pub status: MachineStatus,
    /// The provider's own state string (`started`, `stopped`, …).
    pub raw_state: String,
    /// Volume ids mounted by the machine (when the listing carries them).
    pub volume_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub region: Option<String>,
    pub attached_machine_id: Option<String>,
}

/// The guest size of a spawned machine (spec §3.16: shared, 1 CPU, 2048 MB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub cpu_kind: String,
    pub cpus: u32,
    pub memory_mb: u32,
}

impl Default for Guest {
    fn default() -> Self {
        Self { cpu_kind: "shared".to_string(), cpus: 1, memory_mb: 2048 }
    }
}

/// Everything needed to start one worker machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnSpec {
    pub worker_id: String,
    pub image: String,
    pub region: String,
    pub guest: Guest,
    pub volume_id: String,
    pub volume_path: String,
    /// The worker's environment; the provider adds `AGENT_FACTORY_WORKER_ID` underneath
    /// (keys given here win, spec §2.4).
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The app, machine or volume does not exist. Only a definite answer from the provider
    /// counts (a 404, or its "not found" message) — never a 5xx (spec §6.3 L8).
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation cannot run in the resource's current state (e.g. destroy before stopped);
    /// retry later.
    #[error("precondition failed: {0}")]
    Precondition(String),
    /// 429, 5xx, timeouts and network errors that persisted through the bounded retries. The
    /// resource's state is unknown: it may still exist.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// Anything else (bad request, auth); the message is the provider's.
    #[error("{0}")]
    Other(String),
}

impl ProviderError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound(_))
    }
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// A place where worker machines run. `app` scopes everything (a Fly app; a namespace for the
/// local provider).
pub trait Provider: Send + Sync {
    /// `"fly"`, `"local"`.
    fn kind(&self) -> &'static str;
    /// The app exists and the credentials work.
    fn check_app<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<()>>;
    fn list_machines<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<Vec<Machine>>>;
    /// One machine, `None` when it does not exist.
    fn get_machine<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<Option<Machine>>>;
    fn spawn<'a>(&'a self, app: &'a str, spec: &'a SpawnSpec) -> BoxFuture<'a, ProviderResult<Machine>>;
    /// Stops routing to the machine (no-op where the provider has no such notion).
    fn cordon<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>>;
    fn stop<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>>;
    /// Waits until the machine reaches `state` (e.g. `"stopped"`), at most `timeout`.
    fn wait_for_state<'a>(
        &'a self,
        app: &'a str,
        machine_id: &'a str,
        state: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, ProviderResult<()>>;
    /// Destroys a machine; an absent machine is `Ok` (already gone).
    fn destroy<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>>;
    fn list_volumes<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<Vec<Volume>>>;
    fn create_volume<'a>(
        &'a self,
        app: &'a str,
        name: &'a str,
        region: &'a str,
        size_gb: u32,
    ) -> BoxFuture<'a, ProviderResult<Volume>>;
    /// Deletes a volume; an absent volume is `Ok`.
    fn delete_volume<'a>(&'a self, app: &'a str, volume_id: &'a str) -> BoxFuture<'a, ProviderResult<()>>;
}

/// The dedicated volume name of a worker (spec §3.16 `buildDedicatedVolumeName`).
pub fn dedicated_volume_name(prefix: &str, worker_id: &str) -> String {
    fn sanitize(s: &str) -> String {
        let mapped: String = s
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' })
            .collect();
        let mut out = String::with_capacity(mapped.len());
        for c in mapped.chars() {
            if !(c == '_' && out.ends_with('_')) {
                out.push(c);
            }
        }
        out.trim_matches('_').to_string()
    }
    let p = Some(sanitize(prefix)).filter(|p| !p.is_empty()).unwrap_or_else(|| "openclaw".to_string());
    let w = Some(sanitize(worker_id)).filter(|w| !w.is_empty()).unwrap_or_else(|| "worker".to_string());
    let hash = w.encode_utf16().fold(2_166_136_261u32, |h, unit| (h ^ u32::from(unit)).wrapping_mul(16_777_619));
    let h: String = base36(hash).chars().take(8).collect();
    let keep = 30usize.saturating_sub(1 + h.len()).max(1);
    let head: String = p.chars().take(keep).collect();
    format!("{head}_{h}")
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".to_string();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Finds the worker's dedicated volume in `region`, or creates it (spec §3.16
/// `ensureWorkerVolume`).
pub async fn ensure_worker_volume(
    provider: &dyn Provider,
    app: &str,
    worker_id: &str,
    region: &str,
    volume_name_prefix: &str,
    size_gb: u32,
) -> ProviderResult<Volume> {
    let name = dedicated_volume_name(volume_name_prefix, worker_id);
    let existing = provider.list_volumes(app).await?;
    if let Some(v) = existing.into_iter().find(|v| v.name == name && v.region.as_deref().is_none_or(|r| r == region)) {
        return Ok(v);
    }
    provider.create_volume(app, &name, region, size_gb).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedicated_volume_names_match_the_spec_vectors() {
        assert_eq!(dedicated_volume_name("openclaw_data", "afw-1767258000000-0"), "openclaw_data_i59fdp");
        assert_eq!(dedicated_volume_name("openclaw_data_test", "worker-cleanup-1"), "openclaw_data_test_5m6kc0");
        assert!(dedicated_volume_name("", "").starts_with("openclaw_"));
        assert!(dedicated_volume_name(&"x".repeat(80), "w").len() <= 30);
    }

    #[test]
    fn transient_states_are_active() {
        assert_eq!(status_of("creating"), MachineStatus::Active);
        assert_eq!(status_of("started"), MachineStatus::Active);
        assert_eq!(status_of("stopped"), MachineStatus::Stopped);
        assert_eq!(status_of("launch_failed"), MachineStatus::Stopped);
        assert_eq!(status_of("anything-new"), MachineStatus::Stopped);
    }
}
