//! Every stream, KV bucket and object store of the system, declared once and provisioned idempotently: any
//! service may run `provision` at start, twice or concurrently with another service, and the
//! result is the same. File storage everywhere; the replica count comes from `nats.replicas`.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};

use crate::config::Settings;
use crate::store::JsonStore;

/// Per-conversation inboxes of enqueued messages: subject `af.inbox.<conversation token>`.
pub const INBOX_STREAM: &str = "AF_INBOX";
pub const INBOX_SUBJECT_PREFIX: &str = "af.inbox";
/// Core NATS, no payload: the queue leader found a job no live worker can take (a conversation
/// without a worker, or whose worker went stale), so the scheduler should reconcile.
pub const DEMAND_SUBJECT: &str = "af.scheduler.demand";

/// Conversation history: one subject per conversation, `af.history.<conversation token>`; each
/// message is one appended batch that names the sequence of the batch before it.
pub const HISTORY_STREAM: &str = "AF_HISTORY";
pub const HISTORY_SUBJECT_PREFIX: &str = "af.history";

/// Agent profiles, key = escaped agentKey.
pub const PROFILES: &str = "af_profiles";
/// Versioned, encrypted secrets, key = escaped secretRef.
pub const SECRETS: &str = "af_secrets";
/// Runtime configuration rows (`provider`, `message`).
pub const RUNTIME_CONFIG: &str = "af_runtime_config";
/// Conversation → agent binding, written once by the first enqueue (create-only).
pub const CONVERSATIONS: &str = "af_conversations";
/// Queue state per conversation (cursor, head job, lease); written only by the queue leader.
pub const QUEUE_STATE: &str = "af_queue_state";
/// Worker rows, key = escaped workerId.
pub const WORKERS: &str = "af_workers";
/// Dead-lettered jobs, key = messageId.
pub const DEAD_LETTERS: &str = "af_dead_letters";
/// Web console sessions, key = SHA-256 of the session cookie (hex); entries expire by the
/// bucket's max age (`http.console_session_ttl_ms`), logout deletes them.
pub const CONSOLE_SESSIONS: &str = "af_console_sessions";
/// Leader leases; entries expire by the bucket's max age unless renewed.
pub const LEADERS: &str = "af_leaders";
/// Stack-wide switches such as the manual test clock.
pub const SYSTEM: &str = "af_system";
/// The hydration cache per conversation (last 64 history items and their fingerprint).
pub const HISTORY_CACHE: &str = "af_history_cache";
/// Snapshot records, key = snapshotId (`<conversation token>.<id>`).
pub const SNAPSHOTS: &str = "af_snapshots";
/// Identity bindings: `u.<consumer token>` per consumer user, plus Telegram index keys.
pub const BINDINGS: &str = "af_bindings";
/// Global skills: `skill.<slug>` rows and immutable `version.<slug>.<version token>` bundles.
pub const SKILLS: &str = "af_skills";
/// Attachment records, key = `<message token>.<storage id>`.
pub const ATTACHMENTS: &str = "af_attachments";
/// Metadata attached to a message after enqueue (`attachMessageMetadata`), key =
/// `<conversation token>.<message token>`.
pub const MESSAGE_METADATA: &str = "af_message_metadata";
/// Message templates: `t.<templateId>` documents and `k.<templateKey>` key claims.
pub const MESSAGE_TEMPLATES: &str = "af_message_templates";
/// Push templates: `t.<templateId>` documents and `k.<company token>.<key token>` key claims.
pub const PUSH_TEMPLATES: &str = "af_push_templates";
/// Push jobs, key = `j.<consumer token>.<jobId>` (a user's jobs are one prefix scan).
pub const PUSH_JOBS: &str = "af_push_jobs";
/// Dispatch audit rows, create-only: `d.<jobId>.<run key token>` per push run and
/// `b.<broadcastId>.<agent token>` per broadcast target. The key is the idempotency record.
pub const PUSH_DISPATCHES: &str = "af_push_dispatches";
/// Broadcast records, key = `b.<broadcastId>`.
pub const BROADCASTS: &str = "af_broadcasts";

