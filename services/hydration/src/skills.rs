//! Global skills (spec §3.19): `deployGlobalSkill`, `listGlobalSkills`, `setGlobalSkillStatus`,
//! `deleteGlobalSkill` and `getWorkerGlobalSkillsManifest`. The bundle rules (paths, checksums,
//! marker file, manifest version) live in `common::skills`, shared with the worker.
//!
//! Storage, in `af_skills`:
//! - `skill.<slug>`: one document per skill with its metadata, status and release history
//!   (the active release per channel plus the newest inactive ones, at most
//!   [`MAX_RELEASE_HISTORY`] in all). Releases live in this document so that activating one is
//!   a single compare-and-set: two concurrent deploys of one slug serialise on it and neither
//!   release is lost.
//! - `version.<slug>.<version>`: the immutable version documents holding the files, written
//!   create-only before the skill document references them.
//!
//! Differences from the original (spec §6.8): a corrupt stored skill is left out of the manifest
//! and reported in `problems` instead of failing the whole manifest (K1); paths are checked
//! strictly (K2, in `common::skills`); redeploying the version that is already active in a
//! channel creates no new release, and a deploy keeps a skill an admin disabled disabled (K4).

use common::api;
pub use common::api::skills::SkillStatus;
use common::api::skills::{
    DeletedSkill, DeploySkillArgs, DeployedSkill, ListSkillsArgs, ManifestArgs, ReleaseView, SetSkillStatusArgs,
    SkillSlugArgs, SkillStatusResult, SkillView,
};
use common::auth::Caller;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::skills::{
    LAYOUT_VERSION, ManifestSkill, ModuleFormat, ReleaseChannel, SkillFile, SkillProblem, SkillsManifest,
    bundle_sha256, is_valid_slug, is_valid_version, manifest_version, marker_file, normalize_bundle, skill_dir_name,
};
use common::store::StoreError;
use common::token::{escape, unescape};
use common::{ErrorCode, OpError};
use serde::{Deserialize, Serialize};

/// Releases kept per skill document; active releases are never dropped.
pub const MAX_RELEASE_HISTORY: usize = 20;
pub const DEFAULT_LIST_LIMIT: i64 = 200;
pub const MAX_LIST_LIMIT: i64 = 500;
pub const MAX_VERSION_BYTES: usize = 128;
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Room left under NATS `max_payload` for the subject and headers of a KV put or a reply.
const PAYLOAD_SLACK_BYTES: usize = 4096;
const DEFAULT_ENTRY_POINT: &str = "default";
const DEFAULT_ACTOR: &str = "system";
const DEFAULT_WORKSPACE: &str = "default";

const SLUG_ERROR: &str = "Invalid skill slug. Use lowercase letters, numbers, '-' and '_'.";
const VERSION_ERROR: &str = "Invalid skill version. Use semantic versioning format.";
const ENTRY_POINT_ERROR: &str = "entryPoint is required.";

/// One skill, as stored under `skill.<slug>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillDoc {
    pub skill_id: String,
    pub slug: String,
    pub display_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub status: SkillStatus,
    pub created_by: String,
    pub updated_by: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// The number of the last release created; release ids count up from it.
    pub release_seq: u64,
    /// Oldest first. At most one active release per channel.
    pub releases: Vec<Release>,
}

/// One activation of a version in a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    pub release_id: String,
    pub version_id: String,
    pub version: String,
    pub sha256: String,
    pub module_format: ModuleFormat,
    pub entry_point: String,
    pub release_channel: ReleaseChannel,
    pub is_active: bool,
    pub activated_by: String,
    pub activated_at: i64,
}

/// One immutable version, as stored under `version.<slug>.<version>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionDoc {
    pub version_id: String,
    pub skill_id: String,
    pub slug: String,
    pub version: String,
    pub module_format: ModuleFormat,
    pub entry_point: String,
    pub sha256: String,
    pub files: Vec<SkillFile>,
    pub created_by: String,
    pub created_at: i64,
}

