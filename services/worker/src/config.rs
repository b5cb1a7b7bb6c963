//! The worker's configuration, read once from its environment (spec §4.2, with this project's
//! transport and engine variables). A missing or malformed variable is an error naming it; the
//! binary exits 2 on it. Blank values count as unset, as the scheduler drops blank keys
//! (spec §2.4).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Defaults of the numeric settings (milliseconds unless named otherwise).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 1_800_000;
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_CLAIM_WAIT_MS: u64 = 20_000;
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 20_000;
pub const DEFAULT_SKILLS_TIMEOUT_MS: u64 = 15_000;
pub const DEFAULT_ENGINE_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_TELEGRAM_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_HISTORY_ITEMS: usize = 64;
/// The server's default `attachments.max_bytes`.
pub const DEFAULT_ATTACHMENT_MAX_BYTES: u64 = 52_428_800;
pub const DEFAULT_DATA_DIR: &str = "/data";
pub const DEFAULT_TELEGRAM_API_BASE_URL: &str = telegram_bot::DEFAULT_BASE_URL;
/// The longest Telegram `retry_after` a reply waits out before the job fails (and is retried).
pub const DEFAULT_TELEGRAM_MAX_RETRY_AFTER_MS: u64 = 30_000;
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_LOG_FILTER: &str = "info";
/// The `openclaw` engine's Node.js binary unless `AF_OPENCLAW_NODE` names another.
pub const DEFAULT_OPENCLAW_NODE: &str = "node";
/// Where the worker image installs the `openclaw` package (`ops/scripts/install-openclaw.sh`
/// with `AF_TOOLS_DIR=/opt`).
pub const DEFAULT_OPENCLAW_ENTRY: &str = "/opt/openclaw/node_modules/openclaw/openclaw.mjs";
pub const DEFAULT_OPENCLAW_READY_TIMEOUT_MS: u64 = 60_000;

/// The system prompt of the OpenAI-compatible engine unless `AF_SYSTEM_PROMPT` says otherwise.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are an assistant serving one user in one conversation. \
Earlier messages of the conversation are included. Reply with the message text only.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid worker configuration: {0}")]
pub struct ConfigError(pub String);

/// How the worker reaches the control plane.
#[derive(Clone, PartialEq, Eq)]
pub enum Transport {
    /// `AF_NATS_URL`: operations by NATS request/reply, files straight to the object stores.
    Nats { url: String },
    /// `AF_API_URL` (or `CONVEX_URL`): ingress over HTTP.
    Http { base_url: String },
}

impl fmt::Debug for Transport {
    /// A NATS URL's password is left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nats { url } => {
                let (address, credentials) = common::service::split_credentials(url);
                let shown = match credentials {
                    Some((user, _)) => address.replacen("://", &format!("://{user}:<redacted>@"), 1),
                    None => address,
                };
                f.debug_struct("Nats").field("url", &shown).finish()
            }
            Self::Http { base_url } => f.debug_struct("Http").field("base_url", base_url).finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkillsMode {
    /// Fetch the global skills manifest and materialise it (spec §4.3 step 6c).
    DbManifest,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkillsConfig {
    pub mode: SkillsMode,
    /// Whether a failed bootstrap stops the worker (exit) instead of a warning.
    pub required: bool,
    pub release_channel: String,
    /// Bounds fetching the manifest and materialising it, each.
    pub timeout: Duration,
}

/// How replies to Telegram are formatted (`AF_TELEGRAM_PARSE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelegramFormat {
    /// No `parse_mode`: the text is shown as written (T11: model output is not HTML).
    Plain,
    /// `parse_mode: "HTML"`.
    Html,
    /// `parse_mode: "MarkdownV2"`.
    MarkdownV2,
}

