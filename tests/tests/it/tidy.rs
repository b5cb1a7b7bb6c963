//! Repository hygiene checks ("tidy"): plain file reads, no NATS. They keep the conventions that
//! reviews would otherwise have to catch: module docs, no disabled or placeholder code, tests that
//! wait on conditions instead of sleeping, workspace-managed manifests, services that depend only
//! on `common` and library crates, and documentation that lists every operation and every
//! configuration key.

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

/// The service crates, by package name (each lives in `services/<name>`). A service depends only
/// on `common` and on library crates that are not services (docs/architecture.md); the launcher,
/// the CLI and the tests are not services and may depend on them.
const SERVICES: &[&str] = &["ingress", "queue-manager", "scheduler", "hydration", "push-dispatcher", "cleanup"];

/// The kinds of dependency table a manifest can have, with the underscore spellings Cargo also
/// accepts.
const DEPENDENCY_KINDS: &[&str] =
    &["dependencies", "dev-dependencies", "dev_dependencies", "build-dependencies", "build_dependencies"];

/// Every dependency table of a parsed manifest, as `(name, table)`: the top-level ones and those
/// under each `[target.<cfg>]`.
fn dependency_tables(manifest: &toml::Table) -> Vec<(String, &toml::Table)> {
    fn collect<'a>(prefix: &str, table: &'a toml::Table, out: &mut Vec<(String, &'a toml::Table)>) {
        for kind in DEPENDENCY_KINDS {
            if let Some(deps) = table.get(*kind).and_then(toml::Value::as_table) {
                out.push((format!("{prefix}{kind}"), deps));
            }
        }
    }
    let mut out = Vec::new();
    collect("", manifest, &mut out);
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        for (cfg, target) in targets {
            if let Some(target) = target.as_table() {
                collect(&format!("target.{cfg}."), target, &mut out);
            }
        }
    }
    out
}

/// The service a dependency entry brings in, if any: its package (`package = ...`, else its key)
/// or the directory its `path` names. An entry with `workspace = true` is read together with the
/// entry of the same key in the root manifest's `[workspace.dependencies]`.
fn service_dependency(key: &str, entry: &toml::Value, workspace_deps: Option<&toml::Table>) -> Option<String> {
    let mut entries = vec![entry];
    if entry.get("workspace").and_then(toml::Value::as_bool) == Some(true) {
        entries.extend(workspace_deps.and_then(|deps| deps.get(key)));
    }
    let field = |name: &str| entries.iter().find_map(|e| e.get(name).and_then(toml::Value::as_str));
    let package = field("package").unwrap_or(key);
    let directory =
        field("path").and_then(|path| Path::new(path).file_name()).map(|name| name.to_string_lossy().into_owned());
    [Some(package.to_string()), directory].into_iter().flatten().find(|name| SERVICES.contains(&name.as_str()))
}

/// Every dependency of a service on another service. `workspace` is the root manifest's text (it
/// resolves `workspace = true` entries); `manifests` are the service manifests as `(path, text)`.
/// Each finding names the manifest, the crate, the service it depends on and the table; a
/// manifest that does not parse is a finding too.
fn service_to_service_dependencies(workspace: &str, manifests: &[(&str, &str)]) -> Vec<String> {
    let mut findings = Vec::new();
    let workspace = match workspace.parse::<toml::Table>() {
        Ok(table) => table,
        Err(e) => return vec![format!("the workspace manifest does not parse: {e}")],
    };
    let workspace_deps = workspace.get("workspace").and_then(|w| w.get("dependencies")).and_then(toml::Value::as_table);
    for (path, text) in manifests {
        let manifest = match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(e) => {
                findings.push(format!("{path}: does not parse: {e}"));
                continue;
            }
        };
        let name = manifest
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(toml::Value::as_str)
            .unwrap_or(path)
            .to_string();
        for (table, deps) in dependency_tables(&manifest) {
            for (key, entry) in deps {
                if let Some(service) = service_dependency(key, entry, workspace_deps).filter(|s| *s != name) {
                    findings.push(format!(
                        "{path}: service `{name}` depends on service `{service}` (`{key}` in [{table}])"
                    ));
                }
            }
        }
    }
    findings
}

