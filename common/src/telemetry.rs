//! Logs, traces and metrics, set up once per process. Logs are human-readable by default and JSON
//! when configured; spans are exported over OTLP/HTTP when an endpoint is configured; the W3C
//! trace context rides in NATS headers (`traceparent`, `tracestate`, lowercase as ADR-4 requires)
//! so one trace follows a request across services. Metrics use the `metrics` facade and are
//! rendered in Prometheus text format by ingress at `/metrics`.

use std::sync::OnceLock;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetrySettings};

/// Histogram of operation handling time, labelled by `op` and `status`.
pub const OP_DURATION: &str = "af_op_duration_seconds";
/// Messages waiting in the queue (not done, not dead-lettered), including in flight.
pub const QUEUE_DEPTH: &str = "af_queue_depth";
/// Conversations whose next message could be handed out now.
pub const READY_CONVERSATIONS: &str = "af_ready_conversations";
/// Jobs handed to workers.
pub const CLAIMS: &str = "af_claims_total";
/// Leases that expired and were recovered.
pub const LEASE_EXPIRIES: &str = "af_lease_expiries_total";
/// Jobs moved to the dead letter.
pub const DEAD_LETTERS: &str = "af_dead_letters_total";
/// Jobs enqueued.
pub const ENQUEUED: &str = "af_enqueued_total";
/// Reconciles of the worker pool run (by the loop or called).
pub const RECONCILES: &str = "af_scheduler_reconciles_total";
/// Conversations needing a worker, as the last reconcile saw them.
pub const POOL_DEMAND: &str = "af_scheduler_demand";
/// Draining workers torn down at the drain deadline without their final snapshot (L10).
pub const FORCED_TEARDOWNS: &str = "af_scheduler_forced_teardowns_total";
/// Counter: connections ingress closed at accept because `http.max_connections` were open.
pub const HTTP_CONNECTIONS_REFUSED: &str = "af_http_connections_refused_total";
/// Counter: audit records that could not be appended to `AF_AUDIT` (the call itself went on).
pub const AUDIT_APPEND_FAILURES: &str = "af_audit_append_failures_total";
/// Counter: requests refused by a rate limit (429), labelled by `route`: `ops` (per token),
/// `webhook` (per bot), `pairing` (`/start <code>` attempts per Telegram user or bot).
pub const RATE_LIMITED: &str = "af_rate_limited_total";
/// Gauge: jobs in the dead letter.
pub const QUEUE_DEAD_LETTER: &str = "af_queue_dead_letter";
/// Gauge: jobs leased to a worker right now.
pub const QUEUE_PROCESSING: &str = "af_queue_processing";
/// Gauge: seconds the oldest claimable message has been waiting (since it became due); 0 when
/// none waits. A conversation stuck without a worker shows here first.
pub const QUEUE_OLDEST_AGE: &str = "af_queue_oldest_ready_age_seconds";
/// Histogram: seconds from a message becoming due (enqueued, or its retry time) to its lease.
pub const DISPATCH_LATENCY: &str = "af_dispatch_latency_seconds";
/// Counter: jobs completed by their worker.
pub const COMPLETIONS: &str = "af_completions_total";
/// Counter: jobs failed by their worker, labelled `outcome` = `retry` | `dead_letter`.
pub const FAILURES: &str = "af_failures_total";
/// Gauge: worker rows by `state`: `busy` and `idle` (active, with and without a leased job),
/// `draining`, `stopping`, `stopped`.
pub const WORKERS: &str = "af_workers";
/// Counter: worker spawns asked of a provider, labelled `provider` and `result` = `ok` | `error`.
pub const WORKER_SPAWNS: &str = "af_worker_spawns_total";
/// Counter: worker teardowns asked of a provider, labelled `provider` and `result`.
pub const WORKER_TEARDOWNS: &str = "af_worker_teardowns_total";
/// Counter: failed calls to a worker provider's API (Fly Machines, local processes), labelled
/// `provider` and `call`.
pub const PROVIDER_ERRORS: &str = "af_provider_api_errors_total";
/// Gauge: provider resources (machines, volumes) found without a worker by the last sweep.
pub const ORPHAN_RESOURCES: &str = "af_orphan_resources";
/// Histogram: bytes of the snapshot archives uploaded through ingress.
pub const SNAPSHOT_BYTES: &str = "af_snapshot_bytes";
/// Histogram: seconds an archive upload through ingress took (streamed to the object store).
pub const SNAPSHOT_DURATION: &str = "af_snapshot_upload_duration_seconds";
/// Counter: HTTP requests served by ingress, labelled `route` (the matched pattern) and `status`.
pub const HTTP_REQUESTS: &str = "af_http_requests_total";
/// Counter: Telegram updates the webhook accepted, labelled `duplicate`.
pub const TELEGRAM_UPDATES: &str = "af_telegram_updates_total";
/// Counter: jobs the reference worker finished, labelled `outcome` = `completed` | `failed`.
pub const WORKER_JOBS: &str = "af_worker_jobs_total";
/// Histogram: seconds the reference worker spent on a job, claim to completion.
pub const WORKER_JOB_DURATION: &str = "af_worker_job_duration_seconds";
/// Histogram: seconds the reference worker's snapshot upload took, and bytes uploaded.
pub const WORKER_SNAPSHOT_DURATION: &str = "af_worker_snapshot_duration_seconds";
pub const WORKER_SNAPSHOT_BYTES: &str = "af_worker_snapshot_bytes";

