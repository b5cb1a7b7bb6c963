//! Global skill bundles (spec §3.19), the pure part shared by the server (hydration, which stores
//! and serves them) and the worker (worker-kit, which materialises them): the manifest types,
//! bundle normalisation with the original's error strings, checksums, the marker file and the
//! manifest version.
//!
//! Both sides run the same path rule, so a bundle the server accepted is one the worker accepts,
//! and a path the worker would refuse can never be stored. The rule is stricter than the
//! original's (spec §6.8 K2): see [`normalize_relative_path`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ops::SKILL_BUNDLE_MAX_BYTES;

/// The layout of a materialised skills directory that manifests describe.
pub const LAYOUT_VERSION: &str = "openclaw-workspace-skill-v1";
/// The file that marks a skill directory as managed by agent-factory.
pub const MARKER_FILE: &str = ".af-global-skill.json";
/// The lock file a worker writes at the root of its skills directory.
pub const LOCK_FILE: &str = ".skills.lock.json";
/// The `managedBy` value of every marker file.
pub const MANAGED_BY: &str = "agent-factory";
/// The directory name of a skill whose slug sanitises to nothing.
pub const UNNAMED_SKILL_DIR: &str = "unnamed-skill";

/// How a skill's entry script is loaded; decides the required entry file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModuleFormat {
    #[default]
    Esm,
    Cjs,
}

impl ModuleFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Esm => "esm",
            Self::Cjs => "cjs",
        }
    }

    /// The entry script every bundle of this format must contain.
    pub fn entry_script(self) -> &'static str {
        match self {
            Self::Esm => "scripts/index.mjs",
            Self::Cjs => "scripts/index.cjs",
        }
    }
}

/// The release channels a skill version can be deployed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseChannel {
    #[default]
    Stable,
    Canary,
}

impl ReleaseChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
        }
    }
}

/// One file of a bundle. `sha256` is lower-case hex of the UTF-8 content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillFile {
    pub path: String,
    pub content: String,
    #[serde(default)]
    pub sha256: String,
}

/// One skill of a manifest: the bundle files (sorted by path) followed by the marker file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestSkill {
    pub slug: String,
    pub version: String,
    pub module_format: ModuleFormat,
    pub entry_point: String,
    /// The bundle checksum ([`bundle_sha256`]) over the files without the marker.
    pub sha256: String,
    pub skill_dir_name: String,
    pub files: Vec<SkillFile>,
}

impl ManifestSkill {
    /// The bundle's own files: every file but the marker.
    pub fn bundle_files(&self) -> impl Iterator<Item = &SkillFile> {
        self.files.iter().filter(|f| f.path != MARKER_FILE)
    }

    /// The marker file, when the manifest carries one.
    pub fn marker(&self) -> Option<&SkillFile> {
        self.files.iter().find(|f| f.path == MARKER_FILE)
    }
}

/// A skill left out of a manifest because its stored bundle is corrupt (spec §6.8 K1: the
/// original failed the whole manifest instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillProblem {
    pub slug: String,
    pub version: String,
    pub error: String,
}

/// What `getWorkerGlobalSkillsManifest` returns and a worker materialises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillsManifest {
    pub layout_version: String,
    pub manifest_version: String,
    pub generated_at: i64,
    pub release_channel: ReleaseChannel,
    pub workspace_id: String,
    pub skills: Vec<ManifestSkill>,
    #[serde(default)]
    pub problems: Vec<SkillProblem>,
}

/// The content of a marker file. Field order is the serialised key order, which is the
/// original's: `{slug, version, sha256, managedBy, entryPoint, moduleFormat}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillMarker {
    pub slug: String,
    pub version: String,
    pub sha256: String,
    pub managed_by: String,
    pub entry_point: String,
    pub module_format: ModuleFormat,
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    hex::encode(Sha256::digest(data.as_ref()))
}

