//! Rate limits (issue 14 item 4): with low configured limits, a token's next call over its
//! burst is a 429 `rate_limited` with `Retry-After` while other tokens go on; the admin token
//! has its own quota; the Telegram webhook is limited per bot after the secret check; a bucket
//! refills with the (manual) service clock; never a 5xx.

use std::time::Duration;

use serde_json::{Value, json};
use tests::TestStack;
use tests::fake_telegram::FakeTelegram;

use crate::telegram::agent_with_bot;

/// One `POST /v1/ops/<op>` with `Authorization: Bearer <token>`: status, Retry-After, body.
async fn call(stack: &TestStack, token: &str, op: &str, args: &Value) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(stack.http_url(&format!("/v1/ops/{op}")))
        .bearer_auth(token)
        .json(args)
        .send()
        .await
        .expect("ingress answers");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, retry_after, response.json().await.unwrap_or_default())
}

fn assert_refused(answer: &(u16, Option<String>, Value), retry_after: &str) {
    let (status, header, body) = answer;
    assert_eq!(*status, 429, "{body}");
    assert_eq!(header.as_deref(), Some(retry_after), "{body}");
    assert_eq!(body["error"]["code"], json!("rate_limited"), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("retry after {retry_after} s")), "{message}");
}

fn limited(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut overrides = tests::MANUAL.to_vec();
    overrides.push(("rate_limits.enabled", "true"));
    overrides.extend_from_slice(extra);
    overrides
}

