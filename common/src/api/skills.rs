//! The contracts of global skills (spec §3.19). The bundle and manifest types themselves live in
//! [`crate::skills`], shared with the worker; their schemas are declared here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Ignored;
use crate::ids::{SkillSlug, WorkerId};
use crate::skills::{ModuleFormat, ReleaseChannel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SkillStatus {
    Active,
    Disabled,
}

/// One file of a bundle to deploy.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SkillFileArg {
    /// Relative to the skill directory; `..`, `.` and empty segments, drive letters and the
    /// marker file `.af-global-skill.json` are refused.
    pub path: String,
    pub content: String,
    /// Lower-case hex SHA-256 of the UTF-8 content; required (blank is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `deployGlobalSkill` (spec §3.19.2). The files are checked first, then the slug, the version
/// and the entry point, with the original's messages.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploySkillArgs {
    /// Trimmed and lower-cased, then `^[a-z0-9][a-z0-9_-]{1,127}$`. A plain string, checked
    /// after the files as the original did, so a bad bundle is reported first.
    pub slug: String,
    /// Default: the slug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Semantic version, e.g. `1.2.3` or `1.2.3-beta.1`.
    pub version: String,
    /// At most 200 000 bytes of content in all; must include `SKILL.md` and the entry script.
    pub files: Vec<SkillFileArg>,
    /// Default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// Default `esm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_format: Option<ModuleFormat>,
    /// Default `stable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_channel: Option<ReleaseChannel>,
    /// Recorded as the creator/activator; default `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeployedSkill {
    pub skill_id: String,
    /// `<slug>@<version>`.
    pub version_id: String,
    /// `<slug>:<channel>:<n>`. Redeploying the version already active in the channel creates
    /// no new release and answers the active one (spec §6.8 K4).
    pub release_id: String,
    pub slug: String,
    pub version: String,
    /// The bundle checksum.
    pub sha256: String,
    pub release_channel: ReleaseChannel,
    /// New: a skill an admin disabled stays disabled after a deploy, so the caller sees it.
    pub status: SkillStatus,
}

/// `listGlobalSkills` (spec §3.19.3).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListSkillsArgs {
    /// The channel whose active release is shown; default `stable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_channel: Option<ReleaseChannel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SkillStatus>,
    /// Default 200, clamped to 1–500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// A skill with its active release in the requested channel, sorted by slug.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillView {
    pub skill_id: String,
    pub slug: String,
    pub display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub status: SkillStatus,
    pub updated_at: i64,
    pub active_release: Option<ReleaseView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseView {
    pub release_id: String,
    pub version_id: String,
    pub version: String,
    pub sha256: String,
    pub module_format: ModuleFormat,
    pub entry_point: String,
    pub release_channel: ReleaseChannel,
    pub activated_at: i64,
}

/// `setGlobalSkillStatus` (spec §3.19.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetSkillStatusArgs {
    pub slug: SkillSlug,
    pub status: SkillStatus,
    /// Default `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Accepted and ignored: the server's clock decides (spec §6.1 S6).
    #[serde(default, skip_serializing)]
    pub now_ms: Ignored,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillStatusResult {
    /// False when no such skill exists.
    pub updated: bool,
    pub slug: String,
    pub status: SkillStatus,
}

/// `deleteGlobalSkill` (spec §3.19.3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SkillSlugArgs {
    pub slug: SkillSlug,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletedSkill {
    /// False when no such skill exists.
    pub deleted: bool,
    pub slug: String,
    pub deleted_versions: usize,
    pub deleted_releases: usize,
}

/// `getWorkerGlobalSkillsManifest` (spec §3.19.3).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestArgs {
    /// Echoed in the manifest; default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// A worker may only ask as itself (the original ignored it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    /// Default `stable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_channel: Option<ReleaseChannel>,
}
