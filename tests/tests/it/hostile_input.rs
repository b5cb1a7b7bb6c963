//! Inputs a hostile or careless caller sends, over real HTTP: each is refused with a clear 4xx
//! and nothing is stored (issue "Least privilege …", the defects found black-box).

use common::config::Settings;
use serde_json::json;
use tests::{ADMIN_TOKEN, MANUAL, TestStack, seed_profile};

async fn post(
    stack: &TestStack,
    op: &str,
    authorization: &[&str],
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().post(stack.http_url(&format!("/v1/ops/{op}"))).json(&body);
    for value in authorization {
        request = request.header("authorization", *value);
    }
    let response = request.send().await.expect("answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn hostile_authorization_headers_are_refused() {
    let stack = TestStack::start().await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    assert_eq!(post(&stack, "getQueueStats", &[&bearer], json!({})).await.0, 200);
    for headers in [
        vec![ADMIN_TOKEN.to_string()],                   // no scheme
        vec![format!("Basic {ADMIN_TOKEN}")],            // another scheme
        vec![format!("Bearer {ADMIN_TOKEN} extra")],     // a second word
        vec![bearer.clone(), "Bearer nope".to_string()], // two headers: which one wins is not ours to guess
        vec!["Bearer nope".to_string(), bearer.clone()],
    ] {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, body) = post(&stack, "getQueueStats", &headers, json!({})).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthenticated");
    }
    stack.stop().await;
}

#[test]
fn hostile_weak_configured_tokens_are_refused_at_start() {
    for (key, value) in [
        ("auth.admin_token", "a"),
        ("auth.app_token", "short-token"),
        ("auth.admin_token", "sixteen chars ok"),
        ("auth.worker_token_key", "too-short-for-a-signing-key"),
    ] {
        let err = Settings::from_overrides(&[(key, value)]).expect_err(key);
        assert!(err.to_string().contains(&format!("{key}: must be at least")), "{err}");
    }
    assert!(Settings::from_overrides(&[("auth.admin_token", "sixteen-chars-ok")]).is_ok());
}

#[tokio::test]
async fn hostile_numbers_and_files_are_refused_before_anything_is_stored() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-a").await;
    stack.wait_queue_ready().await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [bearer.as_str()];

    // A message due in the year 292 million would block its conversation for good.
    let mut message = tests::message("c1", "agent-a", "hi");
    message["scheduledFor"] = json!(i64::MAX);
    let (status, body) = post(&stack, "enqueueMessage", &auth, message).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("scheduledFor"), "{body}");
    let (_, items) = post(&stack, "listQueueItemsForConversation", &auth, json!({"conversationId": "c1"})).await;
    assert_eq!(items, json!([]), "nothing was queued");

    for size in [-1.0, 0.0, 0.5, 501.0] {
        let config = json!({"providerConfig": {"kind": "fly", "appName": "a", "volumeSizeGb": size}});
        let (status, body) = post(&stack, "setProviderRuntimeConfig", &auth, config).await;
        assert_eq!(status, 400, "{size}: {body}");
    }
    assert_eq!(post(&stack, "providerRuntimeConfig", &auth, json!({})).await.1, json!(null), "nothing stored");

    let http = reqwest::Client::new();
    let upload = |content_type: String, body: Vec<u8>| {
        http.post(stack.http_url("/v1/media"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let huge_type = format!("image/{}", "x".repeat(64 * 1024));
    let response = upload(huge_type, b"bytes".to_vec()).await.expect("answer");
    assert_eq!(response.status(), 400);
    let response = upload("image/png".to_string(), Vec::new()).await.expect("answer");
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["message"], "the file is empty");
    let response = upload("image/png".to_string(), b"bytes".to_vec()).await.expect("answer");
    assert_eq!(response.status(), 200, "a real file still goes through");
    stack.stop().await;
}

/// Reads from `stream` until the server closes it, failing if that takes longer than `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue, // an error response before the close is fine
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
        }
    }
}

#[tokio::test]
async fn hostile_slow_and_surplus_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let stack = TestStack::start_with(&[("http.header_timeout_ms", "500"), ("http.max_connections", "2")]).await;
    let addr = stack.http_addr;
    // Half a request header, then nothing: closed after the header timeout, token or not.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /v1/ops/getQueueStats HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    closed_within(&mut slow, std::time::Duration::from_secs(10)).await;
    stack.stop().await;

    // Two connections held open (each is inside its header timeout): a third is refused at once.
    let stack = TestStack::start_with(&[("http.header_timeout_ms", "30000"), ("http.max_connections", "2")]).await;
    let addr = stack.http_addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        held.push(stream);
    }
    let mut surplus = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = surplus.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    closed_within(&mut surplus, std::time::Duration::from_secs(10)).await;
    drop(held);
    // Once they are gone, the server serves again.
    tests::wait_until("a connection is served again", std::time::Duration::from_secs(10), || async {
        reqwest::get(stack.http_url("/healthz")).await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    stack.stop().await;
}
