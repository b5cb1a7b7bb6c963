//! Layered configuration: built-in defaults (`defaults.toml`), then an optional TOML file, then
//! `AF_`-prefixed environment variables with `__` between sections. The environment is passed in
//! as a map so tests never mutate the process environment. Bad values fail at start with a
//! message that names the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

/// The built-in defaults, also the reference for docs/configuration.md.
pub const DEFAULTS_TOML: &str = include_str!("defaults.toml");

/// The environment variable prefix.
pub const ENV_PREFIX: &str = "AF";
/// The shortest admin or app token accepted.
pub const MIN_TOKEN_CHARS: usize = 16;
/// The shortest worker token signing key accepted.
pub const MIN_KEY_CHARS: usize = 32;
/// The highest `rate_limits.*_per_minute` accepted (100,000 a second).
pub const MAX_RATE_PER_MINUTE: u32 = 6_000_000;
/// The highest `rate_limits.*_burst` accepted.
pub const MAX_BURST: u32 = 1_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub nats: NatsSettings,
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub secrets: SecretsSettings,
    pub clock: ClockSettings,
    pub loops: LoopSettings,
    pub queue: QueueSettings,
    pub history: HistorySettings,
    pub snapshots: SnapshotSettings,
    pub attachments: AttachmentSettings,
    pub providers: ProviderSettings,
    pub scheduler: SchedulerSettings,
    pub push: PushSettings,
    pub limits: LimitSettings,
    pub telemetry: TelemetrySettings,
    pub telegram: TelegramSettings,
    pub audit: AuditSettings,
    pub rate_limits: RateLimitSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    pub url: Option<String>,
    pub replicas: usize,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// The embedded nats-server encrypts its JetStream store (ChaCha20-Poly1305) with a key
    /// generated into `data_dir/nats.store.key`. Set it before the first start: a store written
    /// in the clear is not converted.
    pub encrypt_store: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub bind: String,
    pub max_body_bytes: usize,
    /// The base URL clients reach ingress at; download and upload links are built from it.
    /// Empty means `http://<bind>`.
    pub public_url: String,
    /// A connection must deliver a request's headers within this long, also when idle between
    /// requests (a client holding half a header, or an idle keep-alive, is closed).
    pub header_timeout_ms: u64,
    /// Connections served at once; more are closed as they are accepted.
    pub max_connections: usize,
    /// How long a web console session lasts after login; also the max age of the sessions
    /// bucket, so an abandoned session disappears on its own.
    pub console_session_ttl_ms: u64,
}

