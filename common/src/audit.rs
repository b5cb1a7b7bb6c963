//! The audit log (issue 14 item 6). The operation transport ([`crate::ops`]) appends one
//! [`AuditRecord`] to the `AF_AUDIT` stream for every call made with the admin role to an
//! operation the catalogue does not mark `read_only`, after the reply has been sent, so the
//! caller never waits for it and a failed append never fails the call (it is logged and counted
//! in `af_audit_append_failures_total`). Worker and app calls are not audited.
//!
//! Secret values never reach the stream: every object key named in [`SECRET_FIELDS`] (compared
//! without regard to case, at any depth) has its value replaced by `"[REDACTED]"` before the
//! arguments are stored, and a test walks every operation's argument schema so a new field whose
//! name looks like a secret cannot be added without being listed here.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::audit::{AuditLogPage, AuditRecord, DEFAULT_LIMIT, ListAuditLogArgs, MAX_LIMIT};
use crate::config::Settings;
use crate::error::OpError;

pub const STREAM: &str = "AF_AUDIT";
pub const SUBJECT_PREFIX: &str = "af.audit";
/// The largest stored arguments, as JSON text; longer ones are cut to this many bytes.
pub const MAX_ARGS_BYTES: usize = 8 * 1024;
pub const REDACTED: &str = "[REDACTED]";
/// The records `listAuditLog` looks at in one call at most; a page may come back shorter (with
/// a cursor) when filters skip many records.
const MAX_SCAN: u64 = 10_000;
/// How far out of time order records of different services may be stored (`sinceMs`).
const SINCE_SLACK_MS: i64 = 60_000;

/// The argument fields that carry secret values, in the contracts' JSON spelling. Matched at any
/// depth and without regard to case.
pub const SECRET_FIELDS: &[&str] = &[
    // importPlaintextSecret, importTelegramTokenForAgent.
    "plaintextValue",
    // reconcileWorkerPool, checkIdleShutdowns, runFlyCleanup, deleteFlyVolume.
    "flyApiToken",
    // Generic names, so a foreign client's extra field is not stored either.
    "token",
    "apiToken",
    "botToken",
    "telegramBotToken",
    "secret",
    "secretToken",
    "linkingSharedSecret",
    "password",
    "privateKey",
    "accessToken",
    "authorization",
    // What users wrote: services enqueue Telegram messages and pushes with the admin token, and
    // the audit log is no place for message texts (who did what, not what users said).
    "payload",
    "messageText",
    "text",
    "content",
];

/// Whether a field name looks like it could carry a secret value: used by the test that keeps
/// [`SECRET_FIELDS`] complete. A `…Ref` (a secret's name), `…Configured`/`…Imported` flags and
/// `…Sha256` digests are not values.
pub fn looks_secret(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let suspicious = ["token", "secret", "password", "plaintext", "privatekey", "apikey"];
    let harmless = ["ref", "refs", "configured", "imported", "sha256", "id"];
    suspicious.iter().any(|s| lower.contains(s)) && !harmless.iter().any(|h| lower.ends_with(h))
}

pub fn is_secret_field(name: &str) -> bool {
    SECRET_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(name))
}

/// Replaces the value of every secret field in `value`, at any depth; answers the values
/// removed as text (to scrub them from an error message that may quote one).
pub fn redact(value: &mut Value) -> Vec<String> {
    let mut removed = Vec::new();
    redact_into(value, &mut removed);
    removed
}

fn redact_into(value: &mut Value, removed: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if is_secret_field(key) {
                    let old = std::mem::replace(v, Value::String(REDACTED.to_string()));
                    match old {
                        Value::String(s) => removed.push(s),
                        Value::Null => {}
                        other => removed.push(other.to_string()),
                    }
                } else {
                    redact_into(v, removed);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_into(v, removed)),
        _ => {}
    }
}

/// `text` with every occurrence of a removed secret value replaced by `"[REDACTED]"`.
pub fn scrub(text: &str, removed: &[String]) -> String {
    removed.iter().filter(|s| !s.is_empty()).fold(text.to_string(), |t, s| t.replace(s.as_str(), REDACTED))
}

