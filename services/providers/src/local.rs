//! The local provider: worker "machines" are child processes of the scheduler on this machine,
//! and a worker's "volume" is a directory. It runs the one-machine stack with the same env
//! contract as a Fly machine, so the reference worker cannot tell the difference.
//!
//! Layout under the provider's root, per app (a namespace here):
//!
//! ```text
//! <root>/<app>/volumes/<volume id>.json   volume record {id, name, region, sizeGb, createdAt}
//! <root>/<app>/volumes/<volume id>/       the volume: the worker's data dir (+ worker.log)
//! <root>/<app>/machines/<machine id>.json machine record {id, name, pid, state, volumeId, …}
//! ```
//!
//! Records are plain files written atomically (temporary file + rename), so a scheduler that
//! restarts re-lists what it started: the state of a machine is derived on every read from the
//! record and the process (`kill(pid, 0)`, and on Linux `/proc/<pid>` must name the worker
//! binary and not be a zombie, so a recycled pid is not mistaken for a worker). Workers are
//! started in their own process group and survive a scheduler restart; stop and destroy signal
//! the whole group (the worker and anything it started). Children started by this process are
//! awaited by a task each, so an exited worker never lingers as a zombie.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::clock::Clock;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Machine, Provider, ProviderError, ProviderResult, SpawnSpec, Volume, status_of};

const STARTED: &str = "started";
const STOPPING: &str = "stopping";
const STOPPED: &str = "stopped";
const DESTROYED: &str = "destroyed";

/// How long a SIGKILLed worker may take to disappear before we report it as stuck.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Variables of the scheduler's own environment a worker inherits. Everything else — the
/// scheduler's `AF_*` configuration and its tokens in particular — stays out, as on a Fly
/// machine, which sees only the env of its spawn spec.
const INHERITED_ENV: [&str; 7] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "RUST_BACKTRACE"];