impl HttpSettings {
    /// The base URL for links handed to workers, without a trailing slash.
    pub fn public_base_url(&self) -> String {
        if self.public_url.trim().is_empty() {
            format!("http://{}", self.bind)
        } else {
            self.public_url.trim().trim_end_matches('/').to_string()
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub admin_token: Option<SecretString>,
    pub app_token: Option<SecretString>,
    pub worker_token_key: Option<SecretString>,
    /// Admin tokens still accepted during a rollover (never sent by the services themselves).
    #[serde(default)]
    pub previous_admin_tokens: Vec<SecretString>,
    /// App tokens still accepted during a rollover.
    #[serde(default)]
    pub previous_app_tokens: Vec<SecretString>,
    /// Keys whose worker tokens still verify; new worker tokens are signed with
    /// `worker_token_key` only.
    #[serde(default)]
    pub previous_worker_token_keys: Vec<SecretString>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSettings {
    pub key: Option<SecretString>,
    /// Keys that still open values sealed under them; new values are sealed with `key`, and the
    /// re-encryption moves the old ones onto it.
    #[serde(default)]
    pub previous_keys: Vec<SecretString>,
}

/// The settings whose environment variables hold comma-separated lists.
const LIST_KEYS: [&str; 4] = [
    "auth.previous_admin_tokens",
    "auth.previous_app_tokens",
    "auth.previous_worker_token_keys",
    "secrets.previous_keys",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    System,
    Manual,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockSettings {
    pub mode: ClockMode,
    pub start_ms: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopSettings {
    /// Pauses every background loop; operators then drive them through their operations.
    pub manual: bool,
    pub lease_recovery: bool,
    pub lease_recovery_interval_ms: u64,
    /// Retention sweeps (expired snapshots and attachments, abandoned uploads), cleanup service.
    pub retention: bool,
    pub retention_interval_ms: u64,
    /// The worker-pool reconcile: triggered by enqueues and periodically (scheduler service).
    pub reconcile: bool,
    /// The push dispatch loop: fires due push jobs at their slot and completes interrupted
    /// broadcasts (push-dispatcher service).
    pub push_dispatch: bool,
    /// The re-encryption of secrets sealed under a previous `secrets.key` (hydration service).
    pub secrets_reencryption: bool,
    pub secrets_reencryption_interval_ms: u64,
}

impl LoopSettings {
    /// Whether one loop runs by itself: its own switch and the global pause.
    pub fn enabled(&self, own_switch: bool) -> bool {
        own_switch && !self.manual
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub default_priority: i64,
    pub max_priority: i64,
    pub max_attempts: u32,
    pub lease_ms: i64,
    pub stale_after_ms: i64,
    pub idle_timeout_ms: i64,
    pub claim_wait_max_ms: u64,
    /// How long the leader may keep worker-row heartbeats, held completions and the replay
    /// watermark in memory before writing them.
    pub lazy_flush_ms: u64,
    pub idempotency_window_ms: u64,
    pub inbox_max_age_ms: u64,
    pub max_message_bytes: usize,
    pub retry: RetrySettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub base_delay_ms: i64,
    pub max_delay_ms: i64,
    pub backoff_factor: f64,
    pub jitter_ratio: f64,
}

/// The audit log of admin calls (`AF_AUDIT`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// How long audit records are kept (the stream's max age); 0 keeps them forever.
    pub retention_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// How long conversation history is kept (the history stream's max age); 0 keeps it forever.
    pub retention_ms: u64,
    /// Most items one `appendConversationMessages` call may carry.
    pub max_batch_items: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSettings {
    /// A snapshot expires this long after it was prepared (the original's 7 days).
    pub retention_ms: i64,
    /// An upload still `uploading` this long after prepare is abandoned and reaped.
    pub upload_timeout_ms: i64,
    /// Largest archive accepted.
    pub max_archive_bytes: u64,
    /// Object store chunk size; larger chunks mean fewer round trips per archive.
    pub chunk_bytes: usize,
}

/// The Telegram Bot API client, the webhook ingress and pairing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramSettings {
    /// Base URL of the Bot API, without `/bot<token>`.
    pub api_base_url: String,
    pub http_timeout_ms: u64,
    /// Attempts of one Bot API call in all (429 and 5xx are retried).
    pub retry_attempts: u32,
    pub retry_base_delay_ms: u64,
    /// A 429 asking to wait longer than this fails the call instead.
    pub max_retry_after_ms: u64,
    /// The webhook is served at `<webhook_path_prefix>/telegram/webhook`.
    pub webhook_path_prefix: String,
    /// Base URL Telegram reaches ingress at; empty = `http.public_url`.
    pub public_url: String,
    /// Accept a webhook URL that is not https (always accepted for a loopback host).
    pub allow_insecure_webhook: bool,
    /// Window in which an update delivered again (same bot and update_id) is dropped.
    pub update_dedup_window_ms: u64,
    /// Largest accepted update body.
    pub max_update_bytes: usize,
    /// Deliveries of one update to the consumer before it is given up (transient failures).
    pub consumer_max_deliver: i64,
    /// Pairing codes one consumer user may create per hour.
    pub pairing_max_per_user_per_hour: u32,
    /// Pairing codes one bot's agents may create per hour.
    pub pairing_max_per_bot_per_hour: u32,
    /// Failed `/start <code>` attempts one Telegram user may make per bot per hour.
    pub pairing_max_failures_per_hour: u32,
    /// Failed `/start <code>` attempts all Telegram users together may make per bot per hour.
    pub pairing_max_failures_per_bot_per_hour: u32,
}

impl TelegramSettings {
    /// The webhook path, `<prefix>/telegram/webhook`.
    pub fn webhook_path(&self) -> String {
        let prefix = self.webhook_path_prefix.trim().trim_end_matches('/');
        format!("{prefix}/telegram/webhook")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentSettings {
    /// Largest media file accepted.
    pub max_bytes: u64,
    /// Most attachments one message may carry.
    pub max_per_message: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Base URL of the Fly Machines API (a fake server in tests).
    pub fly_base_url: String,
    /// Timeout of one provider HTTP request.
    pub http_timeout_ms: u64,
    /// Attempts of a provider request that meets 429, 5xx or a network error.
    pub retry_attempts: u32,
    /// First backoff delay between those attempts (doubles each time).
    pub retry_base_delay_ms: u64,
    /// Longest wait for a stopped machine before destroy is attempted anyway.
    pub stop_wait_ms: u64,
    /// Local provider: directory holding one sub-directory (volume) per worker; empty =
    /// `<data_dir>/workers`.
    pub local_dir: String,
    /// Local provider: the worker program; empty = `af-worker` next to the running executable.
    pub worker_binary: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    /// Provider used while no provider runtime config is stored: `local` (the one-machine
    /// stack) or `none` (nothing is spawned until an operator stores one).
    pub default_provider: String,
    /// The scaling policy used while none is stored (`setScalingRuntimeConfig`).
    pub max_workers: u32,
    pub spawn_step: u32,
    pub reconcile_interval_ms: i64,
    pub drain_deadline_ms: i64,
    /// Demand signals within this window are served by one reconcile.
    pub debounce_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSettings {
    /// A slot fired at most this late is on time; one missed by more (an outage) follows the
    /// job's catch-up policy.
    pub catch_up_grace_ms: i64,
    /// Jobs (or broadcast targets) dispatched at once.
    pub concurrency: usize,
    /// How often the dispatch leader looks for interrupted broadcasts (real time).
    pub broadcast_recovery_interval_ms: u64,
}

/// Request rate limits of ingress (token buckets, GCRA): a refused request is a 429 with
/// `Retry-After`. Each `*_per_minute` is the sustained rate, each `*_burst` how many requests
/// may come at once before the rate applies.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Off: ingress limits nothing (pairing's hourly windows in `[telegram]` still apply).
    pub enabled: bool,
    /// `POST /v1/ops/<name>` per bearer token other than the admin and app tokens (each
    /// worker's token, and any unknown token).
    pub ops_per_minute: u32,
    pub ops_burst: u32,
    /// `POST /v1/ops/<name>` with the app token (the consumer app's backend, for all its users).
    pub app_ops_per_minute: u32,
    pub app_ops_burst: u32,
    /// `POST /v1/ops/<name>` with the admin token.
    pub admin_ops_per_minute: u32,
    pub admin_ops_burst: u32,
    /// Telegram webhook updates per bot (after the secret check).
    pub webhook_per_minute: u32,
    pub webhook_burst: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_string_bytes: usize,
    pub max_list_items: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_filter: String,
    pub otlp_endpoint: Option<String>,
    /// Address a service binary run on its own serves `GET /metrics` on (ingress serves it on
    /// `http.bind` as well). Unset = no separate metrics listener.
    pub metrics_bind: Option<String>,
}

/// Configuration variables are `AF_DATA_DIR` and `AF_<SECTION>__<KEY>`. Other `AF_` variables
/// (`AF_CONFIG`, `AF_NATS_SERVER_BIN`, the CLI's `AF_URL`/`AF_TOKEN`, test knobs) belong to
/// tools and are not configuration keys.
fn is_config_variable(name: &str) -> bool {
    name.strip_prefix("AF_").is_some_and(|rest| rest == "DATA_DIR" || rest.contains("__"))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Loads defaults, then `file` (if any), then the `AF_*` entries of `env`, and validates.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS_TOML, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!("configuration file '{}' does not exist", path.display())));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: HashMap<String, String> =
            env.iter().filter(|(k, _)| is_config_variable(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key(LIST_KEYS[0])
                .with_list_parse_key(LIST_KEYS[1])
                .with_list_parse_key(LIST_KEYS[2])
                .with_list_parse_key(LIST_KEYS[3])
                .source(Some(env)),
        );
        let settings: Settings =
            builder.build().and_then(|c| c.try_deserialize()).map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Defaults only, with the given overrides (`"queue.lease_ms" => "1000"` style keys).
    pub fn from_overrides(overrides: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = overrides
            .iter()
            .map(|(k, v)| (format!("AF_{}", k.replace('.', "__").to_uppercase()), v.to_string()))
            .collect();
        Self::load(None, &env)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        let q = &self.queue;
        if !(60_000..=7 * 86_400_000).contains(&self.http.console_session_ttl_ms) {
            return fail("http.console_session_ttl_ms", "must be between 60000 (a minute) and 604800000 (a week)");
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return fail("nats.replicas", "must be between 1 and 5");
        }
        if self.nats.url.as_ref().is_some_and(|url| url.trim().is_empty()) {
            return fail("nats.url", "must not be empty when set");
        }
        // Static tokens and keys are bearer credentials: short ones can be guessed.
        let a = &self.auth;
        for (key, values, min) in [
            ("auth.admin_token", a.admin_token.as_slice(), MIN_TOKEN_CHARS),
            ("auth.app_token", a.app_token.as_slice(), MIN_TOKEN_CHARS),
            ("auth.worker_token_key", a.worker_token_key.as_slice(), MIN_KEY_CHARS),
            ("auth.previous_admin_tokens", a.previous_admin_tokens.as_slice(), MIN_TOKEN_CHARS),
            ("auth.previous_app_tokens", a.previous_app_tokens.as_slice(), MIN_TOKEN_CHARS),
            ("auth.previous_worker_token_keys", a.previous_worker_token_keys.as_slice(), MIN_KEY_CHARS),
        ] {
            for value in values.iter().map(secrecy::ExposeSecret::expose_secret) {
                if value.chars().count() < min || value.contains(char::is_whitespace) {
                    return Err(ConfigError(format!("{key}: must be at least {min} characters without spaces")));
                }
            }
        }
        if !a.previous_admin_tokens.is_empty() && a.admin_token.is_none() {
            return fail("auth.previous_admin_tokens", "needs auth.admin_token (the current token)");
        }
        if !a.previous_app_tokens.is_empty() && a.app_token.is_none() {
            return fail("auth.previous_app_tokens", "needs auth.app_token (the current token)");
        }
        if !a.previous_worker_token_keys.is_empty() && a.worker_token_key.is_none() {
            return fail("auth.previous_worker_token_keys", "needs auth.worker_token_key (the current key)");
        }
        if !self.secrets.previous_keys.is_empty() && self.secrets.key.is_none() {
            return fail("secrets.previous_keys", "needs secrets.key (the current key)");
        }
        for key in &self.secrets.previous_keys {
            if let Err(why) = crate::crypto::SecretCipher::from_base64(key) {
                // The message names secrets.key; say which setting it came from.
                return Err(ConfigError(format!("secrets.previous_keys: {}", why.trim_start_matches("secrets.key: "))));
            }
        }
        if self.http.bind.parse::<std::net::SocketAddr>().is_err() {
            return fail("http.bind", "must be an address like 127.0.0.1:8080");
        }
        if !(100..=300_000).contains(&self.http.header_timeout_ms) {
            return fail("http.header_timeout_ms", "must be between 100 and 300000");
        }
        if !(1..=1_000_000).contains(&self.http.max_connections) {
            return fail("http.max_connections", "must be between 1 and 1000000");
        }
        if self.http.max_body_bytes < 1024 {
            return fail("http.max_body_bytes", "must be at least 1024");
        }
        if q.lease_ms < 1000 {
            return fail("queue.lease_ms", "must be at least 1000");
        }
        if q.stale_after_ms < q.lease_ms {
            return fail("queue.stale_after_ms", "must be at least queue.lease_ms");
        }
        if q.idle_timeout_ms < 1000 {
            return fail("queue.idle_timeout_ms", "must be at least 1000");
        }
        if q.max_attempts == 0 || q.max_attempts > 1000 {
            return fail("queue.max_attempts", "must be between 1 and 1000");
        }
        if !(0..=q.max_priority).contains(&q.default_priority) {
            return fail("queue.default_priority", "must be between 0 and queue.max_priority");
        }
        if q.retry.base_delay_ms < 0 || q.retry.max_delay_ms < q.retry.base_delay_ms {
            return fail("queue.retry.max_delay_ms", "must be at least queue.retry.base_delay_ms");
        }
        // Written so that NaN fails too.
        if q.retry.backoff_factor.is_nan() || q.retry.backoff_factor < 1.0 {
            return fail("queue.retry.backoff_factor", "must be at least 1.0");
        }
        if !(0.0..=1.0).contains(&q.retry.jitter_ratio) {
            return fail("queue.retry.jitter_ratio", "must be between 0 and 1");
        }
        if q.claim_wait_max_ms > crate::api::LONG_POLL_MAX_MS {
            // Clients wait at most this long beyond their ordinary timeout (one long-poll rule).
            return fail("queue.claim_wait_max_ms", "must be at most 300000");
        }
        if !(10..=60_000).contains(&q.lazy_flush_ms) {
            return fail("queue.lazy_flush_ms", "must be between 10 and 60000");
        }
        if q.max_message_bytes < 1024 || q.max_message_bytes > 1_000_000 {
            return fail("queue.max_message_bytes", "must be between 1024 and 1000000");
        }
        if self.push.catch_up_grace_ms < 1000 {
            return fail("push.catch_up_grace_ms", "must be at least 1000");
        }
        if !(1..=1024).contains(&self.push.concurrency) {
            return fail("push.concurrency", "must be 1..1024");
        }
        if self.push.broadcast_recovery_interval_ms < 100 {
            return fail("push.broadcast_recovery_interval_ms", "must be at least 100");
        }
        let sch = &self.scheduler;
        if !["local", "none"].contains(&sch.default_provider.as_str()) {
            return fail("scheduler.default_provider", "must be \"local\" or \"none\"");
        }
        if sch.spawn_step == 0 {
            return fail("scheduler.spawn_step", "must be at least 1");
        }
        if sch.reconcile_interval_ms < 100 {
            return fail("scheduler.reconcile_interval_ms", "must be at least 100");
        }
        if sch.drain_deadline_ms < 1000 {
            return fail("scheduler.drain_deadline_ms", "must be at least 1000");
        }
        let p = &self.providers;
        if !p.fly_base_url.starts_with("http://") && !p.fly_base_url.starts_with("https://") {
            return fail("providers.fly_base_url", "must start with http:// or https://");
        }
        if p.http_timeout_ms < 100 {
            return fail("providers.http_timeout_ms", "must be at least 100");
        }
        if !(1..=20).contains(&p.retry_attempts) {
            return fail("providers.retry_attempts", "must be between 1 and 20");
        }
        if self.loops.retention_interval_ms < 10 {
            return fail("loops.retention_interval_ms", "must be at least 10");
        }
        let url = self.http.public_url.trim();
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return fail("http.public_url", "must start with http:// or https://");
        }
        if !(1..=10_000).contains(&self.history.max_batch_items) {
            return fail("history.max_batch_items", "must be between 1 and 10000");
        }
        if self.audit.retention_ms != 0 && self.audit.retention_ms < 60_000 {
            return fail("audit.retention_ms", "must be 0 (keep forever) or at least 60000");
        }
        if self.snapshots.retention_ms < 60_000 {
            return fail("snapshots.retention_ms", "must be at least 60000");
        }
        if self.snapshots.upload_timeout_ms < 1000 {
            return fail("snapshots.upload_timeout_ms", "must be at least 1000");
        }
        if self.snapshots.max_archive_bytes < 1024 {
            return fail("snapshots.max_archive_bytes", "must be at least 1024");
        }
        if !(4096..=1_000_000).contains(&self.snapshots.chunk_bytes) {
            return fail("snapshots.chunk_bytes", "must be between 4096 and 1000000 (below the NATS max payload)");
        }
        if self.attachments.max_bytes < 1024 {
            return fail("attachments.max_bytes", "must be at least 1024");
        }
        if !(1..=100).contains(&self.attachments.max_per_message) {
            return fail("attachments.max_per_message", "must be between 1 and 100");
        }
        if self.loops.secrets_reencryption_interval_ms < 1000 {
            return fail("loops.secrets_reencryption_interval_ms", "must be at least 1000");
        }
        if self.loops.lease_recovery_interval_ms < 10 {
            return fail("loops.lease_recovery_interval_ms", "must be at least 10");
        }
        if self.clock.start_ms.is_some_and(|start| start < 0) {
            return fail("clock.start_ms", "must not be negative");
        }
        if self.limits.max_string_bytes < 256 {
            return fail("limits.max_string_bytes", "must be at least 256");
        }
        if self.limits.max_list_items < 1 {
            return fail("limits.max_list_items", "must be at least 1");
        }
        let t = &self.telegram;
        if !t.api_base_url.starts_with("http://") && !t.api_base_url.starts_with("https://") {
            return fail("telegram.api_base_url", "must start with http:// or https://");
        }
        if t.http_timeout_ms < 100 {
            return fail("telegram.http_timeout_ms", "must be at least 100");
        }
        if !(1..=20).contains(&t.retry_attempts) {
            return fail("telegram.retry_attempts", "must be between 1 and 20");
        }
        let prefix = t.webhook_path_prefix.trim();
        if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.contains(['?', '#', ' ', '{', '}'])) {
            return fail("telegram.webhook_path_prefix", "must be empty or a path starting with /");
        }
        let url = t.public_url.trim();
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return fail("telegram.public_url", "must start with http:// or https://");
        }
        if t.update_dedup_window_ms < 1000 {
            return fail("telegram.update_dedup_window_ms", "must be at least 1000");
        }
        if !(1024..=1_000_000).contains(&t.max_update_bytes) {
            return fail("telegram.max_update_bytes", "must be between 1024 and 1000000");
        }
        if t.consumer_max_deliver < 1 {
            return fail("telegram.consumer_max_deliver", "must be at least 1");
        }
        let r = &self.rate_limits;
        for (key, value, max) in [
            ("rate_limits.ops_per_minute", r.ops_per_minute, MAX_RATE_PER_MINUTE),
            ("rate_limits.ops_burst", r.ops_burst, MAX_BURST),
            ("rate_limits.app_ops_per_minute", r.app_ops_per_minute, MAX_RATE_PER_MINUTE),
            ("rate_limits.app_ops_burst", r.app_ops_burst, MAX_BURST),
            ("rate_limits.admin_ops_per_minute", r.admin_ops_per_minute, MAX_RATE_PER_MINUTE),
            ("rate_limits.admin_ops_burst", r.admin_ops_burst, MAX_BURST),
            ("rate_limits.webhook_per_minute", r.webhook_per_minute, MAX_RATE_PER_MINUTE),
            ("rate_limits.webhook_burst", r.webhook_burst, MAX_BURST),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError(format!("{key}: must be between 1 and {max}")));
            }
        }
        Ok(())
    }

    pub fn nats_store_dir(&self) -> PathBuf {
        self.data_dir.join("nats")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load(None, &HashMap::new()).unwrap();
        assert_eq!(s.queue.lease_ms, 360_000);
        assert_eq!(s.queue.stale_after_ms, 420_000);
        assert_eq!(s.clock.mode, ClockMode::System);
        assert!(s.nats.url.is_none());
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let env = HashMap::from([
            ("AF_QUEUE__LEASE_MS".to_string(), "5000".to_string()),
            ("AF_QUEUE__STALE_AFTER_MS".to_string(), "6000".to_string()),
            ("AF_NATS__URL".to_string(), "nats://127.0.0.1:4999".to_string()),
            ("AF_CLOCK__MODE".to_string(), "manual".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
            ("AF_NATS_SERVER_BIN".to_string(), "/x/nats-server".to_string()),
            ("AF_URL".to_string(), "http://x".to_string()),
        ]);
        let s = Settings::load(None, &env).unwrap();
        assert_eq!(s.queue.lease_ms, 5000);
        assert_eq!(s.nats.url.as_deref(), Some("nats://127.0.0.1:4999"));
        assert_eq!(s.clock.mode, ClockMode::Manual);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Settings::from_overrides(&[("queue.lease_ms", "10")]).unwrap_err();
        assert!(err.to_string().contains("queue.lease_ms"), "{err}");
        let err = Settings::from_overrides(&[("queue.lease_ms", "abc")]).unwrap_err();
        assert!(err.to_string().contains("lease_ms"), "{err}");
        let err = Settings::from_overrides(&[("clock.mode", "sundial")]).unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
    }

    #[test]
    fn previous_tokens_and_keys_are_lists_with_the_same_strength_rule() {
        let key1 = crate::crypto::generate_key_base64().unwrap();
        let key2 = crate::crypto::generate_key_base64().unwrap();
        let env = HashMap::from([
            ("AF_AUTH__ADMIN_TOKEN".to_string(), "admin-token-current-0001".to_string()),
            (
                "AF_AUTH__PREVIOUS_ADMIN_TOKENS".to_string(),
                "admin-token-old-00000001,admin-token-old-00000002".to_string(),
            ),
            ("AF_SECRETS__KEY".to_string(), key1),
            ("AF_SECRETS__PREVIOUS_KEYS".to_string(), key2),
        ]);
        let s = Settings::load(None, &env).unwrap();
        assert_eq!(s.auth.previous_admin_tokens.len(), 2);
        assert_eq!(s.secrets.previous_keys.len(), 1);
        assert!(s.auth.previous_app_tokens.is_empty());
        assert!(!format!("{s:?}").contains("admin-token-old"), "never printed");

        let err = Settings::from_overrides(&[
            ("auth.app_token", "app-token-current-0001"),
            ("auth.previous_app_tokens", "short"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("auth.previous_app_tokens"), "{err}");
        let err = Settings::from_overrides(&[("auth.previous_admin_tokens", "admin-token-old-00000001")]).unwrap_err();
        assert!(err.to_string().contains("needs auth.admin_token"), "{err}");
        let err = Settings::from_overrides(&[
            ("secrets.key", &crate::crypto::generate_key_base64().unwrap()),
            ("secrets.previous_keys", "bm90LWEta2V5"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("secrets.previous_keys: must decode to 32 bytes"), "{err}");
    }

    #[test]
    fn rate_limits_must_be_positive() {
        let s = Settings::from_overrides(&[("rate_limits.ops_burst", "5")]).unwrap();
        assert_eq!(s.rate_limits.ops_burst, 5);
        for key in ["rate_limits.ops_per_minute", "rate_limits.webhook_burst", "rate_limits.admin_ops_burst"] {
            let err = Settings::from_overrides(&[(key, "0")]).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = Settings::from_overrides(&[("rate_limits.app_ops_per_minute", "6000001")]).unwrap_err();
        assert!(err.to_string().contains("rate_limits.app_ops_per_minute"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::from_overrides(&[("queue.lease_msec", "1000")]).unwrap_err();
        assert!(err.to_string().contains("lease_msec"), "{err}");
    }
}
