//! The HTTP front door. It authenticates nothing itself and stores nothing: every
//! `POST /v1/ops/<name>` is forwarded over NATS with the caller's Authorization header, and the
//! owning service authenticates and answers. Besides the operations it serves the catalogue
//! (`GET /v1/ops`), liveness (`/healthz`), readiness (`/readyz`), Prometheus metrics
//! (`/metrics`), the file shim for snapshot archives and media ([`blobs`]) and the Telegram
//! webhook ([`telegram`]), which stores each update in a deduplicating stream before answering.
//!
//! Ingress rejects on its own only what it can judge without the services: an unknown operation
//! (404), a request without credentials (401), a token over its rate limit (429 with
//! `Retry-After`, see [`rate_limit`]) and a body over `http.max_body_bytes` (413). Everything
//! else, malformed JSON included, is judged by the owning service.

mod blobs;
mod console;
mod events;
mod rate_limit;
mod session;
mod telegram;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use common::ErrorCode;
use common::OpError;
use common::service::ServiceContext;
use opentelemetry::propagation::Extractor;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const SERVICE: &str = "ingress";

/// The services `/readyz` expects to answer a health ping.
pub const READY_SERVICES: &[&str] = &["queue-manager", "hydration", "scheduler", "push-dispatcher", "cleanup"];

/// How long `/readyz` waits for each check.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

const CONTENT_TYPE_JSON: &str = "application/json";
const CONTENT_TYPE_METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long in-flight requests get to finish once `shutdown` is cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves HTTP on `listener` until `shutdown` is cancelled; in-flight requests finish first
/// (for up to [`SHUTDOWN_GRACE`]). Each connection must send its request headers within
/// `http.header_timeout_ms` (also the next request's, on an idle keep-alive), and at most
/// `http.max_connections` are served at once: a slow or idle client cannot hold the server.
pub async fn run(
    ctx: ServiceContext,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    common::telemetry::register_series(SERVICE);
    let http = ctx.settings.http.clone();
    let app = router_until(ctx, shutdown.clone());
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(http.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(http.header_timeout_ms));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(common::telemetry::HTTP_CONNECTIONS_REFUSED).increment(1);
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    Ok(())
}

/// The complete HTTP application.
pub fn router(ctx: ServiceContext) -> Router {
    router_until(ctx, CancellationToken::new())
}

/// The application whose long-lived responses (the console's event streams) end when
/// `shutdown` is cancelled, so a graceful shutdown does not wait for them.
fn router_until(ctx: ServiceContext, shutdown: CancellationToken) -> Router {
    // Install the Prometheus recorder now, so operations handled before the first scrape count.
    common::telemetry::metrics_handle();
    let max_body = ctx.settings.http.max_body_bytes;
    let limits = rate_limit::Limits::start(&ctx.settings, &ctx.clock);
    Router::new()
        .route("/v1/ops", get(list_ops))
        .route("/v1/ops/{name}", post(call_op))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(console::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        // File transfers stream their bodies under their own limits (see blobs.rs).
        .route("/v1/snapshots/{id}/archive", put(blobs::put_snapshot).get(blobs::get_snapshot))
        .route("/v1/media", post(blobs::post_media))
        .route("/v1/media/{id}", get(blobs::get_media))
        // The Telegram webhook, with its own body limit and secret check (telegram.rs).
        .route_service(&ctx.settings.telegram.webhook_path(), telegram::router(ctx.clone(), limits.clone()))
        .layer(Extension(limits))
        .layer(Extension(std::sync::Arc::new(events::Hub::new(shutdown))))
        .layer(middleware::from_fn(trace_request))
        .with_state(ctx)
}

/// A JSON response with the given status.
fn json_response(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_JSON))], body).into_response()
}

/// The `{"error": {"code", "message"}}` response for `err`.
fn error_response(err: &OpError) -> Response {
    let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&err.to_body()).unwrap_or_default();
    json_response(status, Bytes::from(body))
}

async fn not_found(request: Request) -> Response {
    error_response(&OpError::not_found(format!("no route for {} {}", request.method(), request.uri().path())))
}

/// `POST /v1/ops/{name}`: forwards the body and the caller's Authorization header over NATS.
/// Each token's calls are counted against its rate limit first (429 with `Retry-After`).
async fn call_op(
    State(ctx): State<ServiceContext>,
    Extension(limits): Extension<std::sync::Arc<rate_limit::Limits>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let Some(spec) = common::ops::find(&name) else {
        return error_response(&OpError::not_found(format!("unknown operation '{name}'; GET /v1/ops lists them")));
    };
    let authorization = match console_or_bearer(&ctx, request.headers()).await {
        Ok(value) => value,
        Err(err) => return error_response(&err),
    };
    if let Err(wait) = limits.check_op(&authorization) {
        let secs = rate_limit::retry_after_secs(wait);
        let err = OpError::new(
            ErrorCode::RateLimited,
            format!("too many requests for this token; retry after {secs} s (rate_limits)"),
        );
        return rate_limit::with_retry_after(error_response(&err), wait);
    }
    let max = ctx.settings.http.max_body_bytes;
    if declared_length(request.headers()).is_some_and(|len| len > max as u64) {
        return error_response(&too_large(max));
    }
    // Reads at most `max` bytes (DefaultBodyLimit), whatever the client declared.
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error_response(&too_large(max));
        }
        Err(rejection) => {
            return error_response(&OpError::invalid(format!(
                "could not read the request body: {}",
                rejection.body_text()
            )));
        }
    };
    let wait = common::api::request_wait(spec, &body);
    let (status, reply) = ctx.ops.call_raw(spec.name, Some(&authorization), body, wait).await;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, reply)
}

