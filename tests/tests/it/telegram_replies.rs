//! Replies in the chat from the reference worker (issue 11 item 7): a user writes to the bot
//! through the webhook, the worker (in-process, over ingress HTTP) answers, and the fake Bot API
//! records what the user received — split at 4,096 UTF-16 units, the formatting fallback, a 429
//! waited out, files sent with `sendAudio` / `sendDocument`, and a reply cut short by a 429 the
//! worker does not wait out resumed by the job's retry without repeating a message.

use std::time::Duration;

use serde_json::json;
use tests::fake_telegram::{FakeTelegram, Sent};

use crate::reference_worker::{Via, config, finished, history, start as start_worker};
use crate::snapshots::assign;
use crate::telegram::{agent_with_bot, jobs, stack_with, start};

/// The command engine of these tests: `long` → 10,000 characters (4,096 `a`, 4,096 `b`,
/// 1,808 `c`), `html` → text Telegram's HTML mode refuses, `files` → two files in the
/// workspace and one outside it, named by media lines; anything else → `echo: <text>`.
const ENGINE: &str = r#"input=$(cat)
case "$input" in
  *'"text":"long"'*) awk 'BEGIN { for (i = 0; i < 10000; i++) printf "%c", 97 + int(i / 4096) }' ;;
  *'"text":"html"'*) printf '1 < 2 & <b>bold</b>' ;;
  *'"text":"files"'*)
    mkdir -p out && printf 'ID3-audio' > out/voice.mp3 && printf '%%PDF-1.4' > report.pdf \
      && printf 'not yours' > ../outside.txt \
      && printf 'Two files.\nMEDIA: out/voice.mp3\nMEDIA: report.pdf\nMEDIA: ../outside.txt\n' ;;
  *) printf '%s' "$input" | sed -n 's/.*"text":"\([^"]*\)".*/echo: \1/p' ;;
esac
"#;

/// What bot 1001 sent to chat 42 (chat actions left out).
fn replies(fake: &FakeTelegram) -> Vec<Sent> {
    fake.sent().into_iter().filter(|s| s.bot_id == 1001 && s.chat_id == "42" && s.method != "sendChatAction").collect()
}

/// Waits until bot 1001 sent `count` replies to chat 42, and returns them.
async fn wait_replies(fake: &FakeTelegram, count: usize) -> Vec<Sent> {
    tests::wait_until(&format!("{count} replies in chat 42"), Duration::from_secs(20), || async {
        let sent = replies(fake);
        (sent.len() >= count).then_some(sent)
    })
    .await
}

/// `(method, text or caption, parse_mode, file name, file size)` of a recorded call.
type Delivered<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, Option<usize>);

/// `(method, text, parse_mode)` of a recorded call.
fn summary(sent: &Sent) -> (&str, &str, Option<&str>) {
    (sent.method.as_str(), sent.text.as_str(), sent.parse_mode.as_deref())
}

/// Calls of `method` Telegram refused (made but not recorded as delivered).
fn refused(fake: &FakeTelegram, method: &str) -> usize {
    let made = fake.calls().iter().filter(|(_, m)| m == method).count();
    made - fake.sent().iter().filter(|s| s.method == method).count()
}