/// Which reply engine runs a job (`AF_ENGINE`).
#[derive(Clone, PartialEq, Eq)]
pub enum EngineConfig {
    /// Replies `echo: <text>`; for the local stack and tests.
    Echo,
    /// Runs `program args…` per job: job JSON on stdin, reply text on stdout.
    Command { program: String, args: Vec<String>, timeout: Duration },
    /// An OpenAI-compatible chat-completions endpoint.
    OpenAi {
        base_url: String,
        api_key: Option<String>,
        model: String,
        system_prompt: String,
        /// How many of the bundle's most recent history items go into the prompt.
        history_items: usize,
        timeout: Duration,
    },
    /// A real OpenClaw agent: the worker runs the OpenClaw gateway (Node.js) on loopback and
    /// sends each job to it as one agent turn ([`crate::openclaw`]).
    OpenClaw(OpenClawConfig),
}

/// The `openclaw` engine's settings.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenClawConfig {
    /// `AF_OPENCLAW_NODE`: the Node.js (24 or newer) binary.
    pub node_bin: PathBuf,
    /// `AF_OPENCLAW_ENTRY`: the package's `openclaw.mjs`.
    pub entry: PathBuf,
    /// `AF_OPENCLAW_GATEWAY_PORT`: the loopback port; 0 (the default) picks a free one. The
    /// spec's `OPENCLAW_GATEWAY_PORT` (18789 from the scheduler) is ignored: local workers share
    /// one machine.
    pub port: u16,
    /// `OPENCLAW_GATEWAY_READY_TIMEOUT_MS`: how long the gateway may take to answer `hello-ok`.
    pub ready_timeout: Duration,
    /// `AF_ENGINE_TIMEOUT_MS` (alias `OPENCLAW_TIMEOUT_MS`): one agent turn.
    pub turn_timeout: Duration,
    /// `OPENCLAW_THINKING`: the turn's thinking level (`off`, `low`, `medium`, `high`).
    pub thinking: Option<String>,
    /// The model provider used when the bundle carries none (`OPENAI_BASE_URL`,
    /// `OPENAI_MODEL`, `OPENAI_API_KEY`, `OPENCLAW_MODEL_API`).
    pub fallback_model: common::api::history::ModelRuntimeConfig,
}

impl fmt::Debug for OpenClawConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenClawConfig")
            .field("node_bin", &self.node_bin)
            .field("entry", &self.entry)
            .field("port", &self.port)
            .field("ready_timeout", &self.ready_timeout)
            .field("turn_timeout", &self.turn_timeout)
            .field("fallback_model", &self.fallback_model)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Echo => f.write_str("Echo"),
            Self::Command { program, args, timeout } => f
                .debug_struct("Command")
                .field("program", program)
                .field("args", args)
                .field("timeout", timeout)
                .finish(),
            Self::OpenAi { base_url, api_key, model, history_items, timeout, .. } => f
                .debug_struct("OpenAi")
                .field("base_url", base_url)
                .field("api_key", &api_key.as_ref().map(|_| "<redacted>"))
                .field("model", model)
                .field("history_items", history_items)
                .field("timeout", timeout)
                .finish_non_exhaustive(),
            Self::OpenClaw(config) => config.fmt(f),
        }
    }
}

