//! The queue's contracts: enqueue, claim, leases, dead letters, and the worker rows the queue
//! leader keeps (spec §3.4, §3.14).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{AgentKey, ConversationId, LeaseId, MessageId, SnapshotId, WorkerId};
use crate::model::{Assignment, MachineRef, WorkerRow, WorkerStatus};

/// `enqueueMessage` (spec §3.4.1).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnqueueArgs {
    pub conversation_id: ConversationId,
    pub agent_key: AgentKey,
    /// `{provider, providerUserId, messageText, externalMessageId?, rawUpdateJson?, metadata?,
    /// attachments?}`; attachments that carry a `storageId` are recorded with the message.
    #[schemars(schema_with = "payload_schema")]
    pub payload: serde_json::Map<String, serde_json::Value>,
    /// 0–100, default 50; higher first (within a conversation, order is enqueue order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<f64>,
    /// Earliest claim time (ms since the epoch); default now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<i64>,
    /// 1–100, default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i64>,
    /// A second enqueue with the same key for the same conversation returns the first message's
    /// id and queues nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored: the provider configuration is stored runtime configuration
    /// (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

fn payload_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let attachment = generator.subschema_for::<PayloadAttachment>();
    schemars::json_schema!({
        "type": "object",
        "required": ["provider", "providerUserId", "messageText"],
        "properties": {
            "provider": {"type": "string", "description": "`telegram`, `system_push`, `api`, ..."},
            "providerUserId": {"type": "string"},
            "messageText": {"type": "string"},
            "externalMessageId": {"type": "string"},
            "rawUpdateJson": {"type": "string"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "attachments": {"type": "array", "items": attachment}
        }
    })
}

/// An attachment given in an enqueue payload (spec §1.3), as the original's Telegram ingress
/// wrote it after `prepareTelegramAttachmentsForEnqueue`. Enqueue records one attachment per item
/// (see `attachMessageMedia` for the record) and stores the item with the record's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PayloadAttachment {
    pub kind: super::attachments::AttachmentKind,
    /// Only `ready` (the default) may be enqueued: the file must be there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<super::attachments::AttachmentStatus>,
    /// A file uploaded with `POST /v1/media`.
    pub storage_id: crate::ids::StorageId,
    /// The Telegram `file_id` it was downloaded from; empty for other sources.
    #[serde(default)]
    pub telegram_file_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Lower-cased when stored; default: the `Content-Type` the file was uploaded with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// Replaced by the stored file's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Default: now + the message configuration's `telegramAttachmentRetentionMs` (7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Millis>,
    /// Accepted and ignored: download links are made when the payload is served, for the
    /// caller that may follow them (spec §1.3: never stored; §6.1 S2).
    #[serde(default, skip_serializing)]
    pub download_url: Ignored,
}

impl PayloadAttachment {
    /// Reads `payload.attachments` (absent or `null` is none). A malformed item is a
    /// `400 invalid_input` naming its path, e.g. `payload.attachments[1].storageId: …`.
    pub fn parse_list(value: Option<&serde_json::Value>) -> Result<Vec<Self>, crate::OpError> {
        const AT: &str = "payload.attachments";
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(Vec::new());
        };
        let items: Vec<Self> = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let at = if path == "." { AT.to_string() } else { format!("{AT}{path}") };
            crate::OpError::invalid(format!("{at}: {}", e.into_inner()))
        })?;
        for (i, item) in items.iter().enumerate() {
            if item.status == Some(super::attachments::AttachmentStatus::Expired) {
                return Err(crate::OpError::invalid(format!(
                    "{AT}[{i}].status: an attachment is enqueued 'ready'; an expired file cannot be attached"
                )));
            }
            if let Some(first) = items[..i].iter().position(|other| other.storage_id == item.storage_id) {
                return Err(crate::OpError::invalid(format!("{AT}[{i}].storageId: the file is already {AT}[{first}]")));
            }
        }
        Ok(items)
    }
}

/// `claimNextJob` (spec §3.4.2) with a long poll.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimArgs {
    pub worker_id: WorkerId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    /// Wait up to this long for a job (capped by `queue.claim_wait_max_ms`); 0 answers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// A leased job.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub agent_key: AgentKey,
    pub lease_id: LeaseId,
    pub lease_expires_at: Millis,
    /// The payload as enqueued.
    pub payload: Box<RawValue>,
    /// Failed attempts so far, lease expiries included.
    pub attempts: u32,
    /// The W3C trace context of the message's dispatch, when the control plane exports traces:
    /// a worker continues the message's trace from it (sends it as the `traceparent` header of
    /// its calls, parents its own spans on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// `heartbeatJob` and `completeJob` (spec §3.4.3–3.4.4).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseArgs {
    pub worker_id: WorkerId,
    pub message_id: MessageId,
    pub lease_id: LeaseId,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

