//! Identity bindings (hydration service, spec §3.8): bind, revoke, resolve, the Telegram index
//! keys and the bounded history, through the real operation transport against a real
//! nats-server. Stored documents are read straight from `af_bindings` to check invariants the
//! operations do not show.

use common::ErrorCode;
use common::token::escape;
use hydration::bindings::{self, BindingStatus, UserBindings};
use serde_json::{Value, json};
use tests::{MANUAL, T0, TestStack, seed_profile};

async fn user_doc(stack: &TestStack, consumer_user_id: &str) -> UserBindings {
    stack
        .ctx
        .buckets
        .bindings
        .get::<UserBindings>(&format!("u.{}", escape(consumer_user_id)))
        .await
        .expect("read user document")
        .expect("user document exists")
        .value
}

fn active_count(doc: &UserBindings) -> usize {
    doc.bindings.iter().filter(|b| b.status == BindingStatus::Active).count()
}

/// Stores a profile that carries a Telegram bot identity.
async fn profile_with_bot(stack: &TestStack, agent_key: &str, bot: &str) {
    stack
        .admin()
        .ok(
            "upsertAgentProfile",
            json!({"agentKey": agent_key, "version": "1", "secretsRef": [], "botIdentity": bot, "enabled": true}),
        )
        .await;
}

async fn advance(stack: &TestStack, ms: i64) {
    stack.admin().ok("advanceTestClock", json!({ "ms": ms })).await;
}

#[tokio::test]
async fn bindings_bind_returns_the_view_and_resolution_follows_it() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "sales").await;
    let app = stack.app();
    let user = json!({"consumerUserId": "user:1"});
    assert_eq!(
        app.ok("resolveAgentForUser", user.clone()).await,
        json!({"consumerUserId": "user:1", "agentKey": null})
    );
    assert_eq!(app.ok("getUserAgentBinding", user.clone()).await, Value::Null);

    let view = app
        .ok(
            "bindUserAgent",
            json!({"consumerUserId": "user:1", "agentKey": "sales", "source": "manual", "metadata": {"displayName": "Ann"}}),
        )
        .await;
    let expected = json!({
        "consumerUserId": "user:1",
        "agentKey": "sales",
        "conversationId": "user-agent:sales:user:1",
        "botIdentity": null,
        "status": "active",
        "source": "manual",
        "telegramUserId": null,
        "telegramChatId": null,
        "metadata": {"displayName": "Ann"},
        "boundAt": T0,
        "revokedAt": null
    });
    assert_eq!(view, expected);
    assert_eq!(app.ok("getUserAgentBinding", user.clone()).await, expected);
    assert_eq!(
        app.ok("resolveAgentForUser", user.clone()).await,
        json!({"consumerUserId": "user:1", "agentKey": "sales"})
    );

    // The source defaults to "api"; the profile's (absent) bot leaves botIdentity null.
    let view = stack.admin().ok("bindUserAgent", json!({"consumerUserId": "user:2", "agentKey": "sales"})).await;
    assert_eq!(view["source"], json!("api"));

    let target = bindings::user_agent_target(&stack.ctx, "user:1", "sales", true).await.expect("target");
    assert_eq!(target.conversation_id, "user-agent:sales:user:1");
    assert_eq!(target.provider, "system_push");
    assert!(target.binding_active);
    let none = bindings::user_agent_target(&stack.ctx, "user:3", "sales", false).await.expect("fallback target");
    assert_eq!(none.conversation_id, bindings::user_agent_conversation_id("sales", "user:3"));
    assert!(!none.binding_active);
    let err = bindings::user_agent_target(&stack.ctx, "user:3", "sales", true).await.expect_err("no binding");
    assert_eq!(err.message, "No active binding found for consumerUserId and agentKey");
    stack.stop().await;
}

