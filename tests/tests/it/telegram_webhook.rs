//! The Telegram webhook end to end (issue 11): an unbound user, a photo with a caption that
//! reaches the worker, bindings resolved, rebound and revoked through Telegram routing, and
//! hostile updates fed to `POST /agent-factory/telegram/webhook` with a valid secret (property
//! tests): never a 5xx, never a panic, nothing enqueued.

use std::path::Path;
use std::time::Duration;

use common::topology::{TELEGRAM_UPDATES_CONSUMER, TELEGRAM_UPDATES_STREAM};
use hydration::telegram_updates::REPLY_UNBOUND;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tests::TestStack;
use tests::fake_telegram::FakeTelegram;

use crate::reference_worker::{Via, config, finished, start as start_worker, wait_done};
use crate::snapshots::assign;
use crate::telegram::{agent_with_bot, jobs, stack_with, start, wait_jobs, wait_texts};

const WAIT: Duration = Duration::from_secs(20);

/// Waits until the update consumer has handled every stored update.
async fn wait_updates_handled(stack: &TestStack) {
    tests::wait_until("the update consumer handled every stored update", WAIT, || async {
        let stream = stack.ctx.js.get_stream(TELEGRAM_UPDATES_STREAM).await.ok()?;
        let info = stream.consumer_info(TELEGRAM_UPDATES_CONSUMER).await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info.delivered.stream_sequence)
    })
    .await;
}

/// The queue holds no job at all, in any state.
async fn assert_no_jobs(stack: &TestStack) {
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!(
        (&stats["queuedTotal"], &stats["processing"], &stats["deadLetter"]),
        (&json!(0), &json!(0), &json!(0)),
        "{stats}"
    );
    let mut inbox = stack.ctx.js.get_stream(common::topology::INBOX_STREAM).await.expect("inbox stream");
    let info = inbox.info().await.expect("inbox stream info");
    assert_eq!(info.state.messages, 0, "nothing was enqueued");
}

/// A pairing code of `user` for `agent`.
async fn code(stack: &TestStack, user: &str, agent: &str) -> String {
    let created = stack.app().ok("createPairingCode", json!({"consumerUserId": user, "agentKey": agent})).await;
    created["code"].as_str().expect("code").to_string()
}

async fn resolve(stack: &TestStack, bot: &str, user: &str) -> Value {
    stack.app().ok("resolveAgentForTelegram", json!({"botIdentity": bot, "telegramUserId": user})).await
}

#[tokio::test]
async fn telegram_webhook_unbound_users_get_a_reply_and_no_job() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    agent_with_bot(&stack, &fake, "support", 1002).await;

    let delivery = fake.send_update(1001, fake.text_update(1001, 42, "hello")).await;
    assert_eq!(delivery.status, 200);
    assert_eq!(wait_texts(&fake, 1001, 42, 1).await, vec![REPLY_UNBOUND.to_string()]);
    // A photo from an unbound user: no file fetched, no job.
    let file = fake.add_file(1001, "photos/p.jpg", b"jpeg".to_vec());
    fake.send_update(1001, fake.photo_update(1001, 42, &[&file], "look")).await;
    assert_eq!(wait_texts(&fake, 1001, 42, 2).await[1], REPLY_UNBOUND);
    // S8: bound with the support bot is not bound with the sales bot.
    assert!(start(&fake, 1002, 42, &code(&stack, "bob", "support").await).await.starts_with("Paired!"));
    fake.send_update(1001, fake.text_update(1001, 42, "wrong bot")).await;
    assert_eq!(wait_texts(&fake, 1001, 42, 3).await[2], REPLY_UNBOUND);
    wait_updates_handled(&stack).await;
    assert_no_jobs(&stack).await;
    assert!(!fake.calls().iter().any(|(_, m)| m == "getFile"), "nothing fetched for an unbound user");
    assert!(!fake.sent().iter().any(|s| s.method == "sendChatAction"), "no typing for an unbound user");
    stack.stop().await;
}