/// The credential a call is forwarded with: the caller's Authorization header, or, for a
/// request with a console session cookie and no Authorization header, ingress's admin
/// credential once the session, its CSRF token and the request's origin are verified
/// ([`session::for_change`]). Every console call of an operation counts as a change.
async fn console_or_bearer(ctx: &ServiceContext, headers: &HeaderMap) -> Result<String, OpError> {
    if headers.contains_key(header::AUTHORIZATION) || !session::has_cookie(headers) {
        return authorization(headers);
    }
    session::for_change(ctx, headers).await?;
    session::forwarded_authorization(ctx)
}

/// The Authorization header, which must be present, non-empty and printable.
fn authorization(headers: &HeaderMap) -> Result<String, OpError> {
    let missing = || OpError::unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'");
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or_else(missing)?;
    if values.next().is_some() {
        // Which one would win is up to each proxy on the way: refuse rather than guess.
        return Err(OpError::unauthenticated("send exactly one Authorization header"));
    }
    let value = value.to_str().map_err(|_| OpError::unauthenticated("invalid bearer token"))?;
    if value.trim().is_empty() {
        return Err(missing());
    }
    Ok(value.to_string())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn too_large(max: usize) -> OpError {
    OpError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body exceeds the limit of {max} bytes (http.max_body_bytes)"),
    )
}

/// `GET /v1/ops`: the catalogue's metadata. Lists names and roles only, so it needs no token.
async fn list_ops() -> Response {
    let ops: Vec<Value> = common::ops::CATALOGUE
        .iter()
        .map(|spec| {
            json!({
                "name": spec.name,
                "service": spec.service.as_str(),
                "roles": spec.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                "summary": spec.summary,
            })
        })
        .collect();
    json_response(StatusCode::OK, Bytes::from(serde_json::to_vec(&ops).unwrap_or_default()))
}

/// `GET /openapi.json`: the OpenAPI 3.1 document of every operation, generated from the
/// contracts. Like the catalogue, it describes shapes only, so it needs no token.
async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
        Bytes::from(serde_json::to_vec(&common::api::openapi::document()).unwrap_or_default())
    });
    json_response(StatusCode::OK, DOCUMENT.clone())
}

/// `GET /healthz`: the process answers HTTP. Touches nothing else.
async fn healthz() -> Response {
    json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
}

/// `GET /readyz`: NATS connected, topology provisioned, every service answering health pings.
async fn readyz(State(ctx): State<ServiceContext>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut record = |name: &str, result: Result<(), String>| {
        let value = match result {
            Ok(()) => Value::from("ok"),
            Err(e) => {
                ready = false;
                Value::from(e)
            }
        };
        checks.insert(name.to_string(), value);
    };

    let state = ctx.nats.connection_state();
    record(
        "nats",
        match state {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(format!("not connected ({other})")),
        },
    );

    let topology = tokio::time::timeout(READY_CHECK_TIMEOUT, ctx.js.get_stream(common::topology::INBOX_STREAM)).await;
    record(
        "topology",
        match topology {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("stream {}: {e}", common::topology::INBOX_STREAM)),
            Err(_) => {
                Err(format!("stream {}: no answer within {READY_CHECK_TIMEOUT:?}", common::topology::INBOX_STREAM))
            }
        },
    );

    let pings = READY_SERVICES.iter().map(|service| {
        let nats = ctx.nats.clone();
        async move {
            let subject = common::service::health_subject(service);
            let result = match tokio::time::timeout(READY_CHECK_TIMEOUT, nats.request(subject, "".into())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("health ping failed: {e}")),
                Err(_) => Err(format!("no answer within {READY_CHECK_TIMEOUT:?}")),
            };
            (*service, result)
        }
    });
    for (service, result) in futures::future::join_all(pings).await {
        record(service, result);
    }

    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ok" } else { "unavailable" },
        "checks": checks,
    });
    json_response(status, Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))
}

/// `GET /metrics`: the process's metrics in Prometheus text format.
async fn metrics() -> Response {
    let text = common::telemetry::metrics_handle().render();
    (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_METRICS))], text).into_response()
}

/// Reads W3C trace context (`traceparent`, `tracestate`) from HTTP headers.
struct HttpHeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HttpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One span per request, continuing the caller's trace when it sent a `traceparent`. The
/// operation call inside inherits it, and the NATS client carries it on to the service. Only
/// method, route and status are recorded: never headers (Authorization) or bodies.
async fn trace_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HttpHeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    // The matched pattern, never the path itself: ids in paths would make unbounded series.
    metrics::counter!(common::telemetry::HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
    span.in_scope(|| {
        tracing::debug!(status, elapsed_ms = started.elapsed().as_secs_f64() * 1000.0, "request handled");
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_must_be_present_and_non_empty() {
        let mut headers = HeaderMap::new();
        assert_eq!(authorization(&headers).expect_err("refused").code, ErrorCode::Unauthenticated);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("  "));
        assert_eq!(authorization(&headers).expect_err("refused").code, ErrorCode::Unauthenticated);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(authorization(&headers).expect("accepted"), "Bearer x");
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer y"));
        assert_eq!(authorization(&headers).expect_err("two headers").code, ErrorCode::Unauthenticated);
    }

    #[test]
    fn too_large_is_413() {
        assert_eq!(too_large(1024).http_status(), 413);
    }
}