/// Everything the worker reads from its environment.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// `WORKER_ID`.
    pub worker_id: String,
    /// `AF_WORKER_TOKEN`: the bearer token minted for this workerId.
    pub token: String,
    pub transport: Transport,
    /// `WORKSPACE_ID`.
    pub workspace_id: String,
    /// `OPENCLAW_AGENT_KEY`: the agent of the pre-assigned conversation (`default` when unset).
    pub agent_key: String,
    /// `OPENCLAW_CONVERSATION_ID`: the pre-assigned conversation, if any.
    pub conversation_id: Option<String>,
    pub idle_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Long-poll wait of one claim (`AF_CLAIM_WAIT_MS`).
    pub claim_wait: Duration,
    /// Timeout of one operation over NATS (`AF_REQUEST_TIMEOUT_MS`).
    pub request_timeout: Duration,
    /// `OPENCLAW_DATA_DIR`: the snapshot root (holds `.clawdbot` and `workspace`).
    pub data_dir: PathBuf,
    /// `<data>/.clawdbot`.
    pub state_dir: PathBuf,
    /// `<data>/workspace`.
    pub workspace_dir: PathBuf,
    /// `OPENCLAW_SKILLS_DIR`, default `<workspace>/skills`.
    pub skills_dir: PathBuf,
    pub skills: SkillsConfig,
    pub engine: EngineConfig,
    pub telegram_api_base_url: String,
    pub telegram_timeout: Duration,
    /// `AF_TELEGRAM_PARSE_MODE`: `plain` (default), `HTML` or `MarkdownV2`; a message Telegram
    /// refuses for its formatting is sent again as plain text.
    pub telegram_format: TelegramFormat,
    /// `AF_TELEGRAM_MAX_RETRY_AFTER_MS`: a 429 asking to wait longer fails the job instead.
    pub telegram_max_retry_after: Duration,
    pub attachment_max_bytes: u64,
    /// `AF_WORKER_LOG`: a tracing filter.
    pub log_filter: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: base URL of an OTLP/HTTP collector; the worker's spans go
    /// to `<endpoint>/v1/traces`, continuing each job's trace. Unset = no span export.
    pub otlp_endpoint: Option<String>,
    /// `AF_WORKER_METRICS_BIND`: address the worker serves `GET /metrics` on. Unset = none.
    pub metrics_bind: Option<String>,
}

impl fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("worker_id", &self.worker_id)
            .field("token", &"<redacted>")
            .field("transport", &self.transport)
            .field("workspace_id", &self.workspace_id)
            .field("agent_key", &self.agent_key)
            .field("conversation_id", &self.conversation_id)
            .field("idle_timeout", &self.idle_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("claim_wait", &self.claim_wait)
            .field("request_timeout", &self.request_timeout)
            .field("data_dir", &self.data_dir)
            .field("skills_dir", &self.skills_dir)
            .field("skills", &self.skills)
            .field("engine", &self.engine)
            .field("telegram_api_base_url", &self.telegram_api_base_url)
            .field("telegram_format", &self.telegram_format)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("metrics_bind", &self.metrics_bind)
            .finish_non_exhaustive()
    }
}

/// Reads variables, treating blank values as absent.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()).map(str::to_string)
    }

    fn required(&self, name: &str, what: &str) -> Result<String, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError(format!("{name} is required ({what})")))
    }

    fn u64_or(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => {
                v.parse().map_err(|_| ConfigError(format!("{name} must be a non-negative whole number, got '{v}'")))
            }
        }
    }

    /// A duration in milliseconds that must be positive.
    fn ms_or(&self, name: &str, default: u64) -> Result<Duration, ConfigError> {
        let ms = self.u64_or(name, default)?;
        if ms == 0 {
            return Err(ConfigError(format!("{name} must be greater than 0 (milliseconds)")));
        }
        Ok(Duration::from_millis(ms))
    }

    fn bool_or(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => Ok(true),
            Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => Ok(false),
            Some(v) => Err(ConfigError(format!("{name} must be true or false, got '{v}'"))),
        }
    }

    fn url(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => {
                let url =
                    reqwest::Url::parse(&v).map_err(|e| ConfigError(format!("{name} is not a URL ('{v}'): {e}")))?;
                Ok(Some(url.as_str().trim_end_matches('/').to_string()))
            }
        }
    }

    /// First of `names` that is set, as a URL.
    fn first_url(&self, names: &[&str]) -> Result<Option<String>, ConfigError> {
        for name in names {
            if let Some(url) = self.url(name)? {
                return Ok(Some(url));
            }
        }
        Ok(None)
    }
}

impl WorkerConfig {
    /// Reads the process environment (variables that are not valid UTF-8 are ignored).
    pub fn from_process_env() -> Result<Self, ConfigError> {
        let env: HashMap<String, String> =
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
        Self::from_env(&env)
    }

