//! The operation contracts: every operation declared once, with its name, owning service, the
//! roles that may call it, whether it long-polls, and its argument and result types.
//!
//! Everything else derives from [`CATALOGUE`] and the [`Operation`] impls the
//! [`operations!`](crate::operations) macro generates: the NATS server registry and the typed
//! client (`crate::ops`), the role checks, the client-side timeouts, ingress's routing, the CLI,
//! `GET /openapi.json` and `docs/api.md` ([`openapi`]). The argument and result types live in
//! the area modules below; they derive `JsonSchema`, so the reference is generated from the same
//! types the handlers and callers use.

pub mod attachments;
pub mod audit;
pub mod bindings;
pub mod history;
pub mod openapi;
pub mod pairing;
pub mod pool;
pub mod profiles;
pub mod push;
pub mod queue;
pub mod skills;
pub mod snapshots;
pub mod system;
pub mod telegram;
pub mod templates;
pub mod user_agents;

use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::Role;

/// The service that owns (serves) an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    QueueManager,
    Hydration,
    Scheduler,
    PushDispatcher,
    Cleanup,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueManager => "queue-manager",
            Self::Hydration => "hydration",
            Self::Scheduler => "scheduler",
            Self::PushDispatcher => "push-dispatcher",
            Self::Cleanup => "cleanup",
        }
    }
}

/// One operation of the catalogue, as the transports and the generated reference see it.
#[derive(Debug, Clone, Copy)]
pub struct OpSpec {
    pub name: &'static str,
    pub service: Service,
    pub roles: &'static [Role],
    pub summary: &'static str,
    /// The request may be held open for the `waitMs` it carries (see [`request_wait`]).
    pub long_poll: bool,
    /// Overrides `limits.max_string_bytes` for operations that carry file contents.
    pub max_string_bytes: Option<usize>,
    /// The operation only reads: its calls are not written to the audit log (`crate::audit`).
    /// Every other operation's admin calls are.
    pub read_only: bool,
    pub args_schema: fn(&mut SchemaGenerator) -> Schema,
    pub result_schema: fn(&mut SchemaGenerator) -> Schema,
}

impl OpSpec {
    #[doc(hidden)]
    pub const fn long_poll(self) -> Self {
        Self { long_poll: true, ..self }
    }
    #[doc(hidden)]
    pub const fn read_only(self) -> Self {
        Self { read_only: true, ..self }
    }
    #[doc(hidden)]
    pub const fn max_string_bytes(self, bytes: usize) -> Self {
        Self { max_string_bytes: Some(bytes), ..self }
    }
}

/// An operation's contract. Implemented by the unit struct [`operations!`](crate::operations)
/// declares for each operation, e.g. [`EnqueueMessage`].
pub trait Operation: 'static {
    const SPEC: OpSpec;
    type Args: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static;
    type Output: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
}

#[doc(hidden)]
pub fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// The longest `waitMs` a long poll may hold a request (`queue.claim_wait_max_ms` is validated
/// against it). Clients add the request's `waitMs`, capped by this, to their timeout.
pub const LONG_POLL_MAX_MS: u64 = 300_000;

/// The one long-poll rule: how long the server may hold a request to `spec` beyond an ordinary
/// call, read from the `waitMs` of its JSON body. Typed and raw callers (ingress) both use it.
pub fn request_wait(spec: &OpSpec, body: &[u8]) -> Duration {
    #[derive(serde::Deserialize)]
    struct Wait {
        #[serde(rename = "waitMs")]
        wait_ms: Option<u64>,
    }
    if !spec.long_poll {
        return Duration::ZERO;
    }
    let wait = serde_json::from_slice::<Wait>(body).ok().and_then(|w| w.wait_ms).unwrap_or(0);
    Duration::from_millis(wait.min(LONG_POLL_MAX_MS))
}

