//! The test harness: a real `nats-server` in a temporary directory, the services started in
//! this process (or as child processes), and clients that call operations as a given role.
//! Nothing here sleeps to hope: waits poll a condition with a deadline and report what they saw.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::OpError;
use common::config::Settings;
use common::nats_server::{NatsServer, NatsServerOptions};
use common::ops::OpClient;
use common::service::ServiceContext;
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub mod fake_fly;
/// The fake Telegram Bot API, moved to its own crate (`services/fake-telegram`) so the launcher
/// can run it for the local demo; re-exported here for the tests.
pub use ::fake_telegram;
pub mod workload;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const APP_TOKEN: &str = "test-app-token-1234";
pub const WORKER_TOKEN_KEY: &str = "test-worker-token-key-0123456789abcdef";

/// The repository root (for the project-local nats-server install).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A nats-server of our own, with its data in a temporary directory removed on drop
/// (set `AF_TEST_KEEP_TMP=1` to keep it).
pub struct TestNats {
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
    /// Set by a test that provokes permission violations on purpose; otherwise any violation
    /// in the server's log fails the test when this drops (a grant of
    /// `common::nats_access` that does not match what a service really does).
    pub allow_permission_violations: std::sync::atomic::AtomicBool,
}

impl TestNats {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    pub async fn start_with(extra_config: Option<String>) -> Self {
        common::telemetry::install_crypto_provider();
        let dir = tempfile::Builder::new().prefix("af-test-").tempdir().expect("temp dir");
        let explicit = std::env::var_os("AF_NATS_SERVER_BIN").map(PathBuf::from);
        let binary = common::nats_server::find_binary(explicit.as_deref(), &project_root())
            .expect("nats-server binary (run ops/scripts/install-nats.sh)");
        // As the launcher's: only clients with the password get in.
        let password = common::crypto::random_base36(24);
        let options = NatsServerOptions {
            binary,
            store_dir: dir.path().join("js"),
            run_dir: dir.path().join("run"),
            extra_config,
            credentials: Some(("af-test".to_string(), password)),
            // The benchmarks read /varz and /jsz.
            monitoring: true,
            env: Vec::new(),
        };
        let server = NatsServer::start(&options).await.expect("nats-server starts");
        if std::env::var_os("AF_TEST_KEEP_TMP").is_some() {
            eprintln!("keeping test directory {}", dir.path().display());
        }
        Self { server, dir, allow_permission_violations: false.into() }
    }

    /// The privileged URL (provisioning, seeding, inspecting).
    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// Creates the streams and buckets as the privileged user, as `agent-factory --provision`
    /// does for services that connect as their own users (which may not).
    pub async fn provision(&self) {
        let settings = Arc::new(test_settings(&self.dir.path().join("provision"), &[]));
        ServiceContext::connect(settings, self.url(), "provision").await.expect("provision");
    }

    /// The URL of `service`'s own restricted user.
    pub fn service_url(&self, service: &str) -> String {
        self.server.service_url(service)
    }

    /// The permission violations the server logged so far.
    pub fn permission_violations(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("run/nats-server.log")).unwrap_or_default();
        log.lines().filter(|l| l.contains(" Violation - ")).map(str::to_string).collect()
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let violations = self.permission_violations();
        if !violations.is_empty()
            && !self.allow_permission_violations.load(std::sync::atomic::Ordering::Relaxed)
            && !std::thread::panicking()
        {
            panic!("nats-server logged permission violations:\n{}", violations.join("\n"));
        }
        if std::env::var_os("AF_TEST_KEEP_TMP").is_some() {
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")).keep();
        }
    }
}

/// Settings for tests: known tokens, a fresh secrets key, data under `data_dir`, and the
/// caller's overrides (`("queue.lease_ms", "1000")`).
pub fn test_settings(data_dir: &Path, overrides: &[(&str, &str)]) -> Settings {
    let data = data_dir.display().to_string();
    // No worker pool unless a test asks for one: spawning needs a provider the test controls.
    // No rate limits unless a test asks for them: under a frozen manual clock no bucket ever
    // refills, and the benchmarks drive far more than a production client would.
    let mut all: Vec<(&str, &str)> =
        vec![("data_dir", data.as_str()), ("scheduler.default_provider", "none"), ("rate_limits.enabled", "false")];
    all.extend_from_slice(overrides);
    let mut settings = Settings::from_overrides(&all).expect("valid test settings");
    settings.auth.admin_token = Some(SecretString::from(ADMIN_TOKEN));
    settings.auth.app_token = Some(SecretString::from(APP_TOKEN));
    settings.auth.worker_token_key = Some(SecretString::from(WORKER_TOKEN_KEY));
    settings.secrets.key = Some(SecretString::from(common::crypto::generate_key_base64().expect("key")));
    settings
}

