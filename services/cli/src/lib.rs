//! `afctl`, the operator CLI. It speaks HTTP to ingress (`POST /v1/ops/<name>`), so it needs
//! nothing but the API URL and a token. `op` reaches every operation of the catalogue; the other
//! commands are shortcuts with flags and readable tables. `fake-telegram` drives the fake Telegram
//! Bot API of the local demo (`agent-factory --fake-telegram`) through its control API.
//!
//! The logic lives here, not in `main.rs`, so tests drive it in-process with [`run_with_input`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use comfy_table::{ContentArrangement, Table, presets};
use common::OpError;
use common::api::profiles::{AgentKeyArgs, ImportSecretArgs, Plaintext, SecretsStatusArgs, UpsertAgentProfileArgs};
use common::api::queue::{ClaimArgs, EnqueueArgs, ListJobsArgs};
use common::api::{self, Ignored, Operation};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// What went wrong; `main` maps it to an exit code ([`CliError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad command line or local setup (exit 2). The text is complete, clap's included.
    #[error("{0}")]
    Usage(String),
    /// The operation returned an error (exit 1).
    #[error("error ({}): {}", code_str(.0), .0.message)]
    Op(OpError),
    /// Transport or unexpected failures (exit 1).
    #[error("error: {0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Op(_) | Self::Other(_) => 1,
        }
    }
}

