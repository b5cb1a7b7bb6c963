//! The worker pool's contracts: reconcile, idle shutdowns (scheduler, spec §3.15) and billing
//! protection at the provider (cleanup, spec §3.17).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::model::{ProviderConfig, ScalingPolicy};

/// `reconcileWorkerPool` (spec §3.15.1).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcileArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// For this call only; otherwise the stored policy, else the configured defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_policy: Option<ScalingPolicy>,
    /// Validated and used for this call only (spec §6.3 L6: it no longer overwrites the
    /// stored configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_config: Option<ProviderConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fly_api_token: Option<String>,
    /// Accepted and ignored: workers reach the API at `http.public_url`.
    #[serde(default, skip_serializing)]
    pub convex_url: Ignored,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

/// `checkIdleShutdowns` (spec §3.15.1).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdleArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_config: Option<ProviderConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fly_api_token: Option<String>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileResult {
    pub active_workers: usize,
    pub spawned: usize,
    pub terminated: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdleResult {
    pub checked: usize,
    pub stopped: usize,
    pub pending: usize,
    pub next_check_scheduled: bool,
}

/// `runFlyCleanup` (spec §3.17).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CleanupArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fly_api_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_concurrency: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_concurrency: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_config: Option<ProviderConfig>,
    /// Drain and snapshot the app's live workers before destroying anything (spec §6.3 L14).
    #[serde(default)]
    pub safe: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CleanupReport {
    pub app_name: String,
    pub machines_found: usize,
    pub machines_deleted: usize,
    pub machines_remaining: usize,
    pub machine_ids_deleted: Vec<String>,
    pub machine_ids_remaining: Vec<String>,
    pub volumes_found: usize,
    pub volumes_deleted: usize,
    pub volumes_remaining: usize,
    pub volume_ids_deleted: Vec<String>,
    pub volume_ids_remaining: Vec<String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
    /// Safe mode only: workers drained first, and whether all delivered their snapshot in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_workers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_complete: Option<bool>,
}

/// `deleteFlyVolume` (spec §3.17).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteVolumeArgs {
    pub app_name: String,
    pub volume_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fly_api_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteVolumeResult {
    pub ok: bool,
    /// The provider's HTTP status.
    pub status: u16,
    pub message: String,
}

/// `reapOrphans`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReapArgs {
    /// How long a machine or volume must stay unaccounted for before it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReapReport {
    pub machines_removed: Vec<String>,
    pub volumes_removed: Vec<String>,
    /// Unaccounted for, but not yet past the grace period.
    pub waiting: usize,
    pub errors: Vec<String>,
}
