//! Agent profiles, encrypted secrets and runtime configuration (hydration service), through the
//! real operation transport against a real nats-server.

use std::time::Duration;

use common::ErrorCode;
use common::crypto::{Sealed, SecretCipher};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tests::TestStack;

async fn raw_secret_doc(stack: &TestStack, secret_ref: &str) -> (String, Value) {
    let bytes = stack
        .ctx
        .buckets
        .secrets
        .raw()
        .get(common::token::escape(secret_ref))
        .await
        .expect("kv get")
        .expect("secret document exists");
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8 document");
    let value = serde_json::from_str(&text).expect("json document");
    (text, value)
}

fn stack_cipher(stack: &TestStack) -> SecretCipher {
    let key = stack.ctx.settings.secrets.key.as_ref().expect("test key");
    SecretCipher::from_base64(key).expect("cipher")
}

#[tokio::test]
async fn profiles_upsert_creates_then_patches_with_effective_secret_refs() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    let id = admin
        .ok(
            "upsertAgentProfile",
            json!({
                "agentKey": "sales",
                "version": "1.0.0",
                "secretsRef": ["telegram.botToken.sales", "convex.url"],
                "botIdentity": "12345",
                "bridgeConfig": {"enabled": true, "baseUrl": "https://consumer.example.com"},
                "enabled": true
            }),
        )
        .await;
    assert_eq!(id, json!("sales"), "the profile id is the agentKey");
    let created = admin.ok("getAgentProfile", json!({"agentKey": "sales"})).await;
    assert_eq!(
        created["secretsRef"],
        json!([
            "telegram.botToken.sales",
            "convex.url",
            "fly.apiToken",
            "agent-bridge.serviceKey.sales",
            "agent-bridge.baseUrlMapJson.sales"
        ])
    );
    assert_eq!(created["botIdentity"], json!("12345"));
    assert_eq!(created["bridgeConfig"]["baseUrl"], json!("https://consumer.example.com"));
    assert_eq!(created["enabled"], json!(true));
    let created_at = created["createdAt"].as_i64().expect("createdAt");
    assert!(created["updatedAt"].as_i64().expect("updatedAt") >= created_at);

    // Patch: secretsRef is replaced, fields not supplied are kept, explicit bridge refs win.
    admin
        .ok(
            "upsertAgentProfile",
            json!({
                "agentKey": "sales",
                "version": "1.1.0",
                "secretsRef": ["telegram.botToken"],
                "bridgeConfig": {"enabled": true, "serviceKeySecretRef": "custom.key"},
                "enabled": false
            }),
        )
        .await;
    let patched = admin.ok("getAgentProfile", json!({"agentKey": "sales"})).await;
    assert_eq!(patched["version"], json!("1.1.0"));
    assert_eq!(patched["enabled"], json!(false));
    assert_eq!(patched["botIdentity"], json!("12345"), "kept when omitted");
    assert_eq!(patched["createdAt"].as_i64(), Some(created_at));
    assert_eq!(
        patched["secretsRef"],
        json!(["telegram.botToken", "convex.url", "fly.apiToken", "custom.key", "agent-bridge.baseUrlMapJson.sales"])
    );

    // Disabling the bridge drops its refs.
    admin
        .ok(
            "upsertAgentProfile",
            json!({
                "agentKey": "sales",
                "version": "1.2.0",
                "secretsRef": [],
                "bridgeConfig": {"enabled": false},
                "enabled": true
            }),
        )
        .await;
    let plain = admin.ok("getAgentProfile", json!({"agentKey": "sales"})).await;
    assert_eq!(plain["secretsRef"], json!(["convex.url", "fly.apiToken"]));
    stack.stop().await;
}