fn code_str(err: &OpError) -> String {
    serde_json::to_value(err.code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", err.code))
}

#[derive(Parser)]
#[command(
    name = "afctl",
    version,
    about = "Operate agent-factory through its HTTP API",
    after_help = "Every operation is reachable with `afctl op <name> '<json>'`; `afctl ops` lists them."
)]
struct Cli {
    /// Base URL of the ingress HTTP API.
    #[arg(long, env = "AF_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// Bearer token [default: the contents of <data-dir>/admin.token].
    #[arg(long, env = "AF_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// The launcher's data directory, where the local admin token lives.
    #[arg(long, default_value = "data", global = true)]
    data_dir: PathBuf,
    /// Print the raw JSON results instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Call any operation. JSON arguments from the argument, or from stdin with `-`.
    Op {
        /// Operation name, e.g. getQueueStats.
        name: String,
        /// JSON object of arguments, or `-` to read it from stdin.
        #[arg(default_value = "{}")]
        args: String,
    },
    /// List the operation catalogue.
    Ops,
    /// Agent profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Encrypted secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Queue a message for a conversation; prints the message id.
    Enqueue {
        #[arg(long)]
        conversation: String,
        #[arg(long)]
        agent: String,
        /// The provider user id (the sender).
        #[arg(long)]
        user: String,
        #[arg(long)]
        text: String,
        #[arg(long)]
        priority: Option<i64>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Queue counts: ready, processing, dead letter.
    Stats,
    /// Jobs in one status.
    Jobs {
        /// queued, processing, done, failed or dead_letter.
        #[arg(long)]
        status: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Every worker row.
    Workers,
    /// The audit log of admin calls, newest first (`listAuditLog`).
    Audit {
        /// Only this operation's records, e.g. importPlaintextSecret.
        #[arg(long)]
        operation: Option<String>,
        /// Only records made at or after this time (ms since the epoch).
        #[arg(long)]
        since: Option<i64>,
        /// Records to show, 1–1000 [default: 100].
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after an earlier page (the cursor it printed).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// The fake Telegram Bot API of the local demo (`agent-factory --fake-telegram`).
    FakeTelegram {
        /// Base URL of the fake Bot API.
        #[arg(long, env = "AF_FAKE_TELEGRAM_URL", default_value = "http://127.0.0.1:8081")]
        fake_url: String,
        #[command(subcommand)]
        command: FakeTelegramCommand,
    },
    /// Lease the next job as a worker (admin tool for debugging).
    Claim {
        #[arg(long)]
        worker: String,
        /// Wait up to this long for a job.
        #[arg(long)]
        wait_ms: Option<u64>,
        #[arg(long)]
        conversation: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Create or update a profile.
    Upsert {
        #[arg(long)]
        agent_key: String,
        #[arg(long)]
        version: String,
        /// A secret ref the agent may use; repeat for several.
        #[arg(long = "secret-ref")]
        secret_refs: Vec<String>,
        /// Store the profile disabled.
        #[arg(long)]
        disabled: bool,
        #[arg(long)]
        bot_identity: Option<String>,
    },
    /// Every profile.
    List,
    /// One profile.
    Get { agent_key: String },
}

#[derive(Subcommand)]
enum FakeTelegramCommand {
    /// Create a bot; prints its token.
    AddBot {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        username: String,
    },
    /// Every bot with its webhook and undelivered updates.
    Bots,
    /// A simulated user writes to a bot; the update is delivered to the bot's webhook at once.
    Send {
        /// The Telegram user id (also the private chat's id).
        #[arg(long)]
        user: i64,
        #[arg(long)]
        bot: u64,
        #[arg(long)]
        text: String,
    },
    /// The record of a chat: the user's messages and what the bot sent, oldest first.
    Messages {
        #[arg(long)]
        bot: u64,
        /// The chat id (a user's id for their private chat).
        #[arg(long)]
        chat: i64,
        /// Wait until the bot has sent a message containing this text.
        #[arg(long)]
        wait_for: Option<String>,
        /// How long to wait for `--wait-for`.
        #[arg(long, default_value_t = 30_000)]
        wait_ms: u64,
    },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Store a new version of a secret; the value is read from stdin, never from arguments.
    Import {
        #[arg(long = "ref")]
        secret_ref: String,
    },
    /// Which refs have an active version.
    Status {
        #[arg(required = true)]
        refs: Vec<String>,
    },
}

/// Runs the CLI with `args` (without the program name), reading stdin when a command needs it.
pub async fn run(args: Vec<String>, out: &mut impl Write) -> Result<(), CliError> {
    run_with_input(args, &mut std::io::stdin(), out).await
}

/// Runs the CLI with `args` (without the program name) and the given stdin.
pub async fn run_with_input(args: Vec<String>, input: &mut impl Read, out: &mut impl Write) -> Result<(), CliError> {
    let argv = std::iter::once("afctl".to_string()).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => write!(out, "{}", e.render()).map_err(io_error),
                _ => Err(CliError::Usage(e.render().to_string())),
            };
        }
    };
    let api = Api::new(&cli)?;
    execute(&api, cli.command, cli.json, input, out).await
}

async fn execute(
    api: &Api,
    command: Command,
    raw: bool,
    input: &mut impl Read,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match command {
        Command::Op { name, args } => {
            let body = if args == "-" { read_all(input)? } else { args };
            let result = api.call_raw(&name, body.into_bytes()).await?;
            print_json(out, &result)
        }
        Command::Ops => {
            let ops = api.catalogue().await?;
            render(out, raw, &ops, &["name", "service", "roles", "summary"])
        }
        Command::Profile(cmd) => profile(api, cmd, raw, out).await,
        Command::Secret(cmd) => secret(api, cmd, raw, input, out).await,
        Command::Enqueue { conversation, agent, user, text, priority, idempotency_key } => {
            let payload = json!({ "provider": "cli", "providerUserId": user, "messageText": text });
            let args = EnqueueArgs {
                conversation_id: id_arg("--conversation", &conversation)?,
                agent_key: id_arg("--agent", &agent)?,
                payload: payload.as_object().cloned().unwrap_or_default(),
                priority: priority.map(|p| p as f64),
                scheduled_for: None,
                max_attempts: None,
                idempotency_key,
                now_ms: Ignored,
                provider_config: Ignored,
            };
            let id = api.call::<api::EnqueueMessage>(&args).await?;
            if raw { print_json(out, &json!(id)) } else { writeln!(out, "{id}").map_err(io_error) }
        }
        Command::Stats => {
            let stats = api.call::<api::GetQueueStats>(&Default::default()).await?;
            render_object(out, raw, &json!(stats))
        }
        Command::Jobs { status, limit } => {
            let status = serde_json::from_value(json!(status))
                .map_err(|_| CliError::Usage(format!("error: unknown job status '{status}'\n")))?;
            let jobs = json!(api.call::<api::ListJobsByStatus>(&ListJobsArgs { status, limit }).await?);
            let columns = [
                "_id",
                "conversationId",
                "agentKey",
                "status",
                "priority",
                "scheduledFor",
                "attempts",
                "maxAttempts",
                "lastError",
            ];
            render(out, raw, &jobs, &columns)
        }
        Command::Workers => {
            let workers = json!(api.call::<api::ListWorkersForScheduler>(&Default::default()).await?);
            let columns = ["workerId", "status", "load", "heartbeatAt", "assignment.conversationId"];
            render(out, raw, &workers, &columns)
        }
        Command::Audit { operation, since, limit, cursor } => {
            let args = api::audit::ListAuditLogArgs { since_ms: since, operation, limit, cursor };
            let page = api.call::<api::ListAuditLog>(&args).await?;
            if raw {
                return print_json(out, &json!(page));
            }
            let columns =
                ["atMs", "operation", "role", "principal", "outcome.ok", "outcome.errorCode", "durationMs", "args"];
            render(out, false, &json!(page.records), &columns)?;
            match page.next_cursor {
                Some(cursor) => writeln!(out, "older records: --cursor {cursor}").map_err(io_error),
                None => Ok(()),
            }
        }
        Command::FakeTelegram { fake_url, command } => fake_telegram(api, &fake_url, command, raw, out).await,
        Command::Claim { worker, wait_ms, conversation } => {
            let conversation_id = conversation.map(|c| id_arg("--conversation", &c)).transpose()?;
            let args = ClaimArgs { worker_id: id_arg("--worker", &worker)?, conversation_id, wait_ms, now_ms: Ignored };
            match api.call::<api::ClaimNextJob>(&args).await? {
                None if !raw => writeln!(out, "no job").map_err(io_error),
                job => print_json(out, &json!(job)),
            }
        }
    }
}

async fn profile(api: &Api, cmd: ProfileCommand, raw: bool, out: &mut impl Write) -> Result<(), CliError> {
    match cmd {
        ProfileCommand::Upsert { agent_key, version, secret_refs, disabled, bot_identity } => {
            let secrets_ref = secret_refs.iter().map(|r| id_arg("--secret-ref", r)).collect::<Result<Vec<_>, _>>()?;
            let args = UpsertAgentProfileArgs {
                agent_key: id_arg("--agent-key", &agent_key)?,
                version,
                secrets_ref,
                bot_identity,
                bridge_config: None,
                enabled: !disabled,
                company_id: None,
            };
            let result = api.call::<api::UpsertAgentProfile>(&args).await?;
            print_json(out, &json!(result))
        }
        ProfileCommand::List => {
            let profiles = json!(api.call::<api::ListAgentProfiles>(&Default::default()).await?);
            let columns = ["agentKey", "version", "enabled", "botIdentity", "secretsRef"];
            render(out, raw, &profiles, &columns)
        }
        ProfileCommand::Get { agent_key } => {
            let args = AgentKeyArgs { agent_key: id_arg("agent key", &agent_key)? };
            let profile = api.call::<api::GetAgentProfile>(&args).await?;
            print_json(out, &json!(profile))
        }
    }
}

async fn secret(
    api: &Api,
    cmd: SecretCommand,
    raw: bool,
    input: &mut impl Read,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match cmd {
        SecretCommand::Import { secret_ref } => {
            let value = read_all(input)?;
            // One trailing newline is what `echo` and editors add; anything else is kept.
            let value = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            if value.is_empty() {
                return Err(CliError::Usage(
                    "error: the secret value is read from stdin, which was empty\n".to_string(),
                ));
            }
            let args = ImportSecretArgs {
                secret_ref: id_arg("--ref", &secret_ref)?,
                plaintext_value: Plaintext::new(SecretString::from(value.to_string())),
                metadata: None,
            };
            let result = api.call::<api::ImportPlaintextSecret>(&args).await?;
            if raw {
                print_json(out, &json!(result))
            } else {
                writeln!(out, "stored {secret_ref} version {}", result.version).map_err(io_error)
            }
        }
        SecretCommand::Status { refs } => {
            let secret_refs = refs.iter().map(|r| id_arg("secret ref", r)).collect::<Result<Vec<_>, _>>()?;
            let status = json!(api.call::<api::GetSecretsStatus>(&SecretsStatusArgs { secret_refs }).await?);
            render(out, raw, &status, &["secretRef", "hasActive", "version"])
        }
    }
}

async fn fake_telegram(
    api: &Api,
    base: &str,
    cmd: FakeTelegramCommand,
    raw: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let base = base.trim_end_matches('/');
    match cmd {
        FakeTelegramCommand::AddBot { id, username } => {
            let bot = api.fake(base, "/fake/bots", Some(json!({"id": id, "username": username}))).await?;
            match raw {
                true => print_json(out, &bot),
                false => writeln!(out, "{}", bot["token"].as_str().unwrap_or_default()).map_err(io_error),
            }
        }
        FakeTelegramCommand::Bots => {
            let bots = api.fake(base, "/fake/bots", None).await?;
            render(out, raw, &bots, &["id", "username", "webhookUrl", "pending"])
        }
        FakeTelegramCommand::Send { user, bot, text } => {
            let path = format!("/fake/users/{user}/send");
            let sent = api.fake(base, &path, Some(json!({"botId": bot, "text": text}))).await?;
            if raw {
                return print_json(out, &sent);
            }
            let update = &sent["updateId"];
            match sent["webhookStatus"].as_u64() {
                Some(0) => writeln!(out, "update {update} queued; the webhook could not be reached"),
                Some(status) => writeln!(out, "update {update} delivered; the webhook answered {status}"),
                None => writeln!(
                    out,
                    "update {update} queued, not delivered yet (the bot has no webhook, or an earlier update is undelivered)"
                ),
            }
            .map_err(io_error)
        }
        FakeTelegramCommand::Messages { bot, chat, wait_for, wait_ms } => {
            let path = format!("/fake/bots/{bot}/chats/{chat}/messages");
            let deadline = std::time::Instant::now() + Duration::from_millis(wait_ms);
            let record = loop {
                let record = api.fake(base, &path, None).await?;
                let Some(wanted) = &wait_for else { break record };
                let seen = record.as_array().is_some_and(|entries| {
                    entries
                        .iter()
                        .any(|e| e["from"] == "bot" && e["text"].as_str().is_some_and(|t| t.contains(wanted.as_str())))
                });
                if seen {
                    break record;
                }
                if std::time::Instant::now() >= deadline {
                    render(out, raw, &record, &["from", "method", "text"])?;
                    return Err(CliError::Other(format!(
                        "bot {bot} sent no message containing '{wanted}' to chat {chat} within {wait_ms} ms"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            render(out, raw, &record, &["from", "method", "text"])
        }
    }
}

/// Parses a command-line id by its contract's rule.
fn id_arg<T: TryFrom<String, Error = common::OpError>>(flag: &str, value: &str) -> Result<T, CliError> {
    T::try_from(value.to_string()).map_err(|e| CliError::Usage(format!("error: {flag}: {}\n", e.message)))
}

/// The HTTP client of the operations API.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<SecretString>,
    token_file: PathBuf,
}

impl Api {
    fn new(cli: &Cli) -> Result<Self, CliError> {
        common::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Long enough for the longest claim wait the server allows.
            .timeout(Duration::from_secs(330))
            .build()
            .map_err(|e| CliError::Other(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: cli.url.trim_end_matches('/').to_string(),
            token: cli.token.clone().map(SecretString::from),
            token_file: cli.data_dir.join("admin.token"),
        })
    }

    fn token(&self) -> Result<SecretString, CliError> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        read_token_file(&self.token_file)
    }

    /// Calls operation `O`.
    async fn call<O: Operation>(&self, args: &O::Args) -> Result<O::Output, CliError> {
        let body = serde_json::to_vec(args).map_err(|e| CliError::Other(e.to_string()))?;
        let result = self.call_raw(O::SPEC.name, body).await?;
        serde_json::from_value(result)
            .map_err(|e| CliError::Other(format!("undecodable answer of {}: {e}", O::SPEC.name)))
    }

    async fn call_raw(&self, name: &str, body: Vec<u8>) -> Result<Value, CliError> {
        let token = self.token()?;
        let url = format!("{}/v1/ops/{name}", self.base);
        let response = self
            .http
            .post(&url)
            .bearer_auth(token.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| CliError::Other(format!("cannot reach {}: {e}", self.base)))?;
        decode(response).await
    }

    /// Calls the fake Telegram's control API at `base`: a GET, or a POST of `body`. Returns the
    /// `result` of its `{"ok": true, "result": …}` answer.
    async fn fake(&self, base: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let url = format!("{base}{path}");
        let request = match body {
            Some(body) => self.http.post(&url).json(&body),
            None => self.http.get(&url),
        };
        let response = request.send().await.map_err(|e| CliError::Other(format!("cannot reach {base}: {e}")))?;
        let status = response.status();
        let answer: Value = response
            .json()
            .await
            .map_err(|e| CliError::Other(format!("undecodable answer of the fake Telegram ({status}): {e}")))?;
        match answer.get("ok").and_then(Value::as_bool) {
            Some(true) => Ok(answer.get("result").cloned().unwrap_or(Value::Null)),
            _ => Err(CliError::Other(format!(
                "fake Telegram: {} {}",
                status.as_u16(),
                answer.get("description").and_then(Value::as_str).unwrap_or("unexpected answer")
            ))),
        }
    }

    async fn catalogue(&self) -> Result<Value, CliError> {
        let response = self
            .http
            .get(format!("{}/v1/ops", self.base))
            .send()
            .await
            .map_err(|e| CliError::Other(format!("cannot reach {}: {e}", self.base)))?;
        decode(response).await
    }
}

fn read_token_file(path: &Path) -> Result<SecretString, CliError> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Ok(SecretString::from(token.trim().to_string())),
        _ => Err(CliError::Usage(format!(
            "error: no token: pass --token or set AF_TOKEN, or point --data-dir at the \
             launcher's data directory (no token in {})\n",
            path.display()
        ))),
    }
}

/// A reply's JSON, or the operation error it carries.
async fn decode(response: reqwest::Response) -> Result<Value, CliError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| CliError::Other(format!("reading the reply: {e}")))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Other(format!("undecodable reply ({status}): {e}")));
    }
    match serde_json::from_slice::<common::error::ErrorBody>(&bytes) {
        Ok(body) => Err(CliError::Op(body.error)),
        Err(_) => Err(CliError::Other(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()))),
    }
}

