//! What the queue stores: the job published to a conversation's inbox, the per-conversation
//! queue state (the leader's cursor, head job and lease, in `af_queue_state`) and dead-letter
//! records, plus the argument and result shapes of the queue operations.

use common::clock::Millis;
pub use common::model::{CompletedLease, HeadState, Lease, QueueState};
use serde::{Deserialize, Serialize};

/// A message as enqueued: the body of one inbox stream message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub message_id: String,
    pub conversation_id: String,
    pub agent_key: String,
    /// Kept as the JSON text it was enqueued as: the queue never looks inside it.
    pub payload: Box<serde_json::value::RawValue>,
    pub priority: i64,
    pub scheduled_for: Millis,
    pub max_attempts: u32,
    pub enqueued_at: Millis,
}

/// A dead-lettered job (`af_dead_letters`, key = messageId).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub job: Job,
    pub seq: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub dead_lettered_at: Millis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnqueueArgs {
    pub conversation_id: String,
    pub agent_key: String,
    pub payload: serde_json::Map<String, serde_json::Value>,
    pub priority: Option<f64>,
    pub scheduled_for: Option<i64>,
    pub max_attempts: Option<i64>,
    pub idempotency_key: Option<String>,
    /// Accepted for compatibility with the original and ignored: the provider configuration
    /// lives in stored runtime config (spec §6.3 L6).
    pub provider_config: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimArgs {
    pub worker_id: String,
    pub conversation_id: Option<String>,
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub message_id: String,
    pub conversation_id: String,
    pub agent_key: String,
    pub lease_id: String,
    pub lease_expires_at: Millis,
    pub payload: Box<serde_json::value::RawValue>,
    pub attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseArgs {
    pub worker_id: String,
    pub message_id: String,
    pub lease_id: String,
    pub provider_config: Option<serde_json::Value>,
}

/// `completeAndClaimNext`: a lease to complete, and how long to wait for the next job.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteAndClaimArgs {
    pub worker_id: String,
    pub message_id: String,
    pub lease_id: String,
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailArgs {
    pub worker_id: String,
    pub message_id: String,
    pub lease_id: String,
    pub error_message: String,
    pub provider_config: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailOutcome {
    pub requeued: bool,
    pub dead_lettered: bool,
    pub next_scheduled_for: Option<Millis>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseArgs {
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseOutcome {
    pub requeued: u32,
    pub unlocked: u32,
    pub dead_lettered: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueStats {
    pub queued_ready: u64,
    pub processing: u64,
    pub dead_letter: u64,
    pub queued_total: u64,
    pub ready_conversations: u64,
    /// Long-poll claims currently waiting for a job (idle workers).
    pub parked_claims: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Processing,
    Done,
    DeadLetter,
    Failed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListJobsArgs {
    pub status: JobStatus,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConversationArgs {
    pub conversation_id: String,
    pub limit: Option<usize>,
}

/// A job as the read operations show it (the original's row view).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_creationTime")]
    pub creation_time: Millis,
    pub conversation_id: String,
    pub agent_key: String,
    pub status: JobStatus,
    pub priority: i64,
    pub scheduled_for: Millis,
    pub attempts: u32,
    pub max_attempts: u32,
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageIdArgs {
    pub message_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerIdArgs {
    pub worker_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordSnapshotArgs {
    pub worker_id: String,
    pub snapshot_id: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlState {
    pub should_stop: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignmentArgs {
    pub conversation_id: String,
    pub agent_key: String,
    pub lease_id: String,
    pub assigned_at: Option<Millis>,
}

/// `upsertWorkerState` (spec §3.14.2) without the client clock.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpsertWorkerArgs {
    pub worker_id: String,
    pub provider: String,
    pub status: common::model::WorkerStatus,
    pub load: u32,
    pub scheduled_shutdown_at: Option<Millis>,
    pub stopped_at: Option<Millis>,
    pub machine_id: Option<String>,
    pub app_name: Option<String>,
    pub region: Option<String>,
    pub volume_id: Option<String>,
    /// Absent: unchanged; `null`: cleared; object: replaced.
    #[serde(default, deserialize_with = "double_option")]
    pub assignment: Option<Option<AssignmentArgs>>,
    #[serde(default)]
    pub clear_last_snapshot_id: bool,
    #[serde(default)]
    pub clear_machine_ref: bool,
    #[serde(default)]
    pub clear_volume_id: bool,
}

fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatsView {
    pub active_count: u64,
    pub idle_count: u64,
    pub workers: Vec<WorkerStatsRow>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatsRow {
    pub worker_id: String,
    pub status: common::model::WorkerStatus,
    pub load: u32,
    pub heartbeat_at: Millis,
    pub machine_id: Option<String>,
    pub app_name: Option<String>,
}

/// One conversation the worker pool must serve (`getActiveConversationsForScheduler`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DemandRow {
    pub conversation_id: String,
    pub agent_key: String,
    /// A job is claimable now.
    pub ready: bool,
    /// A job is in flight.
    pub leased: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemandArgs {
    pub limit: Option<usize>,
}