/// The worker's log, in its volume directory (outside the snapshotted `.clawdbot` and
/// `workspace`).
pub const WORKER_LOG: &str = "worker.log";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MachineRecord {
    id: String,
    /// The workerId.
    name: String,
    pid: u32,
    /// `started`, `stopping` or `stopped` as last written; the observed state also depends on
    /// whether the process is alive.
    state: String,
    volume_id: String,
    region: String,
    /// The image of the spawn spec, kept for listings (the local provider always runs its
    /// worker binary).
    image: String,
    created_at: i64,
    #[serde(default)]
    cordoned: bool,
    /// The program that was started, so a re-listing scheduler recognises the process.
    binary: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeRecord {
    id: String,
    name: String,
    region: String,
    size_gb: u32,
    created_at: i64,
}

/// A child this process started; `exited` is set by the task that waits for it.
#[derive(Debug, Clone, Copy)]
struct ChildState {
    pid: u32,
    exited: bool,
}

/// Worker processes on this machine (see the module docs).
pub struct LocalProvider {
    root: PathBuf,
    worker_binary: PathBuf,
    clock: Clock,
    children: Arc<Mutex<HashMap<String, ChildState>>>,
    /// Serialises read-modify-write sequences on records within this process.
    records: tokio::sync::Mutex<()>,
}

impl LocalProvider {
    /// A provider keeping its records and volumes under `root` and starting `worker_binary`.
    /// Relative paths are made absolute now, so a worker's env never depends on a working
    /// directory.
    pub fn new(root: PathBuf, worker_binary: PathBuf) -> Self {
        let root = std::path::absolute(&root).unwrap_or(root);
        let worker_binary = std::path::absolute(&worker_binary).unwrap_or(worker_binary);
        Self {
            root,
            worker_binary,
            clock: Clock::system(),
            children: Arc::new(Mutex::new(HashMap::new())),
            records: tokio::sync::Mutex::new(()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory that is volume `volume_id` of `app` (the worker's data dir).
    pub fn volume_dir(&self, app: &str, volume_id: &str) -> PathBuf {
        self.root.join(app).join("volumes").join(volume_id)
    }

    fn app_dir(&self, app: &str) -> ProviderResult<PathBuf> {
        if !is_safe_name(app) {
            return Err(ProviderError::Other(format!(
                "invalid app name '{app}': use letters, digits, '-' and '_' (it names a directory)"
            )));
        }
        Ok(self.root.join(app))
    }

    fn machines_dir(&self, app: &str) -> ProviderResult<PathBuf> {
        Ok(self.app_dir(app)?.join("machines"))
    }

    fn volumes_dir(&self, app: &str) -> ProviderResult<PathBuf> {
        Ok(self.app_dir(app)?.join("volumes"))
    }

    fn children(&self) -> MutexGuard<'_, HashMap<String, ChildState>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and flag flips), so a poisoned lock is still usable.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn read_machine(&self, app: &str, machine_id: &str) -> ProviderResult<Option<MachineRecord>> {
        if !is_safe_name(machine_id) {
            return Ok(None);
        }
        read_json(&self.machines_dir(app)?.join(format!("{machine_id}.json"))).await
    }

    async fn write_machine(&self, app: &str, record: &MachineRecord) -> ProviderResult<()> {
        write_json(&self.machines_dir(app)?.join(format!("{}.json", record.id)), record).await
    }

    async fn read_machines(&self, app: &str) -> ProviderResult<Vec<MachineRecord>> {
        read_all_json(&self.machines_dir(app)?).await
    }

    async fn read_volume(&self, app: &str, volume_id: &str) -> ProviderResult<Option<VolumeRecord>> {
        if !is_safe_name(volume_id) {
            return Ok(None);
        }
        read_json(&self.volumes_dir(app)?.join(format!("{volume_id}.json"))).await
    }

    /// Whether the machine's worker process is running. For our own children the waiting task
    /// knows; for processes of an earlier scheduler run the OS is asked.
    fn is_alive(&self, record: &MachineRecord) -> bool {
        if let Some(child) = self.children().get(&record.id).copied()
            && child.pid == record.pid
        {
            return !child.exited;
        }
        foreign_process_alive(record.pid, &record.binary)
    }

    /// The state a listing reports: a record says what we asked for, the process says whether
    /// it still runs.
    fn observed_state(&self, record: &MachineRecord) -> &'static str {
        if record.state == STOPPED || !self.is_alive(record) {
            STOPPED
        } else if record.state == STOPPING {
            STOPPING
        } else {
            STARTED
        }
    }

    fn machine_view(&self, record: &MachineRecord) -> Machine {
        let state = self.observed_state(record);
        Machine {
            worker_id: record.name.clone(),
            machine_id: record.id.clone(),
            region: Some(record.region.clone()),
            image: Some(record.image.clone()),
            status: status_of(state),
            raw_state: state.to_string(),
            volume_ids: vec![record.volume_id.clone()],
        }
    }

    /// Sends `signal` to the worker's process group, but only while the worker itself is
    /// verified alive: once it is gone its group id may be reused by unrelated processes.
    fn signal_group(&self, record: &MachineRecord, signal: libc::c_int) -> ProviderResult<()> {
        if !self.is_alive(record) {
            return Ok(());
        }
        let Ok(pgid) = i32::try_from(record.pid) else {
            return Ok(());
        };
        match kill(-pgid, signal) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => {
                Err(ProviderError::Other(format!("signalling machine '{}' (process group {pgid}): {e}", record.id)))
            }
        }
    }

    /// Waits up to `limit` for the worker process to be gone: the kernel says when (a pidfd
    /// turns readable at exit), so there is no polling.
    async fn wait_dead(&self, record: &MachineRecord, limit: Duration) -> bool {
        if !self.is_alive(record) {
            return true;
        }
        match process_exit(record.pid, limit).await {
            Ok(true) => {
                // The kernel saw it exit; the task reaping our child may not have run yet.
                if let Some(child) = self.children().get_mut(&record.id).filter(|c| c.pid == record.pid) {
                    child.exited = true;
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(pid = record.pid, error = %e, "cannot watch the worker process (Linux >= 5.3 has pidfd)");
                !self.is_alive(record)
            }
        }
    }

    /// Records `stopped` for a machine seen dead, so a later recycled pid cannot revive it.
    async fn persist_stopped(&self, app: &str, machine_id: &str) -> ProviderResult<()> {
        let _guard = self.records.lock().await;
        if let Some(mut record) = self.read_machine(app, machine_id).await?
            && record.state != STOPPED
            && !self.is_alive(&record)
        {
            record.state = STOPPED.to_string();
            self.write_machine(app, &record).await?;
        }
        Ok(())
    }

    async fn do_check_app(&self, app: &str) -> ProviderResult<()> {
        for dir in [self.machines_dir(app)?, self.volumes_dir(app)?] {
            tokio::fs::create_dir_all(&dir).await.map_err(|e| io_error("creating", &dir, e))?;
        }
        Ok(())
    }

    async fn do_spawn(&self, app: &str, spec: &SpawnSpec) -> ProviderResult<Machine> {
        if self.read_volume(app, &spec.volume_id).await?.is_none() {
            return Err(ProviderError::NotFound(format!("volume '{}' not found in app '{app}'", spec.volume_id)));
        }
        if !self.worker_binary.is_file() {
            return Err(ProviderError::Other(format!(
                "worker binary '{}' does not exist (set providers.worker_binary)",
                self.worker_binary.display()
            )));
        }
        let _guard = self.records.lock().await;
        if let Some(user) =
            self.read_machines(app).await?.into_iter().find(|m| m.volume_id == spec.volume_id && self.is_alive(m))
        {
            return Err(ProviderError::Precondition(format!(
                "volume '{}' is in use by running machine '{}'",
                spec.volume_id, user.id
            )));
        }
        self.do_check_app(app).await?;
        let volume_dir = self.volume_dir(app, &spec.volume_id);
        tokio::fs::create_dir_all(&volume_dir).await.map_err(|e| io_error("creating", &volume_dir, e))?;
        let log_path = volume_dir.join(WORKER_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_error("opening", &log_path, e))?;
        let log_err = log.try_clone().map_err(|e| io_error("opening", &log_path, e))?;

        let machine_id = new_id(14);
        let mut command = tokio::process::Command::new(&self.worker_binary);
        command
            .env_clear()
            .envs(worker_env(spec, &volume_dir, std::env::vars()))
            .current_dir(&volume_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Its own group: stop and destroy reach everything the worker started, and a
            // Ctrl-C aimed at the scheduler's terminal does not hit the workers.
            .process_group(0)
            // Workers outlive a scheduler restart; destroy is explicit.
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|e| {
            ProviderError::Other(format!("starting worker binary '{}': {e}", self.worker_binary.display()))
        })?;
        let Some(pid) = child.id() else {
            return Err(ProviderError::Other("the worker exited before its pid was known".to_string()));
        };
        self.children().insert(machine_id.clone(), ChildState { pid, exited: false });
        let children = self.children.clone();
        let waited_id = machine_id.clone();
        // Reaps the child as soon as it exits (no zombies), and tells `is_alive`.
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(machine_id = %waited_id, pid, status = ?status, "local worker exited");
            if let Some(state) = children.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&waited_id) {
                state.exited = true;
            }
        });

        let record = MachineRecord {
            id: machine_id.clone(),
            name: spec.worker_id.clone(),
            pid,
            state: STARTED.to_string(),
            volume_id: spec.volume_id.clone(),
            region: spec.region.clone(),
            image: spec.image.clone(),
            created_at: self.clock.now_ms(),
            cordoned: false,
            binary: self.worker_binary.clone(),
        };
        if let Err(e) = self.write_machine(app, &record).await {
            // A process nobody can find again would leak: take it down.
            let _ = self.signal_group(&record, libc::SIGKILL);
            return Err(e);
        }
        tracing::info!(app, machine_id = %machine_id, worker_id = %spec.worker_id, pid, "local worker started");
        Ok(self.machine_view(&record))
    }

    async fn do_cordon(&self, app: &str, machine_id: &str) -> ProviderResult<()> {
        let _guard = self.records.lock().await;
        let mut record = self.read_machine(app, machine_id).await?.ok_or_else(|| machine_not_found(app, machine_id))?;
        if !record.cordoned {
            // Nothing routes to a local worker; the flag only records the request.
            record.cordoned = true;
            self.write_machine(app, &record).await?;
        }
        Ok(())
    }

    async fn do_stop(&self, app: &str, machine_id: &str) -> ProviderResult<()> {
        let _guard = self.records.lock().await;
        let mut record = self.read_machine(app, machine_id).await?.ok_or_else(|| machine_not_found(app, machine_id))?;
        if self.is_alive(&record) {
            self.signal_group(&record, libc::SIGTERM)?;
            record.state = STOPPING.to_string();
        } else {
            record.state = STOPPED.to_string();
        }
        self.write_machine(app, &record).await
    }

    async fn do_wait_for_state(
        &self,
        app: &str,
        machine_id: &str,
        state: &str,
        timeout: Duration,
    ) -> ProviderResult<()> {
        let record = self.read_machine(app, machine_id).await?;
        let current = record.as_ref().map_or(DESTROYED, |r| self.observed_state(r));
        if current == state {
            if state == STOPPED {
                self.persist_stopped(app, machine_id).await?;
            }
            return Ok(());
        }
        let Some(record) = record else {
            return Err(machine_not_found(app, machine_id));
        };
        let unreachable = || {
            ProviderError::Unavailable(format!(
                "machine '{machine_id}' did not reach state '{state}' within {} ms (it is '{current}')",
                timeout.as_millis()
            ))
        };
        // A local machine changes state by itself only by exiting; any other state it could
        // reach only through another call, so there is nothing to wait for.
        if state != STOPPED {
            return Err(unreachable());
        }
        if !self.wait_dead(&record, timeout).await {
            // The worker ignored SIGTERM for the whole grace period: force it.
            tracing::warn!(app, machine_id, pid = record.pid, "worker did not stop in time; sending SIGKILL");
            self.signal_group(&record, libc::SIGKILL)?;
            if !self.wait_dead(&record, KILL_GRACE).await {
                return Err(unreachable());
            }
        }
        self.persist_stopped(app, machine_id).await
    }

    async fn do_destroy(&self, app: &str, machine_id: &str) -> ProviderResult<()> {
        let Some(record) = self.read_machine(app, machine_id).await? else {
            return Ok(());
        };
        if self.is_alive(&record) {
            self.signal_group(&record, libc::SIGKILL)?;
            if !self.wait_dead(&record, KILL_GRACE).await {
                return Err(ProviderError::Unavailable(format!(
                    "machine '{machine_id}' (pid {}) is still running after SIGKILL",
                    record.pid
                )));
            }
        }
        let _guard = self.records.lock().await;
        let path = self.machines_dir(app)?.join(format!("{machine_id}.json"));
        remove_file_if_exists(&path).await?;
        self.children().remove(machine_id);
        tracing::info!(app, machine_id, "local machine destroyed");
        Ok(())
    }

    async fn do_list_volumes(&self, app: &str) -> ProviderResult<Vec<Volume>> {
        let volumes: Vec<VolumeRecord> = read_all_json(&self.volumes_dir(app)?).await?;
        let machines = self.read_machines(app).await?;
        Ok(volumes
            .into_iter()
            .map(|v| Volume {
                attached_machine_id: machines.iter().find(|m| m.volume_id == v.id).map(|m| m.id.clone()),
                id: v.id,
                name: v.name,
                region: Some(v.region),
            })
            .collect())
    }

    async fn do_create_volume(&self, app: &str, name: &str, region: &str, size_gb: u32) -> ProviderResult<Volume> {
        self.do_check_app(app).await?;
        let record = VolumeRecord {
            id: format!("vol_{}", new_id(16)),
            name: name.to_string(),
            region: region.to_string(),
            size_gb,
            created_at: self.clock.now_ms(),
        };
        // The record first: a crash between the two steps leaves a listed volume (which delete
        // cleans up), never an unlisted directory nobody would remove.
        write_json(&self.volumes_dir(app)?.join(format!("{}.json", record.id)), &record).await?;
        let dir = self.volume_dir(app, &record.id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_error("creating", &dir, e))?;
        Ok(Volume { id: record.id, name: record.name, region: Some(record.region), attached_machine_id: None })
    }

    async fn do_delete_volume(&self, app: &str, volume_id: &str) -> ProviderResult<()> {
        if !is_safe_name(volume_id) {
            return Ok(());
        }
        let _guard = self.records.lock().await;
        if let Some(user) =
            self.read_machines(app).await?.into_iter().find(|m| m.volume_id == volume_id && self.is_alive(m))
        {
            return Err(ProviderError::Precondition(format!(
                "volume '{volume_id}' is in use by running machine '{}' (pid {}); stop it first",
                user.id, user.pid
            )));
        }
        let dir = self.volume_dir(app, volume_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("removing", &dir, e)),
        }
        remove_file_if_exists(&self.volumes_dir(app)?.join(format!("{volume_id}.json"))).await
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn check_app<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.do_check_app(app))
    }

    fn list_machines<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<Vec<Machine>>> {
        Box::pin(async move {
            let records = self.read_machines(app).await?;
            Ok(records.iter().map(|r| self.machine_view(r)).collect())
        })
    }

    fn get_machine<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<Option<Machine>>> {
        Box::pin(async move { Ok(self.read_machine(app, machine_id).await?.map(|r| self.machine_view(&r))) })
    }

    fn spawn<'a>(&'a self, app: &'a str, spec: &'a SpawnSpec) -> BoxFuture<'a, ProviderResult<Machine>> {
        Box::pin(self.do_spawn(app, spec))
    }

    fn cordon<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.do_cordon(app, machine_id))
    }

    fn stop<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.do_stop(app, machine_id))
    }

    fn wait_for_state<'a>(
        &'a self,
        app: &'a str,
        machine_id: &'a str,
        state: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.do_wait_for_state(app, machine_id, state, timeout))
    }

    fn destroy<'a>(&'a self, app: &'a str, machine_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.do_destroy(app, machine_id))
    }

    fn list_volumes<'a>(&'a self, app: &'a str) -> BoxFuture<'a, ProviderResult<Vec<Volume>>> {
        Box::pin(self.do_list_volumes(app))
    }

    fn create_volume<'a>(
        &'a self,
        app: &'a str,
        name: &'a str,
        region: &'a str,
        size_gb: u32,
    ) -> BoxFuture<'a, ProviderResult<Volume>> {
        Box::pin(self.do_create_volume(app, name, region, size_gb))
    }

    fn delete_volume<'a>(&'a self, app: &'a str, volume_id: &'a str) -> BoxFuture<'a, ProviderResult<()>> {
        Box::pin(self.do_delete_volume(app, volume_id))
    }
}