fn read_all(input: &mut impl Read) -> Result<String, CliError> {
    let mut text = String::new();
    input.read_to_string(&mut text).map_err(|e| CliError::Other(format!("reading stdin: {e}")))?;
    Ok(text)
}

fn io_error(e: std::io::Error) -> CliError {
    CliError::Other(format!("writing output: {e}"))
}

fn print_json(out: &mut impl Write, value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
    writeln!(out, "{text}").map_err(io_error)
}

/// A list of objects as a table with `columns` (dotted paths reach into nested objects), or the
/// JSON itself with `--json` or when the result is not a list.
fn render(out: &mut impl Write, raw: bool, value: &Value, columns: &[&str]) -> Result<(), CliError> {
    let Some(rows) = value.as_array().filter(|_| !raw) else {
        return print_json(out, value);
    };
    let mut table = new_table();
    // A nested path is headed by its last segment: `assignment.conversationId` → conversationId.
    table.set_header(columns.iter().map(|c| c.rsplit('.').next().unwrap_or(c)).collect::<Vec<_>>());
    for row in rows {
        table.add_row(columns.iter().map(|c| cell(c, lookup(row, c))).collect::<Vec<_>>());
    }
    writeln!(out, "{table}").map_err(io_error)
}

/// An object as a two-column key/value table.
fn render_object(out: &mut impl Write, raw: bool, value: &Value) -> Result<(), CliError> {
    let Some(map) = value.as_object().filter(|_| !raw) else {
        return print_json(out, value);
    };
    let mut table = new_table();
    table.set_header(vec!["key", "value"]);
    for (key, v) in map {
        table.add_row(vec![key.clone(), cell(key, Some(v))]);
    }
    writeln!(out, "{table}").map_err(io_error)
}

