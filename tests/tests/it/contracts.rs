//! The operation contracts seen from outside: `GET /openapi.json` is a valid OpenAPI 3.1
//! document of every operation, the checked-in reference (`docs/openapi.json`, the generated
//! part of `docs/api.md`) matches the contracts, and every id an operation takes refuses
//! hostile values with a 400 at once — never a 5xx, never a hang.

use std::time::Duration;

use common::api::openapi;
use serde_json::{Value, json};
use tests::TestStack;

/// The named schemas of the id types (`common::ids`).
const ID_TYPES: &[&str] = &[
    "ConversationId",
    "AgentKey",
    "WorkerId",
    "ConsumerUserId",
    "CompanyId",
    "MessageId",
    "StorageId",
    "LeaseId",
    "SnapshotId",
    "SecretRef",
    "SkillSlug",
    "MessageTemplateId",
    "PushTemplateId",
    "PushJobId",
    "BroadcastId",
    "TemplateKey",
    "BotIdentity",
    "TelegramId",
    "PairingCode",
];

fn root_file(path: &str) -> std::path::PathBuf {
    tests::project_root().join(path)
}

/// Compares `generated` with the checked-in file, or rewrites the file when `AF_UPDATE_DOCS`
/// is set (`AF_UPDATE_DOCS=1 cargo nextest run -p tests -E 'test(contracts_docs)'`).
fn check_generated(path: &str, generated: &str) {
    let file = root_file(path);
    if std::env::var_os("AF_UPDATE_DOCS").is_some() {
        std::fs::write(&file, generated).expect("write");
        return;
    }
    let current = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        current == generated,
        "{path} is stale: regenerate it with AF_UPDATE_DOCS=1 cargo nextest run -p tests -E 'test(contracts_docs)'"
    );
}

#[test]
fn contracts_docs_are_generated_from_the_contracts() {
    let document = serde_json::to_string_pretty(&openapi::document()).expect("json") + "\n";
    check_generated("docs/openapi.json", &document);
    let api_md = std::fs::read_to_string(root_file("docs/api.md")).expect("docs/api.md");
    let spliced = openapi::splice_reference(&api_md).expect("docs/api.md has the generated reference markers");
    check_generated("docs/api.md", &spliced);
}

#[tokio::test]
async fn contracts_openapi_json_is_valid_openapi_3_1_and_covers_every_operation() {
    let stack = TestStack::start().await;
    let response = reqwest::get(stack.http_url("/openapi.json")).await.expect("GET /openapi.json");
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.expect("json");
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().expect("paths");
    for spec in common::api::CATALOGUE {
        assert!(paths.contains_key(&format!("/v1/ops/{}", spec.name)), "{} is missing", spec.name);
    }
    assert_eq!(paths.len(), common::api::CATALOGUE.len());

    let validator = std::env::var("AF_OPENAPI_VALIDATOR_BIN")
        .unwrap_or_else(|_| root_file(".tools/openapi/bin/openapi-spec-validator").to_string_lossy().into_owned());
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec(&document).expect("json")).expect("write");
    let output = std::process::Command::new(&validator).arg(&file).output().unwrap_or_else(|e| {
        panic!("cannot run {validator} ({e}); ./ops/scripts/install-openapi-validator.sh installs it")
    });
    assert!(
        output.status.success(),
        "the OpenAPI validator refused /openapi.json:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    stack.stop().await;
}

/// An id argument of an operation: its name, its id type, and whether it is a list of ids.
struct IdArgument {
    op: String,
    field: String,
    kind: String,
    list: bool,
}

/// Every argument of every operation whose type is an id (or a list of ids).
fn id_arguments(document: &Value) -> Vec<IdArgument> {
    let schemas = &document["components"]["schemas"];
    let named = |schema: &Value| -> Option<String> {
        let reference = schema.get("$ref").and_then(Value::as_str)?;
        Some(reference.rsplit('/').next()?.to_string())
    };
    let id_kind = |schema: &Value| -> Option<String> {
        let options = schema.get("anyOf").and_then(Value::as_array).cloned().unwrap_or_else(|| vec![schema.clone()]);
        options.iter().filter_map(named).find(|n| ID_TYPES.contains(&n.as_str()))
    };
    let mut out = Vec::new();
    for spec in common::api::CATALOGUE {
        let args = &document["paths"][format!("/v1/ops/{}", spec.name)]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        let Some(name) = named(args) else { continue };
        let Some(properties) = schemas[&name]["properties"].as_object() else { continue };
        for (field, schema) in properties {
            let (kind, list) = match (id_kind(schema), schema.get("items").and_then(id_kind)) {
                (Some(kind), _) => (kind, false),
                (None, Some(kind)) => (kind, true),
                (None, None) => continue,
            };
            out.push(IdArgument { op: spec.name.to_string(), field: field.clone(), kind, list });
        }
    }
    out
}

