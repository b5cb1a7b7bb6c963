//! `agent-factory`: the whole stack in one process. Starts a local nats-server unless `nats.url`
//! is configured, creates the local credentials on first run, serves the HTTP API and stops
//! everything (nats-server included) on SIGINT/SIGTERM or when any service ends. With
//! `--fake-telegram` it also runs the fake Telegram Bot API beside the stack (the local demo).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use common::config::Settings;
use common::nats_server::{NatsServer, NatsServerOptions};
use common::service::{ServiceContext, local_secret_file};
use secrecy::{ExposeSecret, SecretString};

/// glibc malloc took about a third of the stack's instructions under load (callgrind, see
/// docs/benchmarks.md); mimalloc's thread-local free lists are much cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "agent-factory", version, about = "Run the agent-factory stack locally")]
struct Args {
    /// TOML configuration file, layered over the built-in defaults and under AF_* variables.
    #[arg(long, env = "AF_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective settings (secrets redacted) and exit.
    #[arg(long)]
    dump_config: bool,
    /// Also run the fake Telegram Bot API (the local demo): the stack's `telegram.api_base_url`
    /// points at it, `telegram.allow_insecure_webhook` is set, and spawned workers reply
    /// through it. `afctl fake-telegram` drives it.
    #[arg(long)]
    fake_telegram: bool,
    /// Loopback address the fake Telegram Bot API listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081", requires = "fake_telegram")]
    fake_telegram_bind: std::net::SocketAddr,
    /// Create or update every stream and bucket on `nats.url`, then exit: the one-shot
    /// provisioner of a deployment whose services connect as restricted users (the compose
    /// stack), since those users may not create streams.
    #[arg(long, conflicts_with = "fake_telegram")]
    provision: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let env = std::env::vars().collect();
    let mut settings = match Settings::load(args.config.as_deref(), &env) {
        Ok(settings) => settings,
        Err(e) => return config_error(e),
    };
    if args.dump_config {
        print!("{}", debug_to_toml(&format!("{settings:#?}")));
        return ExitCode::SUCCESS;
    }
    let _telemetry = match common::telemetry::init("agent-factory", &settings.telemetry) {
        Ok(guard) => guard,
        Err(e) => return config_error(e),
    };
    if args.provision {
        return provision(Arc::new(settings)).await;
    }
    let fake = match args.fake_telegram {
        true => match start_fake_telegram(args.fake_telegram_bind, &mut settings).await {
            Ok(fake) => Some(fake),
            Err(e) => return config_error(e),
        },
        false => None,
    };
    let fake_url = fake.as_ref().map(fake_telegram::FakeTelegram::base_url);
    run(&mut settings, fake_url.as_deref()).await.unwrap_or_else(|e| {
        tracing::error!("agent-factory failed: {e:#}");
        ExitCode::FAILURE
    })
}

/// Starts the fake Telegram Bot API on `bind` (loopback only: its control API has no
/// authentication) and points the stack at it.
async fn start_fake_telegram(
    bind: std::net::SocketAddr,
    settings: &mut Settings,
) -> anyhow::Result<fake_telegram::FakeTelegram> {
    anyhow::ensure!(bind.ip().is_loopback(), "--fake-telegram-bind {bind}: must be a loopback address");
    let mut fake = fake_telegram::FakeTelegram::try_start_on(&bind.to_string())
        .await
        .with_context(|| format!("--fake-telegram-bind {bind}: cannot listen"))?;
    // Telegram redelivers an update its webhook did not answer 200; so does the fake.
    fake.start_auto_delivery();
    settings.telegram.api_base_url = fake.base_url();
    settings.telegram.allow_insecure_webhook = true;
    tracing::info!(url = fake.base_url(), "fake Telegram Bot API started");
    Ok(fake)
}

