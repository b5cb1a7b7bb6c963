//! Rotation without downtime (issue 14 item 5): admin and app tokens, the worker-token signing
//! key and the secrets key, each rotated while traffic runs through a rolling deployment of the
//! whole stack (replicas with the new settings join the same nats-server, the old ones stop).
//! No request that should pass is refused at any step; at the end the old credential is
//! refused, and every secret sealed under the old key reads under the new one alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::ErrorCode;
use common::config::Settings;
use common::secrets::{SecretDocument, active_secret, cipher_from_settings};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tests::{ADMIN_TOKEN, APP_TOKEN, Api, TestStack, WORKER_TOKEN_KEY, wait_until};

const ADMIN_B: &str = "rotated-admin-token-bbbbbbbb";
const APP_B: &str = "rotated-app-token-bbbbbbbbbb";
const WORKER_KEY_B: &str = "rotated-worker-token-key-bbbbbbbbbbbbbbbbbbbb";

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

/// Calls running in a loop until stopped; every error is kept, and every answer that differs
/// from `expected` (when given). A replica that stops answers the requests it took and hands
/// back the ones it did not (`OpRegistry::serve`), so a rolling deployment fails no call.
struct Traffic {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(calls: Vec<(&'static str, Api, &'static str, Value)>, expected: Option<Value>) -> Self {
        let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, r) = (stop.clone(), rounds.clone());
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            while !s.load(Ordering::SeqCst) {
                for (who, api, op, args) in &calls {
                    match api.call(op, args.clone()).await {
                        Err(e) => failures.push(format!("{op} as {who}: {:?} {}", e.code, e.message)),
                        Ok(v) if expected.as_ref().is_some_and(|x| *x != v) => {
                            failures.push(format!("{op} as {who}: answered {v}"))
                        }
                        Ok(_) => {}
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
            }
            failures
        });
        Self { stop, rounds, task }
    }

    /// Waits until a few more rounds of calls have completed (so they ran against the
    /// deployment as it is now).
    async fn advance(&self) {
        let from = self.rounds.load(Ordering::SeqCst);
        wait_until("traffic makes progress", Duration::from_secs(30), || async {
            (self.rounds.load(Ordering::SeqCst) >= from + 3).then_some(())
        })
        .await;
    }

    async fn finish(self, what: &str) {
        self.advance().await;
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.task.await.expect("traffic task");
        assert!(failures.is_empty(), "{what}: requests refused during the rotation: {failures:#?}");
    }
}

/// The calls one client set makes: admin, app and a worker, each with its own token.
fn calls(
    stack: &TestStack,
    admin: &str,
    app: &str,
    worker_id: &'static str,
    worker: &str,
) -> Vec<(&'static str, Api, &'static str, Value)> {
    vec![
        ("admin", stack.client(admin), "getQueueStats", json!({})),
        ("app", stack.client(app), "hasQueuedJobsForConversation", json!({"conversationId": "c-rotation"})),
        ("worker", stack.client(worker), "getWorkerControlState", json!({"workerId": worker_id})),
    ]
}

fn step1(s: &mut Settings) {
    // Accept B everywhere while A is still what every client (and service) sends.
    s.auth.previous_admin_tokens = vec![secret(ADMIN_B)];
    s.auth.previous_app_tokens = vec![secret(APP_B)];
    s.auth.previous_worker_token_keys = vec![secret(WORKER_KEY_B)];
}

fn step2(s: &mut Settings) {
    // B is current (sent and minted); A still accepted.
    s.auth.admin_token = Some(secret(ADMIN_B));
    s.auth.app_token = Some(secret(APP_B));
    s.auth.worker_token_key = Some(secret(WORKER_KEY_B));
    s.auth.previous_admin_tokens = vec![secret(ADMIN_TOKEN)];
    s.auth.previous_app_tokens = vec![secret(APP_TOKEN)];
    s.auth.previous_worker_token_keys = vec![secret(WORKER_TOKEN_KEY)];
}

