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
        handle
    })
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
