//! Materialising a global skills manifest into a worker's skills directory (spec §4.3 step 6c).
//!
//! Every skill is verified again on the worker with the server's own rules (`common::skills`):
//! each path, each file's checksum, the required files, the marker, and the bundle checksum.
//! A verified skill is written into a temporary directory next to the live one and swapped in
//! by renames, so a reader sees either the old or the new skill, never a mix; a skill that fails
//! verification or writing leaves its live directory untouched and is reported in
//! [`MaterialiseReport::failed`] while the other skills still install.
//!
//! Ownership is decided by the marker file: a directory with `.af-global-skill.json` is managed
//! and is removed when the manifest no longer lists it; a directory without it belongs to
//! someone else and is never touched. Unlike the original (spec §6.8 K3) a manifest skill whose
//! directory is such an unmanaged directory is not silently skipped: it is reported in
//! [`MaterialiseReport::shadowed`] so the caller can surface it.
//!
//! The functions block on `std::fs`; async callers run them on `spawn_blocking`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use common::skills::{
    LAYOUT_VERSION, LOCK_FILE, MANAGED_BY, MARKER_FILE, ManifestSkill, ReleaseChannel, SkillFile, SkillMarker,
    SkillsManifest, bundle_sha256, normalize_bundle, normalize_relative_path, sha256_hex, skill_dir_name,
};
use serde::{Deserialize, Serialize};

/// Prefix of the directories a skill is staged in before it is swapped in.
const STAGE_PREFIX: &str = ".af-tmp-";
/// Prefix of the directories a replaced or removed skill is moved to before it is deleted.
const BACKUP_PREFIX: &str = ".af-bak-";

#[derive(Debug, thiserror::Error)]
pub enum SkillsError {
    #[error("unsupported skills layout '{found}': this worker materialises '{LAYOUT_VERSION}'")]
    Layout { found: String },
    #[error("{action} '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the lock file: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SkillsError + 'a {
    move |source| SkillsError::Io { action, path: path.to_path_buf(), source }
}

/// `<skillsDir>/.skills.lock.json`: what the directory holds after a materialisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillsLock {
    pub layout_version: String,
    pub manifest_version: String,
    pub generated_at: i64,
    pub release_channel: ReleaseChannel,
    pub skills_dir: String,
    pub skills_count: usize,
    /// The directory names of the manifest's skills that are live and match the manifest
    /// (installed or unchanged), sorted.
    pub skills: Vec<String>,
    pub workspace_id: String,
    pub worker_id: String,
}

/// A manifest skill that was not materialised; its live directory, if any, is as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkillFailure {
    pub slug: String,
    pub dir: String,
    pub error: String,
}

/// What one materialisation did. Every list holds directory names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialiseReport {
    /// Written (new, or replacing an older managed version).
    pub installed: Vec<String>,
    /// Already live with the same marker (same slug, version, bundle checksum, entry point).
    pub unchanged: Vec<String>,
    /// Managed directories the manifest no longer lists, deleted.
    pub removed: Vec<String>,
    /// Manifest skills whose directory is taken by an unmanaged directory, which is left alone
    /// (spec §6.8 K3): the skill is not installed.
    pub shadowed: Vec<String>,
    /// Other unmanaged entries of the skills directory, left alone.
    pub unmanaged: Vec<String>,
    pub failed: Vec<SkillFailure>,
    pub lock: SkillsLock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A real directory holding a marker file.
    Managed,
    /// Anything else: a directory without marker, a file, a symlink.
    Unmanaged,
}

