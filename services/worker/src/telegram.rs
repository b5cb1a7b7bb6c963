//! Replies in the Telegram chat (spec §4.5 steps 4 and 7, fixed), sent through the
//! `telegram-bot` library's Bot API client (its timeouts, its 429 `retry_after` and 5xx retries,
//! its token-free errors):
//!
//! - the reply goes to the **chat** (`metadata.telegramChatId`), falling back to
//!   `providerUserId` only when no chat id is known (T10: the user id is only a valid chat id in
//!   private chats);
//! - the text is sent **plain** unless `AF_TELEGRAM_PARSE_MODE` asks for `HTML` or
//!   `MarkdownV2`, and a message Telegram refuses for its formatting is sent again as plain text
//!   (T11: model output is not HTML, and a stray `<` or `&` made Telegram reject the whole
//!   message);
//! - a text longer than Telegram's 4,096 UTF-16 units is sent as several messages, cut between
//!   characters (preferably after a newline), in order;
//! - files the engine names on a line of their own (`MEDIA: <path>`, or the original's
//!   `send · /path` / `send - /path`) are taken out of the text and sent after it as files:
//!   audio (mp3, m4a, ogg, oga, opus, wav, aac, flac) with `sendAudio`, anything else with
//!   `sendDocument`. A path is relative to the workspace, and must resolve inside it (the
//!   original's `/tmp` convention is narrowed: a reply cannot mail out arbitrary files of the
//!   worker). A file that cannot be sent (missing, outside the workspace, empty, over the Bot
//!   API's 50 MB upload limit) is replaced by a short plain-text notice to the user.
//!
//! A reply is a fixed list of [`Step`]s (one per message or file), so the job journal can count
//! the steps already taken and a retried job resumes after them.

use std::path::{Path, PathBuf};

use serde_json::Value;
use telegram_bot::frankenstein::ParseMode;
use telegram_bot::{BotApi, FileMethod, MAX_MESSAGE_UTF16, RetryPolicy, split_message};

use crate::config::{TelegramFormat, WorkerConfig};

/// The Bot API's limit on a file a bot uploads.
pub const MAX_UPLOAD_BYTES: u64 = 50 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TelegramError(pub String);

/// Where a reply to `payload` goes: `metadata.telegramChatId`, else `providerUserId`.
pub fn reply_chat_id(payload: &Value) -> Option<String> {
    let non_blank = |v: Option<&Value>| match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    non_blank(payload.pointer("/metadata/telegramChatId")).or_else(|| non_blank(payload.get("providerUserId")))
}

/// An engine's reply split into what the user reads and the files it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply without its media lines, trimmed.
    pub text: String,
    /// The paths the media lines name, in order.
    pub files: Vec<String>,
}

/// One Bot API call of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// One message of at most [`MAX_MESSAGE_UTF16`] units.
    Text(String),
    /// A file the reply names, as written.
    File(String),
}

impl Reply {
    /// Reads `reply`: a line that is `MEDIA: <path>` (any case), or `send · <path>` /
    /// `send - <path>` with an absolute path, names a file; every other line is text.
    pub fn parse(reply: &str) -> Self {
        let mut text = Vec::new();
        let mut files = Vec::new();
        for line in reply.lines() {
            match media_path(line) {
                Some(path) => files.push(path.to_string()),
                None => text.push(line),
            }
        }
        Self { text: text.join("\n").trim().to_string(), files }
    }

    /// The calls that deliver this reply: the text's messages, then the files.
    pub fn steps(&self) -> Vec<Step> {
        let mut steps: Vec<Step> = if self.text.is_empty() {
            Vec::new()
        } else {
            // Telegram refuses a message of blanks only ("message text is empty").
            split_message(&self.text, MAX_MESSAGE_UTF16)
                .into_iter()
                .filter(|chunk| !chunk.trim().is_empty())
                .map(Step::Text)
                .collect()
        };
        steps.extend(self.files.iter().cloned().map(Step::File));
        steps
    }

    /// The assistant's turn as history and memory keep it: the text, and a `[file: <name>]`
    /// line per file.
    pub fn transcript(&self) -> String {
        let mut lines: Vec<String> = Vec::new();
        if !self.text.is_empty() {
            lines.push(self.text.clone());
        }
        lines.extend(self.files.iter().map(|f| format!("[file: {}]", file_name(f))));
        lines.join("\n")
    }
}