/// The worker's environment: a few inherited basics, `AGENT_FACTORY_WORKER_ID` and the data
/// directory layout underneath, then the spec's env on top (spec §2.4: the scheduler's keys
/// win). Values naming the machine's mount point (`spec.volume_path`, e.g. `/data/workspace`)
/// are rewritten to the volume directory, so the Fly env contract works unchanged.
fn worker_env(
    spec: &SpawnSpec,
    volume_dir: &Path,
    inherited: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = inherited.filter(|(k, _)| INHERITED_ENV.contains(&k.as_str())).collect();
    let data_dir = volume_dir.to_string_lossy().into_owned();
    env.insert("AGENT_FACTORY_WORKER_ID".to_string(), spec.worker_id.clone());
    env.insert("OPENCLAW_DATA_DIR".to_string(), data_dir.clone());
    env.insert("OPENCLAW_STATE_DIR".to_string(), format!("{data_dir}/.clawdbot"));
    env.insert("OPENCLAW_WORKSPACE_DIR".to_string(), format!("{data_dir}/workspace"));
    for (key, value) in &spec.env {
        env.insert(key.clone(), rewrite_mount_path(value, &spec.volume_path, &data_dir));
    }
    env
}

/// `/data` → `<dir>`, `/data/x` → `<dir>/x`; `/database` and other values are kept.
fn rewrite_mount_path(value: &str, mount: &str, dir: &str) -> String {
    let mount = mount.trim_end_matches('/');
    if mount.is_empty() {
        // A mount at `/` would match every absolute path: leave values alone.
        return value.to_string();
    }
    match value.strip_prefix(mount) {
        Some("") => dir.to_string(),
        Some(rest) if rest.starts_with('/') => format!("{dir}{rest}"),
        _ => value.to_string(),
    }
}