fn new_table() -> Table {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic);
    table
}

fn lookup<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(row, |v, key| v.get(key))
}

/// One table cell. Fields ending in `At`/`For`, and `atMs`, holding milliseconds are shown as UTC
/// time.
fn cell(column: &str, value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if column.ends_with("At") || column.ends_with("For") || column == "atMs" => {
            n.as_i64().map(iso_utc).unwrap_or_else(|| n.to_string())
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
        }
        Some(other) => other.to_string(),
    }
}

pub use common::clock::iso_utc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_utc_formats_known_instants() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_utc(1_767_258_000_000), "2026-01-01T09:00:00.000Z");
        assert_eq!(iso_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso_utc(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn cells_render_times_lists_and_nested_paths() {
        let row = json!({"heartbeatAt": 0, "refs": ["a", "b"], "assignment": {"conversationId": "c1"}});
        assert_eq!(cell("heartbeatAt", lookup(&row, "heartbeatAt")), "1970-01-01T00:00:00.000Z");
        assert_eq!(cell("refs", lookup(&row, "refs")), "a, b");
        assert_eq!(cell("x", lookup(&row, "assignment.conversationId")), "c1");
        assert_eq!(cell("missing", lookup(&row, "missing")), "");
    }

    #[tokio::test]
    async fn usage_errors_exit_2_and_help_is_not_an_error() {
        let mut out = Vec::new();
        let err = run_with_input(vec!["nope".into()], &mut &b""[..], &mut out).await.expect_err("unknown command");
        assert_eq!(err.exit_code(), 2);
        run_with_input(vec!["--help".into()], &mut &b""[..], &mut out).await.expect("help is printed");
        assert!(String::from_utf8_lossy(&out).contains("enqueue"));
    }

    #[tokio::test]
    async fn a_missing_token_file_is_a_usage_error() {
        let dir = std::env::temp_dir().join(format!("afctl-test-{}", std::process::id()));
        let mut out = Vec::new();
        let err = run_with_input(
            vec![
                "--url".into(),
                "http://127.0.0.1:9".into(),
                "--data-dir".into(),
                dir.display().to_string(),
                "stats".into(),
            ],
            &mut &b""[..],
            &mut out,
        )
        .await;
        // AF_TOKEN in the environment would supply a token; then the call fails to connect.
        let err = err.expect_err("no token, no server");
        if std::env::var_os("AF_TOKEN").is_none() {
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(err.to_string().contains("no token"), "{err}");
        }
    }
}