#[tokio::test]
async fn telegram_reference_worker_replies_in_the_chat() {
    let fake = FakeTelegram::start().await;
    let stack = stack_with(&fake).await;
    agent_with_bot(&stack, &fake, "sales", 1001).await;
    let code =
        stack.app().ok("createPairingCode", json!({"consumerUserId": "alice", "agentKey": "sales"})).await["code"]
            .as_str()
            .expect("code")
            .to_string();
    assert!(start(&fake, 1001, 42, &code).await.starts_with("Paired!"));
    let conversation = "user-agent:sales:alice";
    assign(&stack, "w1", conversation, "sales").await;
    let data = tempfile::tempdir().expect("tmp");
    let script = data.path().join("engine.sh");
    std::fs::write(&script, ENGINE).expect("write the engine");
    let command = format!("/bin/sh {}", script.display());
    let base_url = fake.base_url();
    let env = [
        ("OPENCLAW_CONVERSATION_ID", conversation),
        ("OPENCLAW_AGENT_KEY", "sales"),
        ("TELEGRAM_API_BASE_URL", base_url.as_str()),
        ("AF_TELEGRAM_PARSE_MODE", "HTML"),
        ("AF_ENGINE", "command"),
        ("AF_ENGINE_COMMAND", command.as_str()),
    ];
    let (stop, worker) = start_worker(config(&stack, "w1", Via::Http, data.path(), &env));
    let mut seen = replies(&fake).len(); // The pairing confirmation.

    // A message from Telegram gets its reply in the chat; Telegram first answers 429 with
    // retry_after 1, and the worker waits that second out before sending again.
    fake.fail_next("sendMessage", 429, Some(1), 1);
    assert_eq!(fake.send_update(1001, fake.text_update(1001, 42, "hello")).await.status, 200);
    let sent = wait_replies(&fake, seen + 1).await;
    assert_eq!(summary(&sent[seen]), ("sendMessage", "echo: hello", Some("HTML")));
    assert_eq!(refused(&fake, "sendMessage"), 1, "the 429");
    let times = fake.call_times("sendMessage");
    let waited = times[times.len() - 1] - times[times.len() - 2];
    assert!(waited >= Duration::from_secs(1), "retry_after honoured: waited {waited:?}");
    seen += 1;

    // A 10,000-character reply arrives as three messages, in order.
    fake.send_update(1001, fake.text_update(1001, 42, "long")).await;
    let sent = wait_replies(&fake, seen + 3).await;
    let texts: Vec<(&str, &str, Option<&str>)> = sent[seen..].iter().map(summary).collect();
    let (a, b, c) = ("a".repeat(4096), "b".repeat(4096), "c".repeat(1808));
    assert_eq!(
        texts,
        vec![
            ("sendMessage", a.as_str(), Some("HTML")),
            ("sendMessage", b.as_str(), Some("HTML")),
            ("sendMessage", c.as_str(), Some("HTML")),
        ]
    );
    seen += 3;

    // Text Telegram cannot parse as HTML is sent again as plain text.
    fake.send_update(1001, fake.text_update(1001, 42, "html")).await;
    let sent = wait_replies(&fake, seen + 1).await;
    assert_eq!(summary(&sent[seen]), ("sendMessage", "1 < 2 & <b>bold</b>", None));
    assert_eq!(refused(&fake, "sendMessage"), 2, "the 429 and the refused HTML");
    seen += 1;

    // Files named by media lines: the text first, then audio with sendAudio, the PDF with
    // sendDocument; a file outside the workspace is not sent, and the user is told.
    fake.send_update(1001, fake.text_update(1001, 42, "files")).await;
    let sent = wait_replies(&fake, seen + 4).await;
    let files: Vec<Delivered<'_>> = sent[seen..]
        .iter()
        .map(|s| (s.method.as_str(), s.text.as_str(), s.parse_mode.as_deref(), s.file_name.as_deref(), s.file_bytes))
        .collect();
    assert_eq!(
        files,
        vec![
            ("sendMessage", "Two files.", Some("HTML"), None, None),
            ("sendAudio", "", None, Some("voice.mp3"), Some(9)),
            ("sendDocument", "", None, Some("report.pdf"), Some(8)),
            (
                "sendMessage",
                "(The file 'outside.txt' could not be sent: it is outside the workspace.)",
                None,
                None,
                None
            ),
        ]
    );

    seen += 4;
    let history_now = history(&stack, conversation).await;
    assert_eq!(history_now.len(), 8);
    let transcript = "Two files.\n[file: voice.mp3]\n[file: report.pdf]\n[file: outside.txt]";
    assert_eq!(history_now[7], ("assistant".to_string(), transcript.to_string()));
    assert_eq!(history_now[3].1.chars().count(), 10_000);

    // A 429 asking for longer than the worker waits (AF_TELEGRAM_MAX_RETRY_AFTER_MS, 30 s) in
    // the middle of a long reply fails the job; its retry sends only the rest, once.
    fake.fail_after("sendMessage", 1, 429, Some(60), 1);
    fake.send_update(1001, fake.text_update(1001, 42, "long")).await;
    let failed = tests::wait_until("the long reply failed once", Duration::from_secs(20), || async {
        let jobs = jobs(&stack, conversation).await;
        jobs.into_iter().find(|j| j["attempts"] == 1 && j["status"] == "queued")
    })
    .await;
    assert_eq!(failed["lastError"], json!("Telegram sendMessage failed: Too Many Requests: retry after 60"));
    assert_eq!(replies(&fake).len(), seen + 1, "the first message went out before the 429");
    stack.admin().ok("advanceTestClock", json!({"ms": 60_000})).await;
    let sent = wait_replies(&fake, seen + 3).await;
    let texts: Vec<&str> = sent[seen..].iter().map(|s| s.text.as_str()).collect();
    assert_eq!(texts, vec![a.as_str(), b.as_str(), c.as_str()], "each part once, in order");

    // Every job is done once, and history has one pair per job.
    tests::wait_until("five jobs done", Duration::from_secs(20), || async {
        let jobs = jobs(&stack, conversation).await;
        (jobs.len() == 5 && jobs.iter().all(|j| j["status"] == "done")).then_some(())
    })
    .await;
    assert_eq!(history(&stack, conversation).await.len(), 10);
    assert_eq!(replies(&fake).len(), seen + 3);
    stop.cancel();
    let outcome = finished(worker).await;
    assert_eq!((outcome.jobs_completed, outcome.jobs_failed), (5, 1));
    stack.stop().await;
}