#[test]
fn tidy_services_depend_only_on_common_and_library_crates() {
    let root = root();
    let workspace = read(&root.join("Cargo.toml"));
    let manifests: Vec<(String, String)> = SERVICES
        .iter()
        .map(|service| {
            let path = root.join("services").join(service).join("Cargo.toml");
            (rel(&path), read(&path))
        })
        .collect();
    for (path, text) in &manifests {
        let name = text.parse::<toml::Table>().ok().and_then(|m| {
            m.get("package").and_then(|p| p.get("name")).and_then(toml::Value::as_str).map(str::to_string)
        });
        assert!(
            name.as_deref().is_some_and(|n| SERVICES.contains(&n)),
            "{path}: expected the package of a service in {SERVICES:?}, found {name:?}"
        );
    }
    let borrowed: Vec<(&str, &str)> = manifests.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    let findings = service_to_service_dependencies(&workspace, &borrowed);
    assert!(
        findings.is_empty(),
        "a service depends only on `common` and on library crates, never on another service \
         (move what they share into a library crate such as `providers`, or into `common`):\n{}",
        findings.join("\n")
    );
}

/// The root manifest the fixtures below are read with.
const FIXTURE_WORKSPACE: &str = r#"
[workspace]
members = ["common", "services/scheduler", "services/hydration", "services/providers"]

[workspace.dependencies]
common = { path = "common" }
hydration = { path = "services/hydration" }
providers = { path = "services/providers" }
the-pool = { path = "services/scheduler", package = "scheduler" }
"#;

#[test]
fn tidy_service_dependency_check_passes_common_and_library_crates() {
    let clean = r#"
[package]
name = "cleanup"

[dependencies]
common.workspace = true
providers.workspace = true
tokio = { version = "1", features = ["rt"] }

[dev-dependencies]
tempfile = "3"
"#;
    assert_eq!(
        service_to_service_dependencies(FIXTURE_WORKSPACE, &[("services/cleanup/Cargo.toml", clean)]),
        Vec::<String>::new()
    );
}

#[test]
fn tidy_service_dependency_check_fails_on_a_service_depending_on_a_service() {
    let through_workspace = r#"
[package]
name = "scheduler"

[dependencies]
common.workspace = true
hydration.workspace = true
"#;
    assert_eq!(
        service_to_service_dependencies(FIXTURE_WORKSPACE, &[("services/scheduler/Cargo.toml", through_workspace)]),
        [
            "services/scheduler/Cargo.toml: service `scheduler` depends on service `hydration` (`hydration` in [dependencies])"
        ]
    );

    let by_path = r#"
[package]
name = "scheduler"

[dependencies]
common = { path = "../../common" }
hydration = { path = "../hydration" }
"#;
    assert_eq!(
        service_to_service_dependencies(FIXTURE_WORKSPACE, &[("services/scheduler/Cargo.toml", by_path)]),
        [
            "services/scheduler/Cargo.toml: service `scheduler` depends on service `hydration` (`hydration` in [dependencies])"
        ]
    );
}

#[test]
fn tidy_service_dependency_check_reads_every_dependency_table() {
    // Dev, build and target-specific tables count, and so do renamed dependencies (a workspace
    // entry that renames, a `package` key, a dotted table).
    let elsewhere = r#"
[package]
name = "cleanup"

[dev-dependencies]
the-pool.workspace = true

[build-dependencies]
ingest = { package = "ingress", version = "0.1" }

[target.'cfg(unix)'.dependencies.queue]
path = "../queue-manager"

[target.'cfg(unix)'.dev_dependencies]
push-dispatcher = { path = "../push-dispatcher" }
"#;
    let findings = service_to_service_dependencies(FIXTURE_WORKSPACE, &[("services/cleanup/Cargo.toml", elsewhere)]);
    let expected = [
        "service `cleanup` depends on service `scheduler` (`the-pool` in [dev-dependencies])",
        "service `cleanup` depends on service `ingress` (`ingest` in [build-dependencies])",
        "service `cleanup` depends on service `queue-manager` (`queue` in [target.cfg(unix).dependencies])",
        "service `cleanup` depends on service `push-dispatcher` (`push-dispatcher` in [target.cfg(unix).dev_dependencies])",
    ];
    assert_eq!(findings.len(), expected.len(), "{findings:#?}");
    for want in expected {
        assert!(findings.iter().any(|f| f.ends_with(want)), "missing `{want}` in {findings:#?}");
    }
}

#[test]
fn tidy_service_dependency_check_reports_a_manifest_that_does_not_parse() {
    let broken =
        service_to_service_dependencies(FIXTURE_WORKSPACE, &[("services/cleanup/Cargo.toml", "[dependencies\n")]);
    assert!(broken.len() == 1 && broken[0].contains("does not parse"), "{broken:?}");
}