async fn provision(settings: Arc<Settings>) -> ExitCode {
    let Some(url) = settings.nats.url.clone() else {
        return config_error("invalid configuration: nats.url: required with --provision (AF_NATS__URL)");
    };
    match ServiceContext::connect(settings, &url, "agent-factory-provision").await {
        Ok(_) => {
            tracing::info!("streams and buckets provisioned");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("provisioning failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(common::process::EXIT_CONFIG as u8)
}

async fn run(settings: &mut Settings, fake_telegram: Option<&str>) -> anyhow::Result<ExitCode> {
    let token_file = local_credentials(settings)?;
    let mut nats = match settings.nats.url {
        Some(_) => None,
        None => Some(start_nats(settings).await?),
    };
    let url = match &nats {
        Some(server) => server.url().to_string(),
        None => settings.nats.url.clone().unwrap_or_default(),
    };
    let result = serve(settings, &url, token_file.as_deref(), nats.as_mut(), fake_telegram).await;
    if let Some(server) = nats.as_mut() {
        server.stop(Duration::from_secs(5)).await;
        tracing::info!("nats-server stopped");
    }
    result
}

/// Creates (first run) or reads the local credentials for every secret not configured.
/// Returns the admin token file when the token came from there.
fn local_credentials(settings: &mut Settings) -> anyhow::Result<Option<PathBuf>> {
    let dir = settings.data_dir.clone();
    let token = |len| move || Ok(common::crypto::random_base36(len));
    let mut admin_file = None;
    if settings.auth.admin_token.is_none() {
        settings.auth.admin_token = Some(local_secret_file(&dir, "admin.token", token(40))?);
        admin_file = Some(dir.join("admin.token"));
    }
    if settings.auth.worker_token_key.is_none() {
        let key = local_secret_file(&dir, "worker-token.key", token(64))?;
        settings.auth.worker_token_key = Some(key);
    }
    if settings.secrets.key.is_none() {
        let key: SecretString = local_secret_file(&dir, "secrets.key", || {
            common::crypto::generate_key_base64().map_err(|e| anyhow::anyhow!(e.message))
        })?;
        settings.secrets.key = Some(key);
    }
    Ok(admin_file)
}

async fn start_nats(settings: &Settings) -> anyhow::Result<NatsServer> {
    let explicit = std::env::var_os("AF_NATS_SERVER_BIN").map(PathBuf::from);
    let root = std::env::current_dir()?;
    let binary = common::nats_server::find_binary(explicit.as_deref(), &root)?;
    // The services' password, generated on first start; workers never get it (they reach the
    // control plane through ingress).
    let password = local_secret_file(&settings.data_dir, "nats.password", || Ok(common::crypto::random_base36(40)))?;
    // Encryption at rest, when asked for: the key is generated once, beside the data, and the
    // store cannot be read without it.
    let extra_config = match settings.nats.encrypt_store {
        true => {
            let key =
                local_secret_file(&settings.data_dir, "nats.store.key", || Ok(common::crypto::random_base36(48)))?;
            Some(format!("jetstream {{ cipher: chachapoly, key: \"{}\" }}\n", key.expose_secret()))
        }
        false => None,
    };
    let options = NatsServerOptions {
        binary,
        store_dir: settings.nats_store_dir(),
        run_dir: settings.data_dir.join("run"),
        extra_config,
        credentials: Some(("agent-factory".to_string(), password.expose_secret().to_string())),
        monitoring: false,
        env: Vec::new(),
    };
    let server = NatsServer::start(&options).await.context("starting nats-server")?;
    tracing::info!(url = server.public_url(), pid = server.pid(), "nats-server started");
    Ok(server)
}

/// Runs the services until a signal, until one of them ends, or until the embedded nats-server
/// dies (the last two are failures: the process exits non-zero rather than run on without its
/// state, so a supervisor restarts it on the same data).
async fn serve(
    settings: &Settings,
    url: &str,
    token_file: Option<&Path>,
    mut embedded: Option<&mut NatsServer>,
    fake_telegram: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let signals = common::service::shutdown_on_signals();
    // Services stop only after the local workers did: a worker's final snapshot needs them.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ctx = ServiceContext::connect(Arc::new(settings.clone()), url, "agent-factory").await?;
    let listener = tokio::net::TcpListener::bind(&settings.http.bind)
        .await
        .with_context(|| format!("binding http.bind {}", settings.http.bind))?;
    let addr = listener.local_addr()?;
    let contexts = match embedded.as_deref() {
        // Each service connects as its own user, with only its own permissions.
        Some(server) => launcher::ServiceContexts::connect(&ctx, |service| server.service_url(service)).await?,
        None => launcher::ServiceContexts::shared(&ctx),
    };
    let mut tasks = launcher::spawn_services(&contexts, listener, &shutdown);
    banner(addr, &common::service::split_credentials(url).0, embedded.is_some(), token_file, fake_telegram);

    let nats_exit = async {
        match embedded.as_deref_mut() {
            Some(server) => (server.exited().await, server.log_tail()),
            None => std::future::pending().await,
        }
    };
    let mut ok = true;
    tokio::select! {
        _ = signals.cancelled() => stop_local_workers(settings).await,
        Some(joined) = tasks.join_next() => ok = report(joined, true),
        (status, log) = nats_exit => {
            tracing::error!(?status, "the embedded nats-server exited; stopping (its last log lines follow)\n{log}");
            ok = false;
        }
    }
    shutdown.cancel();
    let drain = async {
        let mut ok = true;
        while let Some(joined) = tasks.join_next().await {
            ok &= report(joined, false);
        }
        ok
    };
    let drained = tokio::time::timeout(Duration::from_secs(10), drain).await;
    if drained.is_err() {
        tracing::warn!("services did not stop within 10 s; aborting them");
        tasks.abort_all();
    }
    Ok(match ok && drained.unwrap_or(false) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// Asks the workers this machine runs (local provider) to stop — each finishes its job and
/// snapshots its workspace — and waits for them, bounded, so Ctrl-C leaves no process behind.
async fn stop_local_workers(settings: &Settings) {
    use providers::{MachineStatus, Provider};
    let provider = providers::local_provider(settings);
    if !provider.root().exists() {
        return;
    }
    let Ok(machines) = provider.list_machines(providers::LOCAL_APP).await else { return };
    let running: Vec<_> = machines.into_iter().filter(|m| m.status == MachineStatus::Active).collect();
    if running.is_empty() {
        return;
    }
    tracing::info!(workers = running.len(), "stopping local workers (each snapshots its workspace)");
    let stops = running.iter().map(|m| {
        let provider = &provider;
        async move {
            let _ = provider.stop(providers::LOCAL_APP, &m.machine_id).await;
            let _ =
                provider.wait_for_state(providers::LOCAL_APP, &m.machine_id, "stopped", Duration::from_secs(20)).await;
        }
    });
    futures::future::join_all(stops).await;
}

type Joined = Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>;

/// Logs how a service task ended; returns whether that was fine.
fn report(joined: Joined, early: bool) -> bool {
    match joined {
        Ok((name, Ok(()))) if early => tracing::error!(service = name, "service ended early"),
        Ok((_, Ok(()))) => return true,
        Ok((name, Err(e))) => tracing::error!(service = name, "service failed: {e:#}"),
        Err(e) => tracing::error!("service task panicked: {e}"),
    }
    false
}

fn banner(addr: std::net::SocketAddr, nats_url: &str, embedded: bool, token: Option<&Path>, fake: Option<&str>) {
    let base = format!("http://{addr}");
    let nats = if embedded { "embedded" } else { "external" };
    let token = token.map_or("from configuration (auth.admin_token)".to_string(), |p| p.display().to_string());
    let fake = fake.map_or(String::new(), |url| {
        format!("  Telegram     {url} (fake Bot API; afctl fake-telegram --fake-url {url} ...)\n")
    });
    eprintln!(
        "\nagent-factory is running\n  \
         console      {base}/console   (log in with the admin token)\n  \
         API          {base}/v1/ops/<operation>   (catalogue: {base}/v1/ops)\n  \
         health       {base}/healthz   ready: {base}/readyz   metrics: {base}/metrics\n  \
         NATS         {nats_url} ({nats})\n  \
         admin token  {token}\n\
         {fake}  \
         try          target/release/afctl --url {base} ops\n\
         Press Ctrl-C to stop.\n"
    );
}

/// Turns the pretty `Debug` of the settings into TOML-like text. Secrets print as
/// `[REDACTED]` because their type never reveals them; unset options print as comments.
fn debug_to_toml(debug: &str) -> String {
    let mut out = String::new();
    let mut path: Vec<String> = Vec::new();
    let mut reopen = false;
    let mut lines = debug.lines().skip(1).map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with('}') {
            path.pop();
            reopen = true;
            continue;
        }
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        if value.ends_with('{') {
            path.push(key.to_string());
            out.push_str(&format!("\n[{}]\n", path.join(".")));
            reopen = false;
            continue;
        }
        if std::mem::take(&mut reopen) && !path.is_empty() {
            // More keys of a table whose sub-table came first.
            out.push_str(&format!("\n[{}]\n", path.join(".")));
        }
        let mut value = value.trim_end_matches(',').to_string();
        if value.ends_with(['(', '[']) {
            // A multi-line `Some(\n    x,\n)` or list: keep the inner values.
            let close = if value.ends_with('(') { ')' } else { ']' };
            let inner: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with(close)).collect();
            let inner = inner.iter().map(|l| l.trim_end_matches(',')).collect::<Vec<_>>();
            value = match close {
                ')' => inner.join(" "),
                _ => format!("[{}]", inner.join(", ")),
            };
        }
        match value.as_str() {
            "None" => out.push_str(&format!("# {key} = (unset)\n")),
            v if v.contains("REDACTED") => out.push_str(&format!("{key} = \"[REDACTED]\"\n")),
            v if v.starts_with(|c: char| c.is_ascii_uppercase()) => {
                out.push_str(&format!("{key} = \"{}\"\n", v.to_lowercase()))
            }
            v => out.push_str(&format!("{key} = {v}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumped_settings_are_toml_like_and_hide_secrets() {
        let env = [
            ("AF_AUTH__ADMIN_TOKEN", "hunter2-hunter2-hunter2"),
            ("AF_AUTH__PREVIOUS_ADMIN_TOKENS", "previous-hunter2-aaaa,previous-hunter2-bbbb"),
            ("AF_CLOCK__START_MS", "7"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let settings = Settings::load(None, &env).expect("valid settings");
        let text = debug_to_toml(&format!("{settings:#?}"));
        assert!(!text.contains("hunter2"), "{text}");
        for line in [
            "data_dir = \"data\"",
            "[queue.retry]",
            "admin_token = \"[REDACTED]\"",
            "previous_admin_tokens = \"[REDACTED]\"",
            "previous_app_tokens = []",
            "# app_token = (unset)",
            "start_ms = 7",
            "mode = \"system\"",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