/// The states [`WORKERS`] is labelled with.
pub const WORKER_STATES: [&str; 5] = ["busy", "idle", "draining", "stopping", "stopped"];

static PROMETHEUS: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();

/// Keeps the OTLP pipeline alive; flushes it on drop.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The batch exporter runs on its own thread; shutting down flushes pending spans.
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber, propagator and metrics recorder. Safe to call more than once
/// (later calls keep the first subscriber), which lets tests call it freely.
pub fn init(service_name: &str, settings: &TelemetrySettings) -> anyhow::Result<TelemetryGuard> {
    install_crypto_provider();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    metrics_handle();

    let filter = EnvFilter::try_new(&settings.log_filter).map_err(|e| anyhow::anyhow!("telemetry.log_filter: {e}"))?;
    let fmt_layer = match settings.log_format {
        // Colours only on a terminal: logs redirected to a file stay plain text.
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().flatten_event(true).boxed(),
    };

    let mut provider = None;
    let otel_layer = match &settings.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint: {e}"))?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_string()).build();
            let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = p.tracer("agent-factory");
            provider = Some(p);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        None => None,
    };

    let _ = tracing_subscriber::registry().with(filter).with(fmt_layer).with(otel_layer).try_init();
    Ok(TelemetryGuard { provider })
}

/// reqwest with `rustls-no-provider` (and the OTLP exporter) need a process-wide crypto provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The process's Prometheus recorder (installed on first use).
pub fn metrics_handle() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(OP_DURATION.to_string()),
                &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_string()),
                    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_bytes".to_string()),
                    &[1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10],
                )
            })
            .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); then this handle renders nothing,
        // which only affects that process's /metrics output.
        let _ = metrics::set_global_recorder(recorder);
        metrics::describe_histogram!(OP_DURATION, metrics::Unit::Seconds, "operation handling time");
        metrics::describe_gauge!(QUEUE_DEPTH, "messages not yet done or dead-lettered");
        metrics::describe_gauge!(READY_CONVERSATIONS, "conversations with a claimable message");
        metrics::describe_counter!(CLAIMS, "jobs handed to workers");
        metrics::describe_counter!(LEASE_EXPIRIES, "expired leases recovered");
        metrics::describe_counter!(DEAD_LETTERS, "jobs moved to the dead letter");
        metrics::describe_counter!(ENQUEUED, "messages enqueued");
        metrics::describe_counter!(AUDIT_APPEND_FAILURES, "audit records that could not be appended");
        metrics::describe_gauge!(QUEUE_DEAD_LETTER, "jobs in the dead letter");
        metrics::describe_gauge!(QUEUE_PROCESSING, "jobs leased to a worker");
        metrics::describe_gauge!(QUEUE_OLDEST_AGE, metrics::Unit::Seconds, "age of the oldest claimable message");
        metrics::describe_histogram!(DISPATCH_LATENCY, metrics::Unit::Seconds, "from due to leased");
        metrics::describe_counter!(COMPLETIONS, "jobs completed");
        metrics::describe_counter!(FAILURES, "jobs failed by their worker");
        metrics::describe_gauge!(WORKERS, "worker rows by state");
        metrics::describe_counter!(WORKER_SPAWNS, "worker spawns asked of a provider");
        metrics::describe_counter!(WORKER_TEARDOWNS, "worker teardowns asked of a provider");
        metrics::describe_counter!(PROVIDER_ERRORS, "failed calls to a worker provider's API");
        metrics::describe_gauge!(ORPHAN_RESOURCES, "provider resources without a worker at the last sweep");
        metrics::describe_histogram!(SNAPSHOT_BYTES, metrics::Unit::Bytes, "snapshot archive sizes");
        metrics::describe_histogram!(SNAPSHOT_DURATION, metrics::Unit::Seconds, "snapshot archive upload time");
        metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests served by ingress");
        handle
    })
}