/// Materialises `manifest` into `skills_dir` (created when missing) and writes the lock file.
/// Per-skill problems are reported in [`MaterialiseReport::failed`]; the error is for what
/// stops the whole run (an unknown layout, an unusable skills directory, a managed directory
/// that cannot be removed, the lock file).
pub fn materialise(
    manifest: &SkillsManifest,
    skills_dir: &Path,
    worker_id: &str,
) -> Result<MaterialiseReport, SkillsError> {
    if manifest.layout_version != LAYOUT_VERSION {
        return Err(SkillsError::Layout { found: manifest.layout_version.clone() });
    }
    fs::create_dir_all(skills_dir).map_err(io("creating", skills_dir))?;
    remove_leftovers(skills_dir)?;
    let inventory = inventory(skills_dir)?;

    let mut report = MaterialiseReport {
        installed: Vec::new(),
        unchanged: Vec::new(),
        removed: Vec::new(),
        shadowed: Vec::new(),
        unmanaged: Vec::new(),
        failed: Vec::new(),
        lock: SkillsLock {
            layout_version: LAYOUT_VERSION.to_string(),
            manifest_version: manifest.manifest_version.clone(),
            generated_at: manifest.generated_at,
            release_channel: manifest.release_channel,
            skills_dir: skills_dir.display().to_string(),
            skills_count: 0,
            skills: Vec::new(),
            workspace_id: manifest.workspace_id.clone(),
            worker_id: worker_id.to_string(),
        },
    };
    let mut wanted: HashSet<String> = HashSet::new();
    let mut live: BTreeSet<String> = BTreeSet::new();
    for skill in &manifest.skills {
        // The server sends a safe name; sanitising again costs nothing and means a hostile
        // manifest can never name a path outside the skills directory.
        let dir = skill_dir_name(if skill.skill_dir_name.is_empty() { &skill.slug } else { &skill.skill_dir_name });
        let fail = |error: String| SkillFailure { slug: skill.slug.clone(), dir: dir.clone(), error };
        if !wanted.insert(dir.clone()) {
            report.failed.push(fail(format!("another skill of the manifest already uses the directory '{dir}'")));
            continue;
        }
        if inventory.get(&dir) == Some(&Entry::Unmanaged) {
            tracing::warn!(
                slug = %skill.slug,
                dir = %dir,
                "skill directory exists without {MARKER_FILE}; left alone and the skill is not installed"
            );
            report.shadowed.push(dir);
            continue;
        }
        let (files, marker) = match verify_skill(skill) {
            Ok(verified) => verified,
            Err(error) => {
                tracing::warn!(slug = %skill.slug, version = %skill.version, error = %error, "skill refused");
                report.failed.push(fail(error));
                continue;
            }
        };
        let live_dir = skills_dir.join(&dir);
        if inventory.get(&dir) == Some(&Entry::Managed)
            && fs::read_to_string(live_dir.join(MARKER_FILE)).is_ok_and(|c| c == marker.content)
        {
            report.unchanged.push(dir.clone());
            live.insert(dir);
            continue;
        }
        match install(skills_dir, &dir, &files) {
            Ok(()) => {
                tracing::info!(slug = %skill.slug, version = %skill.version, dir = %dir, "skill installed");
                report.installed.push(dir.clone());
                live.insert(dir);
            }
            Err(e) => {
                tracing::warn!(slug = %skill.slug, error = %e, "skill could not be installed");
                report.failed.push(fail(e.to_string()));
            }
        }
    }

    let mut names: Vec<(&String, &Entry)> = inventory.iter().collect();
    names.sort_by_key(|(name, _)| *name);
    for (name, entry) in names {
        match entry {
            Entry::Managed if !wanted.contains(name) => {
                remove_managed(skills_dir, name)?;
                tracing::info!(dir = %name, "managed skill no longer in the manifest; removed");
                report.removed.push(name.clone());
            }
            Entry::Unmanaged if !wanted.contains(name) => report.unmanaged.push(name.clone()),
            _ => {}
        }
    }

    report.lock.skills = live.into_iter().collect();
    report.lock.skills_count = report.lock.skills.len();
    write_lock(skills_dir, &report.lock)?;
    Ok(report)
}