#[tokio::test]
async fn bindings_binding_another_agent_revokes_the_first_and_revoke_counts() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "a").await;
    seed_profile(&stack.ctx, "b").await;
    let admin = stack.admin();
    admin.ok("bindUserAgent", json!({"consumerUserId": "u1", "agentKey": "a"})).await;
    advance(&stack, 1_000).await;
    admin.ok("bindUserAgent", json!({"consumerUserId": "u1", "agentKey": "b"})).await;

    // T9 kept: one active binding per user, the previous one revoked at the time of the bind.
    let doc = user_doc(&stack, "u1").await;
    assert_eq!(doc.bindings.len(), 2);
    assert_eq!((doc.bindings[0].agent_key.as_str(), doc.bindings[0].status), ("b", BindingStatus::Active));
    assert_eq!((doc.bindings[1].agent_key.as_str(), doc.bindings[1].status), ("a", BindingStatus::Revoked));
    assert_eq!(doc.bindings[1].revoked_at, Some(T0 + 1_000));
    assert_eq!(admin.ok("resolveAgentForUser", json!({"consumerUserId": "u1"})).await["agentKey"], json!("b"));

    // The target of the revoked pair is still known, but not when an active binding is required.
    let err = bindings::user_agent_target(&stack.ctx, "u1", "a", true).await.expect_err("revoked");
    assert_eq!(err.message, "No active binding found for consumerUserId and agentKey");
    let target = bindings::user_agent_target(&stack.ctx, "u1", "a", false).await.expect("target");
    assert_eq!(target.conversation_id, "user-agent:a:u1");
    assert!(!target.binding_active);

    advance(&stack, 1_000).await;
    assert_eq!(admin.ok("revokeUserAgentBinding", json!({"consumerUserId": "u1"})).await, json!({"revoked": 1}));
    assert_eq!(admin.ok("revokeUserAgentBinding", json!({"consumerUserId": "u1"})).await, json!({"revoked": 0}));
    assert_eq!(admin.ok("revokeUserAgentBinding", json!({"consumerUserId": "nobody"})).await, json!({"revoked": 0}));
    assert_eq!(admin.ok("getUserAgentBinding", json!({"consumerUserId": "u1"})).await, Value::Null);
    assert_eq!(admin.ok("resolveAgentForUser", json!({"consumerUserId": "u1"})).await["agentKey"], Value::Null);
    let doc = user_doc(&stack, "u1").await;
    assert_eq!(active_count(&doc), 0);
    assert_eq!(doc.bindings[0].revoked_at, Some(T0 + 2_000));
    stack.stop().await;
}