fn step3(s: &mut Settings) {
    step2(s);
    s.auth.previous_admin_tokens.clear();
    s.auth.previous_app_tokens.clear();
    s.auth.previous_worker_token_keys.clear();
}

#[tokio::test]
async fn rotation_of_admin_app_and_worker_tokens_refuses_nothing_during_a_rolling_rollover() {
    let mut stack = TestStack::start().await;
    let worker_a = stack.ctx.auth.mint_worker_token("afw-rotation-a").expect("token");
    let traffic_a = Traffic::start(calls(&stack, ADMIN_TOKEN, APP_TOKEN, "afw-rotation-a", &worker_a), None);
    traffic_a.advance().await;

    // Step 1: processes that also accept B join; the old ones stop.
    let r1 = stack.replica(step1).await;
    traffic_a.advance().await;
    stack.stop_services().await;
    traffic_a.advance().await;

    // Every process accepts B now: clients switch to it, while some still send A.
    let probe = r1.client(ADMIN_B);
    probe.ok("getQueueStats", json!({})).await;
    // A worker token minted under the new key (as step 2's processes mint them).
    let worker_b = common::auth::Authenticator::from_settings(&{
        let mut s = (*stack.ctx.settings).clone();
        step2(&mut s);
        s.auth
    })
    .mint_worker_token("afw-rotation-b")
    .expect("token");
    let traffic_b = Traffic::start(calls(&stack, ADMIN_B, APP_B, "afw-rotation-b", &worker_b), None);
    traffic_b.advance().await;

    // Step 2: processes with B current and A previous replace step 1's.
    let r2 = stack.replica(step2).await;
    assert_eq!(
        r2.ctx.auth.mint_worker_token("afw-rotation-b").expect("mint"),
        worker_b,
        "step 2 mints with the new key"
    );
    traffic_a.advance().await;
    traffic_b.advance().await;
    r1.stop().await;
    traffic_a.finish("clients on the old tokens").await;

    // Step 3: every client is on B: processes that accept only B replace step 2's.
    let r3 = stack.replica(step3).await;
    traffic_b.advance().await;
    r2.stop().await;
    traffic_b.finish("clients on the new tokens").await;

    for (who, api, op, args) in calls(&stack, ADMIN_TOKEN, APP_TOKEN, "afw-rotation-a", &worker_a) {
        let err = api.err(op, args).await;
        assert_eq!(err.code, ErrorCode::Unauthenticated, "{who} with the removed credential: {err:?}");
    }
    for (_, api, op, args) in calls(&stack, ADMIN_B, APP_B, "afw-rotation-b", &worker_b) {
        api.ok(op, args).await;
    }
    // Over HTTP as well: 401 with the old admin token, 200 with the new one.
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/ops/getQueueStats", r3.http_addr);
    for (token, status) in [(ADMIN_TOKEN, 401), (ADMIN_B, 200)] {
        let response = http.post(&url).bearer_auth(token).json(&json!({})).send().await.expect("http");
        assert_eq!(response.status().as_u16(), status, "{token}");
    }
    r3.stop().await;
}

async fn import(api: &Api, secret_ref: &str, value: &str) -> u64 {
    let out = api.ok("importPlaintextSecret", json!({"secretRef": secret_ref, "plaintextValue": value})).await;
    out["version"].as_u64().expect("version")
}

async fn stored_docs(stack: &TestStack) -> Vec<SecretDocument> {
    let all = stack.ctx.buckets.secrets.all::<SecretDocument>().await.expect("scan secrets");
    all.into_iter().map(|(_, v)| v.value).collect()
}

fn key_id(key: &str) -> String {
    common::crypto::SecretCipher::from_base64(&secret(key)).expect("key").key_id().to_string()
}

const REFS: usize = 12;

