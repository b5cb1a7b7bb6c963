//! The audit log (issue 14 item 6): admin calls of operations that change something are
//! appended to `AF_AUDIT` with the caller's token fingerprint, the outcome and redacted
//! arguments; `listAuditLog` and `afctl audit` read them back.

use std::time::Duration;

use common::ErrorCode;
use serde_json::{Value, json};
use tests::{ADMIN_TOKEN, TestStack};

const PLAINTEXT: &str = "pl41ntext-n3ver-st0red-0xC0FFEE";

/// The records of `operation`, newest first, once there are at least `count` of them (the
/// append follows the reply, so it may land a moment later).
async fn records_of(stack: &TestStack, operation: &str, count: usize) -> Vec<Value> {
    let admin = stack.admin();
    tests::wait_until(&format!("{count} audit records of {operation}"), Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let page = admin.ok("listAuditLog", json!({ "operation": operation, "limit": 1000 })).await;
            let records = page["records"].as_array().cloned().unwrap_or_default();
            (records.len() >= count).then_some(records)
        }
    })
    .await
}

/// Every message of the audit stream as raw bytes, and every file of the stream on disk.
async fn raw_audit_bytes(stack: &TestStack) -> Vec<u8> {
    let stream = stack.ctx.js.get_stream(common::audit::STREAM).await.expect("audit stream");
    let info = stream.get_info().await.expect("stream info");
    assert!(info.state.messages > 0, "the audit stream holds records");
    let mut bytes = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(message) = stream.direct_get(seq).await {
            bytes.extend_from_slice(&message.payload);
            for (name, values) in message.headers.iter() {
                bytes.extend_from_slice(name.as_ref());
                for v in values {
                    bytes.extend_from_slice(v.as_str().as_bytes());
                }
            }
        }
    }
    let mut pending = vec![stack.nats.dir.path().to_path_buf()];
    let mut files = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().contains(common::audit::STREAM) {
                bytes.extend(std::fs::read(&path).unwrap_or_default());
                files += 1;
            }
        }
    }
    assert!(files > 0, "the audit stream's files are on disk");
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn audit_records_admin_calls_with_redacted_secrets_and_outcomes() {
    let stack = TestStack::start_with(tests::MANUAL).await;
    let admin = stack.admin();
    let fingerprint = common::audit::fingerprint(ADMIN_TOKEN);
    assert_eq!(fingerprint.len(), 12);

    admin
        .ok(
            "importPlaintextSecret",
            json!({ "secretRef": "telegram.botToken.audited", "plaintextValue": PLAINTEXT, "metadata": {"by": "test"} }),
        )
        .await;
    admin
        .ok("upsertAgentProfile", json!({ "agentKey": "audited", "version": "1", "secretsRef": [], "enabled": true }))
        .await;
    // A failing admin call (a required argument missing), with a secret in an extra field.
    let err =
        admin.err("upsertAgentProfile", json!({ "agentKey": "broken", "version": "1", "token": PLAINTEXT })).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);

    let secrets = records_of(&stack, "importPlaintextSecret", 1).await;
    let imported = &secrets[0];
    assert_eq!(imported["role"], "admin");
    assert_eq!(imported["principal"], fingerprint.as_str());
    assert_eq!(imported["service"], "hydration");
    assert_eq!(imported["outcome"]["ok"], true);
    assert_eq!(imported["atMs"], tests::T0, "the stack's (manual) clock");
    assert_eq!(imported["args"]["secretRef"], "telegram.botToken.audited");
    assert_eq!(imported["args"]["plaintextValue"], "[REDACTED]");
    assert_eq!(imported["args"]["metadata"]["by"], "test");
    assert!(imported["durationMs"].as_f64().is_some_and(|d| d >= 0.0));
    assert!(imported["sequence"].as_u64().is_some());

    let upserts = records_of(&stack, "upsertAgentProfile", 2).await;
    let (failed, ok) = (&upserts[0], &upserts[1]);
    assert!(failed["sequence"].as_u64() > ok["sequence"].as_u64(), "newest first");
    assert_eq!(ok["outcome"], json!({ "ok": true }));
    assert_eq!(ok["args"]["agentKey"], "audited");
    assert_eq!(failed["outcome"]["ok"], false);
    assert_eq!(failed["outcome"]["errorCode"], "invalid_input");
    assert!(failed["outcome"]["errorMessage"].as_str().is_some_and(|m| !m.is_empty()), "{failed}");
    assert_eq!(failed["args"]["token"], "[REDACTED]");

    // Reads are not audited, nor is listAuditLog itself.
    admin.ok("getAgentProfile", json!({ "agentKey": "audited" })).await;
    let page = admin.ok("listAuditLog", json!({})).await;
    let ops: Vec<&str> = page["records"].as_array().unwrap().iter().filter_map(|r| r["operation"].as_str()).collect();
    assert!(!ops.contains(&"getAgentProfile") && !ops.contains(&"listAuditLog"), "{ops:?}");

    // The plaintext is nowhere in the stream, neither in its messages nor in its files.
    let bytes = raw_audit_bytes(&stack).await;
    assert!(contains(&bytes, "telegram.botToken.audited"), "the raw bytes are the records");
    assert!(!contains(&bytes, PLAINTEXT), "the secret value reached the audit stream");
    stack.stop().await;
}