/// The arguments as stored.
pub struct StoredArgs {
    /// The request body, redacted, or a string holding its first [`MAX_ARGS_BYTES`].
    pub args: Value,
    pub truncated: bool,
    /// The secret values taken out, for [`scrub`]; never stored.
    pub removed: Vec<String>,
}

/// The arguments as stored: the request body, redacted, cut to [`MAX_ARGS_BYTES`]. A body that
/// is not a JSON object is stored as its size only (it cannot be redacted field by field).
pub fn stored_args(body: &[u8]) -> StoredArgs {
    let body = body.trim_ascii();
    let stored = |args, truncated, removed| StoredArgs { args, truncated, removed };
    if body.is_empty() {
        return stored(Value::Object(Default::default()), false, Vec::new());
    }
    let mut value = match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return stored(Value::String(format!("[not a JSON object: {} bytes]", body.len())), false, Vec::new()),
    };
    let removed = redact(&mut value);
    let text = value.to_string();
    if text.len() <= MAX_ARGS_BYTES {
        return stored(value, false, removed);
    }
    let mut cut = MAX_ARGS_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = format!("{}…[truncated, {} bytes in all]", &text[..cut], text.len());
    stored(Value::String(prefix), true, removed)
}

/// A non-reversible name for a bearer token: the first 12 hex digits of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    digest_fingerprint(&Sha256::digest(token.as_bytes()).into())
}

/// [`fingerprint`] of a token of which only the SHA-256 is at hand.
pub fn digest_fingerprint(digest: &[u8; 32]) -> String {
    hex::encode(&digest[..6])
}

/// The token of an `Authorization: Bearer <token>` value (already authenticated).
pub fn bearer_token(authorization: &str) -> &str {
    authorization.trim().split_once(' ').map(|(_, t)| t).unwrap_or("")
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), when valid and set.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then(|| id.to_ascii_lowercase())
}

pub fn subject(service: &str) -> String {
    format!("{SUBJECT_PREFIX}.{service}")
}

pub fn stream_config(settings: &Settings) -> stream::Config {
    stream::Config {
        name: STREAM.to_string(),
        description: Some("audit log: admin calls of operations that change something".to_string()),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: settings.nats.replicas,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_millis(settings.audit.retention_ms),
        allow_direct: true,
        ..Default::default()
    }
}

/// Appends `record` and waits for the stream's acknowledgement. Never fails the caller: a
/// failure is logged and counted.
pub async fn append(js: &jetstream::Context, record: &AuditRecord) {
    let result = async {
        let body = serde_json::to_vec(record)?;
        js.publish(subject(&record.service), body.into()).await?.await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        metrics::counter!(crate::telemetry::AUDIT_APPEND_FAILURES).increment(1);
        tracing::warn!(op = %record.operation, error = %e, "could not append to the audit log");
    }
}