/// The whole stack in this process against a private nats-server.
pub struct TestStack {
    pub ctx: ServiceContext,
    pub http_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>,
    pub nats: TestNats,
}

impl TestStack {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(overrides: &[(&str, &str)]) -> Self {
        // Boxed: the start-up future is large in debug builds and would otherwise sit on the
        // test thread's stack.
        Box::pin(Self::start_boxed(overrides)).await
    }

    async fn start_boxed(overrides: &[(&str, &str)]) -> Self {
        let nats = TestNats::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http_addr = listener.local_addr().expect("addr");
        let mut settings = test_settings(&nats.dir.path().join("data"), overrides);
        // Links handed to workers must point at this stack's ingress.
        settings.http.public_url = format!("http://{http_addr}");
        let settings = Arc::new(settings);
        if let Ok(filter) = std::env::var("AF_TEST_LOG") {
            let mut telemetry = settings.telemetry.clone();
            telemetry.log_filter = filter;
            std::mem::forget(common::telemetry::init("test", &telemetry));
        }
        let ctx = ServiceContext::connect(settings, nats.url(), "test-stack").await.expect("connect");
        let shutdown = CancellationToken::new();
        let contexts = launcher::ServiceContexts::connect(&ctx, |s| nats.service_url(s)).await.expect("connect");
        let tasks = launcher::spawn_services(&contexts, listener, &shutdown);
        let stack = Self { ctx, http_addr, shutdown, tasks, nats };
        stack.wait_ready().await;
        stack
    }

    /// Waits until every service answers its health ping.
    async fn wait_ready(&self) {
        for service in ["queue-manager", "hydration", "scheduler", "push-dispatcher", "cleanup"] {
            let subject = common::service::health_subject(service);
            wait_until(&format!("{service} answers health pings"), Duration::from_secs(10), || async {
                self.ctx.nats.request(subject.clone(), "".into()).await.ok().map(|_| ())
            })
            .await;
        }
        self.wait_queue_ready().await;
    }

    /// Waits until the queue has an elected leader serving its operations.
    pub async fn wait_queue_ready(&self) {
        wait_until("the queue has a leader", Duration::from_secs(10), || async {
            self.admin().call("getQueueStats", Value::Object(Default::default())).await.ok()
        })
        .await;
    }

    pub fn client(&self, token: &str) -> Api {
        Api { ops: self.ctx.ops.clone(), token: token.to_string() }
    }

    pub fn admin(&self) -> Api {
        self.client(ADMIN_TOKEN)
    }

    pub fn app(&self) -> Api {
        self.client(APP_TOKEN)
    }

    /// A client authenticated as worker `worker_id`.
    pub fn worker(&self, worker_id: &str) -> Api {
        let token = self.ctx.auth.mint_worker_token(worker_id).expect("worker token");
        self.client(&token)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http_addr, path)
    }

    /// Starts a second set of every service over this stack's nats-server, with this stack's
    /// settings changed by `change` (as a rolling deployment adds processes with a new
    /// configuration). Returns once they answer health pings of their own.
    pub async fn replica(&self, change: impl FnOnce(&mut Settings)) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http_addr = listener.local_addr().expect("addr");
        let mut settings = (*self.ctx.settings).clone();
        settings.http.public_url = format!("http://{http_addr}");
        change(&mut settings);
        let ctx = ServiceContext::connect(Arc::new(settings), self.nats.url(), "test-replica").await.expect("connect");
        let shutdown = CancellationToken::new();
        let contexts = launcher::ServiceContexts::connect(&ctx, |s| self.nats.service_url(s)).await.expect("connect");
        let tasks = launcher::spawn_services(&contexts, listener, &shutdown);
        let replica = Replica { ctx, http_addr, shutdown, tasks };
        // Ingress answers on its own port once its services run; the operation subscriptions
        // of the others are made before their health subscriptions.
        wait_until("the replica's ingress answers", Duration::from_secs(10), || async {
            reqwest::get(format!("http://{http_addr}/healthz")).await.ok().filter(|r| r.status().is_success())
        })
        .await;
        replica
    }

    /// Stops this stack's services (its nats-server keeps running, and so does any replica);
    /// panics if one failed.
    pub async fn stop_services(&mut self) {
        stop_services(&self.shutdown, &mut self.tasks).await;
    }

    /// Stops every service and waits for them; panics if one failed.
    pub async fn stop(mut self) {
        stop_services(&self.shutdown, &mut self.tasks).await;
    }
}