#[tokio::test]
async fn rotation_of_the_secrets_key_reencrypts_everything_without_losing_a_concurrent_import() {
    // The background loop stays off here: the test drives `reencryptSecrets` itself.
    let mut stack = TestStack::start_with(&[("loops.secrets_reencryption", "false")]).await;
    let k1 = stack.ctx.settings.secrets.key.as_ref().expect("key").expose_secret().to_string();
    let k2 = common::crypto::generate_key_base64().expect("key");
    let (id1, id2) = (key_id(&k1), key_id(&k2));
    let admin = stack.admin();
    for i in 0..REFS {
        import(&admin, &format!("rot.ref{i}"), &format!("first-{i}")).await;
        import(&admin, &format!("rot.ref{i}"), &format!("second-{i}")).await;
    }
    // A global secret an operation answers decrypted (the spawn environment of workers).
    import(&admin, "agent-bridge.serviceKey", "bridge-key-1").await;
    let spawn_env = || async { admin.ok("getWorkerSpawnOpenClawEnv", json!({})).await["OPENCLAW_SERVICE_KEY"].clone() };
    assert_eq!(spawn_env().await, json!("bridge-key-1"));
    // A document stored before key ids were kept: its version has no keyId.
    let old = cipher_from_settings(&stack.ctx.settings).expect("cipher");
    let sealed = old.seal("legacy-value", &common::secrets::aad("rot.legacy", 1)).expect("seal");
    let legacy = json!({"secretRef": "rot.legacy", "versions": [{"version": 1, "algorithm": sealed.algorithm,
        "nonce": sealed.nonce, "ciphertext": sealed.ciphertext, "active": true, "createdAt": 1}]});
    stack.ctx.buckets.secrets.write(&common::token::escape("rot.legacy"), &legacy, None).await.expect("legacy doc");

    let status = admin.ok("getSecretsKeyRotationStatus", json!({})).await;
    assert_eq!(status["currentKeyId"], json!(id1));
    assert_eq!(status["versionsByKeyId"], json!({"": 1, id1.clone(): 2 * REFS + 1}));
    assert_eq!(status["pendingVersions"], json!(1), "the version without a key id is moved too");

    // Reads of a secret run through the whole rolling deployment: no error, no wrong answer.
    let reads = Traffic::start(
        vec![("admin", admin.clone(), "getWorkerSpawnOpenClawEnv", json!({}))],
        Some(json!({"OPENCLAW_SERVICE_KEY": "bridge-key-1"})),
    );
    reads.advance().await;
    // Step 1: processes that also open K2 replace the K1-only ones.
    let r0 = stack.replica(|s| s.secrets.previous_keys = vec![secret(&k2)]).await;
    reads.advance().await;
    stack.stop_services().await;
    reads.advance().await;
    // Step 2: K2 current, K1 previous.
    let r1 = stack
        .replica(|s| {
            s.secrets.key = Some(secret(&k2));
            s.secrets.previous_keys = vec![secret(&k1)];
        })
        .await;
    reads.advance().await;
    r0.stop().await;
    reads.advance().await;
    assert_eq!(spawn_env().await, json!("bridge-key-1"), "the service reads with K1 previous");
    let cipher = cipher_from_settings(&r1.ctx.settings).expect("cipher");
    for i in 0..REFS {
        let value = active_secret(&r1.ctx, &cipher, &format!("rot.ref{i}")).await.expect("read").expect("active");
        assert_eq!(value.expose_secret(), format!("second-{i}"), "sealed under K1, read with K1 previous");
    }
    let status = admin.ok("getSecretsKeyRotationStatus", json!({})).await;
    assert_eq!(status["currentKeyId"], json!(id2));
    assert_eq!(status["previousKeyIds"], json!([id1.clone()]));
    assert_eq!(status["pendingVersions"], json!(2 * REFS + 2));
    assert_eq!(status["unknownKeyVersions"], json!(0));

    // A new version of every ref is imported while the re-encryption runs.
    let importer = {
        let admin = admin.clone();
        tokio::spawn(async move {
            for i in 0..REFS {
                assert_eq!(import(&admin, &format!("rot.ref{i}"), &format!("third-{i}")).await, 3);
            }
        })
    };
    let pass = admin.ok("reencryptSecrets", json!({})).await;
    importer.await.expect("importer");
    assert_eq!(pass["failedVersions"], json!(0));
    assert_eq!(pass["reencryptedVersions"], json!(2 * REFS + 2), "every old version moved once: {pass}");
    let status = admin.ok("getSecretsKeyRotationStatus", json!({})).await;
    assert_eq!(status["versionsByKeyId"], json!({id2.clone(): 3 * REFS + 2}), "nothing lost, nothing left: {status}");
    assert_eq!(status["pendingVersions"], json!(0));
    let again = admin.ok("reencryptSecrets", json!({})).await;
    assert_eq!(again["reencryptedVersions"], json!(0));

    // K1 removed: only K2 configured, and every version of every ref still opens.
    let r2 = stack
        .replica(|s| {
            s.secrets.key = Some(secret(&k2));
            s.secrets.previous_keys.clear();
        })
        .await;
    reads.advance().await;
    r1.stop().await;
    reads.finish("reads of a secret").await;
    let only_k2 = cipher_from_settings(&r2.ctx.settings).expect("cipher");
    assert!(only_k2.previous_key_ids().is_empty());
    let docs = stored_docs(&stack).await;
    assert_eq!(docs.len(), REFS + 2);
    for doc in &docs {
        let expected = if doc.secret_ref.starts_with("rot.ref") { 3 } else { 1 };
        assert_eq!(doc.versions.len(), expected, "{}", doc.secret_ref);
        for v in &doc.versions {
            assert_eq!(v.key_id, id2);
            let aad = common::secrets::aad(&doc.secret_ref, v.version);
            only_k2.open(&v.sealed(), &aad).expect("opens with K2 alone");
        }
    }
    assert_eq!(spawn_env().await, json!("bridge-key-1"), "the service reads with K2 alone");
    let legacy = active_secret(&r2.ctx, &only_k2, "rot.legacy").await.expect("read").expect("active");
    assert_eq!(legacy.expose_secret(), "legacy-value");
    for i in 0..REFS {
        let value = active_secret(&r2.ctx, &only_k2, &format!("rot.ref{i}")).await.expect("read").expect("active");
        assert_eq!(value.expose_secret(), format!("third-{i}"));
    }
    let status = admin.ok("getSecretsKeyRotationStatus", json!({})).await;
    assert_eq!(status["previousKeyIds"], json!([]));
    r2.stop().await;
}