/// The path a media line names, if `line` is one.
fn media_path(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.len() >= 6 && line.is_char_boundary(6) && line[..6].eq_ignore_ascii_case("MEDIA:") {
        return Some(unquote(&line[6..])).filter(|p| !p.is_empty());
    }
    ["send · ", "send - "]
        .iter()
        .find_map(|prefix| line.strip_prefix(prefix))
        .map(unquote)
        .filter(|p| p.starts_with('/'))
}

/// `path` without surrounding blanks and quotes.
fn unquote(path: &str) -> &str {
    path.trim().trim_matches(['"', '\'', '`']).trim()
}

/// The last component of `path`, for notices and transcripts.
fn file_name(path: &str) -> String {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.to_string())
}

/// Sends replies of one worker.
#[derive(Clone)]
pub struct Replier {
    api: BotApi,
    parse_mode: Option<ParseMode>,
    workspace_dir: PathBuf,
}

impl Replier {
    pub fn new(config: &WorkerConfig) -> Self {
        let policy = RetryPolicy { max_retry_after: config.telegram_max_retry_after, ..RetryPolicy::default() };
        Self {
            api: BotApi::new(&config.telegram_api_base_url, config.telegram_timeout, policy),
            parse_mode: match config.telegram_format {
                TelegramFormat::Plain => None,
                TelegramFormat::Html => Some(ParseMode::Html),
                TelegramFormat::MarkdownV2 => Some(ParseMode::MarkdownV2),
            },
            workspace_dir: config.workspace_dir.clone(),
        }
    }

    /// Takes one step of a reply to `chat_id`. Errors carry Telegram's description, never the
    /// token.
    pub async fn send(&self, token: &str, chat_id: &str, step: &Step) -> Result<(), TelegramError> {
        match step {
            Step::Text(text) => {
                self.api
                    .send_one(token, chat_id, text, self.parse_mode)
                    .await
                    .map_err(|e| TelegramError(format!("Telegram sendMessage failed: {e}")))?;
            }
            Step::File(named) => match self.readable(named).await {
                Ok((path, bytes)) => {
                    let method = FileMethod::for_file_name(&path.to_string_lossy());
                    self.api
                        .send_file(token, method, chat_id, &file_name(named), bytes.into(), None)
                        .await
                        .map_err(|e| TelegramError(format!("Telegram {} failed: {e}", method.name())))?;
                }
                Err(reason) => {
                    tracing::warn!(file = %named, reason = %reason, "a file of the reply cannot be sent");
                    let notice = format!("(The file '{}' could not be sent: {reason}.)", file_name(named));
                    self.api
                        .send_one(token, chat_id, &notice, None)
                        .await
                        .map_err(|e| TelegramError(format!("Telegram sendMessage failed: {e}")))?;
                }
            },
        }
        Ok(())
    }

