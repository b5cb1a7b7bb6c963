//! A worker is hostile (it runs arbitrary agent code): with everything a worker is given (its
//! environment: the ingress URL and a token for its own worker id), each attack of issue 14 is
//! refused, while the same worker still does its own work.

use serde_json::{Value, json};
use tests::{TestStack, seed_profile};

/// `POST /v1/ops/<op>` as the worker does it, with its bearer token: (status, body).
async fn call(stack: &TestStack, token: &str, op: &str, args: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(stack.http_url(&format!("/v1/ops/{op}")))
        .bearer_auth(token)
        .json(&args)
        .send()
        .await
        .expect("ingress answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn worker_isolation_every_attack_is_refused_while_the_worker_does_its_own_work() {
    let stack = TestStack::start().await;
    seed_profile(&stack.ctx, "agent-a").await;
    let app = stack.app();
    for conversation in ["mine", "theirs"] {
        let payload = json!({"provider": "telegram", "providerUserId": "42", "messageText": "secret text"});
        app.ok("enqueueMessage", json!({"conversationId": conversation, "agentKey": "agent-a", "payload": payload}))
            .await;
    }
    let w1 = stack.ctx.auth.mint_worker_token("w1").expect("token");
    let w2 = stack.ctx.auth.mint_worker_token("w2").expect("token");

    // Its own work: claim, hydrate, heartbeat.
    let (status, mine) = call(&stack, &w1, "claimNextJob", json!({"workerId": "w1"})).await;
    assert_eq!(status, 200, "{mine}");
    let (message_id, lease_id) = (mine["messageId"].clone(), mine["leaseId"].clone());
    let bundle = json!({"messageId": message_id, "conversationId": mine["conversationId"]});
    assert_eq!(call(&stack, &w1, "getHydrationBundleForClaimedJob", bundle.clone()).await.0, 200);
    let lease = json!({"workerId": "w1", "messageId": message_id, "leaseId": lease_id});
    assert_eq!(call(&stack, &w1, "heartbeatJob", lease.clone()).await.0, 200);

    // NATS: no credentials, or a guess, is refused at connect (workers get none).
    let address = stack.nats.server.public_url().to_string();
    assert!(async_nats::connect(address.as_str()).await.is_err(), "NATS without credentials");
    let guessed = async_nats::ConnectOptions::new().user_and_password("agent-factory".into(), "guess".into());
    assert!(guessed.connect(address.as_str()).await.is_err(), "NATS with a guessed password");

    // Admin and app operations: reading queues, forging a job, reading or writing secrets.
    let forged = json!({"conversationId": "theirs", "agentKey": "agent-a",
                        "payload": {"provider": "telegram", "providerUserId": "42", "messageText": "forged"}});
    for (op, args) in [
        ("listQueueItemsForConversation", json!({"conversationId": "theirs"})),
        ("getQueueStats", json!({})),
        ("enqueueMessage", forged),
        ("getSecretsStatus", json!({"secretRefs": ["telegram.botToken"]})),
        ("importPlaintextSecret", json!({"secretRef": "telegram.botToken", "plaintextValue": "x"})),
        ("getConversationHistory", json!({"conversationId": "theirs"})),
    ] {
        let (status, body) = call(&stack, &w1, op, args).await;
        assert_eq!(status, 403, "{op}: {body}");
    }

    // Another worker's identity, lease and conversation.
    assert_eq!(call(&stack, &w1, "claimNextJob", json!({"workerId": "w2"})).await.0, 403, "w1 posing as w2");
    let stolen = json!({"workerId": "w2", "messageId": message_id, "leaseId": lease_id});
    // As in the original, a lease that is not the caller's is answered `false` and changes nothing.
    let (status, body) = call(&stack, &w2, "completeJob", stolen).await;
    assert_eq!((status, &body), (200, &json!(false)), "completing w1's job as w2");
    let (status, body) = call(&stack, &w2, "getHydrationBundleForClaimedJob", bundle).await;
    assert!(status == 403 || body.is_null(), "w2 reading w1's bundle: {status} {body}");

    // A token that is not one: unsigned, expired-looking or for no worker.
    assert_eq!(
        call(&stack, "not-a-worker-token-at-all-0123456789", "claimNextJob", json!({"workerId": "w1"})).await.0,
        401
    );

    // The worker still finishes its own job.
    assert_eq!(call(&stack, &w1, "completeJob", lease).await, (200, json!(true)));
}