/// Checks one manifest skill as the server does and returns the files to write (bundle files
/// with their checksums, then the marker) and the marker.
fn verify_skill(skill: &ManifestSkill) -> Result<(Vec<SkillFile>, SkillFile), String> {
    for file in &skill.files {
        // The server only sends normalised paths, so anything else is refused outright rather
        // than normalised into something the server never vouched for.
        if normalize_relative_path(&file.path).as_deref() != Ok(file.path.as_str()) {
            return Err(format!("invalid_relative_path:{}", file.path));
        }
    }
    let markers: Vec<&SkillFile> = skill.files.iter().filter(|f| f.path == MARKER_FILE).collect();
    let marker = match markers.as_slice() {
        [] => return Err(format!("Global skill bundle must include {MARKER_FILE}.")),
        [one] => (*one).clone(),
        _ => return Err(format!("Duplicate bundle file path: {MARKER_FILE}")),
    };
    if !marker.sha256.is_empty() && marker.sha256 != sha256_hex(&marker.content) {
        return Err(format!("Global skill checksum mismatch for {MARKER_FILE}."));
    }
    let parsed: SkillMarker =
        serde_json::from_str(&marker.content).map_err(|e| format!("{MARKER_FILE} is not a valid marker: {e}"))?;
    if parsed.managed_by != MANAGED_BY
        || parsed.slug != skill.slug
        || parsed.version != skill.version
        || parsed.sha256 != skill.sha256
    {
        return Err(format!("{MARKER_FILE} does not describe {}@{}.", skill.slug, skill.version));
    }
    // As the original worker: a missing per-file checksum is computed (the bundle checksum
    // below still covers every byte).
    let bundle: Vec<SkillFile> = skill
        .bundle_files()
        .map(|f| {
            let sha256 = if f.sha256.trim().is_empty() { sha256_hex(&f.content) } else { f.sha256.clone() };
            SkillFile { path: f.path.clone(), content: f.content.clone(), sha256 }
        })
        .collect();
    let mut files = normalize_bundle(&bundle, skill.module_format)?;
    if bundle_sha256(&files) != skill.sha256 {
        return Err(format!("Global skill bundle checksum mismatch for {}@{}.", skill.slug, skill.version));
    }
    let marker = SkillFile { sha256: sha256_hex(&marker.content), ..marker };
    files.push(marker.clone());
    Ok((files, marker))
}