/// Hostile ids: subject wildcards and separators, spaces, NUL and control characters, empty,
/// 5 KB, non-ASCII; then seeded random strings that each hold at least one forbidden byte.
fn hostile_ids() -> Vec<String> {
    let mut ids: Vec<String> = ["*", ">", "a.>", "a.*.b", ".", "a b", " ", "a\0b", "\u{7}", "a\nb", "", "é", "a/b"]
        .into_iter()
        .map(str::to_string)
        .chain([String::from("x").repeat(5000)])
        .collect();
    let forbidden = b" .*>\0\t\n\x7f/\\\"'#%";
    for seed in 0..24u64 {
        let raw = tests::pseudo_random(12, seed);
        let mut s: String = raw.iter().map(|b| (b'a' + b % 26) as char).collect();
        let at = (raw[0] as usize) % s.len();
        s.insert(at, forbidden[(raw[1] as usize) % forbidden.len()] as char);
        ids.push(s);
    }
    ids
}

fn valid_for(kind: &str, value: &str) -> bool {
    use common::ids::*;
    match kind {
        "ConversationId" => ConversationId::parse(value).is_ok(),
        "AgentKey" => AgentKey::parse(value).is_ok(),
        "WorkerId" => WorkerId::parse(value).is_ok(),
        "ConsumerUserId" => ConsumerUserId::parse(value).is_ok(),
        "CompanyId" => CompanyId::parse(value).is_ok(),
        "MessageId" => MessageId::parse(value).is_ok(),
        "StorageId" => StorageId::parse(value).is_ok(),
        "LeaseId" => LeaseId::parse(value).is_ok(),
        "SnapshotId" => SnapshotId::parse(value).is_ok(),
        "SecretRef" => SecretRef::parse(value).is_ok(),
        "SkillSlug" => SkillSlug::parse(value).is_ok(),
        "MessageTemplateId" => MessageTemplateId::parse(value).is_ok(),
        "PushTemplateId" => PushTemplateId::parse(value).is_ok(),
        "PushJobId" => PushJobId::parse(value).is_ok(),
        "BroadcastId" => BroadcastId::parse(value).is_ok(),
        "TemplateKey" => TemplateKey::parse(value).is_ok(),
        "BotIdentity" => BotIdentity::parse(value).is_ok(),
        "TelegramId" => TelegramId::parse(value).is_ok(),
        "PairingCode" => PairingCode::parse(value).is_ok(),
        other => panic!("unknown id type {other}"),
    }
}

#[tokio::test]
async fn contracts_every_id_argument_refuses_hostile_ids_with_a_400() {
    let stack = TestStack::start().await;
    let document = openapi::document();
    let arguments = id_arguments(&document);
    assert!(arguments.len() >= 40, "expected the id arguments of every operation, found {}", arguments.len());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let token = stack.admin().token.clone();
    let mut sent = 0;
    for IdArgument { op, field, kind, list } in &arguments {
        for id in hostile_ids() {
            // A random string may happen to be a valid id of this kind (`a.b` is a secret ref,
            // ` web` a slug once trimmed): only invalid ones are sent.
            if valid_for(kind, &id) {
                continue;
            }
            let value = if *list { json!([id]) } else { json!(id) };
            let body = json!({ field.as_str(): value });
            let response = http
                .post(stack.http_url(&format!("/v1/ops/{op}")))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{op} {field}={id:?}: no answer within 5 s: {e}"));
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            assert_eq!(status, 400, "{op} {field}={:?}: {text}", id.chars().take(40).collect::<String>());
            assert!(text.contains(field.as_str()), "{op}: the error names the field: {text}");
            sent += 1;
        }
    }
    eprintln!("{sent} hostile ids over {} id arguments: every one a 400", arguments.len());

    // Ids in the file routes' paths: refused before any store access, with the JSON error body.
    for path in ["/v1/snapshots/a.%3E/archive", "/v1/snapshots/%FF/archive", "/v1/snapshots/*/archive"] {
        for method in [reqwest::Method::GET, reqwest::Method::PUT] {
            let response =
                http.request(method.clone(), stack.http_url(path)).bearer_auth(&token).send().await.expect("answer");
            assert_eq!(response.status(), 400, "{method} {path}");
            let body: Value = response.json().await.expect("json error body");
            assert_eq!(body["error"]["code"], "invalid_input", "{method} {path}");
        }
    }
    let response = http.get(stack.http_url("/v1/media/a%20b")).bearer_auth(&token).send().await.expect("answer");
    assert_eq!(response.status(), 400);
    stack.stop().await;
}
