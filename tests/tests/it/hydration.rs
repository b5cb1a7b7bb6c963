//! Conversation history, the hydration bundle and attachments (hydration service), black-box
//! through the operation catalogue and the ingress file shim, on a manual clock.

use common::ErrorCode;
use serde_json::{Value, json};
use tests::{MANUAL, T0, TestStack, message, seed_profile};

async fn stack() -> TestStack {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-a").await;
    stack.wait_queue_ready().await;
    stack
}

async fn enqueue_and_claim(stack: &TestStack, conversation: &str, agent: &str, worker: &str) -> Value {
    stack.app().ok("enqueueMessage", message(conversation, agent, "hello")).await;
    let job = stack.worker(worker).ok("claimNextJob", json!({"workerId": worker})).await;
    assert_eq!(job["conversationId"], conversation);
    job
}

fn items(pairs: &[(&str, i64, &str)]) -> Value {
    pairs.iter().map(|(role, at, content)| json!({"role": role, "content": content, "at": at})).collect()
}

async fn bundle(stack: &TestStack, worker: &str, job: &Value) -> Result<Value, common::OpError> {
    let args =
        json!({"messageId": job["messageId"], "workspaceId": "default", "conversationId": job["conversationId"]});
    stack.worker(worker).call("getHydrationBundleForClaimedJob", args).await
}

async fn import(stack: &TestStack, secret_ref: &str, value: &str) {
    stack.admin().ok("importPlaintextSecret", json!({"secretRef": secret_ref, "plaintextValue": value})).await;
}