/// The files under `dir`, recursively: (path relative to `dir`, bytes).
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    tests::files_under(dir)
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap_or_default();
            (rel, bytes)
        })
        .collect()
}

#[tokio::test]
async fn telegram_webhook_photo_with_caption_reaches_the_worker() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    assert!(start(&fake, 1001, 42, &code(&stack, "alice", "sales").await).await.starts_with("Paired!"));
    let conversation = "user-agent:sales:alice";

    let small = fake.add_file(1001, "photos/file_0.jpg", b"small".to_vec());
    let large = fake.add_file(1001, "photos/file_1.jpg", b"the-largest-photo-size".to_vec());
    let delivery = fake.send_update(1001, fake.photo_update(1001, 42, &[&small, &large], " look at this ")).await;
    assert_eq!(delivery.status, 200);
    let job = wait_jobs(&stack, conversation, 1).await.remove(0);
    let payload = &job["payload"];
    assert_eq!(payload["provider"], json!("telegram"));
    assert_eq!(payload["providerUserId"], json!("42"));
    assert_eq!(payload["messageText"], json!("look at this"), "the caption, trimmed");
    // Spec §3.11 step 8: the bot, chat and user, the media type and the file id per kind (and
    // the providerUserId enqueue copies into metadata).
    assert_eq!(
        payload["metadata"],
        json!({
            "telegramBotIdentity": "1001", "telegramChatId": "42", "telegramUserId": "42", "providerUserId": "42",
            "telegramMediaType": "photo", "telegramPhotoFileId": large,
        })
    );
    let attachments = payload["attachments"].as_array().expect("attachments");
    assert_eq!(attachments.len(), 1, "only the largest size: {attachments:?}");
    let attachment = &attachments[0];
    assert_eq!(
        (&attachment["kind"], &attachment["status"], &attachment["mimeType"], &attachment["telegramFileId"]),
        (&json!("photo"), &json!("ready"), &json!("image/jpeg"), &json!(large))
    );
    assert!(fake.sent().iter().any(|s| s.method == "sendChatAction" && s.text == "typing"));

    // The claimed job's hydration bundle carries the attachment with a download URL.
    let message_id = job["_id"].as_str().expect("message id").to_string();
    assign(&stack, "w-probe", conversation, "sales").await;
    let worker = stack.worker("w-probe");
    let claim = worker.ok("claimNextJob", json!({"workerId": "w-probe", "conversationId": conversation})).await;
    assert_eq!(claim["messageId"], json!(message_id));
    let bundle = worker
        .ok("getHydrationBundleForClaimedJob", json!({"messageId": message_id, "conversationId": conversation}))
        .await;
    let hydrated = &bundle["payload"]["attachments"][0];
    assert_eq!((&hydrated["kind"], &hydrated["status"]), (&json!("photo"), &json!("ready")), "{bundle}");
    assert!(hydrated["downloadUrl"].as_str().is_some_and(|u| !u.is_empty()), "{hydrated}");
    // Handed back, so the reference worker gets it.
    let failed = worker
        .ok(
            "failJob",
            json!({"workerId": "w-probe", "messageId": message_id, "leaseId": claim["leaseId"], "errorMessage": "probe"}),
        )
        .await;
    assert_eq!(failed["requeued"], json!(true));
    stack
        .admin()
        .ok("upsertWorkerState", json!({"workerId": "w-probe", "provider": "local", "status": "draining", "load": 0}))
        .await;
    stack.admin().ok("advanceTestClock", json!({"ms": 60_000})).await;

    // The reference worker downloads the photo into its workspace and names it in the prompt.
    assign(&stack, "w1", conversation, "sales").await;
    let data = tempfile::tempdir().expect("tmp");
    let base_url = fake.base_url();
    let env = [
        ("OPENCLAW_CONVERSATION_ID", conversation),
        ("OPENCLAW_AGENT_KEY", "sales"),
        ("TELEGRAM_API_BASE_URL", base_url.as_str()),
    ];
    let (stop, handle) = start_worker(config(&stack, "w1", Via::Http, data.path(), &env));
    wait_done(&stack, conversation, &message_id).await;
    let downloaded = files_under(&data.path().join("workspace/.telegram-attachments"));
    assert_eq!(downloaded.len(), 1, "{downloaded:?}");
    assert_eq!(downloaded[0].1, b"the-largest-photo-size".to_vec());
    let reply = wait_texts(&fake, 1001, 42, 2).await.remove(1);
    assert!(reply.starts_with("echo: look at this\n\n[telegram_media]\nphoto: "), "{reply}");
    assert!(reply.contains(&downloaded[0].0), "the prompt names the file: {reply}");
    stop.cancel();
    assert_eq!(finished(handle).await.jobs_completed, 1);
    stack.stop().await;
}