#[tokio::test]
async fn profiles_get_and_list() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    assert_eq!(admin.ok("listAgentProfiles", json!({})).await, json!([]));
    assert_eq!(admin.ok("getAgentProfile", json!({"agentKey": "nobody"})).await, Value::Null);
    for key in ["zeta", "alpha", "telegram:42@a+b=c"] {
        admin
            .ok("upsertAgentProfile", json!({"agentKey": key, "version": "1", "secretsRef": [], "enabled": true}))
            .await;
    }
    let list = admin.ok("listAgentProfiles", json!({})).await;
    let keys: Vec<&str> =
        list.as_array().expect("array").iter().map(|p| p["agentKey"].as_str().expect("agentKey")).collect();
    assert_eq!(keys, ["alpha", "telegram:42@a+b=c", "zeta"]);
    // The app role may read one profile.
    let one = stack.app().ok("getAgentProfile", json!({"agentKey": "telegram:42@a+b=c"})).await;
    assert_eq!(one["agentKey"], json!("telegram:42@a+b=c"));
    stack.stop().await;
}

#[tokio::test]
async fn profiles_invalid_input_is_refused_naming_the_field() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    let base = json!({"agentKey": "a", "version": "1", "secretsRef": [], "enabled": true});
    let with = |patch: Value| {
        let mut v = base.clone();
        for (k, val) in patch.as_object().expect("object") {
            v[k] = val.clone();
        }
        v
    };
    let cases = [
        (with(json!({"agentKey": "   "})), "agentKey"),
        (with(json!({"agentKey": "k".repeat(129)})), "agentKey"),
        (with(json!({"agentKey": "a\u{7}b"})), "agentKey"),
        (with(json!({"version": ""})), "version"),
        (with(json!({"version": "v".repeat(65)})), "version"),
        (with(json!({"secretsRef": ["ok", "has space"]})), "secretsRef[1]"),
        (with(json!({"secretsRef": [""]})), "secretsRef[0]"),
        (with(json!({"secretsRef": ["r".repeat(257)]})), "secretsRef[0]"),
        (with(json!({"secretsRef": (0..65).map(|i| format!("r{i}")).collect::<Vec<_>>()})), "secretsRef"),
        (
            with(json!({"bridgeConfig": {"enabled": true, "serviceKeySecretRef": ""}})),
            "bridgeConfig.serviceKeySecretRef",
        ),
        // A wrong type names the argument's path and the expected type.
        (with(json!({"enabled": "yes"})), "enabled: invalid type: string \"yes\", expected a boolean"),
        (with(json!({"bridgeConfig": {"enabled": 1}})), "bridgeConfig.enabled: invalid type"),
        (with(json!({"surprise": 1})), "surprise"),
        (json!({"agentKey": "a", "version": "1", "enabled": true}), "secretsRef"),
    ];
    for (args, field) in cases {
        let err = admin.err("upsertAgentProfile", args.clone()).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{args}: {err:?}");
        assert!(err.message.contains(field), "{args}: message should name {field}: {}", err.message);
    }
    assert_eq!(admin.ok("listAgentProfiles", json!({})).await, json!([]), "nothing was stored");
    let err = admin.err("getAgentProfile", json!({"agentKey": ""})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    let err = admin.err("importPlaintextSecret", json!({"secretRef": "a b", "plaintextValue": "x"})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("secretRef"), "{}", err.message);
    stack.stop().await;
}

#[tokio::test]
async fn profiles_operations_check_roles() {
    let stack = TestStack::start().await;
    let upsert = json!({"agentKey": "a", "version": "1", "secretsRef": [], "enabled": true});
    let err = stack.app().err("upsertAgentProfile", upsert.clone()).await;
    assert_eq!(err.code, ErrorCode::Forbidden, "{err:?}");
    let worker = stack.worker("w-1");
    for (op, args) in [
        ("upsertAgentProfile", upsert.clone()),
        ("getSecretsStatus", json!({"secretRefs": ["convex.url"]})),
        ("importPlaintextSecret", json!({"secretRef": "r", "plaintextValue": "v"})),
        ("providerRuntimeConfig", json!({})),
    ] {
        let err = worker.err(op, args).await;
        assert_eq!(err.code, ErrorCode::Forbidden, "{op}: {err:?}");
    }
    for op in ["importPlaintextSecret", "setMessageRuntimeConfig", "listAgentProfiles"] {
        let err = stack.app().err(op, json!({})).await;
        assert_eq!(err.code, ErrorCode::Forbidden, "{op}: {err:?}");
    }
    let (status, body) = stack
        .ctx
        .ops
        .call_raw("upsertAgentProfile", None, bytes::Bytes::from(upsert.to_string()), Duration::ZERO)
        .await;
    assert_eq!(status, 401);
    let err = common::ops::decode_reply::<Value>(status, &body).expect_err("must fail");
    assert_eq!(err.code, ErrorCode::Unauthenticated);
    let err = stack.client("not-a-token").err("getAgentProfile", json!({"agentKey": "a"})).await;
    assert_eq!(err.code, ErrorCode::Unauthenticated);
    assert_eq!(stack.admin().ok("listAgentProfiles", json!({})).await, json!([]), "no refused call wrote anything");
    stack.stop().await;
}