/// Names that are safe as one path component: non-empty, `[A-Za-z0-9_-]` and dots (not `.`/`..`).
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// `len` lowercase hex characters of a random UUID.
fn new_id(len: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string().chars().take(len).collect()
}

fn machine_not_found(app: &str, machine_id: &str) -> ProviderError {
    ProviderError::NotFound(format!("machine '{machine_id}' not found in app '{app}'"))
}

fn io_error(action: &str, path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Other(format!("{action} {}: {e}", path.display()))
}

async fn read_json<T: DeserializeOwned>(path: &Path) -> ProviderResult<Option<T>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ProviderError::Other(format!("corrupt record {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path, e)),
    }
}

/// Every `*.json` record in `dir` (none when `dir` does not exist); a corrupt one is skipped
/// with a warning rather than hiding every other record.
async fn read_all_json<T: DeserializeOwned>(dir: &Path) -> ProviderResult<Vec<T>> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("listing", dir, e)),
    };
    let mut paths = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(|e| io_error("listing", dir, e))? {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        match read_json(&path).await {
            Ok(Some(record)) => out.push(record),
            Ok(None) => {} // Removed since it was listed.
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable local provider record"),
        }
    }
    Ok(out)
}

/// Writes through a temporary file and a rename, so a reader never sees half a record.
async fn write_json<T: Serialize>(path: &Path, value: &T) -> ProviderResult<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ProviderError::Other(format!("encoding record: {e}")))?;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|e| io_error("creating", parent, e))?;
    }
    let tmp = path.with_extension(format!("json.tmp-{}", new_id(8)));
    tokio::fs::write(&tmp, &bytes).await.map_err(|e| io_error("writing", &tmp, e))?;
    if let Err(e) = tokio::fs::rename(&tmp, path).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io_error("writing", path, e));
    }
    Ok(())
}