#[tokio::test]
async fn telegram_webhook_bindings_resolve_rebind_and_revoke() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    agent_with_bot(&stack, &fake, "support", 1002).await;

    // Resolve: Telegram user 42 paired with alice on the sales bot, and only there.
    assert!(start(&fake, 1001, 42, &code(&stack, "alice", "sales").await).await.starts_with("Paired!"));
    assert_eq!(
        resolve(&stack, "1001", "42").await,
        json!({"consumerUserId": "alice", "agentKey": "sales", "conversationId": "user-agent:sales:alice"})
    );
    let nobody = json!({"consumerUserId": null, "agentKey": null, "conversationId": null});
    assert_eq!(resolve(&stack, "1002", "42").await, nobody, "S8: no other bot's binding");
    fake.send_update(1001, fake.text_update(1001, 42, "one")).await;
    wait_jobs(&stack, "user-agent:sales:alice", 1).await;

    // Rebind: bob's code sent from the same Telegram user moves the identity to bob.
    assert!(start(&fake, 1001, 42, &code(&stack, "bob", "sales").await).await.starts_with("Paired!"));
    assert_eq!(resolve(&stack, "1001", "42").await["consumerUserId"], json!("bob"));
    assert!(stack.app().ok("getUserAgentBinding", json!({"consumerUserId": "alice"})).await.is_null());
    fake.send_update(1001, fake.text_update(1001, 42, "two")).await;
    let bob = wait_jobs(&stack, "user-agent:sales:bob", 1).await;
    assert_eq!(bob[0]["payload"]["messageText"], json!("two"));

    // Rebind to another agent: bob pairs with the support bot; his sales binding goes.
    assert!(start(&fake, 1002, 42, &code(&stack, "bob", "support").await).await.starts_with("Paired!"));
    assert_eq!(resolve(&stack, "1001", "42").await, nobody);
    assert_eq!(resolve(&stack, "1002", "42").await["conversationId"], json!("user-agent:support:bob"));
    let before = fake.texts_to(1001, 42).len();
    fake.send_update(1001, fake.text_update(1001, 42, "three")).await;
    assert_eq!(wait_texts(&fake, 1001, 42, before + 1).await[before], REPLY_UNBOUND);
    fake.send_update(1002, fake.text_update(1002, 42, "four")).await;
    let support = wait_jobs(&stack, "user-agent:support:bob", 1).await;
    assert_eq!(support[0]["payload"]["messageText"], json!("four"));

    // Revoke: nobody is bound, and messages get the pairing hint instead of a job.
    let revoked = stack.app().ok("revokeUserAgentBinding", json!({"consumerUserId": "bob"})).await;
    assert_eq!(revoked, json!({"revoked": 1}));
    assert_eq!(resolve(&stack, "1002", "42").await, nobody);
    let before = fake.texts_to(1002, 42).len();
    fake.send_update(1002, fake.text_update(1002, 42, "five")).await;
    assert_eq!(wait_texts(&fake, 1002, 42, before + 1).await[before], REPLY_UNBOUND);
    wait_updates_handled(&stack).await;
    let counts = [
        jobs(&stack, "user-agent:sales:alice").await.len(),
        jobs(&stack, "user-agent:sales:bob").await.len(),
        jobs(&stack, "user-agent:support:bob").await.len(),
    ];
    assert_eq!(counts, [1, 1, 1], "one job per message routed, none for the unbound ones");
    stack.stop().await;
}