#[tokio::test]
async fn profiles_secret_imports_rotate_versions_and_report_status() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    for (i, value) in ["first-value", "second-value", "third-value"].iter().enumerate() {
        let out = admin
            .ok(
                "importPlaintextSecret",
                json!({
                    "secretRef": "telegram.botToken.sales",
                    "plaintextValue": value,
                    "metadata": {"source": "test"}
                }),
            )
            .await;
        let version = i as u64 + 1;
        assert_eq!(
            out,
            json!({
                "secretId": format!("telegram.botToken.sales#{version}"),
                "secretRef": "telegram.botToken.sales",
                "version": version
            })
        );
    }
    let (_, doc) = raw_secret_doc(&stack, "telegram.botToken.sales").await;
    let versions: Vec<(u64, bool, Option<u64>)> = doc["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            (v["version"].as_u64().expect("version"), v["active"].as_bool().expect("active"), v["rotatedFrom"].as_u64())
        })
        .collect();
    assert_eq!(versions, vec![(1, false, None), (2, false, Some(1)), (3, true, Some(2))]);
    assert_eq!(doc["versions"][2]["metadata"], json!({"source": "test"}));
    assert_eq!(doc["versions"][2]["algorithm"], json!("xchacha20poly1305-v1"));

    admin
        .ok(
            "importPlaintextSecret",
            json!({"secretRef": "convex.url", "plaintextValue": "https://example.convex.cloud"}),
        )
        .await;
    let status = admin
        .ok(
            "getSecretsStatus",
            json!({"secretRefs": ["missing.ref", "telegram.botToken.sales", "convex.url", "missing.ref"]}),
        )
        .await;
    assert_eq!(
        status,
        json!([
            {"secretRef": "missing.ref", "hasActive": false, "version": null},
            {"secretRef": "telegram.botToken.sales", "hasActive": true, "version": 3},
            {"secretRef": "convex.url", "hasActive": true, "version": 1},
            {"secretRef": "missing.ref", "hasActive": false, "version": null}
        ])
    );
    assert_eq!(admin.ok("getSecretsStatus", json!({"secretRefs": []})).await, json!([]));
    stack.stop().await;
}

