//! The original's shapes (issue 10): attachments given in the enqueue payload (spec §3.4.1 step
//! 6, §3.6), `attachMessageMetadata`, `generateMediaUploadUrl`, `getStorageFileUrl` (spec
//! §3.4.8) and `resolveAgentForTelegram` (spec §3.8.3), black-box through the catalogue and the
//! ingress file shim, on a manual clock.

use common::ErrorCode;
use serde_json::{Value, json};
use tests::{APP_TOKEN, MANUAL, T0, TestStack, seed_profile};

const RETENTION_MS: i64 = 60_000;

async fn stack() -> TestStack {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-a").await;
    stack.wait_queue_ready().await;
    stack
}

async fn upload(stack: &TestStack, url: &str, token: &str, bytes: &[u8], mime: &str) -> String {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", mime)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 200, "POST {url}");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["sizeBytes"], bytes.len());
    let _ = stack;
    body["storageId"].as_str().expect("storageId").to_string()
}

async fn http_get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new().get(url).bearer_auth(token).send().await.expect("get")
}

fn enqueue_args(conversation: &str, attachments: Value) -> Value {
    json!({
        "conversationId": conversation,
        "agentKey": "agent-a",
        "payload": {"provider": "telegram", "providerUserId": "u1", "messageText": "look",
                    "metadata": {"telegramChatId": "42"}, "attachments": attachments},
    })
}

async fn bundle(stack: &TestStack, worker: &str, job: &Value) -> Result<Value, common::OpError> {
    let args =
        json!({"messageId": job["messageId"], "workspaceId": "default", "conversationId": job["conversationId"]});
    stack.worker(worker).call("getHydrationBundleForClaimedJob", args).await
}

async fn media_exists(stack: &TestStack, storage_id: &str) -> bool {
    stack.ctx.buckets.media.info(storage_id).await.is_ok_and(|info| !info.deleted)
}

#[tokio::test]
async fn original_shapes_payload_attachments_are_recorded_served_downloaded_and_expired() {
    let stack = stack().await;
    let (admin, app) = (stack.admin(), stack.app());
    admin
        .ok("setMessageRuntimeConfig", json!({"messageConfig": {"telegramAttachmentRetentionMs": RETENTION_MS}}))
        .await;

    // The upload link answers where to POST; the file goes there with the app's token.
    let link = app.ok("generateMediaUploadUrl", json!({})).await;
    let upload_url = link["uploadUrl"].as_str().expect("uploadUrl").to_string();
    assert_eq!(upload_url, stack.http_url("/v1/media"));
    let photo = b"\x89PNG not really a png".to_vec();
    let storage_id = upload(&stack, &upload_url, APP_TOKEN, &photo, "image/png").await;

    // Enqueued as the original's Telegram ingress did: the attachment inside the payload. A
    // stored link is never passed on.
    let items = json!([{"kind": "photo", "status": "ready", "storageId": storage_id, "telegramFileId": "tg-1",
                        "fileName": "cat.png", "downloadUrl": "http://evil.example/steal"}]);
    let message_id = app.ok("enqueueMessage", enqueue_args("c1", items)).await;

    // One record, linked to the message.
    let records = app.ok("listMessageAttachments", json!({"messageId": message_id})).await;
    let records = records.as_array().expect("records").clone();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record["messageId"], message_id);
    assert_eq!(record["conversationId"], "c1");
    assert_eq!(record["agentKey"], "agent-a");
    assert_eq!(record["provider"], "telegram");
    assert_eq!(record["kind"], "photo");
    assert_eq!(record["status"], "ready");
    assert_eq!(record["storageId"], storage_id.as_str());
    assert_eq!(record["telegramFileId"], "tg-1");
    assert_eq!(record["fileName"], "cat.png");
    assert_eq!(record["mimeType"], "image/png", "the upload's content type when the item names none");
    assert_eq!(record["sizeBytes"], photo.len());
    assert_eq!(record["createdAt"], T0);
    assert_eq!(record["expiresAt"], T0 + RETENTION_MS);

    // The queue item shows the recorded values, without a link.
    let listed = app.ok("listQueueItemsForConversation", json!({"conversationId": "c1"})).await;
    let item = &listed[0]["payload"]["attachments"][0];
    assert_eq!(item["status"], "ready");
    assert_eq!(item["sizeBytes"], photo.len());
    assert!(item.get("downloadUrl").is_none(), "{item}");
    assert_eq!(
        app.ok("getStorageFileUrl", json!({"storageId": storage_id})).await,
        json!(stack.http_url(&format!("/v1/media/{storage_id}")))
    );

    // The claim carries the payload as stored; the bundle adds the lease-gated link.
    let job = stack.worker("w1").ok("claimNextJob", json!({"workerId": "w1"})).await;
    assert_eq!(job["messageId"], message_id);
    assert_eq!(job["payload"]["attachments"][0]["status"], "ready");
    assert!(job["payload"]["attachments"][0].get("downloadUrl").is_none());
    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    let attachment = &b["payload"]["attachments"][0];
    assert_eq!(attachment["status"], "ready");
    assert_eq!(attachment["telegramFileId"], "tg-1");
    assert_eq!(attachment["expiresAt"], T0 + RETENTION_MS);
    let url = attachment["downloadUrl"].as_str().expect("downloadUrl").to_string();
    assert_eq!(url, stack.http_url(&format!("/v1/media/{storage_id}")));
    let w1 = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let got = http_get(&url, &w1).await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    assert_eq!(got.bytes().await.expect("body").to_vec(), photo);
    assert_eq!(http_get(&url, &stack.ctx.auth.mint_worker_token("w2").expect("t")).await.status(), 403);
    assert_eq!(http_get(&url, APP_TOKEN).await.status(), 403);

    // Past retention (the lease of 6 minutes still runs) the sweep answers the original's count.
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(0));
    admin.ok("advanceTestClock", json!({"ms": RETENTION_MS})).await;
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(1));
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(0), "nothing left to expire");
    assert!(!media_exists(&stack, &storage_id).await, "the file is deleted");

    let b = bundle(&stack, "w1", &job).await.expect("bundle after expiry");
    let attachment = &b["payload"]["attachments"][0];
    assert_eq!(attachment["status"], "expired");
    assert!(attachment.get("downloadUrl").is_none(), "{attachment}");
    let refused = http_get(&url, &w1).await;
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.expect("json error");
    assert_eq!(body["error"]["message"], format!("attachment '{storage_id}' has expired"));
    let records = app.ok("listMessageAttachments", json!({"messageId": message_id})).await;
    assert_eq!(records[0]["status"], "expired");
    let listed = app.ok("listQueueItemsForConversation", json!({"conversationId": "c1"})).await;
    assert_eq!(listed[0]["payload"]["attachments"][0]["status"], "expired");
    assert_eq!(app.ok("getStorageFileUrl", json!({"storageId": storage_id})).await, Value::Null);
    stack.stop().await;
}

