//! The worker's files under its data directory: the "meaningful state" rule that decides
//! whether a snapshot is restored (spec §4.3 step 6a), the memory files (spec §4.5 step 5), and
//! the per-job journal that makes a retried job skip side effects it already performed (R1).
//!
//! Everything here is small, synchronous file work; callers on the async runtime use
//! `spawn_blocking` or accept the short block.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest user or assistant text kept in a dated memory entry.
pub const MEMORY_ENTRY_CHARS: usize = 1200;

/// The long-term memory file, in the workspace.
pub const MEMORY_FILE: &str = "MEMORY.md";

/// Dated memory entries, in the workspace.
pub const MEMORY_DIR: &str = "memory";

/// Job journals, in the state directory.
pub const JOURNAL_DIR: &str = "jobs";

/// Whether the data directory already holds this conversation's state, in which case a
/// snapshot must not overwrite it: the OpenClaw sessions file is non-empty and not `{}`, or
/// the workspace has anything but a lone `.gitkeep`.
pub fn is_meaningful(state_dir: &Path, workspace_dir: &Path) -> bool {
    let sessions = state_dir.join("agents/main/sessions/sessions.json");
    if let Ok(text) = fs::read_to_string(sessions) {
        let text = text.trim();
        if !text.is_empty() && text != "{}" {
            return true;
        }
    }
    match fs::read_dir(workspace_dir) {
        Ok(entries) => entries.flatten().any(|e| e.file_name() != ".gitkeep"),
        Err(_) => false,
    }
}

pub use common::clock::{utc_date, utc_time};

/// Creates the memory files when missing: `MEMORY.md` and today's `memory/<date>.md`.
pub fn seed_memory(workspace_dir: &Path, now_ms: i64) -> io::Result<()> {
    fs::create_dir_all(workspace_dir.join(MEMORY_DIR))?;
    let memory = workspace_dir.join(MEMORY_FILE);
    if !memory.exists() {
        fs::write(&memory, "# MEMORY\n\nLong-term facts worth keeping across conversations' sessions.\n")?;
    }
    let date = utc_date(now_ms);
    let today = workspace_dir.join(MEMORY_DIR).join(format!("{date}.md"));
    if !today.exists() {
        fs::write(&today, format!("# {date}\n"))?;
    }
    Ok(())
}

/// What one processed job leaves in memory.
#[derive(Debug, Clone, Copy)]
pub struct MemoryEntry<'a> {
    pub now_ms: i64,
    pub conversation_id: &'a str,
    pub agent_key: &'a str,
    pub user_text: &'a str,
    pub reply: &'a str,
}

/// Appends a dated entry to `memory/<UTC date>.md` and remembered facts to `MEMORY.md`.
pub fn record_memory(workspace_dir: &Path, entry: &MemoryEntry<'_>) -> io::Result<()> {
    let dir = workspace_dir.join(MEMORY_DIR);
    fs::create_dir_all(&dir)?;
    let date = utc_date(entry.now_ms);
    let path = dir.join(format!("{date}.md"));
    let mut file = fs::OpenOptions::new().create(true).append(true).open(&path)?;
    if file.metadata()?.len() == 0 {
        writeln!(file, "# {date}")?;
    }
    write!(
        file,
        "\n## {}Z · {} · {}\n\n**user:** {}\n\n**assistant:** {}\n",
        utc_time(entry.now_ms),
        entry.conversation_id,
        entry.agent_key,
        compact(entry.user_text, MEMORY_ENTRY_CHARS),
        compact(entry.reply, MEMORY_ENTRY_CHARS)
    )?;

    let facts = long_term_facts(entry.user_text, entry.reply);
    if !facts.is_empty() {
        let memory = workspace_dir.join(MEMORY_FILE);
        let existing = fs::read_to_string(&memory).unwrap_or_default();
        let new: Vec<String> = facts
            .into_iter()
            .map(|f| format!("- {f}"))
            .filter(|line| !existing.lines().any(|l| l.trim() == line))
            .collect();
        if !new.is_empty() {
            let mut file = fs::OpenOptions::new().create(true).append(true).open(&memory)?;
            if !existing.is_empty() && !existing.ends_with('\n') {
                writeln!(file)?;
            }
            for line in new {
                writeln!(file, "{line}")?;
            }
        }
    }
    Ok(())
}

/// Lines worth keeping for good (spec §4.5 step 5 heuristics): the user's "remember …",
/// "I prefer …", "my name is …", "call me …", and the assistant's Decision/Decided/Convention/
/// Policy lines.
pub fn long_term_facts(user_text: &str, reply: &str) -> Vec<String> {
    const USER: [&str; 5] = ["remember ", "remember:", "i prefer ", "my name is ", "call me "];
    const ASSISTANT: [&str; 4] = ["decision", "decided", "convention", "policy"];
    let pick = |text: &str, prefixes: &[&str]| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| {
                let lower = l.to_lowercase();
                prefixes.iter().any(|p| lower.starts_with(p))
            })
            .map(|l| compact(l, 300))
            .collect()
    };
    let mut facts = pick(user_text, &USER);
    facts.extend(pick(reply, &ASSISTANT));
    facts.dedup();
    facts
}