#[tokio::test]
async fn hydration_bundle_has_the_spec_shape_and_resolves_the_bridge_vector() {
    let stack = stack().await;
    let admin = stack.admin();
    admin
        .ok(
            "upsertAgentProfile",
            json!({
                "agentKey": "bridge-agent", "version": "1.0.0", "enabled": true,
                "secretsRef": ["telegram.botToken.bridge-agent"],
                "bridgeConfig": {"enabled": true, "baseUrl": "https://consumer.example.com",
                                 "serviceId": "openclaw-prod", "appKey": "crm"},
            }),
        )
        .await;
    import(&stack, "agent-bridge.serviceKey.bridge-agent", "service-key-1").await;
    import(&stack, "agent-bridge.baseUrlMapJson.bridge-agent", r#"{"crm":"https://crm.example.com"}"#).await;
    import(&stack, "telegram.botToken.bridge-agent", "123:bot-token").await;

    let job = enqueue_and_claim(&stack, "c1", "bridge-agent", "w1").await;
    let appended = stack
        .worker("w1")
        .ok(
            "appendConversationMessages",
            json!({"conversationId": "c1", "messages": items(&[("user", 1, "hello"), ("assistant", 2, "world")])}),
        )
        .await;
    assert_eq!(appended, json!({"updated": true, "messageCount": 2}));

    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    let expected = json!({
        "messageId": job["messageId"],
        "conversationId": "c1",
        "agentKey": "bridge-agent",
        "payload": {"provider": "telegram", "providerUserId": "u1", "messageText": "hello",
                    "metadata": {"providerUserId": "u1"}},
        "conversationState": {
            "contextHistory": items(&[("user", 1, "hello"), ("assistant", 2, "world")]),
            "pendingToolCalls": [],
        },
        "telegramBotToken": "123:bot-token",
        "bridgeRuntimeConfig": {
            "baseUrl": "https://consumer.example.com",
            "appBaseUrlMapJson": r#"{"crm":"https://crm.example.com"}"#,
            "serviceId": "openclaw-prod",
            "appKey": "crm",
            "serviceKey": "service-key-1",
            "serviceKeySecretRef": "agent-bridge.serviceKey.bridge-agent",
            "botIdentity": null,
        },
    });
    assert_eq!(b, expected);

    // The hydration cache row carries the spec's fingerprint for exactly these two items.
    let cache = stack.ctx.buckets.history_cache.get::<Value>(&common::token::escape("c1")).await.expect("get");
    assert_eq!(cache.expect("cache row").value["deltaFingerprint"], "f575ac2a3");

    // The spawn-time bridge environment: the only bridge profile's values are unambiguous.
    let env = admin.ok("getWorkerSpawnOpenClawEnv", json!({})).await;
    assert_eq!(env, json!({"OPENCLAW_SERVICE_ID": "openclaw-prod", "OPENCLAW_SERVICE_KEY": "service-key-1"}));
}

#[tokio::test]
async fn hydration_bundle_is_refused_to_a_worker_without_the_lease() {
    let stack = stack().await;
    let job = enqueue_and_claim(&stack, "c1", "agent-a", "w1").await;
    let err = bundle(&stack, "w2", &job).await.expect_err("not the holder");
    assert_eq!(err.code, ErrorCode::Forbidden);
    assert!(bundle(&stack, "w1", &job).await.expect("holder").is_object());
    // An admin finds it without naming the conversation.
    let by_admin = stack
        .admin()
        .ok("getHydrationBundleForClaimedJob", json!({"messageId": job["messageId"], "workspaceId": "default"}))
        .await;
    assert_eq!(by_admin["messageId"], job["messageId"]);
    // After completion the job is no longer processing: no bundle.
    let done = json!({"workerId": "w1", "messageId": job["messageId"], "leaseId": job["leaseId"]});
    stack.worker("w1").ok("completeJob", done).await;
    assert_eq!(bundle(&stack, "w1", &job).await.expect("null"), Value::Null);
    // Once the lease has expired the former holder is refused too.
    let job = enqueue_and_claim(&stack, "c1", "agent-a", "w1").await;
    stack.admin().ok("advanceTestClock", json!({"ms": 360_001})).await;
    assert_eq!(bundle(&stack, "w1", &job).await.expect_err("expired").code, ErrorCode::Forbidden);
}

#[tokio::test]
async fn history_append_is_fenced_by_the_lease() {
    let stack = stack().await;
    enqueue_and_claim(&stack, "c1", "agent-a", "w1").await;
    let append = |worker: &'static str, text: &'static str| {
        let api = if worker == "admin" { stack.admin() } else { stack.worker(worker) };
        async move {
            api.call(
                "appendConversationMessages",
                json!({"conversationId": "c1", "messages": [{"role": "assistant", "content": text}]}),
            )
            .await
        }
    };
    assert_eq!(append("w1", "by the holder").await.expect("holder")["updated"], true);
    assert_eq!(append("w2", "by a stranger").await.expect_err("stranger").code, ErrorCode::Forbidden);
    stack.admin().ok("advanceTestClock", json!({"ms": 360_001})).await;
    assert_eq!(append("w1", "after expiry").await.expect_err("stale").code, ErrorCode::Forbidden);
    assert_eq!(append("admin", "by an operator").await.expect("admin")["updated"], true);

    let page = stack.admin().ok("getConversationHistory", json!({"conversationId": "c1"})).await;
    let texts: Vec<&str> =
        page["items"].as_array().expect("items").iter().map(|i| i["content"].as_str().expect("c")).collect();
    assert_eq!(texts, vec!["by an operator", "by the holder"], "newest first, refused appends absent");
    // The default `at` is the clock's now plus the index in the batch.
    assert_eq!(page["items"][1]["at"], T0);

    // An unknown conversation is not an error (spec §3.5.1).
    let unknown = json!({"conversationId": "nope", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(
        stack.admin().ok("appendConversationMessages", unknown).await,
        json!({"updated": false, "messageCount": 0})
    );
    let bad_role = json!({"conversationId": "c1", "messages": [{"role": "robot", "content": "x"}]});
    assert_eq!(stack.admin().err("appendConversationMessages", bad_role).await.code, ErrorCode::InvalidInput);
}

#[tokio::test]
async fn history_pages_newest_first_across_batches_and_concurrent_appends_are_all_kept() {
    let stack = stack().await;
    stack.app().ok("enqueueMessage", message("c1", "agent-a", "hi")).await;
    let admin = stack.admin();
    // 16 concurrent single-item appends: every one lands, none overwrites another.
    let appends = (0..16).map(|i| {
        let admin = admin.clone();
        async move {
            let m =
                json!({"conversationId": "c1", "messages": [{"role": "user", "content": format!("m{i}"), "at": i}]});
            admin.ok("appendConversationMessages", m).await
        }
    });
    futures::future::join_all(appends).await;
    // Then batches of 3, so pages cut through batches.
    for b in 0..4 {
        let batch: Vec<(&str, i64, String)> =
            (0..3).map(|i| ("assistant", 100 + b * 3 + i, format!("b{b}.{i}"))).collect();
        let messages: Value = batch.iter().map(|(r, at, c)| json!({"role": r, "content": c, "at": at})).collect();
        admin.ok("appendConversationMessages", json!({"conversationId": "c1", "messages": messages})).await;
    }
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let page =
            admin.ok("getConversationHistory", json!({"conversationId": "c1", "limit": 5, "cursor": cursor})).await;
        let items = page["items"].as_array().expect("items").clone();
        assert!(items.len() <= 5);
        seen.extend(items.iter().map(|i| i["content"].as_str().expect("content").to_string()));
        cursor = page["nextCursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(seen.len(), 28, "every item exactly once: {seen:?}");
    let batched: Vec<&str> = seen[..12].iter().map(String::as_str).collect();
    assert_eq!(
        batched,
        ["b3.2", "b3.1", "b3.0", "b2.2", "b2.1", "b2.0", "b1.2", "b1.1", "b1.0", "b0.2", "b0.1", "b0.0"]
    );
    let mut singles: Vec<String> = seen[12..].to_vec();
    singles.sort_by_key(|s| s[1..].parse::<u32>().expect("index"));
    assert_eq!(singles, (0..16).map(|i| format!("m{i}")).collect::<Vec<_>>());

    // The cache window follows the stream: the last 28 items in order, fingerprint included.
    let cache = stack.ctx.buckets.history_cache.get::<Value>(&common::token::escape("c1")).await.expect("get");
    let cache = cache.expect("row").value;
    let cached: Vec<&str> =
        cache["deltaContext"].as_array().expect("delta").iter().map(|i| i["content"].as_str().expect("c")).collect();
    let newest_first: Vec<&str> = cached.iter().rev().copied().collect();
    assert_eq!(newest_first, seen.iter().map(String::as_str).collect::<Vec<_>>());
    let bad = admin.err("getConversationHistory", json!({"conversationId": "c1", "cursor": "x"})).await;
    assert_eq!(bad.code, ErrorCode::InvalidInput);
}

async fn upload_media(stack: &TestStack, token: &str, bytes: &[u8], mime: &str) -> Value {
    let response = reqwest::Client::new()
        .post(stack.http_url("/v1/media"))
        .bearer_auth(token)
        .header("content-type", mime)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

async fn http_get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new().get(url).bearer_auth(token).send().await.expect("get")
}

#[tokio::test]
async fn attachments_are_stored_visible_at_claim_time_and_expire_with_their_files() {
    let stack = stack().await;
    let photo = b"\x89PNG not really a png".to_vec();
    let uploaded = upload_media(&stack, tests::APP_TOKEN, &photo, "image/png").await;
    let storage_id = uploaded["storageId"].as_str().expect("storage id").to_string();
    assert_eq!(uploaded["sizeBytes"], photo.len());
    let orphan = upload_media(&stack, tests::APP_TOKEN, b"never attached", "text/plain").await;

    let message_id = stack.app().ok("enqueueMessage", message("c1", "agent-a", "look")).await;
    let attach = |id: &str| {
        json!({"messageId": message_id, "conversationId": "c1",
               "attachments": [{"kind": "photo", "storageId": id, "telegramFileId": "tg-1", "fileName": "cat.png",
                                "mimeType": "image/png"}]})
    };
    let records = stack.app().ok("attachMessageMedia", attach(&storage_id)).await;
    assert_eq!(records[0]["status"], "ready");
    assert_eq!(records[0]["expiresAt"], T0 + 604_800_000);
    assert_eq!(stack.app().err("attachMessageMedia", attach("m-nope")).await.code, ErrorCode::NotFound);
    let wrong_kind = json!({"messageId": message_id, "conversationId": "c1",
                            "attachments": [{"kind": "hologram", "storageId": storage_id}]});
    assert_eq!(stack.app().err("attachMessageMedia", wrong_kind).await.code, ErrorCode::InvalidInput);

    // At claim time the bundle lists it with a link only the lease holder can follow.
    let job = stack.worker("w1").ok("claimNextJob", json!({"workerId": "w1"})).await;
    assert_eq!(job["messageId"], message_id);
    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    let attachment = &b["payload"]["attachments"][0];
    assert_eq!((attachment["kind"].as_str(), attachment["status"].as_str()), (Some("photo"), Some("ready")));
    assert_eq!(attachment["fileName"], "cat.png");
    let url = attachment["downloadUrl"].as_str().expect("download url").to_string();
    let w1 = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let got = http_get(&url, &w1).await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    assert_eq!(got.bytes().await.expect("body").to_vec(), photo);
    assert_eq!(http_get(&url, &stack.ctx.auth.mint_worker_token("w2").expect("t")).await.status(), 403);
    assert_eq!(http_get(&url, tests::APP_TOKEN).await.status(), 403);

    // Past retention the sweep deletes the file and marks the record; the orphan goes too.
    let admin = stack.admin();
    // The original's result: how many attachments expired (orphaned files go too, uncounted).
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(0));
    admin.ok("advanceTestClock", json!({"ms": 604_800_000})).await;
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(1));
    for id in [storage_id.as_str(), orphan["storageId"].as_str().expect("id")] {
        let info = stack.ctx.buckets.media.info(id).await;
        assert!(info.map_or(true, |i| i.deleted), "file {id} is deleted");
    }
    let listed = admin.ok("listMessageAttachments", json!({"messageId": message_id})).await;
    assert_eq!(listed[0]["status"], "expired");

    // A later claim of the same message sees it expired, without a link.
    admin.ok("releaseStuckJobs", json!({})).await;
    let job = stack.worker("w1").ok("claimNextJob", json!({"workerId": "w1"})).await;
    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    assert_eq!(b["payload"]["attachments"][0]["status"], "expired");
    assert!(b["payload"]["attachments"][0].get("downloadUrl").is_none());
}

#[tokio::test]
async fn hydration_bundle_carries_the_agents_model_settings_from_its_scoped_secrets() {
    let stack = stack().await;
    // No model secret: the field is absent (the original's shape).
    let job = enqueue_and_claim(&stack, "c1", "agent-a", "w1").await;
    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    assert!(b.get("modelRuntimeConfig").is_none(), "{b}");
    stack
        .worker("w1")
        .ok("completeJob", json!({"workerId": "w1", "messageId": job["messageId"], "leaseId": job["leaseId"]}))
        .await;

    // The agent's own ref wins over the global one; unset fields are null.
    import(&stack, "model.baseUrl", "https://global.example/v1").await;
    import(&stack, "model.baseUrl.agent-a", "https://agent-a.example/v1").await;
    import(&stack, "model.name", "gpt-test").await;
    import(&stack, "model.apiKey.agent-a", "sk-agent-a").await;
    let job = enqueue_and_claim(&stack, "c1", "agent-a", "w1").await;
    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    assert_eq!(
        b["modelRuntimeConfig"],
        json!({"baseUrl": "https://agent-a.example/v1", "model": "gpt-test", "apiKey": "sk-agent-a", "api": null})
    );
}