#[tokio::test]
async fn original_shapes_enqueue_refuses_malformed_attachments_naming_the_path() {
    let stack = stack().await;
    let app = stack.app();
    let good = upload(&stack, &stack.http_url("/v1/media"), APP_TOKEN, b"abc", "text/plain").await;
    let item = |kind: &str, storage_id: &str| json!({"kind": kind, "storageId": storage_id, "telegramFileId": "t"});
    let cases: Vec<(Value, &str)> = vec![
        (json!([item("hologram", &good)]), "payload.attachments[0].kind: unknown variant `hologram`"),
        (json!([item("photo", "a.b")]), "payload.attachments[0].storageId: invalid storage id"),
        (json!([item("photo", &"x".repeat(5000))]), "payload.attachments[0].storageId: invalid storage id"),
        (json!([{"kind": "photo"}]), "payload.attachments[0]: missing field `storageId`"),
        (json!([{"kind": "photo", "storageId": good, "colour": "red"}]), "unknown field `colour`"),
        (json!([{"kind": "photo", "storageId": good, "sizeBytes": -1}]), "payload.attachments[0].sizeBytes"),
        (json!([{"kind": "photo", "storageId": good, "status": "expired"}]), "payload.attachments[0].status"),
        (json!([{"kind": "photo", "storageId": good, "status": "gone"}]), "payload.attachments[0].status"),
        (json!([item("photo", &good), item("video", &good)]), "payload.attachments[1].storageId"),
        (json!("photo"), "payload.attachments: invalid type"),
        (json!([item("photo", &good), item("photo", "m-nope")]), "payload.attachments[1].storageId: no uploaded file"),
        (
            Value::Array((0..11).map(|i| item("photo", &format!("m{i}"))).collect()),
            "payload.attachments: a message may carry at most 10 attachments",
        ),
    ];
    for (attachments, expected) in cases {
        let err = app.err("enqueueMessage", enqueue_args("c1", attachments.clone())).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{attachments}: {}", err.message);
        assert!(err.message.contains(expected), "{attachments}: '{}' should contain '{expected}'", err.message);
        assert!(err.message.starts_with("payload.attachments"), "names the path: {}", err.message);
    }
    // Nothing was queued and nothing recorded: files are checked before any record is written.
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!(stats["queuedTotal"], 0);
    assert!(stack.ctx.buckets.attachments.keys().await.expect("keys").is_empty());
    // Without text, attachments are enough; an empty list is no attachment.
    let mut no_text = enqueue_args("c1", json!([item("document", &good)]));
    no_text["payload"]["messageText"] = json!("");
    app.ok("enqueueMessage", no_text).await;
    let mut empty = enqueue_args("c2", json!([]));
    empty["payload"]["messageText"] = json!(" ");
    let err = app.err("enqueueMessage", empty).await;
    assert_eq!(err.message, "payload.messageText must not be empty when there are no attachments");
    stack.stop().await;
}