#[tokio::test]
async fn audit_skips_worker_and_app_calls_and_is_admin_only() {
    let stack = TestStack::start_with(tests::MANUAL).await;
    let worker = stack.worker("w-audit");
    // A worker's queue call (its outcome does not matter), then an admin call as a barrier: once
    // the admin call's record is there, a record of the earlier worker call would be too.
    let _ =
        worker.call("heartbeatJob", json!({ "workerId": "w-audit", "messageId": "m-none", "leaseId": "l-none" })).await;
    let _ = stack.app().call("bindUserAgent", json!({ "consumerUserId": "u-1", "agentKey": "nobody" })).await;
    stack.admin().ok("advanceTestClock", json!({ "ms": 1000 })).await;
    records_of(&stack, "advanceTestClock", 1).await;
    let page = stack.admin().ok("listAuditLog", json!({ "limit": 1000 })).await;
    for record in page["records"].as_array().unwrap() {
        assert_eq!(record["role"], "admin", "{record}");
        assert_ne!(record["operation"], "heartbeatJob");
        assert_ne!(record["operation"], "bindUserAgent");
    }

    let err = stack.app().err("listAuditLog", json!({})).await;
    assert_eq!(err.code, ErrorCode::Forbidden);
    assert_eq!(err.http_status(), 403);
    let err = worker.err("listAuditLog", json!({})).await;
    assert_eq!(err.code, ErrorCode::Forbidden);
    stack.stop().await;
}

#[tokio::test]
async fn audit_log_pages_and_filters() {
    let stack = TestStack::start_with(tests::MANUAL).await;
    let admin = stack.admin();
    for i in 0..3 {
        let args = json!({ "agentKey": format!("early-{i}"), "version": "1", "secretsRef": [], "enabled": true });
        admin.ok("upsertAgentProfile", args).await;
    }
    records_of(&stack, "upsertAgentProfile", 3).await;
    admin.ok("advanceTestClock", json!({ "ms": 60_000 })).await;
    let later = tests::T0 + 60_000;
    for i in 0..2 {
        let args = json!({ "agentKey": format!("late-{i}"), "version": "1", "secretsRef": [], "enabled": true });
        admin.ok("upsertAgentProfile", args).await;
    }
    let all = records_of(&stack, "upsertAgentProfile", 5).await;
    assert_eq!(all.len(), 5);

    // Pages of two, newest first, without overlap, ending without a cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = json!({ "operation": "upsertAgentProfile", "limit": 2 });
        if let Some(c) = &cursor {
            args["cursor"] = json!(c);
        }
        let page = admin.ok("listAuditLog", args).await;
        pages += 1;
        let records = page["records"].as_array().unwrap();
        assert!(records.len() <= 2);
        seen.extend(records.iter().map(|r| r["args"]["agentKey"].as_str().unwrap().to_string()));
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, ["late-1", "late-0", "early-2", "early-1", "early-0"]);

    // Since: only the calls made after the clock moved.
    let page = admin.ok("listAuditLog", json!({ "sinceMs": later, "operation": "upsertAgentProfile" })).await;
    let keys: Vec<&str> =
        page["records"].as_array().unwrap().iter().filter_map(|r| r["args"]["agentKey"].as_str()).collect();
    assert_eq!(keys, ["late-1", "late-0"]);
    assert!(page["records"].as_array().unwrap().iter().all(|r| r["atMs"] == later));

    // Bad limits and cursors are refused.
    for bad in [json!({ "limit": 0 }), json!({ "limit": 1001 }), json!({ "cursor": "x" })] {
        assert_eq!(admin.err("listAuditLog", bad).await.code, ErrorCode::InvalidInput);
    }
    stack.stop().await;
}

#[tokio::test]
async fn audit_shows_in_the_cli() {
    let stack = TestStack::start_with(tests::MANUAL).await;
    stack
        .admin()
        .ok(
            "upsertAgentProfile",
            json!({ "agentKey": "cli-audited", "version": "1", "secretsRef": [], "enabled": true }),
        )
        .await;
    records_of(&stack, "upsertAgentProfile", 1).await;
    let base = format!("http://{}", stack.http_addr);
    let run = |extra: &[&str]| {
        let mut argv: Vec<String> = vec!["--url".into(), base.clone(), "--token".into(), ADMIN_TOKEN.into()];
        argv.extend(extra.iter().map(|a| a.to_string()));
        async move {
            let mut out = Vec::new();
            cli::run_with_input(argv, &mut &b""[..], &mut out).await.expect("afctl audit");
            String::from_utf8(out).expect("utf-8")
        }
    };
    let table = run(&["audit", "--operation", "upsertAgentProfile", "--limit", "5"]).await;
    let fingerprint = common::audit::fingerprint(ADMIN_TOKEN);
    for needle in ["upsertAgentProfile", "admin", fingerprint.as_str(), "cli-audited", "2026-01-01T09:00:00.000Z"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    let json_out = run(&["--json", "audit", "--since", &tests::T0.to_string()]).await;
    let page: Value = serde_json::from_str(&json_out).expect("JSON page");
    assert_eq!(page["records"][0]["operation"], "upsertAgentProfile");
    stack.stop().await;
}

#[tokio::test]
async fn audit_append_failure_never_fails_the_call_and_is_counted() {
    // The recorder is process-wide: install it before anything is counted.
    let metrics = common::telemetry::metrics_handle();
    let failures = || {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with(common::telemetry::AUDIT_APPEND_FAILURES))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stack = TestStack::start_with(tests::MANUAL).await;
    let before = failures();
    // Without the stream, no append can succeed.
    stack.ctx.js.delete_stream(common::audit::STREAM).await.expect("delete the audit stream");
    let id = stack
        .admin()
        .ok("upsertAgentProfile", json!({ "agentKey": "unaudited", "version": "1", "secretsRef": [], "enabled": true }))
        .await;
    assert_eq!(id, "unaudited", "the call itself succeeded");
    tests::wait_until("the failed append is counted", Duration::from_secs(10), || async {
        (failures() > before).then_some(())
    })
    .await;
    stack.stop().await;
}