/// Telegram bots: `bot.<botIdentity>` records and `wh.<sha256 of webhook secret>` index keys.
pub const TELEGRAM_BOTS: &str = "af_telegram_bots";
/// Pairing codes (`code.<code>`), per (user, agent) indexes and rate-limit windows.
pub const PAIRING: &str = "af_pairing";
/// Raw Telegram updates as ingress accepted them, subject `af.telegram.updates.<botIdentity>`,
/// deduplicated by `<botIdentity>:<update_id>`; removed once the consumer acknowledged them.
pub const TELEGRAM_UPDATES_STREAM: &str = "AF_TELEGRAM_UPDATES";
pub const TELEGRAM_UPDATES_SUBJECT_PREFIX: &str = "af.telegram.updates";
/// The durable consumer of the hydration service that processes Telegram updates.
pub const TELEGRAM_UPDATES_CONSUMER: &str = "telegram-updates";

pub fn telegram_updates_subject(bot_identity: &str) -> String {
    format!("{TELEGRAM_UPDATES_SUBJECT_PREFIX}.{bot_identity}")
}

/// Object store of workspace snapshot archives, object name = snapshotId.
pub const SNAPSHOT_ARCHIVES: &str = "af_snapshot_archives";
/// Object store of inbound media, object name = storageId.
pub const MEDIA: &str = "af_media";

/// How long a leader lease lives without renewal. Leader liveness is about processes, so it
/// runs on server (real) time even when the business clock is manual.
pub const LEADER_TTL: Duration = Duration::from_secs(3);

pub fn inbox_subject(conversation_token: &str) -> String {
    format!("{INBOX_SUBJECT_PREFIX}.{conversation_token}")
}

pub fn history_subject(conversation_token: &str) -> String {
    format!("{HISTORY_SUBJECT_PREFIX}.{conversation_token}")
}

fn bucket(name: &str, description: &str, history: i64, settings: &Settings) -> kv::Config {
    kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history,
        storage: stream::StorageType::File,
        num_replicas: settings.nats.replicas,
        ..Default::default()
    }
}

fn bucket_configs(settings: &Settings) -> Vec<kv::Config> {
    vec![
        bucket(PROFILES, "agent profiles", 1, settings),
        bucket(SECRETS, "encrypted, versioned secrets", 1, settings),
        bucket(RUNTIME_CONFIG, "provider and message runtime configuration", 1, settings),
        bucket(CONVERSATIONS, "conversation to agent bindings", 1, settings),
        bucket(QUEUE_STATE, "per-conversation queue cursor and lease", 1, settings),
        bucket(WORKERS, "worker rows", 1, settings),
        bucket(DEAD_LETTERS, "dead-lettered jobs", 1, settings),
        kv::Config { max_age: LEADER_TTL, ..bucket(LEADERS, "leader leases", 1, settings) },
        bucket(SYSTEM, "stack-wide switches (test clock)", 1, settings),
        bucket(HISTORY_CACHE, "hydration cache: last history items per conversation", 1, settings),
        bucket(SNAPSHOTS, "workspace snapshot records", 1, settings),
        bucket(BINDINGS, "identity bindings", 1, settings),
        bucket(SKILLS, "global skills, versions and releases", 1, settings),
        bucket(ATTACHMENTS, "message attachment records", 1, settings),
        bucket(MESSAGE_METADATA, "metadata attached to messages after enqueue", 1, settings),
        bucket(MESSAGE_TEMPLATES, "message templates and their key claims", 1, settings),
        bucket(PUSH_TEMPLATES, "push templates and their key claims", 1, settings),
        bucket(PUSH_JOBS, "push jobs", 1, settings),
        bucket(PUSH_DISPATCHES, "push and broadcast dispatch audit rows", 1, settings),
        bucket(BROADCASTS, "broadcast records", 1, settings),
        bucket(TELEGRAM_BOTS, "telegram bots and webhook secret index", 1, settings),
        bucket(PAIRING, "pairing codes and their rate limits", 1, settings),
        kv::Config {
            max_age: Duration::from_millis(settings.http.console_session_ttl_ms),
            ..bucket(CONSOLE_SESSIONS, "web console sessions", 1, settings)
        },
    ]
}