impl SkillDoc {
    fn new(slug: &str, display_name: Option<&str>, description: Option<&str>, actor: &str, now: i64) -> Self {
        Self {
            skill_id: slug.to_string(),
            slug: slug.to_string(),
            display_name: display_name.map(str::trim).filter(|s| !s.is_empty()).unwrap_or(slug).to_string(),
            description: description.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string),
            status: SkillStatus::Active,
            created_by: actor.to_string(),
            updated_by: actor.to_string(),
            created_at: now,
            updated_at: now,
            release_seq: 0,
            releases: Vec::new(),
        }
    }

    pub fn active_release(&self, channel: ReleaseChannel) -> Option<&Release> {
        self.releases.iter().rev().find(|r| r.is_active && r.release_channel == channel)
    }

    /// Makes `version` the active release of its channel and returns the release id and whether
    /// a release was created. When that version (same bundle) is already the active release of
    /// the channel, nothing changes (K4: the original inserted a new release every time).
    fn activate(&mut self, version: &VersionDoc, channel: ReleaseChannel, actor: &str, now: i64) -> (String, bool) {
        if let Some(active) = self.active_release(channel)
            && active.version_id == version.version_id
            && active.sha256 == version.sha256
        {
            return (active.release_id.clone(), false);
        }
        for release in self.releases.iter_mut().filter(|r| r.release_channel == channel) {
            release.is_active = false;
        }
        self.release_seq += 1;
        let release_id = format!("{}:{}:{}", self.slug, channel.as_str(), self.release_seq);
        self.releases.push(Release {
            release_id: release_id.clone(),
            version_id: version.version_id.clone(),
            version: version.version.clone(),
            sha256: version.sha256.clone(),
            module_format: version.module_format,
            entry_point: version.entry_point.clone(),
            release_channel: channel,
            is_active: true,
            activated_by: actor.to_string(),
            activated_at: now,
        });
        self.trim_history();
        (release_id, true)
    }

    /// Drops the oldest inactive releases until at most [`MAX_RELEASE_HISTORY`] remain.
    fn trim_history(&mut self) {
        while self.releases.len() > MAX_RELEASE_HISTORY {
            let Some(oldest_inactive) = self.releases.iter().position(|r| !r.is_active) else {
                break;
            };
            self.releases.remove(oldest_inactive);
        }
    }
}

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::DeployGlobalSkill, _, _, _, _>(
        ctx,
        |ctx, _: Caller, args| async move { deploy(&ctx, args).await },
    );
    ops.handle::<api::ListGlobalSkills, _, _, _, _>(ctx, |ctx, _: Caller, args| async move { list(&ctx, args).await });
    ops.handle::<api::SetGlobalSkillStatus, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        set_status(&ctx, args).await
    });
    ops.handle::<api::DeleteGlobalSkill, _, _, _, _>(
        ctx,
        |ctx, _: Caller, args| async move { delete(&ctx, args).await },
    );
    ops.handle::<api::GetWorkerGlobalSkillsManifest, _, _, _, _>(ctx, |ctx, caller: Caller, args| async move {
        // The original ignored workerId; here a worker may only ask as itself.
        if let Some(worker_id) = &args.worker_id {
            caller.require_worker(worker_id)?;
        }
        manifest(&ctx, args).await
    });
}

fn skill_key(slug: &str) -> String {
    format!("skill.{}", escape(slug))
}

fn version_key(slug: &str, version: &str) -> String {
    format!("version.{}.{}", escape(slug), escape(version))
}

fn versions_filter(slug: &str) -> String {
    format!("version.{}.*", escape(slug))
}

fn normalize_slug(slug: &str) -> String {
    slug.trim().to_lowercase()
}

fn actor_or_default(actor: Option<&str>) -> String {
    actor.map(str::trim).filter(|a| !a.is_empty()).unwrap_or(DEFAULT_ACTOR).to_string()
}

fn check_max_bytes(field: &str, value: Option<&str>, max: usize) -> Result<(), OpError> {
    match value {
        Some(v) if v.len() > max => {
            Err(OpError::invalid(format!("{field}: must be at most {max} bytes, got {}", v.len())))
        }
        _ => Ok(()),
    }
}

