//! `af-worker`: reads its environment, runs the worker until it drains, idles out or gets
//! SIGTERM/SIGINT, and exits 0 — or 2 on a configuration error, and 1/2 on a fatal error that
//! looks transient/permanent (spec §4.4).

use common::config::{LogFormat, TelemetrySettings};

#[tokio::main]
async fn main() {
    let config = match worker::WorkerConfig::from_process_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("af-worker: {e}");
            std::process::exit(2);
        }
    };
    let telemetry = TelemetrySettings {
        log_format: LogFormat::Pretty,
        log_filter: config.log_filter.clone(),
        otlp_endpoint: config.otlp_endpoint.clone(),
        metrics_bind: None,
    };
    let guard = match common::telemetry::init("af-worker", &telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("af-worker: invalid configuration: AF_WORKER_LOG: {e}");
            std::process::exit(2);
        }
    };
    let shutdown = common::service::shutdown_on_signals();
    common::telemetry::register_series("af-worker");
    if let Some(bind) = &config.metrics_bind {
        match tokio::net::TcpListener::bind(bind).await {
            Ok(listener) => {
                tokio::spawn(common::telemetry::serve_metrics(listener, shutdown.clone()));
            }
            Err(e) => {
                eprintln!("af-worker: AF_WORKER_METRICS_BIND: cannot listen on {bind}: {e}");
                std::process::exit(2);
            }
        }
    }
    let code = match worker::run(config, shutdown).await {
        Ok(outcome) => {
            tracing::info!(reason = outcome.reason.as_str(), completed = outcome.jobs_completed,
                failed = outcome.jobs_failed, snapshot = ?outcome.snapshot.as_ref().map(|s| &s.snapshot_id),
                "worker stopped");
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            eprintln!("af-worker: {e}");
            e.exit_code()
        }
    };
    drop(guard); // Flush telemetry: process::exit skips destructors.
    std::process::exit(code);
}