#[tokio::test]
async fn rate_limits_refuse_one_token_over_its_burst_and_no_other() {
    let stack = TestStack::start_with(&limited(&[
        ("rate_limits.ops_per_minute", "1"),
        ("rate_limits.ops_burst", "3"),
        ("rate_limits.admin_ops_per_minute", "2"),
        ("rate_limits.admin_ops_burst", "2"),
    ]))
    .await;
    let w1 = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let w2 = stack.ctx.auth.mint_worker_token("w2").expect("token");
    let control = |worker: &str| json!({"workerId": worker});
    for _ in 0..3 {
        let (status, _, body) = call(&stack, &w1, "getWorkerControlState", &control("w1")).await;
        assert_eq!(status, 200, "{body}");
    }
    // The clock stands still (manual): the 4th call waits for one request's worth, 60 s.
    assert_refused(&call(&stack, &w1, "getWorkerControlState", &control("w1")).await, "60");
    // Refused calls spend nothing, and a refusal is not a failure of the service.
    assert_refused(&call(&stack, &w1, "getWorkerControlState", &control("w1")).await, "60");
    // Another worker's token is not affected, nor is the admin token (its own quota) ...
    let (status, _, body) = call(&stack, &w2, "getWorkerControlState", &control("w2")).await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..2 {
        let (status, _, body) = call(&stack, tests::ADMIN_TOKEN, "getQueueStats", &json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    // ... which is limited too: 2 a minute, so the next one is in 30 s.
    assert_refused(&call(&stack, tests::ADMIN_TOKEN, "getQueueStats", &json!({})).await, "30");
    // An unknown token spends its own bucket: still a 401 until its own burst is spent.
    let (status, _, body) = call(&stack, "not-a-token-at-all", "getQueueStats", &json!({})).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = call(&stack, &w1, "not_an_op", &json!({})).await;
    assert_eq!(status, 404, "an unknown operation is refused before any limit: {body}");

    // One minute later (manual clock, moved over NATS, not through ingress) w1 may call once more.
    stack.admin().ok("advanceTestClock", json!({"ms": 60_000})).await;
    tests::wait_until("w1's bucket refilled with the clock", Duration::from_secs(10), || async {
        let (status, _, _) = call(&stack, &w1, "getWorkerControlState", &control("w1")).await;
        (status == 200).then_some(())
    })
    .await;
    assert_refused(&call(&stack, &w1, "getWorkerControlState", &control("w1")).await, "60");

    let metrics = reqwest::get(stack.http_url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.lines().any(|l| l.starts_with("af_rate_limited_total{") && l.contains(r#"route="ops""#)),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn rate_limits_webhook_per_bot_after_the_secret_check() {
    let fake = FakeTelegram::start().await;
    let base = fake.base_url();
    let mut overrides = limited(&[("rate_limits.webhook_per_minute", "6"), ("rate_limits.webhook_burst", "2")]);
    overrides.push(("telegram.api_base_url", base.as_str()));
    overrides.push(("telegram.retry_base_delay_ms", "1"));
    let stack = TestStack::start_with(&overrides).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    agent_with_bot(&stack, &fake, "support", 1002).await;
    let secret = |bot: u64| fake.webhook(bot).and_then(|w| w.1).expect("secret");
    let update = |id: u64| {
        json!({"update_id": id, "message": {"message_id": id, "date": 0, "chat": {"id": 7, "type": "private"}, "from": {"id": 7, "is_bot": false, "first_name": "a"}, "text": "hi"}})
            .to_string()
    };
    let post = |secret: Option<String>, body: String| {
        let url = stack.http_url("/agent-factory/telegram/webhook");
        async move {
            let mut request = reqwest::Client::new().post(url).header("content-type", "application/json").body(body);
            if let Some(secret) = secret {
                request = request.header("x-telegram-bot-api-secret-token", secret);
            }
            let response = request.send().await.expect("ingress answers");
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            (status, retry_after, response.text().await.unwrap_or_default())
        }
    };
    for id in 1..=2 {
        let (status, _, body) = post(Some(secret(1001)), update(id)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, retry_after, body) = post(Some(secret(1001)), update(3)).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("10")), "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body, json!({"ok": false, "error": "too many updates, retry later"}));
    // A wrong secret is still a 403, not a 429: the limit applies once the bot is known.
    let (status, _, _) = post(Some("wrong-secret".to_string()), update(4)).await;
    assert_eq!(status, 403);
    let (status, _, _) = post(None, update(4)).await;
    assert_eq!(status, 403);
    // The other bot has its own budget.
    let (status, _, body) = post(Some(secret(1002)), update(1)).await;
    assert_eq!(status, 200, "{body}");
    stack.stop().await;
}

#[tokio::test]
async fn rate_limits_pairing_failures_per_bot_across_telegram_users() {
    let fake = FakeTelegram::start().await;
    let base = fake.base_url();
    let mut overrides = tests::MANUAL.to_vec();
    overrides.push(("telegram.api_base_url", base.as_str()));
    overrides.push(("telegram.retry_base_delay_ms", "1"));
    overrides.push(("telegram.pairing_max_failures_per_hour", "2"));
    overrides.push(("telegram.pairing_max_failures_per_bot_per_hour", "3"));
    let stack = TestStack::start_with(&overrides).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    agent_with_bot(&stack, &fake, "support", 1002).await;
    let not_found = "Pairing failed: Pairing code not found";
    let too_many = "Pairing failed: Too many pairing attempts; try again later";
    // Per Telegram user of a bot: 2 failures, then refused without a lookup.
    assert_eq!(crate::telegram::start(&fake, 1001, 11, "GUESS0001").await, not_found);
    assert_eq!(crate::telegram::start(&fake, 1001, 11, "GUESS0002").await, not_found);
    assert_eq!(crate::telegram::start(&fake, 1001, 11, "GUESS0003").await, too_many);
    // Per bot, whoever guesses: the third failure fills the bot's window, a fresh user is refused.
    assert_eq!(crate::telegram::start(&fake, 1001, 12, "GUESS0004").await, not_found);
    assert_eq!(crate::telegram::start(&fake, 1001, 13, "GUESS0005").await, too_many);
    // ... and a real code from that user too, until the hour has passed.
    let code = stack
        .app()
        .ok("createPairingCode", json!({"consumerUserId": "erin", "agentKey": "sales", "ttlMs": 86_400_000}))
        .await;
    let code = code["code"].as_str().expect("code").to_string();
    assert_eq!(crate::telegram::start(&fake, 1001, 13, &code).await, too_many);
    // Another bot's window is its own.
    assert_eq!(crate::telegram::start(&fake, 1002, 13, "GUESS0006").await, not_found);
    stack.admin().ok("advanceTestClock", json!({"ms": 3_600_001})).await;
    let answer = tests::wait_until("the bot's failure window moved on", Duration::from_secs(10), || async {
        let answer = crate::telegram::start(&fake, 1001, 13, &code).await;
        (answer != too_many).then_some(answer)
    })
    .await;
    assert!(answer.starts_with("Paired!"), "{answer}");
    stack.stop().await;
}