/// The entries of the skills directory by name, hidden ones (the lock file, staging) excepted.
fn inventory(skills_dir: &Path) -> Result<HashMap<String, Entry>, SkillsError> {
    let mut out = HashMap::new();
    for entry in fs::read_dir(skills_dir).map_err(io("listing", skills_dir))? {
        let entry = entry.map_err(io("listing", skills_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // symlink_metadata: a symlink is never managed, whatever it points at.
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        let has_marker = fs::symlink_metadata(path.join(MARKER_FILE)).is_ok_and(|m| m.is_file());
        out.insert(name, if is_dir && has_marker { Entry::Managed } else { Entry::Unmanaged });
    }
    Ok(out)
}

/// Deletes staging and backup directories a crashed earlier run left behind. Their prefixes are
/// ours alone, and the manifest being materialised now is authoritative, so nothing in them is
/// needed.
fn remove_leftovers(skills_dir: &Path) -> Result<(), SkillsError> {
    for entry in fs::read_dir(skills_dir).map_err(io("listing", skills_dir))? {
        let entry = entry.map_err(io("listing", skills_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(STAGE_PREFIX) || name.starts_with(BACKUP_PREFIX)) {
            continue;
        }
        let path = entry.path();
        let result = if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(io("removing the leftover", &path))?;
    }
    Ok(())
}

/// Writes `files` into a staging directory and swaps it with `<skills_dir>/<dir>`: the live
/// directory is renamed into a backup, the staged one renamed into place, then the backup is
/// deleted. When the second rename fails the backup is renamed back.
fn install(skills_dir: &Path, dir: &str, files: &[SkillFile]) -> Result<(), SkillsError> {
    let stage = tempfile::Builder::new()
        .prefix(&format!("{STAGE_PREFIX}{dir}-"))
        .tempdir_in(skills_dir)
        .map_err(io("creating a staging directory in", skills_dir))?;
    for file in files {
        let target = stage.path().join(&file.path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let mut out = fs::File::create(&target).map_err(io("creating", &target))?;
        out.write_all(file.content.as_bytes()).map_err(io("writing", &target))?;
        // Durable before the rename publishes it.
        out.sync_all().map_err(io("syncing", &target))?;
    }
    let live = skills_dir.join(dir);
    if fs::symlink_metadata(&live).is_err() {
        fs::rename(stage.path(), &live).map_err(io("renaming the staged skill to", &live))?;
        let _ = stage.keep();
        return Ok(());
    }
    let backup_holder = backup_holder(skills_dir, dir)?;
    let backup = backup_holder.path().join(dir);
    fs::rename(&live, &backup).map_err(io("moving the live skill aside", &live))?;
    if let Err(source) = fs::rename(stage.path(), &live) {
        if let Err(restore) = fs::rename(&backup, &live) {
            tracing::error!(dir = %dir, error = %restore, "could not restore the previous skill directory");
            // Keep the backup so nothing is lost; the next run removes it.
            let _ = backup_holder.keep();
        }
        return Err(SkillsError::Io { action: "renaming the staged skill to", path: live, source });
    }
    let _ = stage.keep();
    if let Err(e) = backup_holder.close() {
        // The new skill is live; a leftover backup is removed by the next run.
        tracing::warn!(dir = %dir, error = %e, "could not delete the previous skill directory");
    }
    Ok(())
}

/// Removes a managed skill: renamed out of sight first, so it disappears at once rather than
/// file by file, then deleted.
fn remove_managed(skills_dir: &Path, dir: &str) -> Result<(), SkillsError> {
    let live = skills_dir.join(dir);
    let holder = backup_holder(skills_dir, dir)?;
    fs::rename(&live, holder.path().join(dir)).map_err(io("moving the removed skill aside", &live))?;
    if let Err(e) = holder.close() {
        tracing::warn!(dir = %dir, error = %e, "could not delete a removed skill; the next run retries");
    }
    Ok(())
}

fn backup_holder(skills_dir: &Path, dir: &str) -> Result<tempfile::TempDir, SkillsError> {
    tempfile::Builder::new()
        .prefix(&format!("{BACKUP_PREFIX}{dir}-"))
        .tempdir_in(skills_dir)
        .map_err(io("creating a backup directory in", skills_dir))
}

/// Writes the lock file through a temporary file and a rename, so readers never see half of it.
fn write_lock(skills_dir: &Path, lock: &SkillsLock) -> Result<(), SkillsError> {
    let path = skills_dir.join(LOCK_FILE);
    let mut content = serde_json::to_vec_pretty(lock)?;
    content.push(b'\n');
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{STAGE_PREFIX}lock-"))
        .tempfile_in(skills_dir)
        .map_err(io("creating a temporary lock file in", skills_dir))?;
    tmp.write_all(&content).map_err(io("writing", tmp.path()))?;
    tmp.as_file().sync_all().map_err(io("syncing", &path))?;
    tmp.persist(&path).map_err(|e| SkillsError::Io { action: "replacing", path: path.clone(), source: e.error })?;
    Ok(())
}

/// Reads the lock file of a skills directory, if there is one.
pub fn read_lock(skills_dir: &Path) -> Result<Option<SkillsLock>, SkillsError> {
    let path = skills_dir.join(LOCK_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SkillsError::Io { action: "reading", path, source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::skills::{ModuleFormat, manifest_version, marker_file};

    fn file(path: &str, content: &str) -> SkillFile {
        SkillFile { path: path.to_string(), content: content.to_string(), sha256: sha256_hex(content) }
    }

    /// A manifest skill built the way the server builds it.
    fn skill(slug: &str, version: &str, extra: &[(&str, &str)]) -> ManifestSkill {
        let mut given =
            vec![file("SKILL.md", &format!("# {slug} {version}\n")), file("scripts/index.mjs", "export {}")];
        given.extend(extra.iter().map(|(p, c)| file(p, c)));
        let mut files = normalize_bundle(&given, ModuleFormat::Esm).expect("valid bundle");
        let sha256 = bundle_sha256(&files);
        files.push(marker_file(slug, version, &sha256, "default", ModuleFormat::Esm));
        ManifestSkill {
            slug: slug.to_string(),
            version: version.to_string(),
            module_format: ModuleFormat::Esm,
            entry_point: "default".to_string(),
            sha256,
            skill_dir_name: skill_dir_name(slug),
            files,
        }
    }

    fn manifest(skills: Vec<ManifestSkill>) -> SkillsManifest {
        SkillsManifest {
            layout_version: LAYOUT_VERSION.to_string(),
            manifest_version: manifest_version(&skills),
            generated_at: 42,
            release_channel: ReleaseChannel::Stable,
            workspace_id: "default".to_string(),
            skills,
            problems: vec![],
        }
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn hidden_leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STAGE_PREFIX) || n.starts_with(BACKUP_PREFIX))
            .collect()
    }

    #[test]
    fn fresh_install_writes_files_marker_and_lock() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("skills");
        let m = manifest(vec![skill("web", "1.0.0", &[("lib/util.mjs", "x")]), skill("calc", "2.0.0", &[])]);
        let report = materialise(&m, &dir, "w1").expect("materialised");
        assert_eq!(report.installed, ["web", "calc"]);
        assert!(report.failed.is_empty() && report.removed.is_empty() && report.shadowed.is_empty());
        assert_eq!(read(&dir.join("web/SKILL.md")), "# web 1.0.0\n");
        assert_eq!(read(&dir.join("web/lib/util.mjs")), "x");
        assert_eq!(read(&dir.join("web/scripts/index.mjs")), "export {}");
        let marker: SkillMarker = serde_json::from_str(&read(&dir.join("web").join(MARKER_FILE))).unwrap();
        assert_eq!(marker.sha256, m.skills[0].sha256);
        let lock = read_lock(&dir).unwrap().expect("lock written");
        assert_eq!(lock.skills, ["calc", "web"]);
        assert_eq!(lock.skills_count, 2);
        assert_eq!(lock.manifest_version, m.manifest_version);
        assert_eq!(lock.worker_id, "w1");
        assert_eq!(lock.generated_at, 42);
        assert_eq!(lock.skills_dir, dir.display().to_string());
        assert_eq!(report.lock, lock);
        assert!(hidden_leftovers(&dir).is_empty());

        // The same manifest again rewrites nothing.
        let again = materialise(&m, &dir, "w1").expect("materialised");
        assert_eq!(again.unchanged, ["web", "calc"]);
        assert!(again.installed.is_empty());
    }

    #[test]
    fn a_new_version_replaces_the_old_one_completely() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        materialise(&manifest(vec![skill("web", "1.0.0", &[("old.txt", "old")])]), dir, "w1").unwrap();
        let report = materialise(&manifest(vec![skill("web", "1.1.0", &[("new.txt", "new")])]), dir, "w1").unwrap();
        assert_eq!(report.installed, ["web"]);
        assert!(!dir.join("web/old.txt").exists(), "files of the old version are gone");
        assert_eq!(read(&dir.join("web/new.txt")), "new");
        assert!(hidden_leftovers(dir).is_empty());
    }

    #[test]
    fn dropped_skills_are_removed_and_unmanaged_dirs_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        fs::create_dir_all(dir.join("mine")).unwrap();
        fs::write(dir.join("mine/SKILL.md"), "hand-made").unwrap();
        fs::write(dir.join("notes.txt"), "a file").unwrap();
        materialise(&manifest(vec![skill("web", "1.0.0", &[]), skill("calc", "1.0.0", &[])]), dir, "w1").unwrap();
        let report = materialise(&manifest(vec![skill("calc", "1.0.0", &[])]), dir, "w1").unwrap();
        assert_eq!(report.removed, ["web"]);
        assert_eq!(report.unchanged, ["calc"]);
        assert_eq!(report.unmanaged, ["mine", "notes.txt"]);
        assert!(!dir.join("web").exists());
        assert_eq!(read(&dir.join("mine/SKILL.md")), "hand-made");
        assert_eq!(read(&dir.join("notes.txt")), "a file");
        assert_eq!(read_lock(dir).unwrap().unwrap().skills, ["calc"]);
    }

    #[test]
    fn an_unmanaged_dir_shadowing_a_skill_is_reported_k3() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        fs::create_dir_all(dir.join("web")).unwrap();
        fs::write(dir.join("web/SKILL.md"), "someone else's").unwrap();
        let report = materialise(&manifest(vec![skill("web", "1.0.0", &[])]), dir, "w1").unwrap();
        assert_eq!(report.shadowed, ["web"]);
        assert!(report.installed.is_empty() && report.unmanaged.is_empty());
        assert_eq!(read(&dir.join("web/SKILL.md")), "someone else's");
        assert!(!dir.join("web").join(MARKER_FILE).exists());
        assert!(read_lock(dir).unwrap().unwrap().skills.is_empty());
    }

    #[test]
    fn a_tampered_file_aborts_that_skill_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        materialise(&manifest(vec![skill("web", "1.0.0", &[])]), dir, "w1").unwrap();
        let mut tampered = skill("web", "1.1.0", &[]);
        tampered.files[0].content.push_str("evil");
        let report = materialise(&manifest(vec![tampered, skill("calc", "1.0.0", &[])]), dir, "w1").unwrap();
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].dir, "web");
        assert_eq!(report.failed[0].error, "Global skill checksum mismatch for SKILL.md.");
        assert_eq!(report.installed, ["calc"]);
        assert_eq!(read(&dir.join("web/SKILL.md")), "# web 1.0.0\n", "the live skill is untouched");
        assert_eq!(read_lock(dir).unwrap().unwrap().skills, ["calc"]);

        // A consistent forgery (file and checksum changed) still fails the bundle checksum.
        let mut forged = skill("web", "1.1.0", &[]);
        forged.files[0] = file("SKILL.md", "evil");
        let report = materialise(&manifest(vec![forged]), dir, "w1").unwrap();
        assert_eq!(report.failed[0].error, "Global skill bundle checksum mismatch for web@1.1.0.");
        assert_eq!(read(&dir.join("web/SKILL.md")), "# web 1.0.0\n");
    }

    #[test]
    fn path_escapes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("skills");
        for bad in ["../escape.txt", "a/../../escape.txt", "/abs.txt", "a\\b.txt", "C:/x", "a//b", "a/."] {
            let mut s = skill("web", "1.0.0", &[]);
            s.files.insert(0, file(bad, "x"));
            let report = materialise(&manifest(vec![s]), &dir, "w1").unwrap();
            assert_eq!(report.failed.len(), 1, "{bad}");
            assert_eq!(report.failed[0].error, format!("invalid_relative_path:{bad}"));
        }
        assert!(!root.path().join("escape.txt").exists());
        assert!(!dir.join("web").exists());
        // A hostile directory name is sanitised into one plain directory.
        let mut s = skill("web", "1.0.0", &[]);
        s.skill_dir_name = "../outside".to_string();
        let report = materialise(&manifest(vec![s]), &dir, "w1").unwrap();
        assert_eq!(report.installed, ["---outside"]);
        assert!(!root.path().join("outside").exists());
    }

    #[test]
    fn a_marker_that_does_not_match_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let mut s = skill("web", "1.0.0", &[]);
        s.files.pop();
        let report = materialise(&manifest(vec![s]), root.path(), "w1").unwrap();
        assert_eq!(report.failed[0].error, "Global skill bundle must include .af-global-skill.json.");
        let mut s = skill("web", "1.0.0", &[]);
        let last = s.files.len() - 1;
        s.files[last] = marker_file("other", "1.0.0", &s.sha256, "default", ModuleFormat::Esm);
        let report = materialise(&manifest(vec![s]), root.path(), "w1").unwrap();
        assert_eq!(report.failed[0].error, ".af-global-skill.json does not describe web@1.0.0.");
    }

    #[test]
    fn leftovers_of_a_crashed_run_are_cleaned_and_layout_checked() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        fs::create_dir_all(dir.join(".af-tmp-web-abc/scripts")).unwrap();
        fs::create_dir_all(dir.join(".af-bak-web-def/web")).unwrap();
        fs::create_dir_all(dir.join(".git")).unwrap();
        materialise(&manifest(vec![]), dir, "w1").unwrap();
        assert!(hidden_leftovers(dir).is_empty());
        assert!(dir.join(".git").exists(), "other hidden entries are not ours");
        let mut m = manifest(vec![]);
        m.layout_version = "v0".to_string();
        assert!(matches!(materialise(&m, dir, "w1"), Err(SkillsError::Layout { .. })));
    }
}