async fn remove_file_if_exists(path: &Path) -> ProviderResult<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("removing", path, e)),
    }
}

/// Sends `signal` to `pid` (a negative pid addresses a process group); signal 0 only probes.
#[allow(unsafe_code)]
fn kill(pid: i32, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Waits up to `limit` for process `pid` to exit; `Ok(true)` once it has (or was already gone).
/// A pidfd becomes readable when its process terminates, so this is an event, not a poll.
async fn process_exit(pid: u32, limit: Duration) -> std::io::Result<bool> {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(true),
        Err(e) => return Err(e),
    };
    let fd = watch_readable(fd)?;
    Ok(tokio::time::timeout(limit, fd.readable()).await.is_ok())
}

#[allow(unsafe_code)]
fn watch_readable(fd: std::os::fd::OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open and refers to the
    // same pidfd until the AsyncFd is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

#[allow(unsafe_code)]
fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Whether `pid` is a live (non-zombie) process running `binary`, for processes this scheduler
/// process did not start itself (it restarted since). Without `/proc` the existence probe alone
/// decides.
fn foreign_process_alive(pid: u32, binary: &Path) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // pid 0 and negative values would address process groups, not one process.
    if pid <= 0 || kill(pid, 0).is_err() {
        // ESRCH: gone. EPERM: exists but belongs to another user, so it is not our worker.
        return false;
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !Path::new("/proc/self").exists() {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // `pid (comm) S …`: the state follows the last ')' (comm may itself contain parentheses).
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    if matches!(rest.trim_start().chars().next(), Some('Z' | 'X' | 'x') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    if cmdline.is_empty() {
        // A process still inside execve(2) (as a worker is for a moment after spawn returns)
        // has no arguments yet, but the kernel has already named it after the new program.
        let comm = head.split_once('(').map_or("", |(_, comm)| comm);
        return comm_names(comm, binary);
    }
    // A script started through its shebang shows as `<interpreter> <script>`, so the binary may
    // be the first or the second argument.
    let binary = binary.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).take(2).any(|arg| arg == binary)
}

/// Whether a process name (`comm`: the program's file name, cut to 15 bytes) is `binary`'s.
fn comm_names(comm: &str, binary: &Path) -> bool {
    const TASK_COMM_LEN: usize = 15;
    let Some(name) = binary.file_name() else {
        return false;
    };
    let name = name.as_encoded_bytes();
    !comm.is_empty() && comm.as_bytes() == &name[..name.len().min(TASK_COMM_LEN)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineStatus;

    const APP: &str = "test-app";

    /// A worker stand-in: writes its env into its data dir, says so through the `ready` FIFO
    /// (when the test made one), and exits 0 on SIGTERM.
    const POLITE_WORKER: &str = "#!/bin/sh\ntrap 'exit 0' TERM\nenv > \"$OPENCLAW_DATA_DIR/env.txt\"\n\
                                 echo up > \"$OPENCLAW_DATA_DIR/ready\"\ntail -f /dev/null & wait $!\n";
    /// One that ignores SIGTERM.
    const STUBBORN_WORKER: &str =
        "#!/bin/sh\ntrap '' TERM\necho up > \"$OPENCLAW_DATA_DIR/ready\"\nexec tail -f /dev/null\n";

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn spec(worker_id: &str, volume_id: &str) -> SpawnSpec {
        SpawnSpec {
            worker_id: worker_id.to_string(),
            image: "local".to_string(),
            region: "local".to_string(),
            guest: Default::default(),
            volume_id: volume_id.to_string(),
            volume_path: "/data".to_string(),
            env: BTreeMap::from([
                ("WORKER_ID".to_string(), worker_id.to_string()),
                ("OPENCLAW_STATE_DIR".to_string(), "/data/.clawdbot".to_string()),
                ("OPENCLAW_SKILLS_DIR".to_string(), "/data/workspace/skills".to_string()),
                ("DATABASE".to_string(), "/database".to_string()),
                ("AGENT_FACTORY_WORKER_ID".to_string(), "from-spec".to_string()),
            ]),
        }
    }

    /// A FIFO `ready` in the volume directory: the worker's `echo up` blocks until the test
    /// reads it, so the test waits for exactly that moment.
    fn ready_fifo(p: &LocalProvider, volume_id: &str) -> PathBuf {
        let fifo = p.volume_dir(APP, volume_id).join("ready");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        fifo
    }

    /// Returns once the worker has written to its `ready` FIFO.
    async fn ready(fifo: PathBuf) {
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo));
        let text = tokio::time::timeout(Duration::from_secs(10), read).await.expect("worker ready").unwrap().unwrap();
        assert_eq!(text.trim(), "up");
    }

    async fn only_machine(p: &LocalProvider) -> Machine {
        let machines = p.list_machines(APP).await.unwrap();
        assert_eq!(machines.len(), 1, "{machines:?}");
        machines.into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn local_spawn_list_stop_wait_destroy() {
        let tmp = tempfile::tempdir().unwrap();
        let binary = script(tmp.path(), "worker.sh", POLITE_WORKER);
        let p = LocalProvider::new(tmp.path().join("root"), binary.clone());
        assert_eq!(p.kind(), "local");
        p.check_app(APP).await.unwrap();
        assert!(p.list_machines(APP).await.unwrap().is_empty());
        let volume = p.create_volume(APP, "openclaw_data_abc", "local", 1).await.unwrap();
        let fifo = ready_fifo(&p, &volume.id);
        let machine = p.spawn(APP, &spec("w-1", &volume.id)).await.unwrap();
        assert_eq!((machine.worker_id.as_str(), machine.status), ("w-1", MachineStatus::Active));
        assert_eq!(machine.volume_ids, vec![volume.id.clone()]);

        // The env contract: spec keys win, mount paths point into the volume directory.
        let dir = p.volume_dir(APP, &volume.id);
        let env_file = dir.join("env.txt");
        ready(fifo).await; // The script wrote its env before it signalled.
        let env = std::fs::read_to_string(&env_file).unwrap();
        let d = dir.display();
        for line in [
            format!("OPENCLAW_DATA_DIR={d}"),
            format!("OPENCLAW_STATE_DIR={d}/.clawdbot"),
            format!("OPENCLAW_WORKSPACE_DIR={d}/workspace"),
            format!("OPENCLAW_SKILLS_DIR={d}/workspace/skills"),
            "DATABASE=/database".to_string(),
            "WORKER_ID=w-1".to_string(),
            "AGENT_FACTORY_WORKER_ID=from-spec".to_string(),
        ] {
            assert!(env.lines().any(|l| l == line), "missing {line} in\n{env}");
        }
        assert!(!env.lines().any(|l| l.starts_with("AF_")), "scheduler config leaked:\n{env}");
        assert!(dir.join(WORKER_LOG).is_file());

        let listed = only_machine(&p).await;
        assert_eq!((listed.raw_state.as_str(), listed.status), (STARTED, MachineStatus::Active));
        assert_eq!(p.get_machine(APP, &machine.machine_id).await.unwrap(), Some(listed));
        p.cordon(APP, &machine.machine_id).await.unwrap();

        p.stop(APP, &machine.machine_id).await.unwrap();
        p.wait_for_state(APP, &machine.machine_id, STOPPED, Duration::from_secs(10)).await.unwrap();
        let stopped = only_machine(&p).await;
        assert_eq!((stopped.raw_state.as_str(), stopped.status), (STOPPED, MachineStatus::Stopped));
        assert_eq!(p.list_volumes(APP).await.unwrap()[0].attached_machine_id.as_deref(), Some(&*machine.machine_id));

        p.destroy(APP, &machine.machine_id).await.unwrap();
        p.destroy(APP, &machine.machine_id).await.unwrap(); // Already gone: still Ok.
        assert!(p.list_machines(APP).await.unwrap().is_empty());
        assert_eq!(p.get_machine(APP, &machine.machine_id).await.unwrap(), None);
        p.wait_for_state(APP, &machine.machine_id, DESTROYED, Duration::from_millis(10)).await.unwrap();
        assert!(p.stop(APP, &machine.machine_id).await.unwrap_err().is_not_found());
        assert!(p.children().is_empty());
    }

    #[tokio::test]
    async fn local_volume_lifecycle_refuses_to_delete_a_volume_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let binary = script(tmp.path(), "worker.sh", POLITE_WORKER);
        let p = LocalProvider::new(tmp.path().join("root"), binary);
        let volume = p.create_volume(APP, "openclaw_data_x", "ams", 3).await.unwrap();
        let listed = p.list_volumes(APP).await.unwrap();
        assert_eq!(
            listed,
            vec![Volume {
                id: volume.id.clone(),
                name: "openclaw_data_x".to_string(),
                region: Some("ams".to_string()),
                attached_machine_id: None,
            }]
        );
        let dir = p.volume_dir(APP, &volume.id);
        assert!(dir.is_dir());

        let machine = p.spawn(APP, &spec("w-1", &volume.id)).await.unwrap();
        let err = p.spawn(APP, &spec("w-2", &volume.id)).await.unwrap_err();
        assert!(matches!(err, ProviderError::Precondition(_)), "{err:?}");
        let err = p.delete_volume(APP, &volume.id).await.unwrap_err();
        assert!(matches!(err, ProviderError::Precondition(_)), "{err:?}");
        assert!(dir.is_dir());

        p.destroy(APP, &machine.machine_id).await.unwrap();
        p.delete_volume(APP, &volume.id).await.unwrap();
        assert!(!dir.exists());
        assert!(p.list_volumes(APP).await.unwrap().is_empty());
        p.delete_volume(APP, &volume.id).await.unwrap(); // Absent: Ok.
        p.delete_volume(APP, "../escape").await.unwrap(); // Never a path outside the root.

        let err = p.spawn(APP, &spec("w-3", "vol_missing")).await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(matches!(p.check_app("../x").await.unwrap_err(), ProviderError::Other(_)));
    }

    #[tokio::test]
    async fn local_machines_are_relisted_by_a_fresh_provider_on_the_same_root() {
        let tmp = tempfile::tempdir().unwrap();
        let binary = script(tmp.path(), "worker.sh", POLITE_WORKER);
        let root = tmp.path().join("root");
        let first = LocalProvider::new(root.clone(), binary.clone());
        let volume = first.create_volume(APP, "v", "local", 1).await.unwrap();
        let machine = first.spawn(APP, &spec("w-1", &volume.id)).await.unwrap();
        drop(first); // A scheduler restart: no child handle any more.

        let second = LocalProvider::new(root, binary);
        let listed = only_machine(&second).await;
        assert_eq!((listed.machine_id.as_str(), listed.raw_state.as_str()), (&*machine.machine_id, STARTED));
        assert_eq!(second.list_volumes(APP).await.unwrap().len(), 1);
        second.stop(APP, &machine.machine_id).await.unwrap();
        second.wait_for_state(APP, &machine.machine_id, STOPPED, Duration::from_secs(10)).await.unwrap();
        assert_eq!(only_machine(&second).await.status, MachineStatus::Stopped);
        second.destroy(APP, &machine.machine_id).await.unwrap();
        second.delete_volume(APP, &volume.id).await.unwrap();
    }

    #[tokio::test]
    async fn local_wait_for_stopped_kills_a_worker_that_ignores_sigterm() {
        let tmp = tempfile::tempdir().unwrap();
        let binary = script(tmp.path(), "stubborn.sh", STUBBORN_WORKER);
        let p = LocalProvider::new(tmp.path().join("root"), binary);
        let volume = p.create_volume(APP, "v", "local", 1).await.unwrap();
        let fifo = ready_fifo(&p, &volume.id);
        let machine = p.spawn(APP, &spec("w-1", &volume.id)).await.unwrap();
        ready(fifo).await; // The trap is installed before the script signals.

        p.stop(APP, &machine.machine_id).await.unwrap();
        assert_eq!(only_machine(&p).await.raw_state, STOPPING);
        let err = p.wait_for_state(APP, &machine.machine_id, STARTED, Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
        p.wait_for_state(APP, &machine.machine_id, STOPPED, Duration::from_millis(300)).await.unwrap();
        assert_eq!(only_machine(&p).await.raw_state, STOPPED);
        p.destroy(APP, &machine.machine_id).await.unwrap();
    }

    #[test]
    fn a_process_in_exec_is_recognised_by_its_name_cut_to_fifteen_bytes() {
        assert!(comm_names("worker.sh", Path::new("/tmp/x/worker.sh")));
        assert!(comm_names("af-worker-with-", Path::new("/opt/af-worker-with-a-long-name")));
        assert!(!comm_names("af-worker-with", Path::new("/opt/af-worker-with-a-long-name")));
        assert!(!comm_names("kworker/0:1", Path::new("/opt/af-worker")));
        assert!(!comm_names("", Path::new("/")));
    }

    #[tokio::test]
    async fn local_a_record_whose_pid_runs_something_else_is_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let p = LocalProvider::new(tmp.path().join("root"), tmp.path().join("af-worker"));
        let record = MachineRecord {
            id: "m1".to_string(),
            name: "w-1".to_string(),
            pid: std::process::id(), // Alive, but it is the test binary, not the worker.
            state: STARTED.to_string(),
            volume_id: "vol_1".to_string(),
            region: "local".to_string(),
            image: "x".to_string(),
            created_at: 0,
            cordoned: false,
            binary: tmp.path().join("af-worker"),
        };
        p.write_machine(APP, &record).await.unwrap();
        assert_eq!(only_machine(&p).await.raw_state, STOPPED);
        // Destroy must not signal the unrelated process (this one): it only removes the record.
        p.destroy(APP, "m1").await.unwrap();
        assert!(p.list_machines(APP).await.unwrap().is_empty());
        assert!(!foreign_process_alive(0, &record.binary));
        assert!(!foreign_process_alive(u32::MAX, &record.binary));
    }

    #[test]
    fn local_mount_paths_are_rewritten_only_at_component_boundaries() {
        assert_eq!(rewrite_mount_path("/data", "/data", "/v"), "/v");
        assert_eq!(rewrite_mount_path("/data/workspace", "/data/", "/v"), "/v/workspace");
        assert_eq!(rewrite_mount_path("/database", "/data", "/v"), "/database");
        assert_eq!(rewrite_mount_path("https://x/data", "/data", "/v"), "https://x/data");
        assert_eq!(rewrite_mount_path("/anything", "/", "/v"), "/anything");
        let env = worker_env(
            &spec("w", "vol"),
            Path::new("/v"),
            [("PATH".to_string(), "/bin".to_string()), ("AF_AUTH__ADMIN_TOKEN".to_string(), "s".to_string())]
                .into_iter(),
        );
        assert_eq!(env.get("PATH").map(String::as_str), Some("/bin"));
        assert!(!env.contains_key("AF_AUTH__ADMIN_TOKEN"));
        assert_eq!(env.get("OPENCLAW_WORKSPACE_DIR").map(String::as_str), Some("/v/workspace"));
    }
}
