//! Records stored in KV that more than one service reads. Field names are the original's
//! (camelCase on the wire and at rest).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// One agent (`af_profiles`, key = escaped agentKey).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentProfile {
    pub agent_key: String,
    pub version: String,
    pub secrets_ref: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_config: Option<BridgeConfig>,
    pub enabled: bool,
    /// The company of the consumer app the agent serves; a broadcast of a company targets its
    /// enabled agents (spec §6.7 P1). Absent: the agent belongs to no company.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BridgeConfig {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_key_secret_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_base_url_map_json_secret_ref: Option<String>,
}

/// Key of the message runtime configuration row in `af_runtime_config`.
pub const MESSAGE_CONFIG_KEY: &str = "message";
/// Key of the provider runtime configuration row in `af_runtime_config`.
pub const PROVIDER_CONFIG_KEY: &str = "provider";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_attachment_retention_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_slug: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_size_gb: Option<f64>,
}

/// Key of the scaling policy row in `af_runtime_config`.
pub const SCALING_CONFIG_KEY: &str = "scaling";

/// How the worker pool scales (spec §2.1 `scaling`). Stored as runtime configuration so every
/// reconcile — triggered, periodic or called — uses the same policy (fix L4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingPolicy {
    /// Most live worker machines (a hard cap, fix L5).
    pub max_workers: u32,
    /// Most workers spawned per reconcile.
    pub spawn_step: u32,
    /// A worker idle this long is drained.
    pub idle_timeout_ms: i64,
    /// Time between periodic reconciles while there is work or teardown pending.
    pub reconcile_interval_ms: i64,
    /// A draining worker that has not delivered its final snapshot by then is torn down anyway
    /// (fix L10). Added by the rewrite; default `scheduler.drain_deadline_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline_ms: Option<i64>,
    /// The original's field, accepted and kept; the original never used it either (spec §6.2
    /// Q6), since demand is counted in conversations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_per_worker_target: Option<f64>,
}

/// A stored runtime configuration row with its last update time.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfigRow<T> {
    pub config: T,
    pub updated_at: Millis,
}

/// The conversation → agent binding (`af_conversations`), created once by the first enqueue
/// and never changed: an enqueue for another agent is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationRecord {
    pub conversation_id: String,
    pub agent_key: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    Active,
    Draining,
    Stopping,
    Stopped,
}

impl WorkerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }

    /// The lifecycle of spec §3.14.1: active→active|draining, draining→draining|stopping,
    /// stopping→stopping|stopped, stopped→stopped.
    pub fn can_become(self, next: WorkerStatus) -> bool {
        use WorkerStatus::{Active, Draining, Stopped, Stopping};
        matches!(
            (self, next),
            (Active, Active | Draining)
                | (Draining, Draining | Stopping)
                | (Stopping, Stopping | Stopped)
                | (Stopped, Stopped)
        )
    }

    pub fn is_running(self) -> bool {
        !matches!(self, Self::Stopped)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineRef {
    pub app_name: String,
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Sticky ownership of one conversation by one worker (or a spawn-time pre-assignment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub conversation_id: String,
    pub agent_key: String,
    pub lease_id: String,
    pub assigned_at: Millis,
}

/// A worker row (`af_workers`, key = escaped workerId).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerRow {
    pub worker_id: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_ref: Option<MachineRef>,
    pub status: WorkerStatus,
    pub load: u32,
    pub heartbeat_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_claim_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_shutdown_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<Assignment>,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The queue leader's durable view of one conversation (`af_queue_state`, key = conversation
/// token); written only by queue-manager, read by hydration to fence side effects by lease. Invariant: every inbox message of this
/// conversation with sequence `<= done_seq` is finished (done or dead-lettered); the first
/// unfinished one, once attempted, is `head`. Only the head can be in flight, which is what
/// keeps a conversation strictly in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueState {
    pub conversation_id: String,
    pub agent_key: String,
    pub done_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadState>,
    /// The lease that completed the last finished job, so a worker whose `completeJob` reply
    /// was lost (e.g. in a leader failover) gets `true` when it retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_completed: Option<CompletedLease>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompletedLease {
    pub message_id: String,
    pub lease_id: String,
    pub worker_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeadState {
    pub seq: u64,
    pub message_id: String,
    /// Failed attempts, lease expiries included.
    pub attempts: u32,
    /// Not claimable before this instant (retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub lease_id: String,
    pub worker_id: String,
    pub expires_at: Millis,
    pub claimed_at: Millis,
}

#[cfg(test)]
mod tests {
    use super::WorkerStatus::*;

    #[test]
    fn lifecycle_only_moves_forward() {
        let all = [Active, Draining, Stopping, Stopped];
        let allowed = [
            (Active, Active),
            (Active, Draining),
            (Draining, Draining),
            (Draining, Stopping),
            (Stopping, Stopping),
            (Stopping, Stopped),
            (Stopped, Stopped),
        ];
        for from in all {
            for to in all {
                assert_eq!(from.can_become(to), allowed.contains(&(from, to)), "{from:?} -> {to:?}");
            }
        }
    }
}