#[tokio::test]
async fn rotation_of_the_secrets_key_by_the_background_loop() {
    let mut stack = TestStack::start_with(&[("loops.secrets_reencryption", "false")]).await;
    let k1 = stack.ctx.settings.secrets.key.as_ref().expect("key").expose_secret().to_string();
    let k2 = common::crypto::generate_key_base64().expect("key");
    let admin = stack.admin();
    for i in 0..4 {
        import(&admin, &format!("loop.ref{i}"), "value").await;
    }
    let replica = stack
        .replica(|s| {
            s.secrets.key = Some(secret(&k2));
            s.secrets.previous_keys = vec![secret(&k1)];
            s.loops.secrets_reencryption = true;
            s.loops.secrets_reencryption_interval_ms = 1000;
        })
        .await;
    stack.stop_services().await;
    let id2 = key_id(&k2);
    wait_until("the loop moves every secret onto the new key", Duration::from_secs(30), || async {
        let status = admin.ok("getSecretsKeyRotationStatus", json!({})).await;
        (status["pendingVersions"] == json!(0)).then_some(())
    })
    .await;
    let status = admin.ok("getSecretsKeyRotationStatus", json!({})).await;
    assert_eq!(status["versionsByKeyId"], json!({id2: 4}));
    replica.stop().await;
}