#[tokio::test]
async fn profiles_secret_plaintext_is_sealed_and_never_returned() {
    // Raise the generic string limit so the operation's own 64 KiB check is the one that fires.
    let stack = TestStack::start_with(&[("limits.max_string_bytes", "200000")]).await;
    let admin = stack.admin();
    let plaintext = "123456:AAH-super-secret-bot-token";
    let out =
        admin.ok("importPlaintextSecret", json!({"secretRef": "telegram.botToken", "plaintextValue": plaintext})).await;
    assert!(!out.to_string().contains(plaintext));
    let status = admin.ok("getSecretsStatus", json!({"secretRefs": ["telegram.botToken"]})).await;
    assert!(!status.to_string().contains(plaintext));

    let (raw, doc) = raw_secret_doc(&stack, "telegram.botToken").await;
    assert!(!raw.contains(plaintext), "plaintext stored in KV: {raw}");
    assert!(!raw.contains("super-secret"), "plaintext fragment stored in KV");
    let sealed: Sealed = serde_json::from_value(doc["versions"][0].clone()).expect("sealed");
    let right = stack_cipher(&stack);
    assert_eq!(sealed.key_id, right.key_id());
    let opened = right.open(&sealed, "telegram.botToken#1").expect("the configured key opens it");
    assert_eq!(opened.expose_secret(), plaintext);
    assert!(right.open(&sealed, "telegram.botToken#2").is_err(), "bound to its version");
    assert!(right.open(&sealed, "other.ref#1").is_err(), "bound to its ref");
    let wrong_key = SecretString::from(common::crypto::generate_key_base64().expect("key"));
    let wrong = SecretCipher::from_base64(&wrong_key).expect("cipher");
    assert!(wrong.open(&sealed, "telegram.botToken#1").is_err());
    // Even with the key id forged to match, another key cannot authenticate the ciphertext.
    let forged = Sealed { key_id: wrong.key_id().to_string(), ..sealed.clone() };
    assert!(wrong.open(&forged, "telegram.botToken#1").is_err());

    let err = admin.err("importPlaintextSecret", json!({"secretRef": "r", "plaintextValue": ""})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("plaintextValue"), "{}", err.message);
    let err = admin
        .err("importPlaintextSecret", json!({"secretRef": "r", "plaintextValue": "x".repeat(64 * 1024 + 1)}))
        .await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("plaintextValue"), "{}", err.message);
    let err = admin.err("importPlaintextSecret", json!({"secretRef": "r", "plaintextValue": 987654321})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(!err.message.contains("987654321"), "{}", err.message);
    let status = admin.ok("getSecretsStatus", json!({"secretRefs": ["r"]})).await;
    assert_eq!(status[0]["hasActive"], json!(false), "refused imports store nothing");
    stack.stop().await;
}

#[tokio::test]
async fn profiles_message_config_is_normalised_and_blank_deletes_the_row() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    assert_eq!(admin.ok("messageRuntimeConfig", json!({})).await, Value::Null);
    let out = admin
        .ok(
            "setMessageRuntimeConfig",
            json!({"messageConfig": {"systemPrompt": "  Be kind.  ", "telegramAttachmentRetentionMs": 86400000.7}}),
        )
        .await;
    assert_eq!(out, Value::Null);
    assert_eq!(
        admin.ok("messageRuntimeConfig", json!({})).await,
        json!({"systemPrompt": "Be kind.", "telegramAttachmentRetentionMs": 86400000})
    );
    // The stored row is the shared RuntimeConfigRow the queue-manager reads at enqueue.
    let row = stack
        .ctx
        .buckets
        .runtime_config
        .get::<common::model::RuntimeConfigRow<common::model::MessageConfig>>(common::model::MESSAGE_CONFIG_KEY)
        .await
        .expect("kv")
        .expect("row");
    assert_eq!(row.value.config.system_prompt.as_deref(), Some("Be kind."));

    // Setting one field replaces the whole config; a bad retention is dropped.
    admin
        .ok(
            "setMessageRuntimeConfig",
            json!({"messageConfig": {"systemPrompt": "Short answers.", "telegramAttachmentRetentionMs": -5}}),
        )
        .await;
    assert_eq!(admin.ok("messageRuntimeConfig", json!({})).await, json!({"systemPrompt": "Short answers."}));
    admin.ok("setMessageRuntimeConfig", json!({"messageConfig": {"telegramAttachmentRetentionMs": 60000}})).await;
    assert_eq!(admin.ok("messageRuntimeConfig", json!({})).await, json!({"telegramAttachmentRetentionMs": 60000}));

    // A whitespace-only prompt with no retention deletes the row.
    admin.ok("setMessageRuntimeConfig", json!({"messageConfig": {"systemPrompt": " \n\t "}})).await;
    assert_eq!(admin.ok("messageRuntimeConfig", json!({})).await, Value::Null);
    let gone = stack.ctx.buckets.runtime_config.get::<Value>(common::model::MESSAGE_CONFIG_KEY).await.expect("kv");
    assert!(gone.is_none(), "row deleted");
    // Deleting again is a no-op, and the row can be created again afterwards.
    admin.ok("setMessageRuntimeConfig", json!({"messageConfig": {}})).await;
    admin.ok("setMessageRuntimeConfig", json!({"messageConfig": {"systemPrompt": "Back."}})).await;
    assert_eq!(admin.ok("messageRuntimeConfig", json!({})).await, json!({"systemPrompt": "Back."}));
    let err = admin.err("setMessageRuntimeConfig", json!({"messageConfig": {"systemPrompt": 3}})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    stack.stop().await;
}