    /// The file `named` (relative to the workspace, or absolute), read, when it may be sent:
    /// inside the workspace after symlinks are resolved, a regular non-empty file within the
    /// upload limit.
    async fn readable(&self, named: &str) -> Result<(PathBuf, Vec<u8>), String> {
        let candidate = self.workspace_dir.join(named);
        let path = tokio::fs::canonicalize(&candidate).await.map_err(|_| "it does not exist".to_string())?;
        let root = tokio::fs::canonicalize(&self.workspace_dir)
            .await
            .map_err(|e| format!("the workspace is unreadable ({e})"))?;
        if !path.starts_with(&root) {
            return Err("it is outside the workspace".to_string());
        }
        let meta = tokio::fs::metadata(&path).await.map_err(|_| "it does not exist".to_string())?;
        if !meta.is_file() {
            return Err("it is not a file".to_string());
        }
        if meta.len() == 0 {
            return Err("it is empty".to_string());
        }
        if meta.len() > MAX_UPLOAD_BYTES {
            return Err("it is larger than Telegram's 50 MB upload limit".to_string());
        }
        let bytes = tokio::fs::read(&path).await.map_err(|e| format!("it is unreadable ({e})"))?;
        if bytes.len() as u64 > MAX_UPLOAD_BYTES {
            return Err("it is larger than Telegram's 50 MB upload limit".to_string());
        }
        Ok((path, bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    #[test]
    fn replies_go_to_the_chat_and_fall_back_to_the_user() {
        let group = json!({"providerUserId": "42", "metadata": {"telegramChatId": "-100777", "providerUserId": "42"}});
        assert_eq!(reply_chat_id(&group).as_deref(), Some("-100777"));
        let private = json!({"providerUserId": " 42 ", "metadata": {"telegramChatId": " "}});
        assert_eq!(reply_chat_id(&private).as_deref(), Some("42"));
        assert_eq!(reply_chat_id(&json!({"metadata": {"telegramChatId": 5}})).as_deref(), Some("5"));
        assert_eq!(reply_chat_id(&json!({"providerUserId": ""})), None);
    }

    #[test]
    fn media_lines_name_files_and_leave_the_text() {
        let reply = Reply::parse(
            "Here you go.\nMEDIA: out/speech.mp3\n  media: \"/data/workspace/r.pdf\"\nsend · /tmp/a.ogg\n\
             send - relative.txt\nMEDIA:\nThe end.",
        );
        assert_eq!(reply.text, "Here you go.\nsend - relative.txt\nMEDIA:\nThe end.");
        assert_eq!(reply.files, vec!["out/speech.mp3", "/data/workspace/r.pdf", "/tmp/a.ogg"]);
        assert_eq!(
            reply.transcript(),
            "Here you go.\nsend - relative.txt\nMEDIA:\nThe end.\n[file: speech.mp3]\n[file: r.pdf]\n[file: a.ogg]"
        );
        let only_files = Reply::parse("MEDIA: a.mp3\n");
        assert_eq!(only_files.steps(), vec![Step::File("a.mp3".to_string())]);
        assert_eq!(only_files.transcript(), "[file: a.mp3]");
        // Multi-byte text is never cut inside a character; a part of blanks only is not sent.
        assert_eq!(Reply::parse("é€😀").steps(), vec![Step::Text("é€😀".to_string())]);
        let blanks = format!("{}\n{}\ny", "x".repeat(3000), " ".repeat(4096));
        let steps = Reply::parse(&blanks).steps();
        assert_eq!(steps, vec![Step::Text(format!("{}\n", "x".repeat(3000))), Step::Text("\ny".to_string())]);
    }

    #[test]
    fn long_texts_become_several_steps_before_the_files() {
        let text = format!("{}{}", "a".repeat(4096), "😀".repeat(10));
        let steps = Reply::parse(&format!("{text}\nMEDIA: x.pdf")).steps();
        assert_eq!(
            steps,
            vec![Step::Text("a".repeat(4096)), Step::Text("😀".repeat(10)), Step::File("x.pdf".to_string())]
        );
    }

    fn replier(workspace: &Path) -> Replier {
        let env: HashMap<String, String> = [
            ("WORKER_ID", "w-1"),
            ("AF_WORKER_TOKEN", "t"),
            ("AF_API_URL", "http://127.0.0.1:9"),
            ("OPENCLAW_DATA_DIR", workspace.parent().and_then(Path::to_str).unwrap_or("/")),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Replier::new(&WorkerConfig::from_env(&env).unwrap())
    }

    #[tokio::test]
    async fn only_regular_files_inside_the_workspace_are_sent() {
        let data = tempfile::tempdir().unwrap();
        let workspace = data.path().join("workspace");
        std::fs::create_dir_all(workspace.join("out")).unwrap();
        std::fs::write(workspace.join("out/a.mp3"), b"id3").unwrap();
        std::fs::write(workspace.join("empty.txt"), b"").unwrap();
        std::fs::write(data.path().join("secret.txt"), b"token").unwrap();
        let replier = replier(&workspace);

        let (path, bytes) = replier.readable("out/a.mp3").await.unwrap();
        assert_eq!((path.file_name().unwrap().to_str(), bytes), (Some("a.mp3"), b"id3".to_vec()));
        let absolute = workspace.join("out/a.mp3").display().to_string();
        assert!(replier.readable(&absolute).await.is_ok());
        for (named, reason) in [
            ("missing.pdf", "it does not exist"),
            ("../secret.txt", "it is outside the workspace"),
            ("/etc/hostname", "it is outside the workspace"),
            ("out", "it is not a file"),
            ("empty.txt", "it is empty"),
        ] {
            let err = replier.readable(named).await.unwrap_err();
            // /etc/hostname may not exist everywhere.
            assert!(err == reason || (named == "/etc/hostname" && err == "it does not exist"), "{named}: {err}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(data.path().join("secret.txt"), workspace.join("link.txt")).unwrap();
            assert_eq!(replier.readable("link.txt").await.unwrap_err(), "it is outside the workspace");
        }
    }
}