    /// Reads the configuration from `env` (see the table in `docs/workers.md`).
    pub fn from_env(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env(vars);
        let worker_id = env.required("WORKER_ID", "the id of this worker, as the scheduler spawned it")?;
        let token = env.required("AF_WORKER_TOKEN", "the bearer token the scheduler minted for this worker")?;
        let transport = match env.get("AF_NATS_URL") {
            Some(url) => Transport::Nats { url },
            None => match env.first_url(&["AF_API_URL", "CONVEX_URL"])? {
                Some(base_url) => Transport::Http { base_url },
                None => {
                    return Err(ConfigError(
                        "AF_NATS_URL or AF_API_URL (alias CONVEX_URL) is required: how the worker reaches the \
                         control plane"
                            .to_string(),
                    ));
                }
            },
        };

        let data_dir = PathBuf::from(env.get("OPENCLAW_DATA_DIR").unwrap_or_else(|| DEFAULT_DATA_DIR.to_string()));
        if !data_dir.is_absolute() {
            return Err(ConfigError(format!(
                "OPENCLAW_DATA_DIR must be an absolute path, got '{}'",
                data_dir.display()
            )));
        }
        // Snapshots archive exactly `<data>/.clawdbot` and `<data>/workspace` (format 1): a state
        // or workspace directory elsewhere would silently be left out of every snapshot.
        let state_dir = layout_dir(&env, "OPENCLAW_STATE_DIR", &data_dir, ".clawdbot")?;
        let workspace_dir = layout_dir(&env, "OPENCLAW_WORKSPACE_DIR", &data_dir, "workspace")?;
        let skills_dir =
            env.get("OPENCLAW_SKILLS_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_dir.join("skills"));

        let skills = SkillsConfig {
            mode: match env.get("SKILLS_BOOTSTRAP_MODE").as_deref() {
                None | Some("db_manifest") => SkillsMode::DbManifest,
                Some("off") => SkillsMode::Off,
                Some(other) => {
                    return Err(ConfigError(format!(
                        "SKILLS_BOOTSTRAP_MODE must be db_manifest or off, got '{other}'"
                    )));
                }
            },
            required: env.bool_or("SKILLS_BOOTSTRAP_REQUIRED", false)?,
            release_channel: env.get("SKILLS_RELEASE_CHANNEL").unwrap_or_else(|| "stable".to_string()),
            timeout: env.ms_or("SKILLS_BOOTSTRAP_TIMEOUT_MS", DEFAULT_SKILLS_TIMEOUT_MS)?,
        };

        Ok(Self {
            worker_id,
            token,
            transport,
            workspace_id: env.get("WORKSPACE_ID").unwrap_or_else(|| "default".to_string()),
            agent_key: env.get("OPENCLAW_AGENT_KEY").unwrap_or_else(|| "default".to_string()),
            conversation_id: env.get("OPENCLAW_CONVERSATION_ID"),
            idle_timeout: env.ms_or("WORKER_IDLE_TIMEOUT_MS", DEFAULT_IDLE_TIMEOUT_MS)?,
            heartbeat_interval: env.ms_or("HEARTBEAT_INTERVAL_MS", DEFAULT_HEARTBEAT_INTERVAL_MS)?,
            claim_wait: env.ms_or("AF_CLAIM_WAIT_MS", DEFAULT_CLAIM_WAIT_MS)?,
            request_timeout: match env.get("AF_REQUEST_TIMEOUT_MS") {
                Some(_) => env.ms_or("AF_REQUEST_TIMEOUT_MS", DEFAULT_REQUEST_TIMEOUT_MS)?,
                None => env.ms_or("CONVEX_HTTP_TIMEOUT_MS", DEFAULT_REQUEST_TIMEOUT_MS)?,
            },
            data_dir,
            state_dir,
            workspace_dir,
            skills_dir,
            skills,
            engine: engine_config(&env)?,
            telegram_api_base_url: env
                .url("TELEGRAM_API_BASE_URL")?
                .unwrap_or_else(|| DEFAULT_TELEGRAM_API_BASE_URL.to_string()),
            telegram_timeout: env.ms_or("AF_TELEGRAM_TIMEOUT_MS", DEFAULT_TELEGRAM_TIMEOUT_MS)?,
            telegram_format: match env.get("AF_TELEGRAM_PARSE_MODE").map(|v| v.to_ascii_lowercase()).as_deref() {
                None | Some("plain" | "none") => TelegramFormat::Plain,
                Some("html") => TelegramFormat::Html,
                Some("markdownv2") => TelegramFormat::MarkdownV2,
                Some(_) => {
                    return Err(ConfigError(format!(
                        "AF_TELEGRAM_PARSE_MODE must be plain, HTML or MarkdownV2, got '{}'",
                        env.get("AF_TELEGRAM_PARSE_MODE").unwrap_or_default()
                    )));
                }
            },
            telegram_max_retry_after: Duration::from_millis(
                env.u64_or("AF_TELEGRAM_MAX_RETRY_AFTER_MS", DEFAULT_TELEGRAM_MAX_RETRY_AFTER_MS)?,
            ),
            attachment_max_bytes: env.u64_or("AF_ATTACHMENT_MAX_BYTES", DEFAULT_ATTACHMENT_MAX_BYTES)?,
            log_filter: env.get("AF_WORKER_LOG").unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string()),
            otlp_endpoint: env.url("OTEL_EXPORTER_OTLP_ENDPOINT")?,
            metrics_bind: match env.get("AF_WORKER_METRICS_BIND") {
                None => None,
                Some(bind) => Some(
                    bind.parse::<std::net::SocketAddr>()
                        .map_err(|e| {
                            ConfigError(format!("AF_WORKER_METRICS_BIND must be host:port, got '{bind}': {e}"))
                        })?
                        .to_string(),
                ),
            },
        })
    }
}