#[tokio::test]
async fn original_shapes_records_are_idempotent_and_a_shared_file_lives_until_its_last_record() {
    let stack = stack().await;
    let admin = stack.admin();
    let storage_id = upload(&stack, &stack.http_url("/v1/media"), APP_TOKEN, b"shared", "image/jpeg").await;
    // What a crash between recording and publishing leaves: records of a message id that was
    // never published. Recording is idempotent (a retried call finds the same record).
    let never_published = uuid::Uuid::now_v7().to_string();
    let record = json!({"messageId": never_published, "conversationId": "c1", "agentKey": "agent-a",
                        "provider": "telegram",
                        "attachments": [{"kind": "photo", "storageId": storage_id}]});
    let first = admin.ok("recordPayloadAttachments", record.clone()).await;
    admin.ok("advanceTestClock", json!({"ms": 1_000})).await;
    let again = admin.ok("recordPayloadAttachments", record.clone()).await;
    assert_eq!(first, again, "the first record stands");
    assert_eq!(first[0]["expiresAt"], T0 + 604_800_000, "default retention: 7 days");
    // Not for apps or workers: it is enqueue's step.
    assert_eq!(stack.app().err("recordPayloadAttachments", record).await.code, ErrorCode::Forbidden);
    assert_eq!(
        admin.ok("attachMessageMetadata", json!({"messageId": never_published, "metadata": {"k": "v"}})).await,
        json!(false),
        "the message itself does not exist"
    );

    // A day later the same file is enqueued for real: a second record, expiring a day later.
    admin.ok("advanceTestClock", json!({"ms": 86_400_000})).await;
    let items = json!([{"kind": "photo", "storageId": storage_id, "telegramFileId": "tg"}]);
    let message_id = stack.app().ok("enqueueMessage", enqueue_args("c1", items)).await;
    // The first record's expiry leaves the file to the second one; the second deletes it.
    admin.ok("setTestClock", json!({"nowMs": T0 + 604_800_000})).await;
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(1));
    assert!(media_exists(&stack, &storage_id).await, "still named by a ready record");
    let records = admin.ok("listMessageAttachments", json!({"messageId": message_id})).await;
    assert_eq!(records[0]["status"], "ready");
    admin.ok("advanceTestClock", json!({"ms": 86_400_000 + 2_000})).await;
    assert_eq!(admin.ok("expireOldTelegramAttachments", json!({})).await, json!(1));
    assert!(!media_exists(&stack, &storage_id).await, "deleted with its last record");
    stack.stop().await;
}

