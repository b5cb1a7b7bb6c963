//! The contracts of push messaging (spec §1.14, §3.18): company push templates, per-user push
//! jobs on a time-zone schedule, their dispatch, and broadcasts to a company's agents. Served by
//! push-dispatcher.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::clock::Millis;
use crate::ids::{AgentKey, BroadcastId, CompanyId, ConsumerUserId, MessageId, PushJobId, PushTemplateId, TemplateKey};

/// How often a push repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Periodicity {
    Manual,
    Daily,
    Weekly,
    Monthly,
}

impl Periodicity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
        }
    }
}

/// A monthly slot's day: 1..31 (clamped to the month's last day, so 31 fires on the 30th of a
/// 30-day month) or `"last"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum DayOfMonth {
    Day(serde_json::Number),
    Named(String),
}

/// When a push fires, in the job's time zone (spec §1.14). `time` is local `HH:mm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// Only when triggered.
    Manual,
    Daily {
        time: String,
    },
    /// `weekday` 1 = Monday … 7 = Sunday.
    Weekly {
        weekday: serde_json::Number,
        time: String,
    },
    Monthly {
        #[serde(rename = "dayOfMonth")]
        day_of_month: DayOfMonth,
        time: String,
    },
}

impl Schedule {
    pub fn kind(&self) -> Periodicity {
        match self {
            Self::Manual => Periodicity::Manual,
            Self::Daily { .. } => Periodicity::Daily,
            Self::Weekly { .. } => Periodicity::Weekly,
            Self::Monthly { .. } => Periodicity::Monthly,
        }
    }
}

/// What the dispatcher does with slots that passed while it could not fire them (an outage
/// longer than `push.catch_up_grace_ms`). Not in the original, which dropped them (spec §6.7
/// P3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Missed slots are dropped; the job fires next at its next slot after now.
    #[default]
    Skip,
    /// The newest missed slot fires once (run key of that slot), older ones are dropped.
    Latest,
}

// ---------------------------------------------------------------------------------------------
// Push templates.

