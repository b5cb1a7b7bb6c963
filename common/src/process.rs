//! The shared shape of a service binary: load configuration (exit 64 naming the bad key),
//! start telemetry, connect to the configured NATS server, run until SIGINT/SIGTERM.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::service::ServiceContext;

/// Exit code for configuration errors (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Loads settings from `--config FILE` / `AF_CONFIG` and the `AF_*` environment, or exits 64.
pub fn load_settings_or_exit() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let file = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("AF_CONFIG").map(PathBuf::from));
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    match Settings::load(file.as_deref(), &env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Runs one service as its own process against `nats.url`.
pub async fn run_service_binary<F, Fut>(name: &'static str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(ServiceContext, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = load_settings_or_exit();
    let _telemetry = crate::telemetry::init(name, &settings.telemetry)?;
    let Some(url) = settings.nats.url.clone() else {
        eprintln!("invalid configuration: nats.url: required when running {name} on its own (AF_NATS__URL)");
        std::process::exit(EXIT_CONFIG);
    };
    let shutdown = crate::service::shutdown_on_signals();
    if let Some(bind) = &settings.telemetry.metrics_bind {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| anyhow::anyhow!("telemetry.metrics_bind: cannot listen on {bind}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
        tokio::spawn(crate::telemetry::serve_metrics(listener, shutdown.clone()));
    }
    let ctx = ServiceContext::connect(Arc::new(settings), &url, name).await?;
    tracing::info!(service = name, nats = %url, "service started");
    run(ctx, shutdown).await
}