/// Cancels `shutdown` and waits for every service task; panics if one failed.
async fn stop_services(
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>,
) {
    shutdown.cancel();
    while let Some(joined) = tasks.join_next().await {
        let (name, result) = joined.expect("service task panicked");
        if let Err(e) = result {
            panic!("service {name} failed: {e:#}");
        }
    }
}

/// Another set of services over a [`TestStack`]'s nats-server ([`TestStack::replica`]).
pub struct Replica {
    pub ctx: ServiceContext,
    pub http_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Replica {
    /// A client over this replica's NATS connection (operations still reach any replica).
    pub fn client(&self, token: &str) -> Api {
        Api { ops: self.ctx.ops.clone(), token: token.to_string() }
    }

    /// Stops the replica's services; panics if one failed.
    pub async fn stop(mut self) {
        stop_services(&self.shutdown, &mut self.tasks).await;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Calls operations as one caller.
#[derive(Clone)]
pub struct Api {
    pub ops: OpClient,
    pub token: String,
}

impl Api {
    /// Calls `op` with JSON arguments, as a client written against the original would; like
    /// every well-behaved client, rides out a leader failover (a loaded CI machine can make a
    /// leader miss a lease renewal).
    pub async fn call(&self, op: &str, args: Value) -> Result<Value, OpError> {
        let spec = common::ops::find(op).unwrap_or_else(|| panic!("'{op}' is not in the catalogue"));
        let patience = common::ops::FAILOVER_PATIENCE;
        Box::pin(self.ops.call_by_name_through_failover(spec, &self.token, &args, patience)).await
    }

    /// Calls operation `O` with its contract types.
    pub async fn typed<O: common::api::Operation>(&self, args: &O::Args) -> Result<O::Output, OpError> {
        Box::pin(self.ops.call_through_failover::<O>(&self.token, args, common::ops::FAILOVER_PATIENCE)).await
    }

    /// Calls and panics with the error if the call fails.
    pub async fn ok(&self, op: &str, args: Value) -> Value {
        match self.call(op, args.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("{op}({args}) failed: {e:?}"),
        }
    }

    /// Calls and returns the error, panicking if the call succeeds.
    pub async fn err(&self, op: &str, args: Value) -> OpError {
        match self.call(op, args.clone()).await {
            Ok(v) => panic!("{op}({args}) should fail but returned {v}"),
            Err(e) => e,
        }
    }
}

/// Polls `probe` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stores an enabled agent profile straight into KV (test set-up that must not depend on the
/// hydration service).
pub async fn seed_profile(ctx: &ServiceContext, agent_key: &str) {
    let profile = common::model::AgentProfile {
        agent_key: agent_key.to_string(),
        version: "1.0.0".to_string(),
        secrets_ref: vec![],
        bot_identity: None,
        bridge_config: None,
        enabled: true,
        company_id: None,
        created_at: 0,
        updated_at: 0,
    };
    let key = common::token::escape(agent_key);
    let store = &ctx.buckets.profiles;
    let revision = store.get::<Value>(&key).await.expect("read profile").map(|v| v.revision);
    store.write(&key, &profile, revision).await.expect("seed profile");
}

/// Overrides for a deterministic stack: manual clock at the spec's reference instant and every
/// background loop paused, so a test drives each step.
pub const MANUAL: &[(&str, &str)] =
    &[("clock.mode", "manual"), ("clock.start_ms", "1767258000000"), ("loops.manual", "true")];

/// The spec's reference instant (2026-01-01T09:00:00Z).
pub const T0: i64 = 1_767_258_000_000;

/// A minimal valid enqueue payload.
pub fn message(conversation: &str, agent: &str, text: &str) -> Value {
    serde_json::json!({
        "conversationId": conversation,
        "agentKey": agent,
        "payload": { "provider": "telegram", "providerUserId": "u1", "messageText": text },
    })
}

/// Path of binary `name` of workspace package `package`, building it first (tests that run
/// services or workers as processes). Call it before starting a stack: the build blocks.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = std::process::Command::new(cargo);
    // The variables cargo sets for this test binary are not the build's: ring's build script
    // watches CARGO_MANIFEST_DIR, and with it set every TLS-using crate (common included) would
    // be rebuilt here, and again by the next `cargo build` outside a test.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            command.env_remove(key);
        }
    }
    let status = command
        .args(["build", "--quiet", "-p", package, "--bin", name])
        .current_dir(project_root())
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {name} failed");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| project_root().join("target"));
    target.join("debug").join(name)
}

/// `len` incompressible bytes, the same for the same seed (archives for snapshot tests and
/// benchmarks).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Every regular file under `dir`, recursively (symlinks are not followed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
    out
}