/// `createPushTemplate` (spec §3.18.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePushTemplateArgs {
    pub company_id: CompanyId,
    /// Unique within the company (`Template key '<templateKey>' already exists for company`).
    pub template_key: TemplateKey,
    pub title: String,
    pub text: String,
    pub periodicity: Periodicity,
    /// Slots of the template's periodicity (none for a manual template).
    pub suggested_times: Vec<Schedule>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// At most 256 bytes.
    pub actor_user_id: String,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `updatePushTemplate` (spec §3.18.3): existing jobs are not affected.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdatePushTemplateArgs {
    pub template_id: PushTemplateId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodicity: Option<Periodicity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggested_times: Option<Vec<Schedule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// At most 256 bytes.
    pub actor_user_id: String,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushTemplateIdArgs {
    pub template_id: PushTemplateId,
}

/// `listPushTemplatesByCompany` (spec §3.18.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListPushTemplatesArgs {
    pub company_id: CompanyId,
    /// Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_disabled: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushTemplateView {
    #[serde(rename = "_id")]
    pub id: PushTemplateId,
    pub company_id: String,
    pub template_key: String,
    pub title: String,
    pub text: String,
    pub periodicity: Periodicity,
    pub suggested_times: Vec<Schedule>,
    pub enabled: bool,
    pub created_by: String,
    pub updated_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

// ---------------------------------------------------------------------------------------------
// Push jobs.

/// `createPushJobFromTemplate` (spec §3.18.4).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePushJobFromTemplateArgs {
    pub company_id: CompanyId,
    pub consumer_user_id: ConsumerUserId,
    pub template_id: PushTemplateId,
    /// IANA time zone, e.g. `Europe/Rome`.
    pub timezone: String,
    /// Default: manual for a manual template, else the template's first suggested time of its
    /// periodicity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Default `skip` (an addition, spec §6.7 P3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `createPushJobFromTemplateForAgent` (spec §3.18.6): as createPushJobFromTemplate, for the
/// user's current agent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePushJobFromTemplateForAgentArgs {
    pub company_id: CompanyId,
    pub consumer_user_id: ConsumerUserId,
    /// Must be the agent of the user's active binding
    /// (`Agent key must match the current active binding for the user`).
    pub agent_key: AgentKey,
    pub template_id: PushTemplateId,
    /// IANA time zone, e.g. `Europe/Rome`.
    pub timezone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `createPushJobCustom` (spec §3.18.4).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePushJobCustomArgs {
    pub company_id: CompanyId,
    pub consumer_user_id: ConsumerUserId,
    pub title: String,
    pub text: String,
    pub periodicity: Periodicity,
    /// IANA time zone, e.g. `Europe/Rome`.
    pub timezone: String,
    /// Its kind must equal the periodicity.
    pub schedule: Schedule,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Default `skip` (an addition, spec §6.7 P3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `createPushJobCustomForAgent` (spec §3.18.6).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePushJobCustomForAgentArgs {
    pub company_id: CompanyId,
    pub consumer_user_id: ConsumerUserId,
    /// Must be the agent of the user's active binding
    /// (`Agent key must match the current active binding for the user`).
    pub agent_key: AgentKey,
    pub title: String,
    pub text: String,
    pub periodicity: Periodicity,
    /// IANA time zone, e.g. `Europe/Rome`.
    pub timezone: String,
    pub schedule: Schedule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `updatePushJob` (spec §3.18.4): merged values are validated; nextRunAt is recomputed.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdatePushJobArgs {
    pub job_id: PushJobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodicity: Option<Periodicity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `updatePushJobForAgent` (spec §3.18.6): false unless the job is the user's with that agent.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdatePushJobForAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    pub job_id: PushJobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodicity: Option<Periodicity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushJobIdArgs {
    pub job_id: PushJobId,
}

/// `setPushJobEnabled` (spec §3.18.4).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetPushJobEnabledArgs {
    pub job_id: PushJobId,
    pub enabled: bool,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `listPushJobsForUser` (spec §3.18.4).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListPushJobsForUserArgs {
    pub consumer_user_id: ConsumerUserId,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_disabled: Option<bool>,
}

/// `listPushJobsForAgent` (spec §3.18.6).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListPushJobsForAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_disabled: Option<bool>,
}

/// A push job, as stored and as every operation shows it (spec §3.18.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushJobView {
    #[serde(rename = "_id")]
    pub id: PushJobId,
    pub company_id: String,
    pub consumer_user_id: String,
    pub agent_key: Option<String>,
    pub source_template_id: Option<String>,
    pub title: String,
    pub text: String,
    pub periodicity: Periodicity,
    pub timezone: String,
    pub schedule: Schedule,
    pub enabled: bool,
    /// The next slot (ms since the epoch); null for manual or disabled jobs.
    pub next_run_at: Option<Millis>,
    pub last_run_at: Option<Millis>,
    pub last_run_key: Option<String>,
    /// What happens to slots missed during an outage (an addition, spec §6.7 P3).
    #[serde(default)]
    pub catch_up: CatchUp,
    pub created_at: Millis,
    pub updated_at: Millis,
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

/// `triggerPushJobNow` (spec §3.18.5).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerPushJobArgs {
    pub job_id: PushJobId,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

/// `triggerPushJobNowForAgent` (spec §3.18.6).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerPushJobForAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    pub job_id: PushJobId,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerResult {
    pub enqueued_message_id: MessageId,
    /// `manual:<jobId>:<now>`.
    pub run_key: String,
}

/// `dispatchDuePushJobs` (spec §3.18.5). The push-dispatcher's own loop fires due jobs on time;
/// this runs one pass by hand.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DispatchDueArgs {
    /// Default 200, clamped to 1..1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DispatchSummary {
    /// Due jobs looked at (manual jobs never are, spec §6.7 P2).
    pub scanned: u64,
    pub enqueued: u64,
    /// Slots already dispatched under their run key, and slots dropped by the catch-up policy.
    pub skipped: u64,
    pub failed: u64,
}

/// `listPushDispatchesByJob` (spec §3.18.5).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListDispatchesByJobArgs {
    pub job_id: PushJobId,
    /// Default 50, clamped to 1..200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// `listPushDispatchesForAgent` (spec §3.18.6).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListDispatchesForAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
    /// Default 50, clamped to 1..200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DispatchStatus {
    Enqueued,
    Skipped,
    Failed,
}