/// Declares the operations: a unit struct implementing [`Operation`] for each, and the
/// [`CATALOGUE`] listing them all in declaration order.
#[macro_export]
macro_rules! operations {
    ($(
        $(#[$meta:meta])*
        $op:ident = $name:literal, $service:ident, [$($role:ident),+] $(, $flag:ident $(($value:expr))?)*;
        $args:ty => $output:ty, $summary:literal;
    )*) => {
        $(
            #[doc = $summary]
            $(#[$meta])*
            #[derive(Debug, Clone, Copy)]
            pub struct $op;

            impl $crate::api::Operation for $op {
                const SPEC: $crate::api::OpSpec = $crate::api::OpSpec {
                    name: $name,
                    service: $crate::api::Service::$service,
                    roles: &[$($crate::auth::Role::$role),+],
                    summary: $summary,
                    long_poll: false,
                    max_string_bytes: None,
                    read_only: false,
                    args_schema: $crate::api::schema_of::<$args>,
                    result_schema: $crate::api::schema_of::<$output>,
                }$(.$flag($($value)?))*;
                type Args = $args;
                type Output = $output;
            }
        )*

        /// Every operation of the system, in the order of the reference.
        pub const CATALOGUE: &[$crate::api::OpSpec] = &[$(<$op as $crate::api::Operation>::SPEC),*];
    };
}

/// The catalogue entry of `name`.
pub fn find(name: &str) -> Option<&'static OpSpec> {
    CATALOGUE.iter().find(|spec| spec.name == name)
}

/// An argument of the original that the rewrite accepts and ignores, because honouring it would
/// reopen a weak spot of spec §6 (for example `nowMs`, S6). Any value is accepted; the generated
/// reference marks it deprecated and says why in the field's description.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored;

impl Serialize for Ignored {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

impl<'de> serde::Deserialize<'de> for Ignored {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(de).map(|_| Ignored)
    }
}

impl JsonSchema for Ignored {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ignored".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({ "deprecated": true })
    }
}

/// Arguments of an operation that takes none.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// The original's limit on a skill bundle (spec §2.3): one file may use all of it.
pub const SKILL_BUNDLE_MAX_BYTES: usize = 200_000;

