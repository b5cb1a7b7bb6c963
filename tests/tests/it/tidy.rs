//! Repository hygiene checks ("tidy"): plain file reads, no NATS. They keep the conventions that
//! reviews would otherwise have to catch: module docs, no disabled or placeholder code, tests that
//! wait on conditions instead of sleeping, workspace-managed manifests, and documentation that
//! lists every operation and every configuration key.

use std::path::{Path, PathBuf};

/// Directories never scanned: build output, local tools and data, VCS metadata.
const SKIP_DIRS: &[&str] = &["target", ".tools", ".git", "data", "node_modules"];

fn root() -> PathBuf {
    tests::project_root()
}

/// Every file under `dir` (recursively) whose name ends with `.{ext}`, sorted.
fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !SKIP_DIRS.contains(&name.as_str()) {
                    stack.push(path);
                }
            } else if kind.is_file() && path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    let root = root();
    path.strip_prefix(&root).unwrap_or(path).display().to_string()
}

/// Lines of `text` containing any of `needles`, as `file:line: text` entries.
fn find_lines(path: &Path, text: &str, needles: &[String]) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| needles.iter().any(|n| line.contains(n.as_str())))
        .map(|(i, line)| format!("{}:{}: {}", rel(path), i + 1, line.trim()))
        .collect()
}

/// The source directories of the library crates: `common/src` and `services/*/src`.
fn crate_source_dirs() -> Vec<PathBuf> {
    let root = root();
    let mut dirs = vec![root.join("common/src")];
    if let Ok(entries) = std::fs::read_dir(root.join("services")) {
        let mut services: Vec<PathBuf> =
            entries.flatten().map(|e| e.path().join("src")).filter(|p| p.is_dir()).collect();
        services.sort();
        dirs.extend(services);
    }
    dirs
}