/// One line, at most `max` characters.
fn compact(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

/// What a job has already done, kept in `<state>/jobs/<messageId>.json` until it completes. A
/// job retried after a partial run (a failed Telegram send, a lost lease) reuses the reply and
/// skips the history append and the messages already sent, so users see each reply once.
/// The state directory is part of snapshots, so this survives a move to another worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub user_text: Option<String>,
    pub reply: Option<String>,
    #[serde(default)]
    pub memory_recorded: bool,
    #[serde(default)]
    pub history_appended: bool,
    /// Steps of the Telegram reply already taken (its messages, then its files:
    /// `telegram::Reply::steps`).
    #[serde(default)]
    pub telegram_sent: usize,
}

impl Journal {
    pub fn path(state_dir: &Path, message_id: &str) -> PathBuf {
        let safe: String = message_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        state_dir.join(JOURNAL_DIR).join(format!("{safe}.json"))
    }

    /// The journal of `message_id`, empty when there is none (or it is unreadable).
    pub fn load(state_dir: &Path, message_id: &str) -> Self {
        fs::read(Self::path(state_dir, message_id))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Written through a temporary file and a rename.
    pub fn save(&self, state_dir: &Path, message_id: &str) -> io::Result<()> {
        let path = Self::path(state_dir, message_id);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, &path)
    }

    pub fn remove(state_dir: &Path, message_id: &str) {
        let _ = fs::remove_file(Self::path(state_dir, message_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_767_258_000_000), "2026-01-01");
        assert_eq!(utc_time(1_767_258_000_000), "09:00:00");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_date(-1), "1969-12-31");
    }

    #[test]
    fn meaningful_state_follows_the_spec_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, ws) = (tmp.path().join(".clawdbot"), tmp.path().join("workspace"));
        assert!(!is_meaningful(&state, &ws));
        fs::create_dir_all(&ws).unwrap();
        fs::write(ws.join(".gitkeep"), "").unwrap();
        assert!(!is_meaningful(&state, &ws));
        let sessions = state.join("agents/main/sessions");
        fs::create_dir_all(&sessions).unwrap();
        fs::write(sessions.join("sessions.json"), " {} ").unwrap();
        assert!(!is_meaningful(&state, &ws));
        fs::write(sessions.join("sessions.json"), r#"{"a":1}"#).unwrap();
        assert!(is_meaningful(&state, &ws));
        fs::write(sessions.join("sessions.json"), "{}").unwrap();
        fs::write(ws.join("notes.md"), "x").unwrap();
        assert!(is_meaningful(&state, &ws));
    }

    #[test]
    fn memory_entries_and_long_term_facts() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path();
        seed_memory(ws, 1_767_258_000_000).unwrap();
        let entry = MemoryEntry {
            now_ms: 1_767_258_000_000,
            conversation_id: "c1",
            agent_key: "agent-a",
            user_text: "hello\nMy name is Ada",
            reply: "Decision: call her Ada.",
        };
        record_memory(ws, &entry).unwrap();
        record_memory(ws, &entry).unwrap();
        let day = fs::read_to_string(ws.join("memory/2026-01-01.md")).unwrap();
        assert!(day.starts_with("# 2026-01-01\n"), "{day}");
        assert_eq!(day.matches("## 09:00:00Z · c1 · agent-a").count(), 2, "{day}");
        assert!(day.contains("**user:** hello My name is Ada"), "{day}");
        let memory = fs::read_to_string(ws.join(MEMORY_FILE)).unwrap();
        assert_eq!(memory.matches("- My name is Ada").count(), 1, "{memory}");
        assert_eq!(memory.matches("- Decision: call her Ada.").count(), 1, "{memory}");
        assert_eq!(compact(&"x".repeat(2000), MEMORY_ENTRY_CHARS).chars().count(), MEMORY_ENTRY_CHARS + 1);
    }

    #[test]
    fn journal_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(Journal::load(tmp.path(), "m/1"), Journal::default());
        let journal = Journal { reply: Some("r".to_string()), history_appended: true, ..Default::default() };
        journal.save(tmp.path(), "m/1").unwrap();
        assert_eq!(Journal::load(tmp.path(), "m/1"), journal);
        assert!(Journal::path(tmp.path(), "m/1").ends_with("jobs/m_1.json"));
        Journal::remove(tmp.path(), "m/1");
        assert_eq!(Journal::load(tmp.path(), "m/1"), Journal::default());
    }
}
