//! The HTTP front door over real HTTP: status codes and JSON error bodies of `POST /v1/ops/*`,
//! the catalogue, liveness, readiness, metrics and trace-context headers.

use serde_json::{Value, json};
use tests::{ADMIN_TOKEN, APP_TOKEN, TestStack};

/// Status, content type and JSON body of a POST to `/v1/ops/<op>`.
async fn post(stack: &TestStack, op: &str, token: Option<&str>, body: &str) -> (u16, String, Value) {
    let mut request = reqwest::Client::new()
        .post(stack.http_url(&format!("/v1/ops/{op}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    decode(request.send().await.expect("http request")).await
}

async fn get(stack: &TestStack, path: &str) -> (u16, String, Value) {
    decode(reqwest::get(stack.http_url(path)).await.expect("http request")).await
}

async fn decode(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, content_type, body)
}

/// Asserts a JSON error reply with `status` and `code`.
fn assert_error(reply: &(u16, String, Value), status: u16, code: &str) {
    let (got, content_type, body) = reply;
    assert_eq!(*got, status, "body: {body}");
    assert_eq!(content_type, "application/json", "body: {body}");
    assert_eq!(body["error"]["code"], json!(code), "body: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error message expected: {body}");
}

#[tokio::test]
async fn ingress_health_readiness_and_metrics() {
    let stack = TestStack::start().await;

    let (status, _, body) = get(&stack, "/healthz").await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let (status, content_type, body) = get(&stack, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/json");
    assert_eq!(body["status"], json!("ok"));
    for check in ["nats", "topology", "queue-manager", "hydration", "scheduler", "push-dispatcher", "cleanup"] {
        assert_eq!(body["checks"][check], json!("ok"), "{check}: {body}");
    }

    let (status, _, _) = post(&stack, "listAgentProfiles", Some(ADMIN_TOKEN), "{}").await;
    assert_eq!(status, 200);
    let response = reqwest::get(stack.http_url("/metrics")).await.expect("metrics");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("ascii").to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = response.text().await.expect("body");
    assert!(
        text.contains("af_op_duration_seconds") && text.contains("listAgentProfiles"),
        "metrics lack the operation histogram:\n{text}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn ingress_forwards_operations_and_continues_a_trace() {
    let stack = TestStack::start().await;
    let reply = post(
        &stack,
        "upsertAgentProfile",
        Some(ADMIN_TOKEN),
        r#"{"agentKey":"web","version":"1.0.0","secretsRef":[],"enabled":true}"#,
    )
    .await;
    assert_eq!(reply, (200, "application/json".to_string(), json!("web")));

    // The same request shape with a W3C traceparent: accepted, and answered the same way.
    let response = reqwest::Client::new()
        .post(stack.http_url("/v1/ops/listAgentProfiles"))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body("{}")
        .send()
        .await
        .expect("http request");
    let (status, _, body) = decode(response).await;
    assert_eq!(status, 200, "{body}");
    let keys: Vec<&str> =
        body.as_array().expect("a list of profiles").iter().filter_map(|p| p["agentKey"].as_str()).collect();
    assert_eq!(keys, ["web"]);

    // An empty body means no arguments.
    let (status, _, _) = post(&stack, "listAgentProfiles", Some(ADMIN_TOKEN), "").await;
    assert_eq!(status, 200);
    stack.stop().await;
}

#[tokio::test]
async fn ingress_authentication_errors_are_401_and_403() {
    let stack = TestStack::start().await;
    assert_error(&post(&stack, "listAgentProfiles", None, "{}").await, 401, "unauthenticated");
    assert_error(&post(&stack, "listAgentProfiles", Some("not-the-token"), "{}").await, 401, "unauthenticated");
    assert_error(&post(&stack, "listAgentProfiles", Some(APP_TOKEN), "{}").await, 403, "forbidden");
    assert_error(&post(&stack, "releaseStuckJobs", Some(APP_TOKEN), "{}").await, 403, "forbidden");
    stack.stop().await;
}

#[tokio::test]
async fn ingress_unknown_operations_and_routes_are_json_404() {
    let stack = TestStack::start().await;
    let reply = post(&stack, "noSuchOperation", Some(ADMIN_TOKEN), "{}").await;
    assert_error(&reply, 404, "not_found");
    assert!(reply.2["error"]["message"].as_str().is_some_and(|m| m.contains("noSuchOperation")), "{}", reply.2);
    // Unknown operations are refused before authentication: there is nothing to protect.
    assert_error(&post(&stack, "noSuchOperation", None, "{}").await, 404, "not_found");
    assert_error(&get(&stack, "/v2/elsewhere").await, 404, "not_found");
    stack.stop().await;
}

#[tokio::test]
async fn ingress_oversized_bodies_are_413_json() {
    let stack = TestStack::start_with(&[("http.max_body_bytes", "1024")]).await;
    let big = format!(r#"{{"agentKey":"{}"}}"#, "x".repeat(4096));
    assert_error(&post(&stack, "getAgentProfile", Some(ADMIN_TOKEN), &big).await, 413, "payload_too_large");
    // A body just under the limit is forwarded (and judged by the service).
    let fits = format!(r#"{{"agentKey":"{}"}}"#, "x".repeat(900));
    let (status, _, body) = post(&stack, "getAgentProfile", Some(ADMIN_TOKEN), &fits).await;
    assert_ne!(status, 413, "{body}");

    // Without a Content-Length the limit is enforced while reading.
    use tower::ServiceExt;
    let request = axum::http::Request::post("/v1/ops/getAgentProfile")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(axum::body::Body::from_stream(futures::stream::iter(
            (0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512])),
        )))
        .expect("request");
    assert!(request.headers().get("content-length").is_none());
    let response = ingress::router(stack.ctx.clone()).oneshot(request).await.expect("router answers");
    assert_eq!(response.status().as_u16(), 413);
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024).await.expect("body");
    let body: Value = serde_json::from_slice(&bytes).expect("json error body");
    assert_eq!(body["error"]["code"], json!("payload_too_large"));
    stack.stop().await;
}

#[tokio::test]
async fn ingress_bad_arguments_are_400_invalid_input() {
    let stack = TestStack::start().await;
    assert_error(&post(&stack, "getAgentProfile", Some(ADMIN_TOKEN), "{nope").await, 400, "invalid_input");
    assert_error(&post(&stack, "getAgentProfile", Some(ADMIN_TOKEN), r#"{"agentKey":5}"#).await, 400, "invalid_input");
    assert_error(&post(&stack, "getAgentProfile", Some(ADMIN_TOKEN), "[1,2]").await, 400, "invalid_input");
    stack.stop().await;
}

#[tokio::test]
async fn ingress_lists_the_catalogue_without_a_token() {
    let stack = TestStack::start().await;
    let (status, content_type, body) = get(&stack, "/v1/ops").await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let ops = body.as_array().expect("a list");
    assert_eq!(ops.len(), common::ops::CATALOGUE.len());
    let enqueue = ops.iter().find(|op| op["name"] == json!("enqueueMessage")).expect("enqueueMessage is listed");
    assert_eq!(enqueue["service"], json!("queue-manager"));
    assert_eq!(enqueue["roles"], json!(["admin", "app"]));
    assert!(enqueue["summary"].as_str().is_some_and(|s| !s.is_empty()));
    stack.stop().await;
}

#[tokio::test]
async fn ingress_carries_the_callers_trace_into_the_nats_request() {
    use futures::StreamExt;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    // What telemetry::init sets up when OTLP export is on, scoped to this test's thread (the
    // current-thread runtime runs ingress here too).
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());

    let stack = TestStack::start().await;
    // A plain subscription sees the request next to the hydration queue group that answers it.
    let mut requests = stack.ctx.nats.subscribe(common::ops::subject("listAgentProfiles")).await.expect("subscribe");
    stack.ctx.nats.flush().await.expect("flush");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(stack.http_url("/v1/ops/listAgentProfiles"))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .body("{}")
        .send()
        .await
        .expect("http request");
    assert_eq!(response.status().as_u16(), 200);

    let request = tokio::time::timeout(std::time::Duration::from_secs(5), requests.next())
        .await
        .expect("the forwarded request was seen")
        .expect("subscription open");
    let traceparent = request
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_string())
        .expect("the NATS request carries a traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], trace_id, "same trace: {traceparent}");
    assert_ne!(parts[2], caller_span, "ingress's own span is the parent: {traceparent}");
    stack.stop().await;
}