#[tokio::test]
async fn original_shapes_attach_message_metadata_merges_where_the_payload_is_served() {
    let stack = stack().await;
    let (admin, app) = (stack.admin(), stack.app());
    let message = |conversation: &str| {
        json!({"conversationId": conversation, "agentKey": "agent-a",
               "payload": {"provider": "telegram", "providerUserId": " u1 ", "messageText": "hi",
                           "metadata": {"a": "1"}}})
    };
    let m1 = app.ok("enqueueMessage", message("c1")).await;
    let m2 = app.ok("enqueueMessage", message("c1")).await;

    // By id alone (the original's arguments), then with the optional conversation.
    let attach = |id: &Value, metadata: Value| json!({"messageId": id, "metadata": metadata});
    assert_eq!(app.ok("attachMessageMetadata", attach(&m1, json!({"a": "2", "b": "3"}))).await, json!(true));
    let mut with_conversation = attach(&m1, json!({"c": "4"}));
    with_conversation["conversationId"] = json!("c1");
    assert_eq!(admin.ok("attachMessageMetadata", with_conversation).await, json!(true));
    let mut elsewhere = attach(&m1, json!({"c": "5"}));
    elsewhere["conversationId"] = json!("c-other");
    assert_eq!(admin.ok("attachMessageMetadata", elsewhere).await, json!(false), "not in that conversation");
    // Missing messages answer false; hostile ids and metadata are refused.
    let unknown = json!(uuid::Uuid::now_v7().to_string());
    assert_eq!(app.ok("attachMessageMetadata", attach(&unknown, json!({"k": "v"}))).await, json!(false));
    assert_eq!(app.ok("attachMessageMetadata", attach(&json!("m-nope"), json!({"k": "v"}))).await, json!(false));
    for (args, field) in [
        (attach(&json!("a.>"), json!({})), "messageId"),
        (json!({"messageId": m1}), "metadata"),
        (attach(&m1, json!({"k": 1})), "metadata.k"),
        (attach(&m1, json!({"": "v"})), "metadata"),
        (attach(&m1, json!({"k\n": "v"})), "metadata"),
        (attach(&m1, json!({"k": "v".repeat(4097)})), "metadata.k"),
        (json!({"messageId": m1, "metadata": {}, "extra": 1}), "extra"),
    ] {
        let err = app.err("attachMessageMetadata", args.clone()).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{args}");
        assert!(err.message.contains(field), "{args}: {}", err.message);
    }
    let many: serde_json::Map<String, Value> = (0..64).map(|i| (format!("k{i}"), json!("v"))).collect();
    let err = app.err("attachMessageMetadata", attach(&m1, Value::Object(many))).await;
    assert!(err.message.contains("at most 64 attached keys"), "{}", err.message);

    // The worker holding the lease may attach to its own message, and only to it.
    let job = stack.worker("w1").ok("claimNextJob", json!({"workerId": "w1"})).await;
    assert_eq!(job["messageId"], m1);
    let own = json!({"messageId": m1, "metadata": {"d": "6"}});
    assert_eq!(stack.worker("w1").ok("attachMessageMetadata", own.clone()).await, json!(true));
    let err = stack.worker("w2").err("attachMessageMetadata", own).await;
    assert_eq!(err.code, ErrorCode::Forbidden);
    let err = stack.worker("w1").err("attachMessageMetadata", attach(&m2, json!({"d": "7"}))).await;
    assert_eq!(err.code, ErrorCode::Forbidden, "not its leased message");

    let merged = json!({"providerUserId": "u1", "a": "2", "b": "3", "c": "4", "d": "6"});
    let b = bundle(&stack, "w1", &job).await.expect("bundle");
    assert_eq!(b["payload"]["metadata"], merged);
    let listed = app.ok("listQueueItemsForConversation", json!({"conversationId": "c1"})).await;
    let by_id = |id: &Value| listed.as_array().expect("rows").iter().find(|r| r["_id"] == *id).cloned().expect("row");
    assert_eq!(by_id(&m1)["payload"]["metadata"], merged);
    assert_eq!(by_id(&m2)["payload"]["metadata"], json!({"providerUserId": "u1", "a": "1"}));

    // A finished message is still found (by the time in its id) and keeps what was attached.
    let done = json!({"workerId": "w1", "messageId": m1, "leaseId": job["leaseId"]});
    stack.worker("w1").ok("completeJob", done).await;
    assert_eq!(app.ok("attachMessageMetadata", attach(&m1, json!({"e": "8"}))).await, json!(true));
    let err = stack.worker("w1").err("attachMessageMetadata", attach(&m1, json!({"e": "9"}))).await;
    assert_eq!(err.code, ErrorCode::Forbidden, "the lease ended with the job");
    stack.stop().await;
}

#[tokio::test]
async fn original_shapes_media_links_and_their_errors() {
    let stack = stack().await;
    for api in [stack.admin(), stack.app(), stack.worker("w1")] {
        let link = api.ok("generateMediaUploadUrl", json!({})).await;
        assert_eq!(link, json!({"uploadUrl": stack.http_url("/v1/media")}));
    }
    let err = stack.app().err("generateMediaUploadUrl", json!({"kind": "photo"})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    let err = stack.client("not-a-token").err("generateMediaUploadUrl", json!({})).await;
    assert_eq!(err.code, ErrorCode::Unauthenticated);

    let w1 = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let storage_id = upload(&stack, &stack.http_url("/v1/media"), &w1, b"made by a worker", "text/plain").await;
    let url = stack.worker("w1").ok("getStorageFileUrl", json!({"storageId": storage_id})).await;
    assert_eq!(url, json!(stack.http_url(&format!("/v1/media/{storage_id}"))));
    // The link is gated as every media download: an admin may follow it.
    let got = http_get(url.as_str().expect("url"), tests::ADMIN_TOKEN).await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.expect("body").as_ref(), b"made by a worker");
    assert_eq!(stack.app().ok("getStorageFileUrl", json!({"storageId": "m0000"})).await, Value::Null);
    for hostile in ["", "a.b", "a/b", "*", "é", &"x".repeat(200)] {
        let err = stack.app().err("getStorageFileUrl", json!({"storageId": hostile})).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{hostile:?}");
        assert!(err.message.contains("storageId"), "{}", err.message);
    }
    let err = stack.app().err("getStorageFileUrl", json!({})).await;
    assert!(err.message.contains("missing field `storageId`"), "{}", err.message);
    stack.stop().await;
}

