//! The user-facing aggregate APIs (spec §3.12) as the consumer app calls them with the app
//! token: the onboarding state machine through every `nextAction` (T5), the overview and
//! lookups across bind, rebind and revoke, the conversation view and queue items of a user's
//! conversation with an agent, and `sendMessageToUserAgent`.

use std::time::Duration;

use serde_json::{Value, json};
use telegram_bot::{BotApi, RetryPolicy};
use tests::TestStack;
use tests::fake_telegram::FakeTelegram;

use crate::telegram::{agent_with_bot, jobs, stack_with, start, wait_jobs};

async fn onboarding(stack: &TestStack, user: &str, agent: &str) -> Value {
    stack.app().ok("getUserAgentOnboardingState", json!({"consumerUserId": user, "agentKey": agent})).await
}

async fn profile(stack: &TestStack, agent: &str, enabled: bool, bot: Option<&str>) {
    let mut args = json!({"agentKey": agent, "version": "1.2.0", "secretsRef": [], "enabled": enabled});
    if let Some(bot) = bot {
        args["botIdentity"] = json!(bot);
    }
    stack.admin().ok("upsertAgentProfile", args).await;
}

#[tokio::test]
async fn user_agents_onboarding_walks_through_every_next_action() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    let app = stack.app();
    profile(&stack, "sales", true, None).await;

    // 1. Nothing set up yet.
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!(
        state,
        json!({
            "agentKey": "sales",
            "telegramUsername": null,
            "botIdentity": null,
            "tokenSecretRef": "telegram.botToken.sales",
            "tokenImported": false,
            "webhookReady": false,
            "pairingCode": null,
            "pairingStatus": null,
            "pairingDeepLink": null,
            "nextAction": "import_token"
        })
    );

    // 2. The token is imported (by the app, for its user): the webhook is next.
    let token = fake.add_bot(1001, "sales_bot");
    app.ok(
        "importTelegramTokenForAgent",
        json!({"consumerUserId": "alice", "agentKey": "sales", "plaintextValue": token}),
    )
    .await;
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!(state["nextAction"], json!("configure_webhook"), "{state}");
    assert_eq!((state["tokenImported"].clone(), state["webhookReady"].clone()), (json!(true), json!(false)));
    assert_eq!((state["botIdentity"].clone(), state["telegramUsername"].clone()), (json!("1001"), json!("sales_bot")));

    // 3. The webhook is set and verified with Telegram: pairing is next, before any pairing
    //    exists (T5: the original stayed at configure_webhook until a pairing was completed).
    stack.admin().ok("configureTelegramWebhook", json!({"agentKey": "sales"})).await;
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!(state["nextAction"], json!("create_pairing"), "{state}");
    assert_eq!(state["webhookReady"], json!(true));
    assert_eq!(state["pairingStatus"], Value::Null);

    // 4. A pairing code is pending: the user completes it in the chat.
    let pairing = app.ok("createUserAgentPairing", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    let code = pairing["pairing"]["code"].as_str().expect("code").to_string();
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!(state["nextAction"], json!("complete_pairing"), "{state}");
    assert_eq!(state["pairingStatus"], json!("pending"));
    assert_eq!(state["pairingCode"], json!(code));
    assert_eq!(state["pairingDeepLink"], json!(format!("https://t.me/sales_bot?start={code}")));

    // An expired code sends the user back to creating one.
    stack.admin().ok("advanceTestClock", json!({"ms": 900_000})).await;
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!(state["nextAction"], json!("create_pairing"), "{state}");
    assert_eq!((state["pairingStatus"].clone(), state["pairingCode"].clone()), (json!("expired"), Value::Null));
    let pairing = app.ok("createUserAgentPairing", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    let code = pairing["pairing"]["code"].as_str().expect("code").to_string();
    assert_eq!(onboarding(&stack, "alice", "sales").await["nextAction"], json!("complete_pairing"));

    // 5. The user sends /start <code>: ready.
    assert!(start(&fake, 1001, 42, &code).await.starts_with("Paired!"));
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!(state["nextAction"], json!("ready"), "{state}");
    assert_eq!(state["pairingStatus"], json!("used"));
    assert_eq!((state["pairingCode"].clone(), state["pairingDeepLink"].clone()), (Value::Null, Value::Null));

    // Telegram dropping the webhook shows once readiness has asked Telegram again.
    BotApi::new(&fake.base_url(), Duration::from_secs(5), RetryPolicy::default())
        .delete_webhook(&token)
        .await
        .expect("deleteWebhook");
    let readiness = app.ok("getWebhookReadiness", json!({"agentKey": "sales"})).await;
    assert_eq!(readiness["webhookReady"], json!(false));
    assert_eq!(onboarding(&stack, "alice", "sales").await["nextAction"], json!("configure_webhook"));
    stack.admin().ok("configureTelegramWebhook", json!({"agentKey": "sales"})).await;
    assert_eq!(onboarding(&stack, "alice", "sales").await["nextAction"], json!("ready"));

    // Another user of the same agent starts at pairing; revoking sends alice back there too.
    assert_eq!(onboarding(&stack, "bob", "sales").await["nextAction"], json!("create_pairing"));
    app.ok("revokeUserAgentBinding", json!({"consumerUserId": "alice"})).await;
    let state = onboarding(&stack, "alice", "sales").await;
    assert_eq!((state["nextAction"].clone(), state["pairingStatus"].clone()), (json!("create_pairing"), Value::Null));

    // An unknown agent is not an error: it has everything still to do.
    let state = onboarding(&stack, "alice", "ghost").await;
    assert_eq!(state["nextAction"], json!("import_token"));
    assert_eq!(state["tokenSecretRef"], json!("telegram.botToken.ghost"));
    stack.stop().await;
}

/// The agent keys and statuses of a user's overview, in order.
async fn statuses(stack: &TestStack, user: &str) -> Vec<(String, String)> {
    let overview = stack.app().ok("getUserAgentsOverview", json!({"consumerUserId": user})).await;
    overview["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["agentKey"].as_str().unwrap_or_default().to_string(),
                a["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, s)| (a.to_string(), s.to_string())).collect()
}

#[tokio::test]
async fn user_agents_overview_and_lookups_follow_bind_rebind_and_revoke() {
    let stack = TestStack::start_with(tests::MANUAL).await;
    let app = stack.app();
    profile(&stack, "sales", true, None).await;
    profile(&stack, "support", true, None).await;
    profile(&stack, "third", true, Some("3003")).await;

    // An unknown user has no agents, and may create one.
    let overview = app.ok("getUserAgentsOverview", json!({"consumerUserId": "alice", "nowMs": 5})).await;
    assert_eq!(overview, json!({"agents": [], "activeAgentKey": null, "canCreateNewAgent": true}));
    assert_eq!(app.ok("listUserAgents", json!({"consumerUserId": "alice"})).await, json!([]));
    assert_eq!(app.ok("getUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await, Value::Null);
    assert_eq!(app.ok("getActiveUserAgent", json!({"consumerUserId": "alice"})).await, Value::Null);

    // Bound.
    app.ok(
        "bindUserAgent",
        json!({"consumerUserId": "alice", "agentKey": "sales", "metadata": {"displayName": "My sales agent"}}),
    )
    .await;
    let overview = app.ok("getUserAgentsOverview", json!({"consumerUserId": "alice"})).await;
    assert_eq!(overview["activeAgentKey"], json!("sales"));
    assert_eq!(overview["canCreateNewAgent"], json!(false));
    assert_eq!(
        overview["agents"],
        json!([{
            "consumerUserId": "alice",
            "agentKey": "sales",
            "displayName": "My sales agent",
            "telegramUsername": null,
            "version": "1.2.0",
            "status": "active",
            "bindingStatus": "active",
            "pairingStatus": "used",
            "conversationId": "user-agent:sales:alice",
            "canCreateNewAgent": false,
            "canDisable": true,
            "canChat": true,
            "canManagePushJobs": true
        }])
    );
    assert_eq!(app.ok("getActiveUserAgent", json!({"consumerUserId": "alice"})).await, overview["agents"][0]);

    // Rebound to another agent: the new one is active and listed first, the old one disabled.
    app.ok("bindUserAgent", json!({"consumerUserId": "alice", "agentKey": "support"})).await;
    assert_eq!(statuses(&stack, "alice").await, pairs(&[("support", "active"), ("sales", "disabled")]));
    let sales = app.ok("getUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!((sales["bindingStatus"].clone(), sales["pairingStatus"].clone()), (json!("revoked"), Value::Null));
    assert_eq!((sales["canChat"].clone(), sales["canCreateNewAgent"].clone()), (json!(false), json!(false)));
    assert_eq!(app.ok("getActiveUserAgent", json!({"consumerUserId": "alice"})).await["agentKey"], json!("support"));
    let enabled_only = app.ok("listUserAgents", json!({"consumerUserId": "alice", "includeDisabled": false})).await;
    let keys: Vec<&Value> = enabled_only.as_array().expect("list").iter().map(|a| &a["agentKey"]).collect();
    assert_eq!(keys, vec![&json!("support")]);
    assert_eq!(app.ok("listUserAgents", json!({"consumerUserId": "alice"})).await.as_array().map(Vec::len), Some(2));

    // A disabled profile under an active binding fails; enabled again it is active.
    profile(&stack, "support", false, None).await;
    let support = app.ok("getActiveUserAgent", json!({"consumerUserId": "alice"})).await;
    assert_eq!((support["status"].clone(), support["canChat"].clone()), (json!("failed"), json!(false)));
    profile(&stack, "support", true, None).await;

    // A pending pairing code for a third agent lists it as pairing.
    app.ok("createPairingCode", json!({"consumerUserId": "alice", "agentKey": "third"})).await;
    assert_eq!(
        statuses(&stack, "alice").await,
        pairs(&[("support", "active"), ("sales", "disabled"), ("third", "pairing")])
    );
    let third = app.ok("getUserAgent", json!({"consumerUserId": "alice", "agentKey": "third"})).await;
    assert_eq!((third["pairingStatus"].clone(), third["bindingStatus"].clone()), (json!("pending"), Value::Null));
    assert_eq!(third["conversationId"], json!("user-agent:third:alice"));

    // Revoked: no active agent, the user may create one, nothing is chat-able.
    app.ok("revokeUserAgentBinding", json!({"consumerUserId": "alice"})).await;
    let overview = app.ok("getUserAgentsOverview", json!({"consumerUserId": "alice"})).await;
    assert_eq!((overview["activeAgentKey"].clone(), overview["canCreateNewAgent"].clone()), (Value::Null, json!(true)));
    assert_eq!(
        statuses(&stack, "alice").await,
        pairs(&[("support", "disabled"), ("sales", "disabled"), ("third", "pairing")])
    );
    assert!(overview["agents"].as_array().expect("agents").iter().all(|a| a["canCreateNewAgent"] == json!(true)));
    assert_eq!(app.ok("getActiveUserAgent", json!({"consumerUserId": "alice"})).await, Value::Null);
    let enabled_only = app.ok("listUserAgents", json!({"consumerUserId": "alice", "includeDisabled": false})).await;
    assert_eq!(enabled_only.as_array().map(Vec::len), Some(1), "only the pairing agent: {enabled_only}");

    // Bad arguments are 400s naming the argument; a send without an active binding says so.
    let err = app.err("getUserAgentsOverview", json!({"consumerUserId": " "})).await;
    assert_eq!(err.code, common::ErrorCode::InvalidInput);
    assert!(err.message.contains("consumerUserId"), "{}", err.message);
    let err = app.err("getUserAgent", json!({"consumerUserId": "alice"})).await;
    assert!(err.message.contains("agentKey"), "{}", err.message);
    for (user, agent) in [("alice", "sales"), ("nobody", "sales"), ("alice", "ghost")] {
        let err = app
            .err("sendMessageToUserAgent", json!({"consumerUserId": user, "agentKey": agent, "content": "hi"}))
            .await;
        assert_eq!(err.message, "No active binding found for consumerUserId and agentKey", "{user}/{agent}");
        assert_eq!(err.code, common::ErrorCode::NotFound);
    }
    // The worker role may not call them.
    let err = stack.worker("w1").err("getUserAgentsOverview", json!({"consumerUserId": "alice"})).await;
    assert_eq!(err.code, common::ErrorCode::Forbidden);
    stack.stop().await;
}

#[tokio::test]
async fn user_agents_conversation_view_queue_items_and_send() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    let app = stack.app();
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    let conversation = "user-agent:sales:alice";

    // Before anything happened the view is empty, not an error.
    let view = app.ok("getConversationViewForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!(
        view,
        json!({
            "conversationId": conversation,
            "contextHistory": [],
            "pendingToolCalls": [],
            "queueItems": [],
            "hasQueuedJobs": false,
            "latestMessageId": null,
            "lastUserMessageAt": null,
            "lastAssistantMessageAt": null
        })
    );

    // Paired in Telegram, the app sends a message as the user's Telegram identity.
    let pairing = app.ok("createUserAgentPairing", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert!(start(&fake, 1001, 42, pairing["pairing"]["code"].as_str().expect("code")).await.starts_with("Paired!"));
    let sent = app
        .ok(
            "sendMessageToUserAgent",
            json!({
                "consumerUserId": "alice", "agentKey": "sales", "content": "hello from the app",
                "metadata": {"campaign": "spring", "source": "spoofed"}, "idempotencyKey": "send-1",
                "nowMs": 1, "providerConfig": {"kind": "fly"}
            }),
        )
        .await;
    let job = wait_jobs(&stack, conversation, 1).await.remove(0);
    assert_eq!(job["_id"], sent);
    assert_eq!(job["agentKey"], json!("sales"));
    let payload = &job["payload"];
    assert_eq!((payload["provider"].clone(), payload["providerUserId"].clone()), (json!("telegram"), json!("42")));
    assert_eq!(payload["messageText"], json!("hello from the app"));
    assert_eq!(
        payload["metadata"],
        json!({
            "campaign": "spring", "consumerUserId": "alice", "source": "user_agent_api",
            "telegramChatId": "42", "telegramUserId": "42", "providerUserId": "42"
        })
    );
    // A retried send with the same key queues nothing new.
    let again = app
        .ok(
            "sendMessageToUserAgent",
            json!({"consumerUserId": "alice", "agentKey": "sales", "content": "hello from the app", "idempotencyKey": "send-1"}),
        )
        .await;
    assert_eq!(again, sent);
    let err = app
        .err("sendMessageToUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales", "content": "  "}))
        .await;
    assert_eq!(err.message, "content must not be empty");

    // The user writes in Telegram too: the same conversation.
    fake.send_update(1001, fake.text_update(1001, 42, "and hello from the chat")).await;
    let queued = wait_jobs(&stack, conversation, 2).await;
    assert_eq!(queued[0]["payload"]["messageText"], json!("and hello from the chat"));

    let view = app.ok("getConversationViewForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!(view["conversationId"], json!(conversation));
    let ids: Vec<&Value> = view["queueItems"].as_array().expect("items").iter().map(|j| &j["_id"]).collect();
    assert_eq!(ids, vec![&queued[0]["_id"], &sent], "newest first");
    assert_eq!(
        (view["hasQueuedJobs"].clone(), view["latestMessageId"].clone()),
        (json!(true), queued[0]["_id"].clone())
    );
    let view = app
        .ok("getConversationViewForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales", "limit": 1}))
        .await;
    assert_eq!(view["queueItems"].as_array().map(Vec::len), Some(1));

    // History written by the agent shows, oldest first, with the latest time of each role.
    let t0 = tests::T0;
    stack
        .admin()
        .ok(
            "appendConversationMessages",
            json!({"conversationId": conversation, "messages": [
                {"role": "user", "content": "hello from the app", "at": t0 + 1},
                {"role": "assistant", "content": "hi Alice", "at": t0 + 2},
                {"role": "user", "content": "and hello from the chat", "at": t0 + 3},
            ]}),
        )
        .await;
    let view = app.ok("getConversationViewForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    let contents: Vec<&Value> =
        view["contextHistory"].as_array().expect("history").iter().map(|i| &i["content"]).collect();
    assert_eq!(contents, vec![&json!("hello from the app"), &json!("hi Alice"), &json!("and hello from the chat")]);
    assert_eq!(
        (view["lastUserMessageAt"].clone(), view["lastAssistantMessageAt"].clone()),
        (json!(t0 + 3), json!(t0 + 2))
    );
    let view = app
        .ok(
            "getConversationViewForUserAgent",
            json!({"consumerUserId": "alice", "agentKey": "sales", "historyLimit": 2}),
        )
        .await;
    assert_eq!(view["contextHistory"].as_array().map(Vec::len), Some(2));
    assert_eq!(view["contextHistory"][0]["content"], json!("hi Alice"));

    // A worker finishes the first job: queue items by status.
    let worker = stack.worker("w1");
    let claim = worker.ok("claimNextJob", json!({"workerId": "w1"})).await;
    assert_eq!(claim["messageId"], sent, "the conversation's jobs run in order");
    worker.ok("completeJob", json!({"workerId": "w1", "messageId": sent, "leaseId": claim["leaseId"]})).await;
    let items = |statuses: Value| {
        let app = app.clone();
        async move {
            let list = app
                .ok(
                    "listQueueItemsForUserAgent",
                    json!({"consumerUserId": "alice", "agentKey": "sales", "statuses": statuses}),
                )
                .await;
            list.as_array().expect("list").iter().map(|j| j["_id"].clone()).collect::<Vec<Value>>()
        }
    };
    assert_eq!(items(json!(["done"])).await, vec![sent.clone()]);
    assert_eq!(items(json!(["queued", "processing"])).await, vec![queued[0]["_id"].clone()]);
    assert_eq!(items(json!(["dead_letter"])).await, Vec::<Value>::new());
    let all = app.ok("listQueueItemsForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!(all.as_array().map(Vec::len), Some(2));
    // The status filter applies to the newest `limit` items, as in the original.
    let newest_done = app
        .ok(
            "listQueueItemsForUserAgent",
            json!({"consumerUserId": "alice", "agentKey": "sales", "statuses": ["done"], "limit": 1}),
        )
        .await;
    assert_eq!(newest_done, json!([]));

    let claim = worker.ok("claimNextJob", json!({"workerId": "w1"})).await;
    worker
        .ok("completeJob", json!({"workerId": "w1", "messageId": claim["messageId"], "leaseId": claim["leaseId"]}))
        .await;
    let view = app.ok("getConversationViewForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!(view["hasQueuedJobs"], json!(false));

    // Revoked, the view is still there (history is kept) but sending is refused.
    app.ok("revokeUserAgentBinding", json!({"consumerUserId": "alice"})).await;
    let view = app.ok("getConversationViewForUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales"})).await;
    assert_eq!(view["queueItems"].as_array().map(Vec::len), Some(2));
    let err = app
        .err("sendMessageToUserAgent", json!({"consumerUserId": "alice", "agentKey": "sales", "content": "hi"}))
        .await;
    assert_eq!(err.message, "No active binding found for consumerUserId and agentKey");

    // A binding without Telegram ids sends as a system push from the consumer user.
    app.ok("bindUserAgent", json!({"consumerUserId": "bob", "agentKey": "sales"})).await;
    let sent = app
        .ok("sendMessageToUserAgent", json!({"consumerUserId": "bob", "agentKey": "sales", "content": "from the web"}))
        .await;
    let job = wait_jobs(&stack, "user-agent:sales:bob", 1).await.remove(0);
    assert_eq!(job["_id"], sent);
    assert_eq!(
        (job["payload"]["provider"].clone(), job["payload"]["providerUserId"].clone()),
        (json!("system_push"), json!("bob"))
    );
    assert_eq!(
        job["payload"]["metadata"],
        json!({"consumerUserId": "bob", "source": "user_agent_api", "providerUserId": "bob"})
    );
    // A disabled agent refuses the enqueue with the queue's message.
    profile(&stack, "sales", false, Some("1001")).await;
    let err =
        app.err("sendMessageToUserAgent", json!({"consumerUserId": "bob", "agentKey": "sales", "content": "hi"})).await;
    assert_eq!(err.message, "Agent profile 'sales' not found or disabled");
    assert_eq!(jobs(&stack, "user-agent:sales:bob").await.len(), 1);

    // Over HTTP with the app token, as the consumer app calls it.
    let response = reqwest::Client::new()
        .post(stack.http_url("/v1/ops/getActiveUserAgent"))
        .bearer_auth(tests::APP_TOKEN)
        .json(&json!({"consumerUserId": "bob"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let active: Value = response.json().await.expect("json");
    assert_eq!((active["agentKey"].clone(), active["status"].clone()), (json!("sales"), json!("failed")));
    stack.stop().await;
}
