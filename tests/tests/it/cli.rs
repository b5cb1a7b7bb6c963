//! `afctl` driven in-process against a real stack over HTTP: generic operation calls, tables,
//! stdin-only secrets and the error format.

use serde_json::Value;
use tests::{ADMIN_TOKEN, TestStack};

/// Runs afctl as admin against `stack` with `stdin`; returns its stdout or its error.
async fn afctl(stack: &TestStack, args: &[&str], stdin: &str) -> Result<String, cli::CliError> {
    afctl_as(stack, ADMIN_TOKEN, args, stdin).await
}

async fn afctl_as(stack: &TestStack, token: &str, args: &[&str], stdin: &str) -> Result<String, cli::CliError> {
    let base = format!("http://{}", stack.http_addr);
    let mut argv: Vec<String> = vec!["--url".into(), base, "--token".into(), token.into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut out = Vec::new();
    cli::run_with_input(argv, &mut stdin.as_bytes(), &mut out).await?;
    Ok(String::from_utf8(out).expect("utf-8 output"))
}

#[tokio::test]
async fn cli_upserts_and_lists_profiles() {
    let stack = TestStack::start().await;
    let out = afctl(
        &stack,
        &[
            "profile",
            "upsert",
            "--agent-key",
            "helper",
            "--version",
            "2.0.0",
            "--secret-ref",
            "telegram.botToken.helper",
            "--bot-identity",
            "bot-1",
        ],
        "",
    )
    .await
    .expect("upsert");
    assert_eq!(out.trim(), "\"helper\"");

    let out = afctl(&stack, &["op", "listAgentProfiles"], "").await.expect("op");
    let profiles: Value = serde_json::from_str(&out).expect("pretty JSON");
    assert_eq!(profiles[0]["agentKey"], "helper");
    assert_eq!(profiles[0]["version"], "2.0.0");

    // The same operation with arguments from stdin.
    let out = afctl(&stack, &["op", "getAgentProfile", "-"], r#"{"agentKey":"helper"}"#).await.expect("op from stdin");
    let profile: Value = serde_json::from_str(&out).expect("pretty JSON");
    assert_eq!(profile["botIdentity"], "bot-1");

    let table = afctl(&stack, &["profile", "list"], "").await.expect("list");
    for needle in ["agentKey", "helper", "2.0.0", "telegram.botToken.helper"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn cli_ops_table_lists_the_catalogue() {
    let stack = TestStack::start().await;
    let table = afctl(&stack, &["ops"], "").await.expect("ops");
    for needle in ["name", "enqueueMessage", "queue-manager", "admin, app"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    let raw = afctl(&stack, &["--json", "ops"], "").await.expect("ops --json");
    let ops: Value = serde_json::from_str(&raw).expect("JSON with --json");
    assert_eq!(ops.as_array().map(Vec::len), Some(common::ops::CATALOGUE.len()));
    stack.stop().await;
}

#[tokio::test]
async fn cli_imports_secrets_from_stdin_only_and_shows_status() {
    let stack = TestStack::start().await;
    let out = afctl(&stack, &["secret", "import", "--ref", "fly.apiToken"], "s3cret\n").await.expect("import");
    assert_eq!(out.trim(), "stored fly.apiToken version 1");
    assert!(!out.contains("s3cret"));

    let table = afctl(&stack, &["secret", "status", "fly.apiToken", "convex.url"], "").await.expect("status");
    assert!(table.contains("fly.apiToken") && table.contains("true"), "{table}");
    assert!(table.contains("convex.url") && table.contains("false"), "{table}");

    // The value is never taken from the command line.
    let err = afctl(&stack, &["secret", "import", "--ref", "x", "--value", "leak"], "")
        .await
        .expect_err("--value is not an option");
    assert_eq!(err.exit_code(), 2);
    let err = afctl(&stack, &["secret", "import", "--ref", "x"], "").await.expect_err("an empty stdin is refused");
    assert_eq!(err.exit_code(), 2);
    stack.stop().await;
}

#[tokio::test]
async fn cli_shows_queue_stats() {
    let stack = TestStack::start().await;
    let table = afctl(&stack, &["stats"], "").await.expect("stats");
    for needle in ["queuedReady", "processing", "deadLetter"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn cli_errors_carry_the_code_and_message() {
    let stack = TestStack::start().await;
    let err = afctl(&stack, &["op", "getAgentProfile", "{nope"], "").await.expect_err("malformed JSON");
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().starts_with("error (invalid_input): "), "{err}");

    let err = afctl_as(&stack, "wrong-token", &["profile", "list"], "").await.expect_err("wrong token");
    assert!(err.to_string().starts_with("error (unauthenticated): "), "{err}");

    let err = afctl(&stack, &["op", "noSuchOperation"], "").await.expect_err("unknown operation");
    assert!(err.to_string().starts_with("error (not_found): "), "{err}");

    let err = afctl(&stack, &["no-such-command"], "").await.expect_err("usage error");
    assert_eq!(err.exit_code(), 2);
    stack.stop().await;
}

#[tokio::test]
async fn cli_enqueues_lists_and_claims_jobs() {
    let stack = TestStack::start().await;
    let upsert = ["profile", "upsert", "--agent-key", "ops", "--version", "1"];
    afctl(&stack, &upsert, "").await.expect("profile");
    let id = afctl(
        &stack,
        &[
            "enqueue",
            "--conversation",
            "conv-cli",
            "--agent",
            "ops",
            "--user",
            "u-1",
            "--text",
            "hello",
            "--priority",
            "70",
        ],
        "",
    )
    .await
    .expect("enqueue");
    let id = id.trim().to_string();
    assert!(!id.is_empty() && !id.contains(char::is_whitespace), "{id:?}");

    let table = afctl(&stack, &["jobs", "--status", "queued"], "").await.expect("jobs");
    for needle in [id.as_str(), "conv-cli", "ops", "70", "scheduledFor"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }

    let job = afctl(&stack, &["claim", "--worker", "w-cli"], "").await.expect("claim");
    let job: Value = serde_json::from_str(&job).expect("the claimed job as JSON");
    assert_eq!(job["messageId"], Value::from(id.as_str()));
    assert_eq!(job["payload"]["messageText"], "hello");
    // The only job is leased: another worker gets nothing.
    let none = afctl(&stack, &["claim", "--worker", "w-other"], "").await.expect("claim again");
    assert_eq!(none.trim(), "no job");
    stack.stop().await;
}