/// `<data>/<name>`, or the variable's value when it names that same directory.
fn layout_dir(env: &Env<'_>, name: &str, data_dir: &Path, entry: &str) -> Result<PathBuf, ConfigError> {
    let expected = data_dir.join(entry);
    match env.get(name).map(PathBuf::from) {
        None => Ok(expected),
        Some(given) if given == expected => Ok(expected),
        Some(given) => Err(ConfigError(format!(
            "{name} is '{}' but must be '{}' (OPENCLAW_DATA_DIR/{entry}): snapshots archive that path",
            given.display(),
            expected.display()
        ))),
    }
}

fn engine_config(env: &Env<'_>) -> Result<EngineConfig, ConfigError> {
    let timeout = match env.get("AF_ENGINE_TIMEOUT_MS") {
        Some(_) => env.ms_or("AF_ENGINE_TIMEOUT_MS", DEFAULT_ENGINE_TIMEOUT_MS)?,
        None => env.ms_or("OPENCLAW_TIMEOUT_MS", DEFAULT_ENGINE_TIMEOUT_MS)?,
    };
    match env.get("AF_ENGINE").as_deref() {
        None | Some("echo") => Ok(EngineConfig::Echo),
        Some("command") => {
            let line = env.required("AF_ENGINE_COMMAND", "the program the command engine runs for each job")?;
            let mut words = parse_command(&line)?.into_iter();
            let program = words.next().ok_or_else(|| ConfigError("AF_ENGINE_COMMAND names no program".to_string()))?;
            Ok(EngineConfig::Command { program, args: words.collect(), timeout })
        }
        Some("openai") => Ok(EngineConfig::OpenAi {
            base_url: env.url("OPENAI_BASE_URL")?.unwrap_or_else(|| DEFAULT_OPENAI_BASE_URL.to_string()),
            api_key: env.get("OPENAI_API_KEY"),
            model: env.required("OPENAI_MODEL", "the model the openai engine asks for")?,
            system_prompt: env.get("AF_SYSTEM_PROMPT").unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()),
            history_items: usize::try_from(env.u64_or("AF_ENGINE_HISTORY_ITEMS", DEFAULT_HISTORY_ITEMS as u64)?)
                .unwrap_or(DEFAULT_HISTORY_ITEMS),
            timeout,
        }),
        Some("openclaw") => Ok(EngineConfig::OpenClaw(OpenClawConfig {
            node_bin: PathBuf::from(env.get("AF_OPENCLAW_NODE").unwrap_or_else(|| DEFAULT_OPENCLAW_NODE.to_string())),
            entry: PathBuf::from(env.get("AF_OPENCLAW_ENTRY").unwrap_or_else(|| DEFAULT_OPENCLAW_ENTRY.to_string())),
            port: match env.get("AF_OPENCLAW_GATEWAY_PORT") {
                None => 0,
                Some(v) => v.parse().map_err(|_| {
                    ConfigError(format!(
                        "AF_OPENCLAW_GATEWAY_PORT must be a port number (0 picks a free one), got '{v}'"
                    ))
                })?,
            },
            ready_timeout: env.ms_or("OPENCLAW_GATEWAY_READY_TIMEOUT_MS", DEFAULT_OPENCLAW_READY_TIMEOUT_MS)?,
            turn_timeout: timeout,
            thinking: env.get("OPENCLAW_THINKING"),
            fallback_model: common::api::history::ModelRuntimeConfig {
                base_url: env.url("OPENAI_BASE_URL")?,
                model: env.get("OPENAI_MODEL").or_else(|| env.get("OPENCLAW_AGENT_MODEL")),
                api_key: env.get("OPENAI_API_KEY"),
                api: env.get("OPENCLAW_MODEL_API"),
            },
        })),
        Some(other) => Err(ConfigError(format!("AF_ENGINE must be echo, command, openai or openclaw, got '{other}'"))),
    }
}