/// `completeAndClaimNext`: a lease to complete, and how long to wait for the next job.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteAndClaimArgs {
    pub worker_id: WorkerId,
    pub message_id: MessageId,
    pub lease_id: LeaseId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompleteAndClaim {
    /// What `completeJob` would have answered.
    pub completed: bool,
    /// The next job, or null.
    pub next: Option<Claim>,
}

/// `failJob` (spec §3.4.5).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailArgs {
    pub worker_id: WorkerId,
    pub message_id: MessageId,
    pub lease_id: LeaseId,
    pub error_message: String,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailOutcome {
    pub requeued: bool,
    pub dead_lettered: bool,
    pub next_scheduled_for: Option<Millis>,
}

/// `releaseStuckJobs` (spec §3.4.6).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseOutcome {
    pub requeued: u32,
    pub unlocked: u32,
    /// Lease expiries count as attempts (spec §6.2 Q2): jobs that ran out of them.
    pub dead_lettered: u32,
}

/// Arguments of the operations that take only the original's optional `nowMs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NowArgs {
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Processing,
    Done,
    DeadLetter,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListJobsArgs {
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConversationArgs {
    pub conversation_id: ConversationId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A job as the read operations show it (the original's row view).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    #[serde(rename = "_id")]
    pub id: MessageId,
    #[serde(rename = "_creationTime")]
    pub creation_time: Millis,
    pub conversation_id: ConversationId,
    pub agent_key: AgentKey,
    pub status: JobStatus,
    pub priority: i64,
    pub scheduled_for: Millis,
    pub attempts: u32,
    pub max_attempts: u32,
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageIdArgs {
    pub message_id: MessageId,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerIdArgs {
    pub worker_id: WorkerId,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerToken {
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordSnapshotArgs {
    pub worker_id: WorkerId,
    pub snapshot_id: SnapshotId,
}

/// `getWorkerControlState` (spec §3.14.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlState {
    pub should_stop: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignmentArgs {
    pub conversation_id: ConversationId,
    pub agent_key: AgentKey,
    pub lease_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at: Option<Millis>,
}

/// `upsertWorkerState` (spec §3.14.2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpsertWorkerArgs {
    pub worker_id: WorkerId,
    pub provider: String,
    pub status: WorkerStatus,
    pub load: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_shutdown_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// Absent: unchanged; `null`: cleared; object: replaced.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    pub assignment: Option<Option<AssignmentArgs>>,
    #[serde(default)]
    pub clear_last_snapshot_id: bool,
    #[serde(default)]
    pub clear_machine_ref: bool,
    #[serde(default)]
    pub clear_volume_id: bool,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

impl UpsertWorkerArgs {
    /// A move of `worker_id` to `status` with `load`, changing nothing else.
    pub fn new(worker_id: WorkerId, provider: impl Into<String>, status: WorkerStatus, load: u32) -> Self {
        Self {
            worker_id,
            provider: provider.into(),
            status,
            load,
            scheduled_shutdown_at: None,
            stopped_at: None,
            machine_id: None,
            app_name: None,
            region: None,
            volume_id: None,
            assignment: None,
            clear_last_snapshot_id: false,
            clear_machine_ref: false,
            clear_volume_id: false,
            now_ms: Ignored,
        }
    }
}

fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// A worker row as the original's views return it (spec §1.4): every optional field present,
/// `null` when unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    pub worker_id: String,
    pub provider: String,
    pub volume_id: Option<String>,
    pub machine_ref: Option<MachineRef>,
    pub status: WorkerStatus,
    pub load: u32,
    pub heartbeat_at: Millis,
    pub last_claim_at: Option<Millis>,
    pub scheduled_shutdown_at: Option<Millis>,
    pub stopped_at: Option<Millis>,
    pub last_snapshot_id: Option<String>,
    pub assignment: Option<Assignment>,
    pub capabilities: Vec<String>,
}

impl From<WorkerRow> for WorkerView {
    fn from(row: WorkerRow) -> Self {
        Self {
            worker_id: row.worker_id,
            provider: row.provider,
            volume_id: row.volume_id,
            machine_ref: row.machine_ref,
            status: row.status,
            load: row.load,
            heartbeat_at: row.heartbeat_at,
            last_claim_at: row.last_claim_at,
            scheduled_shutdown_at: row.scheduled_shutdown_at,
            stopped_at: row.stopped_at,
            last_snapshot_id: row.last_snapshot_id,
            assignment: row.assignment,
            capabilities: row.capabilities,
        }
    }
}

impl From<WorkerView> for WorkerRow {
    fn from(view: WorkerView) -> Self {
        Self {
            worker_id: view.worker_id,
            provider: view.provider,
            volume_id: view.volume_id,
            machine_ref: view.machine_ref,
            status: view.status,
            load: view.load,
            heartbeat_at: view.heartbeat_at,
            last_claim_at: view.last_claim_at,
            scheduled_shutdown_at: view.scheduled_shutdown_at,
            stopped_at: view.stopped_at,
            last_snapshot_id: view.last_snapshot_id,
            assignment: view.assignment,
            capabilities: view.capabilities,
        }
    }
}

/// `explainConversation`: what a conversation is waiting for, in one answer (the web console's
/// inspector: "why was this message not answered?").
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExplainArgs {
    pub conversation_id: ConversationId,
}

/// Where a conversation's oldest unanswered message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing is waiting: every message was answered (or there is none).
    Idle,
    /// Due, and no live worker serves the conversation: the worker pool must spawn one.
    WaitingForWorker,
    /// Due, and a live worker is assigned: it has not claimed the message yet.
    WaitingForClaim,
    /// Not due before `scheduledFor` (enqueued for later).
    Scheduled,
    /// An attempt failed; retried at `scheduledFor`.
    RetryBackoff,
    /// A worker holds the lease and is processing it.
    Processing,
    /// The holder's lease ran out; lease recovery puts the message back.
    LeaseExpired,
    /// The newest message was dead-lettered after its last attempt.
    DeadLettered,
}

/// The answer of `explainConversation`. Jobs come without their payloads (message texts).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationExplanation {
    pub conversation_id: String,
    pub verdict: Verdict,
    /// The verdict in one sentence, for an operator.
    pub reason: String,
    /// The oldest unanswered message (or the dead-lettered one the verdict is about).
    pub message: Option<JobView>,
    /// Its lease, while a worker holds it.
    pub lease: Option<crate::model::Lease>,
    /// The lease holder, or else the live worker assigned to the conversation.
    pub worker: Option<WorkerView>,
    /// The conversation's newest workspace snapshot.
    pub last_snapshot: Option<super::snapshots::SnapshotView>,
    /// The W3C trace id the message was enqueued under (its spans, from enqueue on).
    pub trace_id: Option<String>,
    /// Unanswered messages of the conversation.
    pub unanswered: u32,
    /// The conversation's newest jobs, newest first.
    pub jobs: Vec<JobView>,
    /// The time the answer was computed at.
    pub now: Millis,
}

/// `getWorkerStats` (spec §3.4.7).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatsView {
    pub active_count: u64,
    pub idle_count: u64,
    pub workers: Vec<WorkerStatsRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatsRow {
    pub worker_id: String,
    pub status: WorkerStatus,
    pub load: u32,
    pub heartbeat_at: Millis,
    pub machine_id: Option<String>,
    pub app_name: Option<String>,
}

/// One conversation the worker pool must serve (`getActiveConversationsForScheduler`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DemandRow {
    pub conversation_id: String,
    pub agent_key: String,
    /// A job is claimable now.
    pub ready: bool,
    /// A job is in flight.
    pub leased: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemandArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_attachments_name_the_path_of_a_malformed_item() {
        let parse = |v: serde_json::Value| PayloadAttachment::parse_list(Some(&v));
        let ok = parse(json!([{"kind": "voice", "storageId": "m1", "downloadUrl": "http://x"}])).expect("valid");
        assert_eq!(ok[0].kind, super::super::attachments::AttachmentKind::Voice);
        assert_eq!(
            serde_json::to_value(&ok[0]).expect("json"),
            json!({"kind": "voice", "storageId": "m1", "telegramFileId": ""})
        );
        assert!(PayloadAttachment::parse_list(None).expect("none").is_empty());
        assert!(parse(serde_json::Value::Null).expect("null").is_empty());
        let err = |v: serde_json::Value| parse(v).expect_err("refused").message;
        assert!(
            err(json!([{"kind": "photo", "storageId": "m1"}, {"kind": "gif", "storageId": "m2"}]))
                .starts_with("payload.attachments[1].kind: unknown variant `gif`")
        );
        assert!(
            err(json!([{"kind": "photo", "storageId": "a b"}]))
                .starts_with("payload.attachments[0].storageId: invalid storage id")
        );
        assert!(err(json!({"kind": "photo"})).starts_with("payload.attachments: invalid type: map"));
        assert!(
            err(json!([{"kind": "photo", "storageId": "m1", "status": "expired"}]))
                .starts_with("payload.attachments[0].status")
        );
        assert!(
            err(json!([{"kind": "photo", "storageId": "m1"}, {"kind": "video", "storageId": "m1"}]))
                .starts_with("payload.attachments[1].storageId: the file is already payload.attachments[0]")
        );
    }
}
