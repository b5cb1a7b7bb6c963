//! What every service needs to run: a NATS connection, the JetStream context with the topology
//! provisioned, the clock, the authenticator and the settings, bundled in a cheap-to-clone
//! [`ServiceContext`]. Also the process-level helpers: signal handling and local key files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::clock::{Clock, ManualTime};
use crate::config::{ClockMode, Settings};
use crate::ops::OpClient;
use crate::topology::{self, Buckets};

/// Shared by every task of a service; cloning is one reference count.
#[derive(Clone)]
pub struct ServiceContext(Arc<ServiceContextInner>);

impl std::ops::Deref for ServiceContext {
    type Target = ServiceContextInner;
    fn deref(&self) -> &ServiceContextInner {
        &self.0
    }
}

pub struct ServiceContextInner {
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub clock: Clock,
    pub settings: Arc<Settings>,
    pub auth: Arc<Authenticator>,
    pub buckets: Buckets,
    pub ops: OpClient,
    /// The NATS URL this process connected to (handed to the workers it spawns locally).
    pub nats_url: String,
}

/// The key of the manual clock record in the `af_system` bucket.
pub const TEST_CLOCK_KEY: &str = "test_clock";

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestClockRecord {
    pub now_ms: i64,
}

impl ServiceContext {
    /// Calls another service's operation as this service, with the admin credential the
    /// services share through configuration, riding out a leader failover. Without that
    /// credential the cross-service step cannot run, and the error says so.
    pub async fn call_service<O: crate::api::Operation>(&self, args: &O::Args) -> Result<O::Output, crate::OpError> {
        use secrecy::ExposeSecret;
        let token = self.settings.auth.admin_token.as_ref().ok_or_else(|| {
            crate::OpError::internal(format!("auth.admin_token is not configured; calling '{}' needs it", O::SPEC.name))
        })?;
        self.ops.call_through_failover::<O>(token.expose_secret(), args, crate::ops::FAILOVER_PATIENCE).await
    }

    /// Connects to NATS (retrying for `nats.connect_timeout_ms`), provisions the topology (or,
    /// as a service's restricted user, waits until the provisioner has), and sets up the clock.
    pub async fn connect(settings: Arc<Settings>, url: &str, name: &str) -> anyhow::Result<Self> {
        let patience = Duration::from_millis(settings.nats.connect_timeout_ms);
        let nats = connect_nats(url, name, patience).await?;
        let js = jetstream::new(nats.clone());
        let buckets = if restricted_user(url).is_some() {
            open_when_provisioned(&js, patience).await?
        } else {
            topology::provision(&js, &settings).await?;
            Buckets::open(&js).await?
        };
        let clock = match settings.clock.mode {
            ClockMode::System => Clock::system(),
            ClockMode::Manual => start_manual_clock(&buckets, &settings).await?,
        };
        let auth = Arc::new(Authenticator::from_settings(&settings.auth));
        Ok(Self::assemble(nats, js, buckets, clock, settings, auth, url))
    }

    fn assemble(
        nats: async_nats::Client,
        js: jetstream::Context,
        buckets: Buckets,
        clock: Clock,
        settings: Arc<Settings>,
        auth: Arc<Authenticator>,
        url: &str,
    ) -> Self {
        let ops = OpClient::new(nats.clone(), Duration::from_millis(settings.nats.request_timeout_ms))
            .with_clock(clock.clone());
        let nats_url = url.to_string();
        Self(Arc::new(ServiceContextInner { nats, js, clock, settings, auth, buckets, ops, nats_url }))
    }

    /// The same context over a NATS connection of its own. One connection is one reader and
    /// one writer task in the client: a busy component (the queue dispatcher) gets its own so
    /// its traffic does not queue behind, or in front of, the rest of the process's.
    pub async fn with_own_connection(&self, name: &str) -> anyhow::Result<Self> {
        self.with_connection(&self.nats_url, name).await
    }

    /// The same settings and clock over a new connection to `url`, typically a service's own
    /// restricted user ([`crate::nats_server::NatsServer::service_url`]).
    pub async fn with_connection(&self, url: &str, name: &str) -> anyhow::Result<Self> {
        let nats = connect_nats(url, name, Duration::from_millis(self.settings.nats.connect_timeout_ms)).await?;
        let js = jetstream::new(nats.clone());
        let buckets = Buckets::open(&js).await?;
        Ok(Self::assemble(nats, js, buckets, self.clock.clone(), self.settings.clone(), self.auth.clone(), url))
    }
}

/// The service whose restricted NATS user `url` names, if any.
fn restricted_user(url: &str) -> Option<&'static str> {
    let (_, credentials) = split_credentials(url);
    let (user, _) = credentials?;
    crate::nats_access::SERVICES.iter().copied().find(|s| *s == user)
}

/// Opens the buckets once the provisioner has created them, for `patience`.
async fn open_when_provisioned(js: &jetstream::Context, patience: Duration) -> anyhow::Result<Buckets> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match Buckets::open(js).await {
            Ok(buckets) => return Ok(buckets),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), "topology not provisioned yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("the topology is not provisioned (run `agent-factory --provision`)")),
        }
    }
}