// ---- hostile updates ----

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-formed private text message, for mutation.
fn message() -> Value {
    json!({
        "message_id": 7, "date": 1_767_258_000,
        "from": {"id": 42, "is_bot": false, "first_name": "Eve"},
        "chat": {"id": 42, "type": "private"}, "text": "hi"
    })
}

/// Bodies a hostile or broken sender could POST, labelled by kind.
fn hostile_body() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let fields = [
        "update_id",
        "message",
        "message_id",
        "date",
        "from",
        "chat",
        "sender_chat",
        "text",
        "caption",
        "entities",
        "reply_to_message",
        "photo",
        "document",
        "voice",
        "sticker",
    ];
    prop_oneof![
        // Wrong types at the top.
        any_json().prop_map(|v| ("any json", v.to_string().into_bytes())),
        // A message with one field of the wrong type (or an update id of any type).
        (prop::sample::select(fields.to_vec()), any_json(), any::<i64>()).prop_map(|(field, value, id)| {
            let mut message = message();
            let mut update = json!({"update_id": id});
            if field == "update_id" {
                update["update_id"] = value;
            } else if field == "message" {
                message = value;
            } else {
                message[field] = value;
            }
            update["message"] = message;
            ("wrong types", update.to_string().into_bytes())
        }),
        // Unknown update kinds, and known kinds without a message.
        ("[a-z_]{1,24}", any_json(), 0..i64::MAX).prop_map(|(kind, value, id)| {
            ("unknown kind", json!({"update_id": id, kind: value}).to_string().into_bytes())
        }),
        // Deep nesting, as arrays at the top or objects under a message.
        (100usize..3000, any::<bool>()).prop_map(|(depth, arrays)| {
            let body = if arrays {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!(r#"{{"update_id": 3, "message": {}1{}}}"#, r#"{"a":"#.repeat(depth), "}".repeat(depth))
            };
            ("deep nesting", body.into_bytes())
        }),
        // Invalid UTF-8 inside a string and outside one.
        (prop::collection::vec(0x80u8..=0xff, 1..16), any::<bool>()).prop_map(|(junk, in_string)| {
            let mut body = br#"{"update_id": 4, "message": {"message_id": 1, "date": 0, "chat": {"id": 42, "type": "private"}, "text": ""#.to_vec();
            if !in_string {
                body.truncate(body.len() - 1);
            }
            body.extend_from_slice(&[0xc3, 0x28]); // Never valid.
            body.extend(junk);
            body.extend_from_slice(br#""}}"#);
            ("invalid utf-8", body)
        }),
        // Bodies over the limit (telegram.max_update_bytes, 1,000,000).
        (0usize..4096).prop_map(|extra| {
            let text = "x".repeat(1_000_000 + extra);
            ("huge", json!({"update_id": 6, "message": {"text": text}}).to_string().into_bytes())
        }),
        // Noise.
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|bytes| ("random bytes", bytes)),
    ]
}