/// Registers the series `service` owns, at zero, so a scrape finds every series the dashboard
/// and the alert rules query from the start (a counter that never moved would otherwise be
/// absent, and `rate()` over it empty rather than 0).
pub fn register_series(service: &str) {
    metrics_handle();
    match service {
        "queue-manager" => {
            for name in [QUEUE_DEPTH, READY_CONVERSATIONS, QUEUE_DEAD_LETTER, QUEUE_PROCESSING, QUEUE_OLDEST_AGE] {
                metrics::gauge!(name).increment(0.0);
            }
            for name in [CLAIMS, LEASE_EXPIRIES, DEAD_LETTERS, ENQUEUED, COMPLETIONS] {
                metrics::counter!(name).increment(0);
            }
            for outcome in ["retry", "dead_letter"] {
                metrics::counter!(FAILURES, "outcome" => outcome).increment(0);
            }
            for state in WORKER_STATES {
                metrics::gauge!(WORKERS, "state" => state).increment(0.0);
            }
            // A registered histogram renders with empty buckets.
            let _ = metrics::histogram!(DISPATCH_LATENCY);
        }
        "scheduler" => {
            metrics::counter!(RECONCILES).increment(0);
            metrics::counter!(FORCED_TEARDOWNS).increment(0);
            metrics::gauge!(POOL_DEMAND).increment(0.0);
            for result in ["ok", "error"] {
                metrics::counter!(WORKER_SPAWNS, "result" => result).increment(0);
                metrics::counter!(WORKER_TEARDOWNS, "result" => result).increment(0);
            }
            metrics::counter!(PROVIDER_ERRORS, "call" => "spawn").increment(0);
        }
        "cleanup" => {
            metrics::gauge!(ORPHAN_RESOURCES).increment(0.0);
            metrics::counter!(PROVIDER_ERRORS, "call" => "sweep").increment(0);
        }
        "ingress" => {
            metrics::counter!(HTTP_CONNECTIONS_REFUSED).increment(0);
            metrics::counter!(RATE_LIMITED, "route" => "ops").increment(0);
            metrics::counter!(TELEGRAM_UPDATES, "duplicate" => "false").increment(0);
            let _ = metrics::histogram!(SNAPSHOT_BYTES);
            let _ = metrics::histogram!(SNAPSHOT_DURATION);
        }
        "hydration" => {
            metrics::counter!("af_telegram_updates_processed_total", "outcome" => "processed").increment(0);
        }
        "af-worker" => {
            for outcome in ["completed", "failed"] {
                metrics::counter!(WORKER_JOBS, "outcome" => outcome).increment(0);
            }
            let _ = metrics::histogram!(WORKER_JOB_DURATION);
            let _ = metrics::histogram!(WORKER_SNAPSHOT_DURATION);
            let _ = metrics::histogram!(WORKER_SNAPSHOT_BYTES);
        }
        _ => {}
    }
    metrics::counter!(AUDIT_APPEND_FAILURES).increment(0);
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown`: how a service
/// running on its own, or a worker, is scraped. Anything else is 404.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut stream, _) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        tokio::spawn(async move {
            // One request per connection: read the head (bounded in size and time), answer, close.
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let mut parts = line.split(|b| *b == b' ');
            let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let path = target.split(|b| *b == b'?').next().unwrap_or_default();
            let (status, content_type, body) = match (method, path) {
                (b"GET", b"/metrics") => {
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics_handle().render())
                }
                (b"GET", b"/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
                (b"GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics\n".to_string()),
                _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The W3C `traceparent` of the current span, when it belongs to a sampled trace (only when
/// spans are exported: without an OTLP pipeline there is no trace to continue).
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The `traceparent` of `span` (as [`current_traceparent`], for a span not entered).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    span.in_scope(current_traceparent)
}

/// Makes `span` a child of the W3C `traceparent` given (a job's stored trace context).
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The `traceparent` carried in NATS headers, if any.
pub fn traceparent_header(headers: Option<&HeaderMap>) -> Option<String> {
    headers?.get("traceparent").map(|v| v.as_str().to_string()).filter(|v| v.len() <= 128)
}

struct HeaderInjector<'a>(&'a mut HeaderMap);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's trace context into NATS headers.
pub fn inject_current_context(headers: &mut HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
}