#[tokio::test]
async fn original_shapes_resolve_agent_for_telegram_stays_within_its_bot() {
    let stack = stack().await;
    let (admin, app) = (stack.admin(), stack.app());
    seed_profile(&stack.ctx, "agent-b").await;
    let bind = |user: &str, agent: &str, bot: &str, tg_user: &str, tg_chat: &str| {
        json!({"consumerUserId": user, "agentKey": agent, "botIdentity": bot, "source": "telegram_pairing",
               "telegramUserId": tg_user, "telegramChatId": tg_chat})
    };
    admin.ok("bindUserAgent", bind("u1", "agent-a", "bot-1", "42", "420")).await;
    // The same Telegram ids under another bot are another identity.
    admin.ok("bindUserAgent", bind("u2", "agent-b", "bot-2", "42", "420")).await;

    let resolve = |args: Value| {
        let app = app.clone();
        async move { app.call("resolveAgentForTelegram", args).await }
    };
    let u1 = json!({"consumerUserId": "u1", "agentKey": "agent-a", "conversationId": "user-agent:agent-a:u1"});
    let none = json!({"consumerUserId": null, "agentKey": null, "conversationId": null});
    assert_eq!(resolve(json!({"botIdentity": "bot-1", "telegramUserId": "42"})).await.expect("by user"), u1);
    assert_eq!(resolve(json!({"botIdentity": " bot-1 ", "telegramChatId": " 420 "})).await.expect("by chat"), u1);
    assert_eq!(
        resolve(json!({"botIdentity": "bot-1", "telegramUserId": "7", "telegramChatId": "420"})).await.expect("chat"),
        u1,
        "an unknown user falls back to the chat, within the bot"
    );
    assert_eq!(
        resolve(json!({"botIdentity": "bot-2", "telegramUserId": "42"})).await.expect("other bot")["agentKey"],
        "agent-b"
    );
    assert_eq!(resolve(json!({"botIdentity": "bot-3", "telegramUserId": "42"})).await.expect("unknown bot"), none);
    assert_eq!(resolve(json!({"botIdentity": "bot-1"})).await.expect("no ids"), none);
    assert_eq!(resolve(json!({"botIdentity": "bot-1", "telegramUserId": " "})).await.expect("blank"), none);

    // No lookup across bots (T9, S8): a missing bot is refused, never guessed.
    for args in [json!({"telegramUserId": "42"}), json!({"botIdentity": "  ", "telegramUserId": "42"})] {
        let err = resolve(args).await.expect_err("no bot");
        assert_eq!(err.code, ErrorCode::InvalidInput);
        assert!(err.message.starts_with("botIdentity: required"), "{}", err.message);
    }
    for (args, field) in [
        (json!({"botIdentity": "bot-1", "telegramUserId": "4\n2"}), "telegramUserId"),
        (json!({"botIdentity": "bot-1", "telegramChatId": "9".repeat(300)}), "telegramChatId"),
        (json!({"botIdentity": "b".repeat(300), "telegramUserId": "42"}), "botIdentity"),
        (json!({"botIdentity": "bot-1", "telegramUserId": 42}), "telegramUserId"),
        (json!({"botIdentity": "bot-1", "fallbackAgentKey": "default"}), "fallbackAgentKey"),
    ] {
        let err = resolve(args.clone()).await.expect_err("refused");
        assert_eq!(err.code, ErrorCode::InvalidInput, "{args}");
        assert!(err.message.contains(field), "{args}: {}", err.message);
    }
    let worker = stack.worker("w1").err("resolveAgentForTelegram", json!({"botIdentity": "bot-1"})).await;
    assert_eq!(worker.code, ErrorCode::Forbidden);

    // A revoked binding no longer resolves.
    admin.ok("revokeUserAgentBinding", json!({"consumerUserId": "u1"})).await;
    assert_eq!(resolve(json!({"botIdentity": "bot-1", "telegramUserId": "42"})).await.expect("revoked"), none);
    stack.stop().await;
}