/// One dispatch of a push job (the audit row, spec §1.14).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DispatchView {
    #[serde(rename = "_id")]
    pub id: String,
    pub job_id: PushJobId,
    /// `scheduled:<jobId>:<slot>` or `manual:<jobId>:<now>`.
    pub run_key: String,
    pub status: DispatchStatus,
    pub scheduled_for: Millis,
    pub enqueued_message_id: Option<MessageId>,
    pub created_at: Millis,
    pub error: Option<String>,
}

/// Arguments naming a (user, agent) pair (`getUserAgentPushStats`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserAgentArgs {
    pub consumer_user_id: ConsumerUserId,
    pub agent_key: AgentKey,
}

/// `getUserAgentPushStats` (spec §3.18.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushStats {
    pub total_push_jobs: u64,
    pub active_push_jobs: u64,
    /// Every dispatch of the agent's jobs (the original capped this at 200, spec §6.7 P5).
    pub total_dispatches: u64,
    pub latest_dispatch_at: Option<Millis>,
}

// ---------------------------------------------------------------------------------------------
// Broadcasts.

/// `sendBroadcastToAllActiveAgents` (spec §3.18.7): one message to every enabled agent of the
/// company, each in its `broadcast:agent:<agentKey>` conversation. Every target is enqueued
/// before the call returns.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BroadcastArgs {
    /// Only the enabled agents whose profile names this company are targeted (spec §6.7 P1).
    pub company_id: CompanyId,
    pub title: String,
    pub text: String,
    /// Who asked; at most 256 bytes.
    pub requested_by: String,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
    /// Accepted and ignored (spec §6.3 L6).
    #[serde(default, skip_serializing)]
    pub provider_config: Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BroadcastResult {
    pub broadcast_id: BroadcastId,
    pub total_targets: u64,
    pub enqueued: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BroadcastIdArgs {
    pub broadcast_id: BroadcastId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BroadcastStatus {
    Running,
    Done,
    Failed,
}

/// A broadcast and its progress (`getBroadcastStatus`, an addition). Counts are read from the
/// per-target dispatch rows, so they are exact even while the broadcast runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BroadcastView {
    #[serde(rename = "_id")]
    pub id: BroadcastId,
    pub company_id: String,
    pub title: String,
    pub text: String,
    /// Always `all_active_agents`.
    pub target: String,
    pub requested_by: String,
    pub requested_at: Millis,
    pub status: BroadcastStatus,
    pub total_targets: u64,
    pub enqueued_count: u64,
    pub failed_count: u64,
    pub completed_at: Option<Millis>,
}

/// `getUserAgentConversationStats` (spec §3.18.6): zeros unless the user's active agent is
/// `agentKey`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationStats {
    /// Items in the conversation's history.
    pub context_messages: u64,
    /// Jobs queued or processing (of the newest 500).
    pub queued_messages: u64,
    /// Jobs failed or dead-lettered (of the newest 500).
    pub failed_messages: u64,
}

/// `getUserAgentUsageStats` (spec §3.18.6): push and conversation stats together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStats {
    pub total_push_jobs: u64,
    pub active_push_jobs: u64,
    pub total_dispatches: u64,
    pub latest_dispatch_at: Option<Millis>,
    pub context_messages: u64,
    pub queued_messages: u64,
    pub failed_messages: u64,
}