fn object_store_configs(settings: &Settings) -> Vec<object_store::Config> {
    let store = |name: &str, description: &str| object_store::Config {
        bucket: name.to_string(),
        description: Some(description.to_string()),
        storage: stream::StorageType::File,
        num_replicas: settings.nats.replicas,
        ..Default::default()
    };
    vec![store(SNAPSHOT_ARCHIVES, "workspace snapshot archives"), store(MEDIA, "inbound media")]
}

fn history_config(settings: &Settings) -> stream::Config {
    stream::Config {
        name: HISTORY_STREAM.to_string(),
        description: Some("conversation history, one subject per conversation".to_string()),
        subjects: vec![format!("{HISTORY_SUBJECT_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: settings.nats.replicas,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_millis(settings.history.retention_ms),
        allow_direct: true,
        ..Default::default()
    }
}

fn inbox_config(settings: &Settings) -> stream::Config {
    stream::Config {
        name: INBOX_STREAM.to_string(),
        description: Some("per-conversation message inboxes".to_string()),
        subjects: vec![format!("{INBOX_SUBJECT_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: settings.nats.replicas,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_millis(settings.queue.inbox_max_age_ms),
        duplicate_window: Duration::from_millis(settings.queue.idempotency_window_ms),
        max_message_size: (settings.queue.max_message_bytes + 4096) as i32,
        allow_direct: true,
        ..Default::default()
    }
}

fn telegram_updates_config(settings: &Settings) -> stream::Config {
    stream::Config {
        name: TELEGRAM_UPDATES_STREAM.to_string(),
        description: Some("raw telegram updates, deduplicated by bot and update_id".to_string()),
        subjects: vec![format!("{TELEGRAM_UPDATES_SUBJECT_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: settings.nats.replicas,
        retention: stream::RetentionPolicy::WorkQueue,
        // Telegram keeps an undelivered update at most 24 hours; so do we, unprocessed.
        max_age: Duration::from_millis(settings.telegram.update_dedup_window_ms.max(86_400_000)),
        duplicate_window: Duration::from_millis(settings.telegram.update_dedup_window_ms),
        max_message_size: (settings.telegram.max_update_bytes + 4096) as i32,
        ..Default::default()
    }
}

/// Creates or updates every stream and bucket. Safe to run from any number of services.
pub async fn provision(js: &jetstream::Context, settings: &Settings) -> anyhow::Result<()> {
    use anyhow::Context as _;
    for attempt in 1..=5 {
        let result: anyhow::Result<()> = async {
            js.create_or_update_stream(inbox_config(settings))
                .await
                .with_context(|| format!("provisioning stream {INBOX_STREAM}"))?;
            js.create_or_update_stream(history_config(settings))
                .await
                .with_context(|| format!("provisioning stream {HISTORY_STREAM}"))?;
            js.create_or_update_stream(telegram_updates_config(settings))
                .await
                .with_context(|| format!("provisioning stream {TELEGRAM_UPDATES_STREAM}"))?;
            js.create_or_update_stream(crate::audit::stream_config(settings))
                .await
                .with_context(|| format!("provisioning stream {}", crate::audit::STREAM))?;
            for cfg in bucket_configs(settings) {
                let name = cfg.bucket.clone();
                js.create_or_update_key_value(cfg).await.with_context(|| format!("provisioning bucket {name}"))?;
            }
            for cfg in object_store_configs(settings) {
                let name = cfg.bucket.clone();
                provision_object_store(js, cfg).await.with_context(|| format!("provisioning object store {name}"))?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            // Two services provisioning at the same instant can see a transient
            // "already in use" from the server; the next pass finds everything in place.
            Err(e) if attempt < 5 => {
                tracing::debug!(error = %format!("{e:#}"), attempt, "provisioning raced, retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Object stores have no create-or-update in async-nats: create, and accept one that exists.
async fn provision_object_store(js: &jetstream::Context, cfg: object_store::Config) -> anyhow::Result<()> {
    if js.get_object_store(&cfg.bucket).await.is_ok() {
        return Ok(());
    }
    js.create_object_store(cfg).await?;
    Ok(())
}

/// Opened handles to every bucket.
#[derive(Clone)]
pub struct Buckets {
    pub profiles: JsonStore,
    pub secrets: JsonStore,
    pub runtime_config: JsonStore,
    pub conversations: JsonStore,
    pub queue_state: JsonStore,
    pub workers: JsonStore,
    pub dead_letters: JsonStore,
    pub leaders: JsonStore,
    pub system: JsonStore,
    pub history_cache: JsonStore,
    pub snapshots: JsonStore,
    pub bindings: JsonStore,
    pub skills: JsonStore,
    pub attachments: JsonStore,
    pub message_metadata: JsonStore,
    pub message_templates: JsonStore,
    pub push_templates: JsonStore,
    pub push_jobs: JsonStore,
    pub push_dispatches: JsonStore,
    pub broadcasts: JsonStore,
    pub telegram_bots: JsonStore,
    pub pairing: JsonStore,
    pub console_sessions: JsonStore,
    pub snapshot_archives: object_store::ObjectStore,
    pub media: object_store::ObjectStore,
}

async fn open_objects(js: &jetstream::Context, name: &str) -> anyhow::Result<object_store::ObjectStore> {
    js.get_object_store(name).await.map_err(|e| anyhow::anyhow!("opening object store {name}: {e}"))
}

impl Buckets {
    pub async fn open(js: &jetstream::Context) -> anyhow::Result<Self> {
        let open = |name: &'static str| async move {
            js.get_key_value(name)
                .await
                .map(|kv| JsonStore::new(kv, js.client()))
                .map_err(|e| anyhow::anyhow!("opening bucket {name}: {e}"))
        };
        Ok(Self {
            profiles: open(PROFILES).await?,
            secrets: open(SECRETS).await?,
            runtime_config: open(RUNTIME_CONFIG).await?,
            conversations: open(CONVERSATIONS).await?,
            queue_state: open(QUEUE_STATE).await?,
            workers: open(WORKERS).await?,
            dead_letters: open(DEAD_LETTERS).await?,
            leaders: open(LEADERS).await?,
            system: open(SYSTEM).await?,
            history_cache: open(HISTORY_CACHE).await?,
            snapshots: open(SNAPSHOTS).await?,
            bindings: open(BINDINGS).await?,
            skills: open(SKILLS).await?,
            attachments: open(ATTACHMENTS).await?,
            message_metadata: open(MESSAGE_METADATA).await?,
            message_templates: open(MESSAGE_TEMPLATES).await?,
            push_templates: open(PUSH_TEMPLATES).await?,
            push_jobs: open(PUSH_JOBS).await?,
            push_dispatches: open(PUSH_DISPATCHES).await?,
            broadcasts: open(BROADCASTS).await?,
            telegram_bots: open(TELEGRAM_BOTS).await?,
            pairing: open(PAIRING).await?,
            console_sessions: open(CONSOLE_SESSIONS).await?,
            snapshot_archives: open_objects(js, SNAPSHOT_ARCHIVES).await?,
            media: open_objects(js, MEDIA).await?,
        })
    }
}