#[tokio::test]
async fn profiles_provider_config_round_trips() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    assert_eq!(admin.ok("providerRuntimeConfig", json!({})).await, Value::Null);
    let config = json!({
        "kind": "fly",
        "appName": "af-workers",
        "organizationSlug": "acme",
        "image": "registry.fly.io/worker:1",
        "region": "ams",
        "volumeName": "openclaw_data",
        "volumePath": "/data",
        "volumeSizeGb": 10.0
    });
    assert_eq!(admin.ok("setProviderRuntimeConfig", json!({"providerConfig": config})).await, Value::Null);
    assert_eq!(admin.ok("providerRuntimeConfig", json!({})).await, config);
    // No validation (as the original): a partial config is stored as given and replaces the old.
    admin.ok("setProviderRuntimeConfig", json!({"providerConfig": {"kind": "fly", "appName": ""}})).await;
    assert_eq!(admin.ok("providerRuntimeConfig", json!({})).await, json!({"kind": "fly", "appName": ""}));
    let err = admin.err("setProviderRuntimeConfig", json!({"providerConfig": {"appNmae": "typo"}})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("appNmae"), "{}", err.message);
    stack.stop().await;
}

#[tokio::test]
async fn profiles_concurrent_secret_imports_get_distinct_versions() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    let imports = (0..8).map(|i| {
        let admin = admin.clone();
        async move {
            admin
                .ok(
                    "importPlaintextSecret",
                    json!({"secretRef": "fly.apiToken", "plaintextValue": format!("token-{i}")}),
                )
                .await["version"]
                .as_u64()
                .expect("version")
        }
    });
    let mut versions = futures::future::join_all(imports).await;
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<u64>>(), "each CAS winner got its own version");
    let (_, doc) = raw_secret_doc(&stack, "fly.apiToken").await;
    let active: Vec<u64> = doc["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter(|v| v["active"] == json!(true))
        .map(|v| v["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(active, vec![8], "only the newest version is active");
    stack.stop().await;
}

/// An answer larger than one NATS message (12,000 profiles: about 1.7 MB) is a 413 naming the
/// sizes, at once, not a request that times out; a broadcast still finds its company's agents
/// among thousands.
#[tokio::test]
async fn profiles_an_answer_too_large_for_nats_is_a_413_and_broadcasts_still_work() {
    let stack = TestStack::start().await;
    let seeds = (0..12_000).map(|i| {
        let ctx = stack.ctx.clone();
        async move {
            let profile = common::model::AgentProfile {
                agent_key: format!("agent-{i:05}"),
                version: "1.0.0".into(),
                secrets_ref: vec![format!("telegram.botToken.agent-{i:05}"), "convex.url".into()],
                bot_identity: None,
                bridge_config: None,
                enabled: true,
                company_id: Some(if i < 2 { "small".into() } else { "other".into() }),
                created_at: 0,
                updated_at: 0,
            };
            ctx.buckets.profiles.create(&profile.agent_key, &profile).await.expect("seed profile");
        }
    });
    futures::future::join_all(seeds).await;

    let err = stack.admin().err("listAgentProfiles", json!({})).await;
    assert_eq!(err.code, ErrorCode::PayloadTooLarge);
    assert!(err.message.contains("larger than a NATS message may be"), "{}", err.message);

    let args = json!({"companyId": "small", "title": "hi", "text": "hello", "requestedBy": "ops"});
    let result = stack.app().ok("sendBroadcastToAllActiveAgents", args).await;
    assert_eq!(result["totalTargets"], 2, "{result}");
}