/// The validated inputs of a deploy, in the spec's order of checks: files first, then slug,
/// version and entryPoint. Returns the version document to store.
fn validated_version(args: &DeploySkillArgs, actor: &str, now: i64) -> Result<VersionDoc, OpError> {
    let slug = normalize_slug(&args.slug);
    let version = args.version.trim().to_string();
    let module_format = args.module_format.unwrap_or_default();
    let given: Vec<SkillFile> = args
        .files
        .iter()
        .map(|f| SkillFile {
            path: f.path.clone(),
            content: f.content.clone(),
            sha256: f.sha256.clone().unwrap_or_default(),
        })
        .collect();
    let files = normalize_bundle(&given, module_format).map_err(OpError::invalid)?;
    if !is_valid_slug(&slug) {
        return Err(OpError::invalid(SLUG_ERROR));
    }
    if !is_valid_version(&version) {
        return Err(OpError::invalid(VERSION_ERROR));
    }
    check_max_bytes("version", Some(&version), MAX_VERSION_BYTES)?;
    let entry_point = args.entry_point.as_deref().unwrap_or(DEFAULT_ENTRY_POINT).trim().to_string();
    if entry_point.is_empty() {
        return Err(OpError::invalid(ENTRY_POINT_ERROR));
    }
    check_max_bytes("entryPoint", Some(&entry_point), MAX_NAME_BYTES)?;
    check_max_bytes("displayName", args.display_name.as_deref().map(str::trim), MAX_NAME_BYTES)?;
    check_max_bytes("description", args.description.as_deref().map(str::trim), MAX_DESCRIPTION_BYTES)?;
    check_max_bytes("actor", Some(actor), MAX_NAME_BYTES)?;
    Ok(VersionDoc {
        version_id: format!("{slug}@{version}"),
        skill_id: slug.clone(),
        sha256: bundle_sha256(&files),
        slug,
        version,
        module_format,
        entry_point,
        files,
        created_by: actor.to_string(),
        created_at: now,
    })
}

async fn deploy(ctx: &ServiceContext, args: DeploySkillArgs) -> Result<DeployedSkill, OpError> {
    let actor = actor_or_default(args.actor.as_deref());
    let now = ctx.clock.now_ms();
    let version = validated_version(&args, &actor, now)?;
    let channel = args.release_channel.unwrap_or_default();
    ensure_version(ctx, &version).await?;

    let mut outcome: Option<(String, bool, SkillStatus)> = None;
    ctx.buckets
        .skills
        .modify::<SkillDoc, OpError, _>(&skill_key(&version.slug), |current| {
            let mut doc = match current {
                None => {
                    SkillDoc::new(&version.slug, args.display_name.as_deref(), args.description.as_deref(), &actor, now)
                }
                Some(mut doc) => {
                    if let Some(name) = args.display_name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
                        doc.display_name = name.to_string();
                    }
                    if let Some(description) = args.description.as_deref() {
                        let description = description.trim();
                        doc.description = (!description.is_empty()).then(|| description.to_string());
                    }
                    // Deviation (K4): the status is left as it is; the original forced
                    // `active`, silently undoing an admin's setGlobalSkillStatus.
                    doc.updated_by = actor.clone();
                    doc.updated_at = now;
                    doc
                }
            };
            let (release_id, created) = doc.activate(&version, channel, &actor, now);
            outcome = Some((release_id, created, doc.status));
            Ok(Some(doc))
        })
        .await?;
    let (release_id, created, status) =
        outcome.ok_or_else(|| OpError::internal("deployGlobalSkill: the skill document was not written"))?;
    tracing::info!(
        slug = %version.slug,
        version = %version.version,
        channel = channel.as_str(),
        release_id = %release_id,
        new_release = created,
        "global skill deployed"
    );
    Ok(DeployedSkill {
        skill_id: version.skill_id,
        version_id: version.version_id,
        release_id,
        slug: version.slug,
        version: version.version,
        sha256: version.sha256,
        release_channel: channel,
        status,
    })
}