/// Normalises a bundle path as the original does (backslashes become `/`, leading slashes are
/// dropped, so `/SKILL.md` is `SKILL.md`) and then refuses every form that could leave the skill
/// directory or means something else on some platform (spec §6.8 K2): an empty path, any empty,
/// `.` or `..` segment (anywhere, trailing included), a drive letter (`C:` as any segment's
/// start, which also covers `\\?\C:\…`), and NUL or any other control character. The error is
/// `invalid_relative_path:<original>` for all of them.
pub fn normalize_relative_path(raw: &str) -> Result<String, String> {
    let invalid = || format!("invalid_relative_path:{raw}");
    let slashed = raw.replace('\\', "/");
    let path = slashed.trim_start_matches('/');
    if path.is_empty() || path.chars().any(char::is_control) {
        return Err(invalid());
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." || starts_with_drive_letter(segment) {
            return Err(invalid());
        }
    }
    Ok(path.to_string())
}

fn starts_with_drive_letter(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':'
}

/// Validates and normalises a bundle (spec §3.19.1): the checks run in the spec's order, the
/// first failure is returned with the original's message, and the result is sorted by path with
/// every `sha256` set to the lower-case hex of its content.
pub fn normalize_bundle(files: &[SkillFile], module_format: ModuleFormat) -> Result<Vec<SkillFile>, String> {
    if files.is_empty() {
        return Err("Global skill bundle must contain at least one file.".to_string());
    }
    let mut out: Vec<SkillFile> = Vec::with_capacity(files.len());
    let mut seen = std::collections::HashSet::with_capacity(files.len());
    let mut total_bytes = 0usize;
    for file in files {
        let path = normalize_relative_path(&file.path)?;
        if path == MARKER_FILE {
            return Err(format!("Bundle files must not include {MARKER_FILE}."));
        }
        if !seen.insert(path.clone()) {
            return Err(format!("Duplicate bundle file path: {path}"));
        }
        total_bytes = total_bytes.saturating_add(file.content.len());
        if total_bytes > SKILL_BUNDLE_MAX_BYTES {
            return Err("Global skill bundle too large (max 200KB).".to_string());
        }
        let given = file.sha256.trim();
        if given.is_empty() {
            return Err(format!("Missing bundle checksum for {path}."));
        }
        let actual = sha256_hex(&file.content);
        // Hex is case-insensitive; the stored form is always the lower-case one computed here.
        if !given.eq_ignore_ascii_case(&actual) {
            return Err(format!("Global skill checksum mismatch for {path}."));
        }
        out.push(SkillFile { path, content: file.content.clone(), sha256: actual });
    }
    if !seen.contains("SKILL.md") {
        return Err("Global skill bundle must include SKILL.md.".to_string());
    }
    let entry = module_format.entry_script();
    if !seen.contains(entry) {
        return Err(format!("Global skill bundle must include {entry}."));
    }
    // The original sorts with a locale compare; for the ASCII paths bundles use in practice that
    // is close to byte order, and byte order is what every reader can reproduce exactly.
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The bundle checksum over normalised (sorted) files: SHA-256 of
/// `path\nsha256\ncontent` per file, joined with `\n---\n`.
pub fn bundle_sha256<'a>(files: impl IntoIterator<Item = &'a SkillFile>) -> String {
    let mut hasher = Sha256::new();
    for (i, file) in files.into_iter().enumerate() {
        if i > 0 {
            hasher.update(b"\n---\n");
        }
        hasher.update(file.path.as_bytes());
        hasher.update(b"\n");
        hasher.update(file.sha256.as_bytes());
        hasher.update(b"\n");
        hasher.update(file.content.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The directory a skill is materialised into: the slug lower-cased, every character outside
/// `[a-z0-9-_]` replaced by `-`, `unnamed-skill` when empty. The result never starts with `.`,
/// so it can never be `.`/`..` or collide with the lock file or temporary directories.
pub fn skill_dir_name(slug: &str) -> String {
    let name: String = slug
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' { c } else { '-' })
        .collect();
    if name.is_empty() { UNNAMED_SKILL_DIR.to_string() } else { name }
}

/// The marker file of a skill: 2-space-indented JSON plus a trailing newline, with its checksum.
pub fn marker_file(
    slug: &str,
    version: &str,
    sha256: &str,
    entry_point: &str,
    module_format: ModuleFormat,
) -> SkillFile {
    let marker = SkillMarker {
        slug: slug.to_string(),
        version: version.to_string(),
        sha256: sha256.to_string(),
        managed_by: MANAGED_BY.to_string(),
        entry_point: entry_point.to_string(),
        module_format,
    };
    // A struct of strings always serialises; the fallback only keeps this function total.
    let mut content = serde_json::to_string_pretty(&marker).unwrap_or_default();
    content.push('\n');
    let sha256 = sha256_hex(&content);
    SkillFile { path: MARKER_FILE.to_string(), content, sha256 }
}

/// The manifest version (spec §3.19.3): SHA-256 of the seed joining, with `|`, per skill (in the
/// given order) `<slug>@<version>:<bundleSha>:` followed by the sorted `<path>:<sha256>` of its
/// non-marker files joined with `,`; the seed is `empty` when there are no skills.
pub fn manifest_version(skills: &[ManifestSkill]) -> String {
    if skills.is_empty() {
        return sha256_hex("empty");
    }
    let parts: Vec<String> = skills
        .iter()
        .map(|skill| {
            let mut entries: Vec<String> = skill.bundle_files().map(|f| format!("{}:{}", f.path, f.sha256)).collect();
            entries.sort();
            format!("{}@{}:{}:{}", skill.slug, skill.version, skill.sha256, entries.join(","))
        })
        .collect();
    sha256_hex(parts.join("|"))
}

/// `^[a-z0-9][a-z0-9-_]{1,127}$` (spec §3.19.2), on the trimmed, lower-cased slug.
pub fn is_valid_slug(slug: &str) -> bool {
    let bytes = slug.as_bytes();
    (2..=128).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..].iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `^\d+\.\d+\.\d+(?:[-+][A-Za-z0-9.-]+)?$` (spec §3.19.2), on the trimmed version.
pub fn is_valid_version(version: &str) -> bool {
    let (core, suffix) = match version.find(['-', '+']) {
        Some(i) => (&version[..i], Some(&version[i + 1..])),
        None => (version, None),
    };
    let mut numbers = core.split('.');
    let numeric = |part: Option<&str>| part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !(numeric(numbers.next()) && numeric(numbers.next()) && numeric(numbers.next()) && numbers.next().is_none()) {
        return false;
    }
    match suffix {
        None => true,
        Some(s) => !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str) -> SkillFile {
        SkillFile { path: path.to_string(), content: content.to_string(), sha256: sha256_hex(content) }
    }

    fn minimal() -> Vec<SkillFile> {
        vec![file("scripts/index.mjs", "export default 1;\n"), file("SKILL.md", "# Skill\n")]
    }

    fn err(files: &[SkillFile], format: ModuleFormat) -> String {
        normalize_bundle(files, format).expect_err("must be refused")
    }

    #[test]
    fn sha256_hex_is_lower_case_and_stable() {
        assert_eq!(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn normalisation_sorts_and_recomputes_checksums() {
        let mut files = minimal();
        files.push(SkillFile {
            path: "\\docs\\README.md".to_string(),
            content: "hi".to_string(),
            sha256: sha256_hex("hi").to_uppercase(),
        });
        files.push(file("/lib/a.mjs", "a"));
        let out = normalize_bundle(&files, ModuleFormat::Esm).expect("valid");
        let paths: Vec<&str> = out.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["SKILL.md", "docs/README.md", "lib/a.mjs", "scripts/index.mjs"]);
        assert_eq!(out[1].sha256, sha256_hex("hi"), "stored checksums are lower-case");
        // Input order does not change the result.
        let mut reversed = files.clone();
        reversed.reverse();
        assert_eq!(normalize_bundle(&reversed, ModuleFormat::Esm).expect("valid"), out);
    }

    #[test]
    fn every_error_string_in_the_spec_order() {
        assert_eq!(err(&[], ModuleFormat::Esm), "Global skill bundle must contain at least one file.");
        let mut files = minimal();
        files.push(file("a/../b", "x"));
        assert_eq!(err(&files, ModuleFormat::Esm), "invalid_relative_path:a/../b");
        let mut files = minimal();
        files.push(file("/.af-global-skill.json", "{}"));
        assert_eq!(err(&files, ModuleFormat::Esm), "Bundle files must not include .af-global-skill.json.");
        let mut files = minimal();
        files.push(file("\\SKILL.md", "again"));
        assert_eq!(err(&files, ModuleFormat::Esm), "Duplicate bundle file path: SKILL.md");
        let big = "x".repeat(100_000);
        let files = vec![file("SKILL.md", &big), file("scripts/index.mjs", &big)];
        assert!(normalize_bundle(&files, ModuleFormat::Esm).is_ok(), "exactly 200 000 bytes is allowed");
        let files = vec![file("SKILL.md", &big), file("scripts/index.mjs", &big), file("c", "y")];
        assert_eq!(err(&files, ModuleFormat::Esm), "Global skill bundle too large (max 200KB).");
        let mut files = minimal();
        files[0].sha256 = "  ".to_string();
        assert_eq!(err(&files, ModuleFormat::Esm), "Missing bundle checksum for scripts/index.mjs.");
        let mut files = minimal();
        files[1].sha256 = sha256_hex("other");
        assert_eq!(err(&files, ModuleFormat::Esm), "Global skill checksum mismatch for SKILL.md.");
        let files = vec![file("scripts/index.mjs", "x")];
        assert_eq!(err(&files, ModuleFormat::Esm), "Global skill bundle must include SKILL.md.");
        let files = vec![file("SKILL.md", "x")];
        assert_eq!(err(&files, ModuleFormat::Esm), "Global skill bundle must include scripts/index.mjs.");
        assert_eq!(err(&minimal(), ModuleFormat::Cjs), "Global skill bundle must include scripts/index.cjs.");
        let cjs = vec![file("SKILL.md", "x"), file("scripts/index.cjs", "y")];
        assert!(normalize_bundle(&cjs, ModuleFormat::Cjs).is_ok());
    }

    #[test]
    fn the_first_failing_file_wins() {
        // A bad path after a duplicate: the duplicate (earlier file) is reported.
        let files = vec![file("SKILL.md", "a"), file("SKILL.md", "b"), file("../x", "c")];
        assert_eq!(err(&files, ModuleFormat::Esm), "Duplicate bundle file path: SKILL.md");
        // A checksum mismatch before the missing required files.
        let files = vec![SkillFile { path: "x".into(), content: "x".into(), sha256: "00".into() }];
        assert_eq!(err(&files, ModuleFormat::Esm), "Global skill checksum mismatch for x.");
    }

    #[test]
    fn path_escapes_are_refused_k2() {
        for bad in [
            "",
            "/",
            "\\\\",
            ".",
            "./",
            "..",
            "../x",
            "a/..",
            "a/../b",
            "a\\..\\b",
            "./SKILL.md",
            "a/./b",
            "a/.",
            "a//b",
            "a/",
            "C:",
            "C:foo",
            "a:b",
            "c:/windows/x",
            "C:\\Windows\\x",
            "\\\\?\\C:\\x",
            "a\0b",
            "a\nb",
            "tab\there",
            "del\u{7f}",
        ] {
            assert_eq!(normalize_relative_path(bad), Err(format!("invalid_relative_path:{bad}")), "{bad:?}");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for (raw, normal) in [
            ("SKILL.md", "SKILL.md"),
            ("/SKILL.md", "SKILL.md"),
            ("//a/b.txt", "a/b.txt"),
            ("\\scripts\\index.mjs", "scripts/index.mjs"),
            ("..hidden/x", "..hidden/x"),
            ("a/b..c", "a/b..c"),
            (".env.example", ".env.example"),
            ("ab:c", "ab:c"),
            ("ünï/cødé.md", "ünï/cødé.md"),
        ] {
            assert_eq!(normalize_relative_path(raw).as_deref(), Ok(normal), "{raw:?}");
        }
    }

    #[test]
    fn bundle_sha_matches_the_spec_formula() {
        let files = normalize_bundle(&minimal(), ModuleFormat::Esm).expect("valid");
        let expected = sha256_hex(format!(
            "SKILL.md\n{}\n# Skill\n\n---\nscripts/index.mjs\n{}\nexport default 1;\n",
            sha256_hex("# Skill\n"),
            sha256_hex("export default 1;\n")
        ));
        assert_eq!(bundle_sha256(&files), expected);
        assert_eq!(bundle_sha256(&files), bundle_sha256(&normalize_bundle(&minimal(), ModuleFormat::Esm).unwrap()));
    }

    #[test]
    fn dir_names_are_sanitised() {
        assert_eq!(skill_dir_name("web-search_2"), "web-search_2");
        assert_eq!(skill_dir_name("Web Search!"), "web-search-");
        assert_eq!(skill_dir_name("../x"), "---x");
        assert_eq!(skill_dir_name(""), "unnamed-skill");
    }

    #[test]
    fn marker_is_indented_json_in_the_original_key_order() {
        let marker = marker_file("web", "1.0.0", "abc", "default", ModuleFormat::Cjs);
        assert_eq!(marker.path, ".af-global-skill.json");
        assert_eq!(
            marker.content,
            "{\n  \"slug\": \"web\",\n  \"version\": \"1.0.0\",\n  \"sha256\": \"abc\",\n  \
             \"managedBy\": \"agent-factory\",\n  \"entryPoint\": \"default\",\n  \"moduleFormat\": \"cjs\"\n}\n"
        );
        assert_eq!(marker.sha256, sha256_hex(&marker.content));
    }

    #[test]
    fn manifest_version_follows_the_seed_formula() {
        assert_eq!(manifest_version(&[]), sha256_hex("empty"));
        let files = normalize_bundle(&minimal(), ModuleFormat::Esm).expect("valid");
        let sha = bundle_sha256(&files);
        let mut with_marker = files.clone();
        with_marker.push(marker_file("web", "1.0.0", &sha, "default", ModuleFormat::Esm));
        let skill = ManifestSkill {
            slug: "web".into(),
            version: "1.0.0".into(),
            module_format: ModuleFormat::Esm,
            entry_point: "default".into(),
            sha256: sha.clone(),
            skill_dir_name: "web".into(),
            files: with_marker,
        };
        let seed = format!(
            "web@1.0.0:{sha}:SKILL.md:{},scripts/index.mjs:{}",
            sha256_hex("# Skill\n"),
            sha256_hex("export default 1;\n")
        );
        assert_eq!(manifest_version(std::slice::from_ref(&skill)), sha256_hex(&seed));
        let mut other = skill.clone();
        other.slug = "xyz".into();
        assert_eq!(manifest_version(&[skill.clone(), other.clone()]), {
            let other_seed = seed.replacen("web@", "xyz@", 1);
            sha256_hex(format!("{seed}|{other_seed}"))
        });
    }

    #[test]
    fn slug_and_version_rules() {
        for ok in ["ab", "a1", "0-x", "web_search-2", &"a".repeat(128)] {
            assert!(is_valid_slug(ok), "{ok}");
        }
        for bad in ["", "a", "-ab", "_ab", "Ab", "a b", "a.b", "ü-x", &"a".repeat(129)] {
            assert!(!is_valid_slug(bad), "{bad}");
        }
        for ok in ["1.0.0", "10.20.30", "1.0.0-beta.1", "1.0.0+build.5", "1.0.0-rc-1", "0.0.0-a.b-c"] {
            assert!(is_valid_version(ok), "{ok}");
        }
        for bad in [
            "",
            "1",
            "1.0",
            "1.0.0.0",
            "v1.0.0",
            "1.0.0-",
            "1.0.0+",
            "1.0.0-a_b",
            "1..0",
            "1.0.x",
            "١.٠.٠",
            "1.0.0-a+b",
        ] {
            assert!(!is_valid_version(bad), "{bad}");
        }
    }

    #[test]
    fn manifest_round_trips_in_camel_case() {
        let manifest = SkillsManifest {
            layout_version: LAYOUT_VERSION.into(),
            manifest_version: manifest_version(&[]),
            generated_at: 5,
            release_channel: ReleaseChannel::Canary,
            workspace_id: "default".into(),
            skills: vec![],
            problems: vec![SkillProblem { slug: "x".into(), version: "1.0.0".into(), error: "bad".into() }],
        };
        let json = serde_json::to_value(&manifest).expect("serialise");
        assert_eq!(json["layoutVersion"], "openclaw-workspace-skill-v1");
        assert_eq!(json["releaseChannel"], "canary");
        assert_eq!(json["problems"][0]["error"], "bad");
        let back: SkillsManifest = serde_json::from_value(json).expect("deserialise");
        assert_eq!(back, manifest);
    }
}