/// Connects to the NATS server at `url`, which may carry a user and password
/// (`nats://user:password@host:port`); they are sent as the client's credentials and never
/// logged.
pub async fn connect_nats(url: &str, name: &str, patience: Duration) -> anyhow::Result<async_nats::Client> {
    let (address, credentials) = split_credentials(url);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let mut options = async_nats::ConnectOptions::new().name(name).connection_timeout(Duration::from_secs(2));
        if let Some((user, password)) = &credentials {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(service) = restricted_user(url) {
            // A service user may subscribe only to replies under its own prefix.
            options = options.custom_inbox_prefix(crate::nats_access::inbox_prefix(service));
        }
        match options.connect(address.as_str()).await {
            Ok(client) => return Ok(client),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(url = %address, error = %e, "nats not reachable yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(anyhow::anyhow!("cannot connect to NATS at {address} (nats.url): {e}"));
            }
        }
    }
}

/// `nats://user:password@host:port` → (`nats://host:port`, the user and password).
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_string(), None) };
    let host_start = rest.find('/').unwrap_or(rest.len());
    match rest[..host_start].rsplit_once('@') {
        Some((userinfo, host)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let address = format!("{scheme}://{host}{}", &rest[host_start..]);
            (address, Some((user.to_string(), password.to_string())))
        }
        None => (url.to_string(), None),
    }
}

/// Reads (or creates) the stack-wide manual clock record and keeps this process's clock in step
/// with it through a KV watch.
async fn start_manual_clock(buckets: &Buckets, settings: &Settings) -> anyhow::Result<Clock> {
    let store = buckets.system.clone();
    let current = match store.get::<TestClockRecord>(TEST_CLOCK_KEY).await? {
        Some(v) => v,
        None => {
            let start = settings.clock.start_ms.unwrap_or_else(|| Clock::system().now_ms());
            match store.create(TEST_CLOCK_KEY, &TestClockRecord { now_ms: start }).await {
                Ok(revision) => crate::store::Versioned { value: TestClockRecord { now_ms: start }, revision },
                Err(e) if e.is_conflict() => {
                    store.get(TEST_CLOCK_KEY).await?.context("test clock record vanished while being created")?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let clock = Clock::manual(current.value.now_ms);
    clock
        .apply_manual(ManualTime { now_ms: current.value.now_ms, revision: current.revision })
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let mut watch = store.raw().watch(TEST_CLOCK_KEY).await.context("watching the test clock")?;
    let follower = clock.clone();
    tokio::spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            if let Ok(record) = crate::store::decode::<TestClockRecord>(TEST_CLOCK_KEY, &entry.value) {
                let _ = follower.apply_manual(ManualTime { now_ms: record.now_ms, revision: entry.revision });
            }
        }
        tracing::warn!("test clock watch ended");
    });
    tracing::warn!(now_ms = current.value.now_ms, "manual test clock enabled: time moves only when told to");
    Ok(clock)
}

/// A token cancelled on the first SIGINT/SIGTERM; a second signal exits the process at once.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down (signal again to exit immediately)");
        t.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Reads the secret in `dir/name`, creating it with `generate` and owner-only permissions on
/// first use. Only the local stack uses this; production passes keys by configuration.
pub fn local_secret_file(
    dir: &Path,
    name: &str,
    generate: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<SecretString> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    if path.is_file() {
        let mode = std::fs::metadata(&path)?.permissions().mode();
        if mode & 0o077 != 0 {
            anyhow::bail!("{} is readable by others (mode {:o}); chmod 600 it", path.display(), mode & 0o777);
        }
        let value = std::fs::read_to_string(&path)?.trim().to_string();
        return Ok(SecretString::from(value));
    }
    let value = generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(value.as_bytes())?;
    tracing::info!(path = %path.display(), "generated {name} (owner-only permissions); keep it safe");
    Ok(SecretString::from(value))
}

/// The subject on which every replica of `service` answers health pings.
pub fn health_subject(service: &str) -> String {
    format!("af.health.{service}")
}

/// Answers `af.health.<service>` with `{"service", "status": "ok"}` until `shutdown`. Ingress's
/// `/readyz` pings these to tell whether every service is up.
pub async fn serve_health(
    ctx: ServiceContext,
    service: &'static str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = ctx.nats.subscribe(health_subject(service)).await?;
    ctx.nats.flush().await?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = sub.next() => {
                let Some(msg) = msg else { return Ok(()) };
                if let Some(reply) = msg.reply {
                    let body = serde_json::json!({ "service": service, "status": "ok" });
                    let _ = ctx.nats.publish(reply, body.to_string().into()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_credentials;

    #[test]
    fn credentials_are_split_off_the_url() {
        let (address, credentials) = split_credentials("nats://svc:s3cret@127.0.0.1:4222");
        assert_eq!(address, "nats://127.0.0.1:4222");
        assert_eq!(credentials, Some(("svc".to_string(), "s3cret".to_string())));
        assert_eq!(split_credentials("nats://127.0.0.1:4222"), ("nats://127.0.0.1:4222".to_string(), None));
        assert_eq!(split_credentials("localhost:4222").1, None);
    }
}