/// Stores the version document unless it exists; an existing one must hold the same bundle.
async fn ensure_version(ctx: &ServiceContext, version: &VersionDoc) -> Result<(), OpError> {
    let store = &ctx.buckets.skills;
    let key = version_key(&version.slug, &version.version);
    let encoded = serde_json::to_vec(version).map_err(OpError::internal)?.len();
    let max = ctx.nats.max_payload().saturating_sub(PAYLOAD_SLACK_BYTES);
    if encoded > max {
        return Err(OpError::new(
            ErrorCode::PayloadTooLarge,
            format!("the encoded skill version is {encoded} bytes, over the {max} bytes a NATS message may carry"),
        ));
    }
    let existing = match read_version(ctx, version).await? {
        Some(existing) => existing,
        None => match store.create(&key, version).await {
            Ok(_) => return Ok(()),
            // A concurrent deploy stored it first: compare with theirs.
            Err(e) if e.is_conflict() => read_version(ctx, version)
                .await?
                .ok_or_else(|| OpError::conflict(format!("concurrent update of '{key}'; retry the request")))?,
            Err(e) => return Err(e.into()),
        },
    };
    if existing.sha256 != version.sha256
        || existing.module_format != version.module_format
        || existing.entry_point != version.entry_point
    {
        return Err(OpError::conflict(format!(
            "Skill {}@{} already exists with a different bundle.",
            version.slug, version.version
        )));
    }
    Ok(())
}