operations! {
    // Queue.
    EnqueueMessage = "enqueueMessage", QueueManager, [Admin, App];
        queue::EnqueueArgs => crate::ids::MessageId, "queue a message for a conversation";
    ClaimNextJob = "claimNextJob", QueueManager, [Admin, Worker], long_poll;
        queue::ClaimArgs => Option<queue::Claim>, "lease the next job for a worker, optionally waiting";
    HeartbeatJob = "heartbeatJob", QueueManager, [Admin, Worker];
        queue::LeaseArgs => bool, "extend the lease of a processing job";
    CompleteJob = "completeJob", QueueManager, [Admin, Worker];
        queue::LeaseArgs => bool, "mark a leased job done";
    CompleteAndClaimNext = "completeAndClaimNext", QueueManager, [Admin, Worker], long_poll;
        queue::CompleteAndClaimArgs => queue::CompleteAndClaim,
        "complete a job and claim the next one, in one round trip";
    FailJob = "failJob", QueueManager, [Admin, Worker];
        queue::FailArgs => queue::FailOutcome, "fail a leased job: retry with backoff or dead-letter";
    ReleaseStuckJobs = "releaseStuckJobs", QueueManager, [Admin];
        queue::ReleaseArgs => queue::ReleaseOutcome, "recover jobs whose lease expired";
    GetQueueStats = "getQueueStats", QueueManager, [Admin, App], read_only;
        queue::NowArgs => queue::QueueStats, "counts of ready, processing and dead-lettered jobs";
    ListJobsByStatus = "listJobsByStatus", QueueManager, [Admin], read_only;
        queue::ListJobsArgs => Vec<queue::JobView>, "jobs in one status";
    ListQueueItemsForConversation = "listQueueItemsForConversation", QueueManager, [Admin, App], read_only;
        queue::ConversationArgs => Vec<queue::JobView>, "a conversation's jobs, newest first";
    HasQueuedJobsForConversation = "hasQueuedJobsForConversation", QueueManager, [Admin, App, Worker], read_only;
        queue::ConversationArgs => bool, "whether a conversation has queued jobs";
    RequeueDeadLetter = "requeueDeadLetter", QueueManager, [Admin];
        queue::MessageIdArgs => crate::ids::MessageId,
        "put a dead-lettered job back at the end of its conversation";
    PurgeDeadLetter = "purgeDeadLetter", QueueManager, [Admin];
        queue::MessageIdArgs => bool, "delete a dead-lettered job";
    ExplainConversation = "explainConversation", QueueManager, [Admin], read_only;
        queue::ExplainArgs => queue::ConversationExplanation,
        "why a conversation's message is not answered yet: its state, lease, worker, snapshot, trace";
    // Workers.
    GetWorkerControlState = "getWorkerControlState", QueueManager, [Admin, Worker], read_only;
        queue::WorkerIdArgs => queue::ControlState, "whether a worker should stop";
    GetWorkerStats = "getWorkerStats", QueueManager, [Admin, App], read_only;
        NoArgs => queue::WorkerStatsView, "active workers and their load";
    UpsertWorkerState = "upsertWorkerState", QueueManager, [Admin];
        queue::UpsertWorkerArgs => queue::WorkerView, "create or move a worker row through its lifecycle";
    ListWorkersForScheduler = "listWorkersForScheduler", QueueManager, [Admin], read_only;
        queue::NowArgs => Vec<queue::WorkerView>, "every worker row";
    GetActiveConversationsForScheduler = "getActiveConversationsForScheduler", QueueManager, [Admin], read_only;
        queue::DemandArgs => Vec<queue::DemandRow>, "conversations with work claimable now or in flight";
    GetActiveConversationCountForScheduler = "getActiveConversationCountForScheduler", QueueManager, [Admin], read_only;
        queue::NowArgs => u64, "how many conversations need a worker";
    GetReadyConversationCountForScheduler = "getReadyConversationCountForScheduler", QueueManager, [Admin], read_only;
        queue::NowArgs => u64, "how many conversations have a job claimable now";
    RecordWorkerSnapshot = "recordWorkerSnapshot", QueueManager, [Admin];
        queue::RecordSnapshotArgs => Option<queue::WorkerView>,
        "note a worker's ready snapshot; draining becomes stopping";
    IssueWorkerToken = "issueWorkerToken", QueueManager, [Admin];
        queue::WorkerIdArgs => queue::WorkerToken, "mint the bearer token a worker uses";
    // Test clock.
    GetTestClock = "getTestClock", QueueManager, [Admin], read_only;
        NoArgs => system::ClockView, "the clock mode and the time every service sees";
    SetTestClock = "setTestClock", QueueManager, [Admin];
        system::SetTestClockArgs => system::ClockView, "manual clock only: set the time of the whole stack";
    AdvanceTestClock = "advanceTestClock", QueueManager, [Admin];
        system::AdvanceTestClockArgs => system::ClockView,
        "manual clock only: move the time of the whole stack forward";
    // Profiles, secrets, runtime configuration.
    UpsertAgentProfile = "upsertAgentProfile", Hydration, [Admin];
        profiles::UpsertAgentProfileArgs => crate::ids::AgentKey, "create or update an agent profile";
    GetAgentProfile = "getAgentProfile", Hydration, [Admin, App], read_only;
        profiles::AgentKeyArgs => Option<crate::model::AgentProfile>, "one agent profile";
    ListAgentProfiles = "listAgentProfiles", Hydration, [Admin], read_only;
        NoArgs => Vec<crate::model::AgentProfile>, "every agent profile";
    ImportPlaintextSecret = "importPlaintextSecret", Hydration, [Admin];
        profiles::ImportSecretArgs => profiles::ImportedSecret, "store a new active version of a secret";
    GetSecretsStatus = "getSecretsStatus", Hydration, [Admin], read_only;
        profiles::SecretsStatusArgs => Vec<profiles::SecretStatus>, "which secret refs have an active version";
    GetSecretsKeyRotationStatus = "getSecretsKeyRotationStatus", Hydration, [Admin], read_only;
        NoArgs => profiles::SecretsKeyRotationStatus, "stored secret versions counted by the key that sealed them";
    ReencryptSecrets = "reencryptSecrets", Hydration, [Admin];
        NoArgs => profiles::ReencryptedSecrets, "seal every secret version not under secrets.key again with it";
    ProviderRuntimeConfig = "providerRuntimeConfig", Hydration, [Admin], read_only;
        NoArgs => Option<crate::model::ProviderConfig>, "the stored provider configuration";
    SetProviderRuntimeConfig = "setProviderRuntimeConfig", Hydration, [Admin];
        profiles::SetProviderConfigArgs => (), "store the provider configuration";
    ScalingRuntimeConfig = "scalingRuntimeConfig", Hydration, [Admin], read_only;
        NoArgs => Option<crate::model::ScalingPolicy>, "the stored scaling policy of the worker pool";
    SetScalingRuntimeConfig = "setScalingRuntimeConfig", Hydration, [Admin];
        profiles::SetScalingPolicyArgs => (), "store the scaling policy of the worker pool";
    MessageRuntimeConfig = "messageRuntimeConfig", Hydration, [Admin], read_only;
        NoArgs => Option<crate::model::MessageConfig>, "the stored message configuration";
    SetMessageRuntimeConfig = "setMessageRuntimeConfig", Hydration, [Admin];
        profiles::SetMessageConfigArgs => (), "store the message configuration";
    // Worker pool.
    ReconcileWorkerPool = "reconcileWorkerPool", Scheduler, [Admin];
        pool::ReconcileArgs => pool::ReconcileResult,
        "bring the worker pool to the demand: spawn, drain, tear down";
    CheckIdleShutdowns = "checkIdleShutdowns", Scheduler, [Admin];
        pool::IdleArgs => pool::IdleResult, "drain idle workers and tear down drained ones";
    RunFlyCleanup = "runFlyCleanup", Cleanup, [Admin];
        pool::CleanupArgs => pool::CleanupReport, "destroy every machine and volume of the Fly app, with a report";
    DeleteFlyVolume = "deleteFlyVolume", Cleanup, [Admin];
        pool::DeleteVolumeArgs => pool::DeleteVolumeResult, "delete one Fly volume by id";
    ReapOrphans = "reapOrphans", Cleanup, [Admin];
        pool::ReapArgs => pool::ReapReport, "remove provider machines and volumes no worker row accounts for";
    // Conversation history and hydration.
    AppendConversationMessages = "appendConversationMessages", Hydration, [Admin, Worker];
        history::AppendMessagesArgs => history::AppendResult, "append to a conversation's history (lease-fenced)";
    GetConversationHistory = "getConversationHistory", Hydration, [Admin, App], read_only;
        history::HistoryArgs => history::HistoryPage, "a conversation's history, newest first, in pages";
    GetHydrationBundleForClaimedJob = "getHydrationBundleForClaimedJob", Hydration, [Admin, Worker], read_only;
        history::BundleArgs => Option<history::Bundle>, "everything a worker needs for its claimed job";
    GetWorkerSpawnOpenClawEnv = "getWorkerSpawnOpenClawEnv", Hydration, [Admin], read_only;
        NoArgs => history::SpawnEnv, "bridge environment forwarded to spawned workers";
    // Workspace snapshots.
    PrepareDataSnapshotUpload = "prepareDataSnapshotUpload", Hydration, [Admin, Worker];
        snapshots::PrepareSnapshotArgs => snapshots::PreparedUpload, "start a snapshot upload";
    FinalizeDataSnapshotUpload = "finalizeDataSnapshotUpload", Hydration, [Admin, Worker];
        snapshots::FinalizeSnapshotArgs => bool, "verify an uploaded archive and mark it ready";
    FailDataSnapshotUpload = "failDataSnapshotUpload", Hydration, [Admin, Worker];
        snapshots::FailSnapshotArgs => bool, "mark a snapshot upload failed";
    GetLatestDataSnapshotForRestore = "getLatestDataSnapshotForRestore", Hydration, [Admin, Worker], read_only;
        snapshots::RestoreArgs => Option<snapshots::RestoreTarget>, "the newest ready snapshot of a conversation";
    ListSnapshotsForConversation = "listSnapshotsForConversation", Hydration, [Admin, App], read_only;
        snapshots::ConversationSnapshotsArgs => Vec<snapshots::SnapshotView>,
        "a conversation's snapshots, newest first";
    ListSnapshotsForUserAgent = "listSnapshotsForUserAgent", Hydration, [Admin, App], read_only;
        snapshots::UserAgentSnapshotsArgs => Vec<snapshots::SnapshotView>,
        "snapshots of a user's conversation with an agent";
    GetLatestSnapshotForUserAgent = "getLatestSnapshotForUserAgent", Hydration, [Admin, App], read_only;
        snapshots::UserAgentSnapshotsArgs => Option<snapshots::SnapshotView>,
        "the newest snapshot of a user-agent conversation";
    ExpireOldDataSnapshots = "expireOldDataSnapshots", Hydration, [Admin];
        snapshots::SnapshotSweepArgs => snapshots::SnapshotSweep,
        "expire snapshots past retention and reap abandoned uploads";
    AuthorizeBlobTransfer = "authorizeBlobTransfer", Hydration, [Admin, App, Worker], read_only;
        snapshots::BlobTransferArgs => snapshots::BlobTransfer, "ingress: may this caller move this archive or file";
    // Identity bindings.
    BindUserAgent = "bindUserAgent", Hydration, [Admin, App];
        bindings::BindArgs => bindings::BindingView, "bind a consumer user to an agent";
    RevokeUserAgentBinding = "revokeUserAgentBinding", Hydration, [Admin, App];
        bindings::RevokeBindingArgs => bindings::RevokeResult, "revoke a consumer user's active bindings";
    ResolveAgentForUser = "resolveAgentForUser", Hydration, [Admin, App], read_only;
        bindings::ConsumerUserArgs => bindings::AgentForUser, "the agent a consumer user is bound to";
    GetUserAgentBinding = "getUserAgentBinding", Hydration, [Admin, App], read_only;
        bindings::ConsumerUserArgs => Option<bindings::BindingView>, "a consumer user's active binding";
    ResolveAgentForTelegram = "resolveAgentForTelegram", Hydration, [Admin, App], read_only;
        bindings::TelegramResolveArgs => bindings::TelegramResolution,
        "the binding a Telegram user or chat of one bot resolves to";
    // Global skills.
    DeployGlobalSkill = "deployGlobalSkill", Hydration, [Admin], max_string_bytes(SKILL_BUNDLE_MAX_BYTES);
        skills::DeploySkillArgs => skills::DeployedSkill, "deploy a skill version to a release channel";
    ListGlobalSkills = "listGlobalSkills", Hydration, [Admin], read_only;
        skills::ListSkillsArgs => Vec<skills::SkillView>, "global skills with their active release";
    SetGlobalSkillStatus = "setGlobalSkillStatus", Hydration, [Admin];
        skills::SetSkillStatusArgs => skills::SkillStatusResult, "enable or disable a global skill";
    DeleteGlobalSkill = "deleteGlobalSkill", Hydration, [Admin];
        skills::SkillSlugArgs => skills::DeletedSkill, "delete a skill with all its versions and releases";
    GetWorkerGlobalSkillsManifest = "getWorkerGlobalSkillsManifest", Hydration, [Admin, Worker], read_only;
        skills::ManifestArgs => crate::skills::SkillsManifest, "the skills a worker materialises";
    // Attachments.
    AttachMessageMedia = "attachMessageMedia", Hydration, [Admin, App];
        attachments::AttachMediaArgs => Vec<attachments::Attachment>, "attach uploaded media to an enqueued message";
    ListMessageAttachments = "listMessageAttachments", Hydration, [Admin, App], read_only;
        attachments::MessageAttachmentsArgs => Vec<attachments::Attachment>, "the attachment records of a message";
    ExpireOldTelegramAttachments = "expireOldTelegramAttachments", Hydration, [Admin];
        attachments::AttachmentSweepArgs => usize,
        "expire attachments past retention, deleting the blobs; answers how many";
    RecordPayloadAttachments = "recordPayloadAttachments", Hydration, [Admin];
        attachments::RecordPayloadAttachmentsArgs => Vec<attachments::Attachment>,
        "enqueue: record a payload's attachments before its message is published";
    AttachMessageMetadata = "attachMessageMetadata", Hydration, [Admin, App, Worker];
        attachments::AttachMetadataArgs => bool, "merge keys into a message's payload metadata";
    GenerateMediaUploadUrl = "generateMediaUploadUrl", Hydration, [Admin, App, Worker], read_only;
        NoArgs => attachments::MediaUploadUrl, "where to upload a media file";
    GetStorageFileUrl = "getStorageFileUrl", Hydration, [Admin, App, Worker], read_only;
        attachments::StorageFileArgs => Option<String>, "the download link of a stored file, or null";
    // Message templates.
    CreateMessageTemplate = "createMessageTemplate", PushDispatcher, [Admin, App];
        templates::CreateMessageTemplateArgs => crate::ids::MessageTemplateId, "create a reusable message text";
    UpdateMessageTemplate = "updateMessageTemplate", PushDispatcher, [Admin, App];
        templates::UpdateMessageTemplateArgs => bool, "change a message template";
    DeleteMessageTemplate = "deleteMessageTemplate", PushDispatcher, [Admin, App];
        templates::MessageTemplateIdArgs => bool, "delete a message template";
    ListMessageTemplatesByCompany = "listMessageTemplatesByCompany", PushDispatcher, [Admin, App], read_only;
        templates::ListMessageTemplatesArgs => Vec<templates::MessageTemplateView>,
        "message templates, most used first";
    SendMessageTemplateToUserAgent = "sendMessageTemplateToUserAgent", PushDispatcher, [Admin, App];
        templates::SendMessageTemplateArgs => templates::SendMessageTemplateResult,
        "send a template's text to a user's agent conversation";
    // Push templates and jobs.
    CreatePushTemplate = "createPushTemplate", PushDispatcher, [Admin, App];
        push::CreatePushTemplateArgs => crate::ids::PushTemplateId, "create a company push template";
    UpdatePushTemplate = "updatePushTemplate", PushDispatcher, [Admin, App];
        push::UpdatePushTemplateArgs => bool, "change a push template (its jobs are not affected)";
    DeletePushTemplate = "deletePushTemplate", PushDispatcher, [Admin, App];
        push::PushTemplateIdArgs => bool, "delete a push template";
    ListPushTemplatesByCompany = "listPushTemplatesByCompany", PushDispatcher, [Admin, App], read_only;
        push::ListPushTemplatesArgs => Vec<push::PushTemplateView>, "a company's push templates, newest first";
    CreatePushJobFromTemplate = "createPushJobFromTemplate", PushDispatcher, [Admin, App];
        push::CreatePushJobFromTemplateArgs => crate::ids::PushJobId, "schedule a push for a user from a template";
    CreatePushJobCustom = "createPushJobCustom", PushDispatcher, [Admin, App];
        push::CreatePushJobCustomArgs => crate::ids::PushJobId, "schedule a push for a user";
    UpdatePushJob = "updatePushJob", PushDispatcher, [Admin, App];
        push::UpdatePushJobArgs => bool, "change a push job; its next run is recomputed";
    DeletePushJob = "deletePushJob", PushDispatcher, [Admin, App];
        push::PushJobIdArgs => bool, "delete a push job";
    SetPushJobEnabled = "setPushJobEnabled", PushDispatcher, [Admin, App];
        push::SetPushJobEnabledArgs => bool, "enable or disable a push job";
    ListPushJobsForUser = "listPushJobsForUser", PushDispatcher, [Admin, App], read_only;
        push::ListPushJobsForUserArgs => Vec<push::PushJobView>, "a user's push jobs, newest first";
    TriggerPushJobNow = "triggerPushJobNow", PushDispatcher, [Admin, App];
        push::TriggerPushJobArgs => push::TriggerResult, "send a push job's message now";
    DispatchDuePushJobs = "dispatchDuePushJobs", PushDispatcher, [Admin, App];
        push::DispatchDueArgs => push::DispatchSummary, "fire the due push jobs now (the dispatcher also does it on time)";
    ListPushDispatchesByJob = "listPushDispatchesByJob", PushDispatcher, [Admin, App], read_only;
        push::ListDispatchesByJobArgs => Vec<push::DispatchView>, "a push job's dispatches, newest first";
    ListPushJobsForAgent = "listPushJobsForAgent", PushDispatcher, [Admin, App], read_only;
        push::ListPushJobsForAgentArgs => Vec<push::PushJobView>, "a user's push jobs with one agent";
    CreatePushJobFromTemplateForAgent = "createPushJobFromTemplateForAgent", PushDispatcher, [Admin, App];
        push::CreatePushJobFromTemplateForAgentArgs => crate::ids::PushJobId,
        "schedule a push from a template for the user's current agent";
    CreatePushJobCustomForAgent = "createPushJobCustomForAgent", PushDispatcher, [Admin, App];
        push::CreatePushJobCustomForAgentArgs => crate::ids::PushJobId, "schedule a push for the user's current agent";
    UpdatePushJobForAgent = "updatePushJobForAgent", PushDispatcher, [Admin, App];
        push::UpdatePushJobForAgentArgs => bool, "change a push job of a user's agent";
    TriggerPushJobNowForAgent = "triggerPushJobNowForAgent", PushDispatcher, [Admin, App];
        push::TriggerPushJobForAgentArgs => push::TriggerResult, "send a push job of a user's agent now";
    ListPushDispatchesForAgent = "listPushDispatchesForAgent", PushDispatcher, [Admin, App], read_only;
        push::ListDispatchesForAgentArgs => Vec<push::DispatchView>, "dispatches of a user's jobs with one agent";
    GetUserAgentPushStats = "getUserAgentPushStats", PushDispatcher, [Admin, App], read_only;
        push::UserAgentArgs => push::PushStats, "push job and dispatch counts of a user with one agent";
    GetUserAgentConversationStats = "getUserAgentConversationStats", PushDispatcher, [Admin, App], read_only;
        push::UserAgentArgs => push::ConversationStats, "history and queue counts of a user's conversation with an agent";
    GetUserAgentUsageStats = "getUserAgentUsageStats", PushDispatcher, [Admin, App], read_only;
        push::UserAgentArgs => push::UsageStats, "push and conversation counts of a user with one agent";
    // Broadcasts.
    SendBroadcastToAllActiveAgents = "sendBroadcastToAllActiveAgents", PushDispatcher, [Admin, App];
        push::BroadcastArgs => push::BroadcastResult, "send one message to every enabled agent of a company";
    GetBroadcastStatus = "getBroadcastStatus", PushDispatcher, [Admin, App], read_only;
        push::BroadcastIdArgs => Option<push::BroadcastView>, "a broadcast and its progress";
    // Telegram administration.
    PrepareTelegramAttachmentsForEnqueue = "prepareTelegramAttachmentsForEnqueue", Hydration, [Admin, App];
        telegram::PrepareTelegramAttachmentsArgs => Vec<queue::PayloadAttachment>,
        "fetch a Telegram message's files with the agent's bot token into the media store, ready to enqueue";
    ImportTelegramTokenForAgent = "importTelegramTokenForAgent", Hydration, [Admin, App];
        telegram::ImportTelegramTokenArgs => telegram::ImportedTelegramToken,
        "verify a bot token with getMe and store it as the agent's token";
    ConfigureTelegramWebhook = "configureTelegramWebhook", Hydration, [Admin];
        telegram::ConfigureWebhookArgs => telegram::WebhookConfigured,
        "point a bot's webhook at this deployment, with a random per-bot secret";
    ReconcileTelegramBotIdentityForAgent = "reconcileTelegramBotIdentityForAgent", Hydration, [Admin];
        telegram::ReconcileBotIdentityArgs => telegram::ReconciledBotIdentity,
        "verify an agent's stored token again and re-sync its bot identity";
    GetWebhookReadiness = "getWebhookReadiness", Hydration, [Admin, App], read_only;
        profiles::AgentKeyArgs => telegram::WebhookReadiness, "ask Telegram whether an agent's webhook is ready";
    SoftResetTelegramBindingsMissingBotIdentity = "softResetTelegramBindingsMissingBotIdentity", Hydration, [Admin];
        telegram::SoftResetArgs => telegram::SoftResetReport,
        "the 3.1.0 migration: annotate or revoke bindings and expire pairings without a bot identity";
    // Pairing.
    CreatePairingCode = "createPairingCode", Hydration, [Admin, App];
        pairing::CreatePairingArgs => pairing::PairingView, "a one-time code a user sends to the agent's bot";
    ConsumePairingCode = "consumePairingCode", Hydration, [Admin, App];
        pairing::ConsumePairingArgs => pairing::ConsumedPairing,
        "bind the Telegram identity that sent /start <code> to the code's user";
    GetPairingCodeStatus = "getPairingCodeStatus", Hydration, [Admin, App], read_only;
        pairing::PairingCodeArgs => Option<pairing::PairingView>, "one pairing code";
    CreateUserAgentPairing = "createUserAgentPairing", Hydration, [Admin, App];
        pairing::CreatePairingArgs => pairing::UserAgentPairing, "a pairing code with its t.me deep link";
    GetUserAgentPairingStatus = "getUserAgentPairingStatus", Hydration, [Admin, App], read_only;
        pairing::UserAgentArgs => Option<pairing::PairingView>, "the newest pairing code of a user and agent";
    // User-facing aggregates.
    GetUserAgentsOverview = "getUserAgentsOverview", Hydration, [Admin, App], read_only;
        user_agents::ConsumerUserNowArgs => user_agents::UserAgentsOverview,
        "a user's agents with their status, and whether the user may create another";
    ListUserAgents = "listUserAgents", Hydration, [Admin, App], read_only;
        user_agents::ListUserAgentsArgs => Vec<user_agents::UserAgentView>, "a user's agents, newest binding first";
    GetUserAgent = "getUserAgent", Hydration, [Admin, App], read_only;
        pairing::UserAgentArgs => Option<user_agents::UserAgentView>, "one agent of a user, or null";
    GetActiveUserAgent = "getActiveUserAgent", Hydration, [Admin, App], read_only;
        user_agents::ConsumerUserNowArgs => Option<user_agents::UserAgentView>,
        "the agent of a user's active binding, or null";
    GetUserAgentOnboardingState = "getUserAgentOnboardingState", Hydration, [Admin, App], read_only;
        pairing::UserAgentArgs => user_agents::OnboardingState,
        "how far a user's agent is set up, and the next step";
    GetConversationViewForUserAgent = "getConversationViewForUserAgent", Hydration, [Admin, App], read_only;
        user_agents::ConversationViewArgs => user_agents::ConversationView,
        "history and queue items of a user's conversation with an agent";
    ListQueueItemsForUserAgent = "listQueueItemsForUserAgent", Hydration, [Admin, App], read_only;
        user_agents::ListUserAgentQueueItemsArgs => Vec<queue::JobView>,
        "jobs of a user's conversation with an agent, newest first";
    SendMessageToUserAgent = "sendMessageToUserAgent", Hydration, [Admin, App];
        user_agents::SendMessageToUserAgentArgs => crate::ids::MessageId,
        "queue a message into a user's conversation with their bound agent";
    // Audit log.
    ListAuditLog = "listAuditLog", Hydration, [Admin], read_only;
        audit::ListAuditLogArgs => audit::AuditLogPage,
        "audited admin calls (who, what, when, redacted arguments, outcome), newest first, in pages";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_long_polls_wait_and_the_wait_is_capped() {
        let complete_and_claim = CompleteAndClaimNext::SPEC;
        assert!(complete_and_claim.long_poll && ClaimNextJob::SPEC.long_poll);
        let body = br#"{"workerId":"w","messageId":"m","leaseId":"l","waitMs":25000}"#;
        assert_eq!(request_wait(&complete_and_claim, body), Duration::from_secs(25));
        let huge = br#"{"waitMs":99999999999}"#;
        assert_eq!(request_wait(&ClaimNextJob::SPEC, huge), Duration::from_millis(LONG_POLL_MAX_MS));
        assert_eq!(request_wait(&CompleteJob::SPEC, body), Duration::ZERO);
        assert_eq!(request_wait(&ClaimNextJob::SPEC, b"not json"), Duration::ZERO);
    }

    #[test]
    fn catalogue_names_are_unique_and_every_op_has_a_role() {
        let mut seen = std::collections::HashSet::new();
        for spec in CATALOGUE {
            assert!(seen.insert(spec.name), "duplicate {}", spec.name);
            assert!(!spec.roles.is_empty(), "{} is reachable by nobody", spec.name);
            assert_eq!(find(spec.name).map(|s| s.name), Some(spec.name));
        }
    }
}