#[tokio::test]
async fn bindings_errors_use_the_original_strings_and_inputs_are_validated() {
    let stack = TestStack::start().await;
    seed_profile(&stack.ctx, "plain").await;
    let admin = stack.admin();

    let err = admin.err("bindUserAgent", json!({"consumerUserId": "u1", "agentKey": "ghost"})).await;
    assert_eq!((err.code, err.message.as_str()), (ErrorCode::NotFound, "Agent profile 'ghost' not found"));

    let err =
        admin.err("bindUserAgent", json!({"consumerUserId": "u1", "agentKey": "plain", "telegramUserId": "42"})).await;
    assert_eq!((err.code, err.message.as_str()), (ErrorCode::InvalidInput, "Agent 'plain' is missing botIdentity"));
    let err =
        admin.err("bindUserAgent", json!({"consumerUserId": "u1", "agentKey": "plain", "telegramChatId": "42"})).await;
    assert_eq!(err.message, "Agent 'plain' is missing botIdentity");
    // A blank given botIdentity does not count (spec §3.8.2 step 2).
    let err = admin
        .err(
            "bindUserAgent",
            json!({"consumerUserId": "u1", "agentKey": "plain", "telegramChatId": "42", "botIdentity": "  "}),
        )
        .await;
    assert_eq!(err.message, "Agent 'plain' is missing botIdentity");
    assert_eq!(admin.ok("getUserAgentBinding", json!({"consumerUserId": "u1"})).await, Value::Null, "nothing bound");

    // A given botIdentity wins over the profile's; the profile's is used otherwise.
    profile_with_bot(&stack, "tg", " 777 ").await;
    let view =
        admin.ok("bindUserAgent", json!({"consumerUserId": "u1", "agentKey": "tg", "telegramUserId": " 42 "})).await;
    assert_eq!((view["botIdentity"].clone(), view["telegramUserId"].clone()), (json!("777"), json!("42")));
    let view = admin
        .ok(
            "bindUserAgent",
            json!({"consumerUserId": "u1", "agentKey": "plain", "botIdentity": "888", "telegramChatId": "9"}),
        )
        .await;
    assert_eq!(view["botIdentity"], json!("888"));

    let cases = [
        (json!({"consumerUserId": "  ", "agentKey": "plain"}), "consumerUserId"),
        (json!({"consumerUserId": "u".repeat(257), "agentKey": "plain"}), "consumerUserId"),
        (json!({"consumerUserId": "u1", "agentKey": ""}), "agentKey"),
        (json!({"consumerUserId": "u1", "agentKey": "plain", "source": "fax"}), "unknown variant"),
        (json!({"consumerUserId": "u1", "agentKey": "plain", "bogus": 5}), "bogus"),
        (json!({"consumerUserId": "u1", "agentKey": "plain", "telegramUserId": ""}), "telegramUserId"),
        (json!({"consumerUserId": "u1", "agentKey": "plain", "metadata": {"k": "v".repeat(600)}}), "metadata.k"),
        (json!({"consumerUserId": "u1", "agentKey": "plain", "metadata": {"k": 1}}), "expected a string"),
    ];
    for (args, field) in cases {
        let err = admin.err("bindUserAgent", args.clone()).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{args}: {err:?}");
        assert!(err.message.contains(field), "{args}: message should name {field}: {}", err.message);
    }
    for op in ["revokeUserAgentBinding", "resolveAgentForUser", "getUserAgentBinding"] {
        let err = admin.err(op, json!({"consumerUserId": ""})).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{op}: {err:?}");
        let err = stack.worker("w-1").err(op, json!({"consumerUserId": "u1"})).await;
        assert_eq!(err.code, ErrorCode::Forbidden, "{op}: {err:?}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn bindings_a_telegram_identity_moves_to_the_newest_consumer_of_the_same_bot() {
    let stack = TestStack::start().await;
    profile_with_bot(&stack, "bot1-agent", "bot-1").await;
    profile_with_bot(&stack, "bot2-agent", "bot-2").await;
    let admin = stack.admin();
    let bind = |user: &str, agent: &str, extra: Value| {
        let mut args = json!({"consumerUserId": user, "agentKey": agent, "source": "telegram_pairing"});
        for (k, v) in extra.as_object().expect("object") {
            args[k] = v.clone();
        }
        let admin = admin.clone();
        async move { admin.ok("bindUserAgent", args).await }
    };
    bind("A", "bot1-agent", json!({"telegramUserId": "X", "telegramChatId": "chat-A"})).await;
    let found = bindings::resolve_telegram(&stack.ctx, "bot-1", Some("X"), None).await.expect("resolve");
    assert_eq!(found.map(|v| v.consumer_user_id), Some("A".to_string()));

    // The same Telegram user id under another bot is another identity: A keeps its binding.
    bind("C", "bot2-agent", json!({"telegramUserId": "X"})).await;
    assert_eq!(admin.ok("resolveAgentForUser", json!({"consumerUserId": "A"})).await["agentKey"], json!("bot1-agent"));

    // B takes telegram user X of bot-1: A's binding is revoked (spec §3.8.2 step 4).
    bind("B", "bot1-agent", json!({"telegramUserId": "X"})).await;
    assert_eq!(admin.ok("getUserAgentBinding", json!({"consumerUserId": "A"})).await, Value::Null);
    let doc = user_doc(&stack, "A").await;
    assert_eq!(doc.bindings[0].status, BindingStatus::Revoked);
    assert!(doc.bindings[0].revoked_at.is_some());
    let by_user = bindings::resolve_telegram(&stack.ctx, "bot-1", Some("X"), None).await.expect("resolve");
    assert_eq!(by_user.map(|v| (v.consumer_user_id, v.status)), Some(("B".to_string(), BindingStatus::Active)));
    // A's chat key still names A, but A's binding is revoked: the stale key resolves to nothing.
    assert_eq!(bindings::resolve_telegram(&stack.ctx, "bot-1", None, Some("chat-A")).await.expect("resolve"), None);
    let by_bot2 = bindings::resolve_telegram(&stack.ctx, "bot-2", Some("X"), None).await.expect("resolve");
    assert_eq!(by_bot2.map(|v| v.consumer_user_id), Some("C".to_string()));
    assert_eq!(admin.ok("resolveAgentForUser", json!({"consumerUserId": "C"})).await["agentKey"], json!("bot2-agent"));

    // The chat id alone displaces too, and the user id is tried before the chat id.
    bind("D", "bot1-agent", json!({"telegramChatId": "chat-B"})).await;
    bind("E", "bot1-agent", json!({"telegramChatId": "chat-B"})).await;
    assert_eq!(admin.ok("getUserAgentBinding", json!({"consumerUserId": "D"})).await, Value::Null);
    let both = bindings::resolve_telegram(&stack.ctx, "bot-1", Some("X"), Some("chat-B")).await.expect("resolve");
    assert_eq!(both.map(|v| v.consumer_user_id), Some("B".to_string()));
    let chat = bindings::resolve_telegram(&stack.ctx, "bot-1", Some("nobody"), Some("chat-B")).await.expect("resolve");
    assert_eq!(chat.map(|v| v.consumer_user_id), Some("E".to_string()));

    // The target of a binding with a chat id is a Telegram one.
    let target = bindings::user_agent_target(&stack.ctx, "E", "bot1-agent", true).await.expect("target");
    assert_eq!((target.provider.as_str(), target.telegram_chat_id.as_deref()), ("telegram", Some("chat-B")));
    let err = bindings::resolve_telegram(&stack.ctx, " ", Some("X"), None).await.expect_err("blank bot");
    assert_eq!(err.code, ErrorCode::InvalidInput);
    stack.stop().await;
}

#[tokio::test]
async fn bindings_concurrent_binds_of_one_user_leave_exactly_one_active_binding() {
    let stack = TestStack::start().await;
    let agents: Vec<String> = (0..8).map(|i| format!("agent-{i}")).collect();
    for agent in &agents {
        seed_profile(&stack.ctx, agent).await;
    }
    let calls = agents.iter().map(|agent| {
        let api = if agent.ends_with(['0', '2', '4', '6']) { stack.admin() } else { stack.app() };
        let args = json!({"consumerUserId": "racer", "agentKey": agent});
        async move { api.ok("bindUserAgent", args).await }
    });
    let views = futures::future::join_all(calls).await;
    assert_eq!(views.len(), 8);

    let doc = user_doc(&stack, "racer").await;
    assert_eq!(doc.bindings.len(), 8, "every bind is kept in the history");
    assert_eq!(active_count(&doc), 1, "{doc:#?}");
    let active = doc.active().expect("one active binding");
    let resolved = stack.admin().ok("resolveAgentForUser", json!({"consumerUserId": "racer"})).await;
    assert_eq!(resolved["agentKey"], json!(active.agent_key));
    stack.stop().await;
}

#[tokio::test]
async fn bindings_concurrent_binds_of_one_telegram_identity_leave_one_holder() {
    let stack = TestStack::start().await;
    profile_with_bot(&stack, "tg", "bot-1").await;
    let calls = (0..8).map(|i| {
        let api = stack.admin();
        let args = json!({"consumerUserId": format!("user-{i}"), "agentKey": "tg", "telegramUserId": "X"});
        async move { api.ok("bindUserAgent", args).await }
    });
    futures::future::join_all(calls).await;

    let mut holders = Vec::new();
    for i in 0..8 {
        let user = format!("user-{i}");
        if active_count(&user_doc(&stack, &user).await) > 0 {
            holders.push(user);
        }
    }
    assert_eq!(holders.len(), 1, "per bot at most one active binding per telegramUserId: {holders:?}");
    let resolved = bindings::resolve_telegram(&stack.ctx, "bot-1", Some("X"), None).await.expect("resolve");
    assert_eq!(resolved.map(|v| v.consumer_user_id), Some(holders[0].clone()));
    stack.stop().await;
}

#[tokio::test]
async fn bindings_history_stays_bounded() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "a").await;
    seed_profile(&stack.ctx, "b").await;
    let admin = stack.admin();
    for i in 0..60 {
        let agent = if i % 2 == 0 { "a" } else { "b" };
        admin.ok("bindUserAgent", json!({"consumerUserId": "busy", "agentKey": agent})).await;
        advance(&stack, 1).await;
    }
    let doc = user_doc(&stack, "busy").await;
    assert_eq!(doc.bindings.len(), bindings::MAX_REVOKED_KEPT + 1);
    assert_eq!(active_count(&doc), 1);
    assert_eq!(doc.bindings[0].status, BindingStatus::Active);
    assert_eq!(doc.bindings[0].bound_at, T0 + 59, "the newest bind is the active one");
    assert_eq!(doc.bindings[50].bound_at, T0 + 9, "the oldest kept is the 10th bind");
    stack.stop().await;
}