async fn read_version(ctx: &ServiceContext, version: &VersionDoc) -> Result<Option<VersionDoc>, OpError> {
    let key = version_key(&version.slug, &version.version);
    match ctx.buckets.skills.get::<VersionDoc>(&key).await {
        Ok(found) => Ok(found.map(|v| v.value)),
        Err(StoreError::Corrupt { reason, .. }) => Err(OpError::conflict(format!(
            "The stored version {}@{} is corrupt ({reason}); delete the skill and deploy it again.",
            version.slug, version.version
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Every skill document, sorted by slug. Documents that do not decode are returned as
/// problems (slug from the key, empty version) rather than failing the caller.
async fn all_skills(ctx: &ServiceContext) -> Result<(Vec<SkillDoc>, Vec<SkillProblem>), OpError> {
    let entries = ctx.buckets.skills.scan::<serde_json::Value>("skill.*").await?;
    let mut docs = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (key, entry) in entries {
        match serde_json::from_value::<SkillDoc>(entry.value) {
            Ok(doc) => docs.push(doc),
            Err(e) => {
                let token = key.strip_prefix("skill.").unwrap_or(&key);
                let slug = unescape(token).unwrap_or_else(|| token.to_string());
                tracing::warn!(key = %key, error = %e, "skill document does not decode; skipped");
                problems.push(SkillProblem {
                    slug,
                    version: String::new(),
                    error: format!("Stored skill document is not valid: {e}"),
                });
            }
        }
    }
    docs.sort_by(|a, b| a.slug.cmp(&b.slug));
    Ok((docs, problems))
}

async fn list(ctx: &ServiceContext, args: ListSkillsArgs) -> Result<Vec<SkillView>, OpError> {
    let channel = args.release_channel.unwrap_or_default();
    let limit = args.limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT) as usize;
    let (docs, _) = all_skills(ctx).await?;
    Ok(docs
        .into_iter()
        .filter(|doc| args.status.is_none_or(|s| s == doc.status))
        .take(limit)
        .map(|doc| {
            let active_release = doc.active_release(channel).map(|r| ReleaseView {
                release_id: r.release_id.clone(),
                version_id: r.version_id.clone(),
                version: r.version.clone(),
                sha256: r.sha256.clone(),
                module_format: r.module_format,
                entry_point: r.entry_point.clone(),
                release_channel: r.release_channel,
                activated_at: r.activated_at,
            });
            SkillView {
                skill_id: doc.skill_id,
                slug: doc.slug,
                display_name: doc.display_name,
                description: doc.description,
                status: doc.status,
                updated_at: doc.updated_at,
                active_release,
            }
        })
        .collect())
}

async fn set_status(ctx: &ServiceContext, args: SetSkillStatusArgs) -> Result<SkillStatusResult, OpError> {
    let slug = args.slug.into_string();
    let actor = actor_or_default(args.actor.as_deref());
    check_max_bytes("actor", Some(&actor), MAX_NAME_BYTES)?;
    let now = ctx.clock.now_ms();
    let written = ctx
        .buckets
        .skills
        .modify::<SkillDoc, OpError, _>(&skill_key(&slug), |current| {
            Ok(current.map(|mut doc| {
                doc.status = args.status;
                doc.updated_by = actor.clone();
                doc.updated_at = now;
                doc
            }))
        })
        .await?;
    if written.is_some() {
        tracing::info!(slug = %slug, status = ?args.status, "global skill status set");
    }
    Ok(SkillStatusResult { updated: written.is_some(), slug, status: args.status })
}

/// Deletes every version document, then the skill document at the revision it was read at. A
/// deploy racing with the delete changes that revision, so the whole delete runs again and also
/// removes the version the deploy added. Versions go first so that an interrupted delete leaves
/// a skill whose missing versions the manifest reports, never orphan versions that would make a
/// later deploy of the same version conflict.
async fn delete(ctx: &ServiceContext, args: SkillSlugArgs) -> Result<DeletedSkill, OpError> {
    const ATTEMPTS: usize = 16;
    let slug = args.slug.into_string();
    let store = &ctx.buckets.skills;
    let key = skill_key(&slug);
    let mut deleted_versions = std::collections::HashSet::new();
    for _ in 0..ATTEMPTS {
        // Read raw so that a corrupt skill document can still be deleted.
        let Some(skill) = store.get::<serde_json::Value>(&key).await? else {
            return Ok(DeletedSkill { deleted: false, slug, deleted_versions: 0, deleted_releases: 0 });
        };
        let releases = skill.value.get("releases").and_then(|r| r.as_array()).map_or(0, Vec::len);
        for (version_key, entry) in store.scan::<serde_json::Value>(&versions_filter(&slug)).await? {
            match store.delete(&version_key, entry.revision).await {
                Ok(()) => {
                    deleted_versions.insert(version_key);
                }
                // Deleted by a concurrent delete: the next attempt rescans.
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
        }
        match store.delete(&key, skill.revision).await {
            Ok(()) => {
                tracing::info!(slug = %slug, versions = deleted_versions.len(), releases, "global skill deleted");
                return Ok(DeletedSkill {
                    deleted: true,
                    slug,
                    deleted_versions: deleted_versions.len(),
                    deleted_releases: releases,
                });
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OpError::conflict(format!("concurrent updates of skill '{slug}' kept the delete from finishing; retry")))
}

async fn manifest(ctx: &ServiceContext, args: ManifestArgs) -> Result<SkillsManifest, OpError> {
    let channel = args.release_channel.unwrap_or_default();
    let workspace_id = args
        .workspace_id
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| DEFAULT_WORKSPACE.to_string());
    let (docs, mut problems) = all_skills(ctx).await?;
    let mut skills = Vec::new();
    for doc in docs.iter().filter(|d| d.status == SkillStatus::Active) {
        let Some(release) = doc.active_release(channel) else {
            continue;
        };
        match verified_skill(ctx, doc, release).await? {
            Ok(skill) => skills.push(skill),
            Err(error) => {
                tracing::warn!(
                    slug = %doc.slug,
                    version = %release.version,
                    error = %error,
                    "global skill left out of the manifest"
                );
                problems.push(SkillProblem { slug: doc.slug.clone(), version: release.version.clone(), error });
            }
        }
    }
    let manifest = SkillsManifest {
        layout_version: LAYOUT_VERSION.to_string(),
        manifest_version: manifest_version(&skills),
        generated_at: ctx.clock.now_ms(),
        release_channel: channel,
        workspace_id,
        skills,
        problems,
    };
    // A reply larger than NATS allows would never arrive and the worker would only see a
    // timeout; say why instead.
    let encoded = serde_json::to_vec(&manifest).map_err(OpError::internal)?.len();
    let max = ctx.nats.max_payload().saturating_sub(PAYLOAD_SLACK_BYTES);
    if encoded > max {
        return Err(OpError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the skills manifest is {encoded} bytes, over the {max} bytes a NATS reply may carry; \
                 disable skills or raise the server's max_payload"
            ),
        ));
    }
    Ok(manifest)
}

/// Loads the active release's version and checks it again (paths, per-file and bundle
/// checksums). The outer error is an infrastructure failure; the inner one says why this skill
/// is corrupt and must be left out (K1).
async fn verified_skill(
    ctx: &ServiceContext,
    doc: &SkillDoc,
    release: &Release,
) -> Result<Result<ManifestSkill, String>, OpError> {
    let id = format!("{}@{}", doc.slug, release.version);
    let version = match ctx.buckets.skills.get::<VersionDoc>(&version_key(&doc.slug, &release.version)).await {
        Ok(Some(v)) => v.value,
        Ok(None) => return Ok(Err(format!("The stored version {id} is missing."))),
        Err(StoreError::Corrupt { reason, .. }) => {
            return Ok(Err(format!("The stored version {id} is not valid: {reason}")));
        }
        Err(e) => return Err(e.into()),
    };
    let files = match normalize_bundle(&version.files, version.module_format) {
        Ok(files) => files,
        Err(e) => return Ok(Err(e)),
    };
    let sha256 = bundle_sha256(&files);
    if sha256 != version.sha256
        || sha256 != release.sha256
        || version.module_format != release.module_format
        || version.entry_point != release.entry_point
    {
        return Ok(Err(format!("Global skill bundle checksum mismatch for {id}.")));
    }
    let mut all_files = files;
    all_files.push(marker_file(&doc.slug, &version.version, &sha256, &version.entry_point, version.module_format));
    Ok(Ok(ManifestSkill {
        slug: doc.slug.clone(),
        version: version.version,
        module_format: version.module_format,
        entry_point: version.entry_point,
        sha256,
        skill_dir_name: skill_dir_name(&doc.slug),
        files: all_files,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: &str, sha: &str) -> VersionDoc {
        VersionDoc {
            version_id: format!("web@{v}"),
            skill_id: "web".into(),
            slug: "web".into(),
            version: v.into(),
            module_format: ModuleFormat::Esm,
            entry_point: "default".into(),
            sha256: sha.into(),
            files: vec![],
            created_by: "a".into(),
            created_at: 0,
        }
    }

    fn args(json: serde_json::Value) -> DeploySkillArgs {
        serde_json::from_value(json).expect("valid args")
    }

    #[test]
    fn redeploying_the_active_version_creates_no_release() {
        let mut doc = SkillDoc::new("web", None, None, "a", 1);
        let v1 = version("1.0.0", "s1");
        assert_eq!(doc.activate(&v1, ReleaseChannel::Stable, "a", 2), ("web:stable:1".to_string(), true));
        assert_eq!(doc.activate(&v1, ReleaseChannel::Stable, "b", 3), ("web:stable:1".to_string(), false));
        assert_eq!(doc.releases.len(), 1);
        assert_eq!(doc.releases[0].activated_at, 2);
        // Another channel is its own release.
        assert_eq!(doc.activate(&v1, ReleaseChannel::Canary, "a", 4), ("web:canary:2".to_string(), true));
        // Going back to an older version is a new release.
        let v2 = version("2.0.0", "s2");
        assert!(doc.activate(&v2, ReleaseChannel::Stable, "a", 5).1);
        assert_eq!(doc.activate(&v1, ReleaseChannel::Stable, "a", 6), ("web:stable:4".to_string(), true));
        let active: Vec<&str> = doc.releases.iter().filter(|r| r.is_active).map(|r| r.release_id.as_str()).collect();
        assert_eq!(active, ["web:canary:2", "web:stable:4"]);
        assert_eq!(doc.active_release(ReleaseChannel::Stable).map(|r| r.version.as_str()), Some("1.0.0"));
    }

    #[test]
    fn history_is_bounded_and_keeps_active_releases() {
        let mut doc = SkillDoc::new("web", None, None, "a", 1);
        doc.activate(&version("0.0.1", "canary"), ReleaseChannel::Canary, "a", 1);
        for i in 0..30 {
            doc.activate(&version(&format!("1.0.{i}"), &format!("s{i}")), ReleaseChannel::Stable, "a", i);
        }
        assert_eq!(doc.releases.len(), MAX_RELEASE_HISTORY);
        assert_eq!(doc.active_release(ReleaseChannel::Canary).map(|r| r.version.as_str()), Some("0.0.1"));
        assert_eq!(doc.active_release(ReleaseChannel::Stable).map(|r| r.version.as_str()), Some("1.0.29"));
        assert_eq!(doc.release_seq, 31);
    }

    #[test]
    fn deploy_validation_order_and_defaults() {
        let sha = |s: &str| common::skills::sha256_hex(s);
        let files = serde_json::json!([
            {"path": "SKILL.md", "content": "x", "sha256": sha("x")},
            {"path": "scripts/index.mjs", "content": "y", "sha256": sha("y")},
        ]);
        // Files are checked before the slug.
        let err = validated_version(&args(serde_json::json!({"slug": "!", "version": "x", "files": []})), "a", 0)
            .expect_err("refused");
        assert_eq!(err.message, "Global skill bundle must contain at least one file.");
        let err = validated_version(&args(serde_json::json!({"slug": "!", "version": "x", "files": files})), "a", 0)
            .expect_err("refused");
        assert_eq!(err.message, SLUG_ERROR);
        let err =
            validated_version(&args(serde_json::json!({"slug": " Web ", "version": "x", "files": files})), "a", 0)
                .expect_err("refused");
        assert_eq!(err.message, VERSION_ERROR);
        let err = validated_version(
            &args(serde_json::json!({"slug": "web", "version": "1.0.0", "files": files, "entryPoint": " "})),
            "a",
            0,
        )
        .expect_err("refused");
        assert_eq!(err.message, ENTRY_POINT_ERROR);
        let doc = validated_version(
            &args(serde_json::json!({"slug": " Web ", "version": " 1.0.0 ", "files": files})),
            "a",
            7,
        )
        .expect("valid");
        assert_eq!((doc.slug.as_str(), doc.version.as_str(), doc.version_id.as_str()), ("web", "1.0.0", "web@1.0.0"));
        assert_eq!(doc.entry_point, "default");
        assert_eq!(doc.module_format, ModuleFormat::Esm);
        assert_eq!(doc.sha256, bundle_sha256(&doc.files));
    }

    #[test]
    fn keys_escape_their_tokens() {
        assert_eq!(skill_key("web"), "skill.web");
        assert_eq!(version_key("web", "1.0.0+b"), "version.web.1=2E0=2E0=2Bb");
        assert_eq!(versions_filter("web"), "version.web.*");
    }

    #[test]
    fn status_and_delete_refuse_hostile_slugs_while_reading_the_arguments() {
        use common::api::skills::{SetSkillStatusArgs, SkillSlugArgs};
        let long = "a".repeat(5000);
        for slug in [long.as_str(), "a.>", "*", "a b"] {
            assert!(serde_json::from_value::<SkillSlugArgs>(serde_json::json!({"slug": slug})).is_err(), "{slug}");
            let args = serde_json::json!({"slug": slug, "status": "disabled"});
            assert!(serde_json::from_value::<SetSkillStatusArgs>(args).is_err(), "{slug}");
        }
        let args: SkillSlugArgs = serde_json::from_value(serde_json::json!({"slug": " Web "})).expect("valid");
        assert_eq!(skill_key(&args.slug), "skill.web", "normalised as before");
    }
}