#[test]
fn telegram_webhook_hostile_updates_never_5xx_and_enqueue_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (fake, stack, secret) = runtime.block_on(async {
        let fake = FakeTelegram::start().await;
        let stack = stack_with(&fake).await;
        agent_with_bot(&stack, &fake, "sales", 1001).await;
        let secret = fake.webhook(1001).and_then(|w| w.1).expect("secret");
        (fake, stack, secret)
    });

    let config = Config { cases: 64, failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&hostile_body(), |(kind, body)| {
        let size = body.len();
        let delivery = runtime.block_on(fake.post_raw(1001, body, Some(&secret)));
        prop_assert!(delivery.status != 0, "{kind} ({size} bytes): no answer (a panic?): {}", delivery.body);
        prop_assert!(delivery.status < 500, "{kind} ({size} bytes): {} {}", delivery.status, delivery.body);
        let expected: &[u16] = match kind {
            "invalid utf-8" => &[400],
            "huge" => &[413],
            _ => &[200, 400],
        };
        prop_assert!(
            expected.contains(&delivery.status),
            "{kind} ({size} bytes): unexpected {} {}",
            delivery.status,
            delivery.body
        );
        Ok::<(), TestCaseError>(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    runtime.block_on(async {
        // Whatever was stored has been handled, and none of it became a job.
        wait_updates_handled(&stack).await;
        assert_no_jobs(&stack).await;
        // The pipeline survived: a real user still pairs and gets a job.
        let code = code(&stack, "alice", "sales").await;
        assert!(start(&fake, 1001, 4242, &code).await.starts_with("Paired!"));
        fake.send_update(1001, fake.text_update(1001, 4242, "still alive")).await;
        let jobs = wait_jobs(&stack, "user-agent:sales:alice", 1).await;
        assert_eq!(jobs[0]["payload"]["messageText"], json!("still alive"));
        stack.stop().await;
    });
    drop(fake);
}

/// `prepareTelegramAttachmentsForEnqueue` (spec §3.6): the files are fetched with the agent's
/// bot token into the media store, and the answer is enqueued as it is.
#[tokio::test]
async fn telegram_prepared_attachments_are_fetched_and_enqueue_as_they_are() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "files", 9101).await;
    let photo = fake.add_file(9101, "photos/file_7.jpg", b"jpeg-bytes".to_vec());
    let voice = fake.add_file(9101, "voice/file_8.oga", b"ogg".to_vec());
    let app = stack.app();

    let args = json!({"agentKey": "files", "attachments": [
        {"kind": "photo", "telegramFileId": photo, "sizeBytes": 99},
        {"kind": "voice", "telegramFileId": voice, "fileName": "note.ogg", "mimeType": "application/octet-stream"},
    ]});
    let prepared = app.ok("prepareTelegramAttachmentsForEnqueue", args).await;
    let items = prepared.as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!((items[0]["kind"].as_str(), items[0]["status"].as_str()), (Some("photo"), Some("ready")));
    assert_eq!((items[0]["mimeType"].as_str(), items[0]["sizeBytes"].as_u64()), (Some("image/jpeg"), Some(99)));
    assert_eq!(items[0]["telegramFileId"], photo.as_str());
    assert_eq!(items[0]["expiresAt"], tests::T0 + 604_800_000);
    assert_eq!((items[1]["mimeType"].as_str(), items[1]["sizeBytes"].as_u64()), (Some("audio/ogg"), Some(3)));

    let payload = json!({"provider": "telegram", "providerUserId": "42", "messageText": "", "attachments": prepared});
    let enqueue = json!({"conversationId": "telegram:42", "agentKey": "files", "payload": payload});
    let message_id = app.ok("enqueueMessage", enqueue).await;
    let job = stack.worker("w1").ok("claimNextJob", json!({"workerId": "w1"})).await;
    assert_eq!(job["messageId"], message_id);
    assert_eq!(job["payload"]["attachments"][1]["storageId"], items[1]["storageId"]);

    // The original's errors: no token for the agent; Telegram refusing the file id.
    let args = json!({"agentKey": "nobody", "attachments": [{"kind": "photo", "telegramFileId": photo}]});
    let err = app.err("prepareTelegramAttachmentsForEnqueue", args).await;
    assert_eq!(err.message, "missing active telegram bot token for agent 'nobody'");
    let args = json!({"agentKey": "files", "attachments": [{"kind": "photo", "telegramFileId": "AgACnope"}]});
    let err = app.err("prepareTelegramAttachmentsForEnqueue", args).await;
    assert!(err.message.starts_with("Telegram getFile failed: "), "{}", err.message);
    let args = json!({"agentKey": "files", "attachments": [{"kind": "hologram", "telegramFileId": photo}]});
    assert_eq!(app.err("prepareTelegramAttachmentsForEnqueue", args).await.code, common::ErrorCode::InvalidInput);
}