#[test]
fn tidy_every_library_and_module_file_starts_with_a_module_doc() {
    let mut offenders = Vec::new();
    let mut checked = 0;
    for dir in crate_source_dirs() {
        for path in files_with_ext(&dir, "rs") {
            let is_binary_root = path.file_name().is_some_and(|n| n == "main.rs")
                || path.parent().is_some_and(|p| p.file_name().is_some_and(|n| n == "bin"));
            if is_binary_root {
                continue;
            }
            checked += 1;
            let text = read(&path);
            let first = text.lines().enumerate().find(|(_, line)| !line.trim().is_empty());
            match first {
                Some((_, line)) if line.trim_start().starts_with("//!") => {}
                Some((i, line)) => offenders.push(format!("{}:{}: {}", rel(&path), i + 1, line.trim())),
                None => offenders.push(format!("{}:1: (empty file)", rel(&path))),
            }
        }
    }
    assert!(checked > 0, "no library source files found under {}", root().display());
    assert!(
        offenders.is_empty(),
        "these files must start with a `//!` module doc comment saying what the module is for:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn tidy_no_disabled_tests_or_placeholder_code() {
    // Built at run time so this file does not match itself.
    let needles: Vec<String> = vec![
        concat!("#[", "ignore").to_string(),
        concat!("#[", "should_panic").to_string(),
        concat!("todo", "!(").to_string(),
        concat!("unimplemented", "!(").to_string(),
        concat!("dbg", "!(").to_string(),
    ];
    let mut offenders = Vec::new();
    for path in files_with_ext(&root(), "rs") {
        offenders.extend(find_lines(&path, &read(&path), &needles));
    }
    assert!(
        offenders.is_empty(),
        "disabled tests, placeholders or debug prints ({}) are not allowed; \
         fix the test or the code instead:\n{}",
        needles.join(", "),
        offenders.join("\n")
    );
}

#[test]
fn tidy_integration_tests_wait_on_conditions_instead_of_sleeping() {
    let needles: Vec<String> = vec![format!("std::thread::{}", "sleep"), format!("tokio::time::{}(", "sleep")];
    let mut offenders = Vec::new();
    for path in files_with_ext(&root().join("tests/tests"), "rs") {
        offenders.extend(find_lines(&path, &read(&path), &needles));
    }
    assert!(
        offenders.is_empty(),
        "tests must wait on a condition with a deadline (see the harness in tests/src), \
         not sleep:\n{}",
        offenders.join("\n")
    );
}

/// The member paths listed in the root manifest's `[workspace] members`, globs expanded.
fn workspace_members() -> Vec<PathBuf> {
    let root = root();
    let manifest = read(&root.join("Cargo.toml"));
    let start = manifest
        .find("members")
        .and_then(|i| manifest[i..].find('[').map(|j| i + j + 1))
        .expect("root Cargo.toml has a members list");
    let end = manifest[start..].find(']').map(|j| start + j).expect("members list is closed");
    let mut members = Vec::new();
    for entry in manifest[start..end].split(',') {
        let entry = entry.trim().trim_matches('"');
        if entry.is_empty() {
            continue;
        }
        if let Some(parent) = entry.strip_suffix("/*") {
            if let Ok(dirs) = std::fs::read_dir(root.join(parent)) {
                members.extend(dirs.flatten().map(|d| d.path()).filter(|p| p.join("Cargo.toml").is_file()));
            }
        } else {
            members.push(root.join(entry));
        }
    }
    members.sort();
    members
}

#[test]
fn tidy_member_manifests_inherit_version_and_edition_from_the_workspace() {
    let members = workspace_members();
    assert!(!members.is_empty(), "no workspace members found");
    let mut offenders = Vec::new();
    for member in members {
        let path = member.join("Cargo.toml");
        if !path.is_file() {
            offenders.push(format!("{}: listed in members but missing", rel(&path)));
            continue;
        }
        let text = read(&path);
        for key in ["version", "edition"] {
            let inherited = text.lines().any(|line| {
                let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
                compact == format!("{key}.workspace=true") || compact == format!("{key}={{workspace=true}}")
            });
            if !inherited {
                let line = text
                    .lines()
                    .position(|l| l.trim_start().starts_with(&format!("{key} ")))
                    .or_else(|| text.lines().position(|l| l.trim() == "[package]"))
                    .map_or(1, |i| i + 1);
                offenders.push(format!("{}:{line}: `{key}.workspace = true` expected", rel(&path)));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "member crates take version and edition from [workspace.package]:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn tidy_every_operation_is_documented_in_docs_api_md() {
    let path = root().join("docs/api.md");
    let doc = read(&path);
    let missing: Vec<String> = common::ops::CATALOGUE
        .iter()
        .filter(|spec| !doc.contains(&format!("`{}`", spec.name)))
        .map(|spec| format!("{}: `{}` ({})", rel(&path), spec.name, spec.summary))
        .collect();
    assert!(
        missing.is_empty(),
        "operations of common::ops::CATALOGUE missing from docs/api.md \
         (add a table row and a section):\n{}",
        missing.join("\n")
    );
}

/// The keys of a TOML defaults file as `section.key` with their line numbers, including keys
/// that are commented out (`# url = ...`), which document optional settings.
fn default_keys(text: &str) -> Vec<(usize, String)> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = header.trim().to_string();
            continue;
        }
        let body = line.trim_start_matches('#').trim();
        let Some((key, _value)) = body.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let is_key = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && key.starts_with(|c: char| c.is_ascii_lowercase());
        if !is_key {
            continue;
        }
        let full = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
        keys.push((i + 1, full));
    }
    keys
}

#[test]
fn tidy_every_default_key_is_documented_in_docs_configuration_md() {
    let defaults_path = root().join("common/src/defaults.toml");
    let defaults = read(&defaults_path);
    let keys = default_keys(&defaults);
    assert!(
        keys.iter().any(|(_, k)| k == "nats.url"),
        "the defaults parser should see commented-out keys such as nats.url: {keys:?}"
    );
    let doc = read(&root().join("docs/configuration.md"));
    let missing: Vec<String> = keys
        .iter()
        .filter(|(_, key)| !doc.contains(&format!("`{key}`")))
        .map(|(line, key)| format!("{}:{line}: `{key}`", rel(&defaults_path)))
        .collect();
    assert!(missing.is_empty(), "configuration keys missing from docs/configuration.md:\n{}", missing.join("\n"));
}

#[test]
fn tidy_defaults_parser_reads_sections_and_commented_keys() {
    let keys =
        default_keys("top = 1\n# Prose = with an equals sign\n[a]\nx = 1\n# y = \"z\"  # note\n[a.b]\nc = 2.0\n");
    let names: Vec<&str> = keys.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(names, ["top", "a.x", "a.y", "a.b.c"]);
}