/// `listAuditLog`: walks the stream backwards from the cursor (a stream sequence) and answers
/// up to `limit` records that pass the filters, newest first.
pub async fn list(js: &jetstream::Context, args: &ListAuditLogArgs) -> Result<AuditLogPage, OpError> {
    let limit = args.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(OpError::invalid(format!("limit: must be between 1 and {MAX_LIMIT}")));
    }
    let cursor = match args.cursor.as_deref() {
        None => None,
        Some(c) => Some(c.parse::<u64>().map_err(|_| OpError::invalid("cursor: not a cursor of listAuditLog"))?),
    };
    let stream = js.get_stream(STREAM).await.map_err(OpError::internal)?;
    let info = stream.get_info().await.map_err(OpError::internal)?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut seq = cursor.map_or(last, |c| c.min(last));
    let mut records = Vec::new();
    let mut scanned = 0;
    while seq >= first.max(1) && records.len() < limit as usize {
        if scanned == MAX_SCAN {
            return Ok(AuditLogPage { records, next_cursor: Some(seq.to_string()) });
        }
        scanned += 1;
        let message = match stream.direct_get(seq).await {
            Ok(m) => m,
            // Removed by age (or never written at this sequence): nothing to show.
            Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => {
                seq -= 1;
                continue;
            }
            Err(e) => return Err(OpError::internal(e)),
        };
        seq -= 1;
        let Ok(mut record) = serde_json::from_slice::<AuditRecord>(&message.payload) else { continue };
        if let Some(since) = args.since_ms {
            // Each service appends as its calls finish, so the stream is in time order only to
            // within moments: an older record is skipped, and the walk ends at the first one
            // older than `since` by more than that.
            if record.at_ms < since.saturating_sub(SINCE_SLACK_MS) {
                return Ok(AuditLogPage { records, next_cursor: None });
            }
            if record.at_ms < since {
                continue;
            }
        }
        if args.operation.as_deref().is_some_and(|op| op != record.operation) {
            continue;
        }
        record.sequence = Some(message.sequence);
        records.push(record);
    }
    let next_cursor = (seq >= first.max(1) && seq > 0).then(|| seq.to_string());
    Ok(AuditLogPage { records, next_cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth_and_long_args_are_cut() {
        let body = br#"{"secretRef":"a.b","plaintextValue":"hunter2","nested":[{"FlyApiToken":"t0k"}],"n":1}"#;
        let StoredArgs { args, truncated, removed } = stored_args(body);
        assert!(!truncated);
        assert_eq!(removed.len(), 2);
        assert_eq!(scrub("invalid value hunter2 here", &removed), "invalid value [REDACTED] here");
        let text = args.to_string();
        assert!(!text.contains("hunter2") && !text.contains("t0k"), "{text}");
        assert_eq!(args["plaintextValue"], REDACTED);
        assert_eq!(args["nested"][0]["FlyApiToken"], REDACTED);
        assert_eq!(args["secretRef"], "a.b");

        let long = format!(r#"{{"plaintextValue":"{}","title":"{}"}}"#, "s".repeat(20_000), "é".repeat(9_000));
        let StoredArgs { args, truncated, .. } = stored_args(long.as_bytes());
        assert!(truncated);
        let text = args.as_str().unwrap();
        assert!(text.len() < MAX_ARGS_BYTES + 100 && !text.contains("sss"), "{}", text.len());
        assert!(text.ends_with("bytes in all]"));

        assert_eq!(stored_args(b"").args, serde_json::json!({}));
        assert_eq!(stored_args(b"[\"hunter2\"]").args, "[not a JSON object: 11 bytes]");
        assert_eq!(stored_args(b"{nope hunter2").args, "[not a JSON object: 13 bytes]");
    }

    #[test]
    fn fingerprints_and_trace_ids() {
        assert_eq!(fingerprint("admin-secret").len(), 12);
        assert_ne!(fingerprint("admin-secret"), fingerprint("app-secret"));
        assert_eq!(bearer_token("Bearer abc"), "abc");
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("garbage"), None);
    }

    /// Every argument field of every operation whose name looks like it carries a secret is
    /// listed in [`SECRET_FIELDS`]: a new operation cannot forget to redact one.
    #[test]
    fn every_secret_looking_argument_field_is_redacted() {
        fn walk(value: &Value, found: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::Object(props)) = map.get("properties") {
                        found.extend(props.keys().cloned());
                    }
                    map.values().for_each(|v| walk(v, found));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        for spec in crate::api::CATALOGUE {
            let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
            let root = (spec.args_schema)(&mut generator);
            let mut found = Vec::new();
            walk(&serde_json::to_value(&root).unwrap(), &mut found);
            for def in generator.definitions().values() {
                walk(def, &mut found);
            }
            for name in found {
                if looks_secret(&name) && !is_secret_field(&name) {
                    missing.push(format!("{}.{name}", spec.name));
                }
            }
        }
        assert!(missing.is_empty(), "argument fields that look secret but are not in SECRET_FIELDS: {missing:?}");
        assert!(looks_secret("plaintextValue") && !looks_secret("secretRef") && !looks_secret("tokenSecretRef"));
    }
}