/// `AF_ENGINE_COMMAND`: a JSON array of strings (`["/bin/sh", "-c", "cat"]`) for arguments with
/// spaces, else words separated by whitespace (no shell quoting).
fn parse_command(line: &str) -> Result<Vec<String>, ConfigError> {
    if line.starts_with('[') {
        let words: Vec<String> = serde_json::from_str(line).map_err(|e| {
            ConfigError(format!("AF_ENGINE_COMMAND looks like a JSON array but is not an array of strings: {e}"))
        })?;
        if words.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(ConfigError("AF_ENGINE_COMMAND names no program".to_string()));
        }
        Ok(words)
    } else {
        Ok(line.split_whitespace().map(str::to_string).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut all: HashMap<String, String> =
            [("WORKER_ID", "w-1"), ("AF_WORKER_TOKEN", "tok"), ("AF_NATS_URL", "nats://127.0.0.1:4222")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        for (k, v) in pairs {
            all.insert(k.to_string(), v.to_string());
        }
        all
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        WorkerConfig::from_env(&env(pairs)).unwrap_err().0
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = WorkerConfig::from_env(&env(&[])).unwrap();
        assert_eq!(c.worker_id, "w-1");
        assert_eq!(c.transport, Transport::Nats { url: "nats://127.0.0.1:4222".to_string() });
        assert_eq!((c.workspace_id.as_str(), c.agent_key.as_str()), ("default", "default"));
        assert_eq!(c.conversation_id, None);
        assert_eq!(c.idle_timeout, Duration::from_millis(1_800_000));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(10_000));
        assert_eq!(c.claim_wait, Duration::from_millis(20_000));
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.state_dir, PathBuf::from("/data/.clawdbot"));
        assert_eq!(c.workspace_dir, PathBuf::from("/data/workspace"));
        assert_eq!(c.skills_dir, PathBuf::from("/data/workspace/skills"));
        assert_eq!(c.skills.mode, SkillsMode::DbManifest);
        assert!(!c.skills.required);
        assert_eq!(c.skills.release_channel, "stable");
        assert_eq!(c.engine, EngineConfig::Echo);
        assert_eq!(c.telegram_api_base_url, "https://api.telegram.org");
        assert_eq!(c.telegram_format, TelegramFormat::Plain);
        assert_eq!(c.telegram_max_retry_after, Duration::from_secs(30));
        assert!(!format!("{c:?}").contains("tok\""), "the token is redacted: {c:?}");
        let c = WorkerConfig::from_env(&env(&[("AF_NATS_URL", "nats://svc:pa55@127.0.0.1:4222")])).unwrap();
        assert_eq!(format!("{:?}", c.transport), r#"Nats { url: "nats://svc:<redacted>@127.0.0.1:4222" }"#);
    }

    #[test]
    fn required_variables_are_named() {
        let mut e = env(&[]);
        e.remove("WORKER_ID");
        assert!(WorkerConfig::from_env(&e).unwrap_err().0.starts_with("WORKER_ID is required"));
        let mut e = env(&[("AF_WORKER_TOKEN", "  ")]);
        assert!(WorkerConfig::from_env(&e).unwrap_err().0.starts_with("AF_WORKER_TOKEN is required"));
        e.insert("AF_WORKER_TOKEN".to_string(), "t".to_string());
        e.remove("AF_NATS_URL");
        assert!(WorkerConfig::from_env(&e).unwrap_err().0.contains("AF_NATS_URL or AF_API_URL"));
    }

    #[test]
    fn http_transport_accepts_the_convex_url_alias() {
        let mut e = env(&[("CONVEX_URL", "http://127.0.0.1:8080/")]);
        e.remove("AF_NATS_URL");
        let c = WorkerConfig::from_env(&e).unwrap();
        assert_eq!(c.transport, Transport::Http { base_url: "http://127.0.0.1:8080".to_string() });
        e.insert("AF_API_URL".to_string(), "http://ingress:9000".to_string());
        let c = WorkerConfig::from_env(&e).unwrap();
        assert_eq!(c.transport, Transport::Http { base_url: "http://ingress:9000".to_string() });
        e.insert("AF_API_URL".to_string(), "not a url".to_string());
        assert!(WorkerConfig::from_env(&e).unwrap_err().0.starts_with("AF_API_URL is not a URL"));
    }

    #[test]
    fn malformed_values_name_their_variable() {
        assert_eq!(
            err(&[("WORKER_IDLE_TIMEOUT_MS", "soon")]),
            "WORKER_IDLE_TIMEOUT_MS must be a non-negative whole number, got 'soon'"
        );
        assert_eq!(
            err(&[("HEARTBEAT_INTERVAL_MS", "0")]),
            "HEARTBEAT_INTERVAL_MS must be greater than 0 (milliseconds)"
        );
        assert!(err(&[("AF_CLAIM_WAIT_MS", "-1")]).starts_with("AF_CLAIM_WAIT_MS"));
        assert!(err(&[("AF_CLAIM_WAIT_MS", "0")]).starts_with("AF_CLAIM_WAIT_MS must be greater than 0"));
        assert!(
            err(&[("SKILLS_BOOTSTRAP_REQUIRED", "maybe")])
                .starts_with("SKILLS_BOOTSTRAP_REQUIRED must be true or false")
        );
        assert!(err(&[("SKILLS_BOOTSTRAP_MODE", "git")]).starts_with("SKILLS_BOOTSTRAP_MODE"));
        assert!(err(&[("AF_ENGINE", "gpt")]).starts_with("AF_ENGINE must be echo, command, openai or openclaw"));
        assert!(
            err(&[("AF_ENGINE", "openclaw"), ("AF_OPENCLAW_GATEWAY_PORT", "x")])
                .starts_with("AF_OPENCLAW_GATEWAY_PORT")
        );
        assert!(err(&[("AF_ENGINE", "command")]).starts_with("AF_ENGINE_COMMAND is required"));
        assert!(
            err(&[("AF_ENGINE", "command"), ("AF_ENGINE_COMMAND", "[1]")]).starts_with("AF_ENGINE_COMMAND looks like")
        );
        assert!(err(&[("AF_ENGINE", "openai")]).starts_with("OPENAI_MODEL is required"));
        assert!(err(&[("OPENCLAW_DATA_DIR", "data")]).starts_with("OPENCLAW_DATA_DIR must be an absolute path"));
        assert!(
            err(&[("OPENCLAW_STATE_DIR", "/elsewhere")])
                .starts_with("OPENCLAW_STATE_DIR is '/elsewhere' but must be '/data/.clawdbot'")
        );
        assert!(err(&[("TELEGRAM_API_BASE_URL", "::")]).starts_with("TELEGRAM_API_BASE_URL is not a URL"));
        assert_eq!(
            err(&[("AF_TELEGRAM_PARSE_MODE", "bbcode")]),
            "AF_TELEGRAM_PARSE_MODE must be plain, HTML or MarkdownV2, got 'bbcode'"
        );
        let parse_mode =
            |v: &str| WorkerConfig::from_env(&env(&[("AF_TELEGRAM_PARSE_MODE", v)])).unwrap().telegram_format;
        assert_eq!(
            (parse_mode("HTML"), parse_mode("markdownv2"), parse_mode("plain")),
            (TelegramFormat::Html, TelegramFormat::MarkdownV2, TelegramFormat::Plain)
        );
    }

    #[test]
    fn data_dir_layout_and_engines() {
        let c = WorkerConfig::from_env(&env(&[
            ("OPENCLAW_DATA_DIR", "/v/vol_1"),
            ("OPENCLAW_STATE_DIR", "/v/vol_1/.clawdbot/"),
            ("OPENCLAW_WORKSPACE_DIR", "/v/vol_1/workspace"),
            ("OPENCLAW_CONVERSATION_ID", "telegram:42"),
            ("OPENCLAW_AGENT_KEY", "support"),
            ("AF_ENGINE", "command"),
            ("AF_ENGINE_COMMAND", r#"["/bin/sh", "-c", "cat; echo"]"#),
        ]))
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/v/vol_1/.clawdbot"));
        assert_eq!(c.skills_dir, PathBuf::from("/v/vol_1/workspace/skills"));
        assert_eq!((c.conversation_id.as_deref(), c.agent_key.as_str()), (Some("telegram:42"), "support"));
        assert_eq!(
            c.engine,
            EngineConfig::Command {
                program: "/bin/sh".to_string(),
                args: vec!["-c".to_string(), "cat; echo".to_string()],
                timeout: Duration::from_millis(120_000),
            }
        );
        let c =
            WorkerConfig::from_env(&env(&[("AF_ENGINE", "command"), ("AF_ENGINE_COMMAND", "python3 reply.py --fast")]))
                .unwrap();
        assert!(
            matches!(&c.engine, EngineConfig::Command { program, args, .. } if program == "python3" && args.len() == 2)
        );
        let c = WorkerConfig::from_env(&env(&[
            ("AF_ENGINE", "openai"),
            ("OPENAI_MODEL", "m"),
            ("OPENAI_API_KEY", "sk-secret"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1/"),
        ]))
        .unwrap();
        assert!(matches!(&c.engine, EngineConfig::OpenAi { base_url, model, .. }
            if base_url == "http://127.0.0.1:11434/v1" && model == "m"));
        assert!(!format!("{:?}", c.engine).contains("sk-secret"));
        let c = WorkerConfig::from_env(&env(&[
            ("AF_ENGINE", "openclaw"),
            ("OPENAI_API_KEY", "sk-secret"),
            ("OPENAI_MODEL", "gpt-x"),
            ("AF_ENGINE_TIMEOUT_MS", "5000"),
        ]))
        .unwrap();
        let EngineConfig::OpenClaw(oc) = &c.engine else { panic!("{:?}", c.engine) };
        assert_eq!(oc.entry, PathBuf::from(DEFAULT_OPENCLAW_ENTRY));
        assert_eq!((oc.port, oc.turn_timeout), (0, Duration::from_secs(5)));
        assert_eq!(oc.fallback_model.model.as_deref(), Some("gpt-x"));
        assert!(!format!("{:?}", c.engine).contains("sk-secret"));
    }
}
