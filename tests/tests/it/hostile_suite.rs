//! The hostile-input suite: generated inputs against every operation's argument decoding, the
//! raw request bodies, the streamed snapshot and media routes (over real HTTP, counted by
//! status: no 5xx, no request that hangs), and against snapshot archives and skill bundles
//! (proptest: no panic, no path escape, limits enforced). Its figures are in
//! `docs/security.md`; they print with
//! `cargo nextest run -p tests -E 'test(hostile_suite)' --no-capture`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tests::{ADMIN_TOKEN, MANUAL, TestStack, pseudo_random, seed_profile};

/// A request that has not answered within this long counts as hung.
const HANG: Duration = Duration::from_secs(20);

/// Values that have broken services before: wildcards and separators in ids, control
/// characters, path escapes, huge and negative numbers, wrong types, deep or wide structures.
fn hostile_values() -> Vec<Value> {
    let deep = (0..200).fold(json!(1), |inner, _| json!([inner]));
    let wide: serde_json::Map<String, Value> = (0..2_000).map(|i| (format!("k{i}"), json!(i))).collect();
    vec![
        json!(""),
        json!("*"),
        json!(">"),
        json!("a.>"),
        json!("a.b"),
        json!("../../etc/passwd"),
        json!("/absolute"),
        json!("nul\u{0}byte"),
        json!("line\nbreak\r\t"),
        json!("%2e%2e%2f"),
        json!("\u{202e}rtl\u{feff}"),
        json!("x".repeat(5_000)),
        json!("y".repeat(300_000)),
        json!(-1),
        json!(0),
        json!(1),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1.5),
        json!(-1e308),
        json!(1e308),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!(["*", ">"]),
        json!({"$ref": "#", "__proto__": {"admin": true}}),
        deep,
        Value::Object(wide),
    ]
}

/// The top-level argument names of every operation, from the generated OpenAPI document.
fn argument_names() -> BTreeMap<String, Vec<String>> {
    let document = common::api::openapi::document();
    let schemas = &document["components"]["schemas"];
    let resolve = |schema: &Value| match schema["$ref"].as_str() {
        Some(reference) => schemas[reference.trim_start_matches("#/components/schemas/")].clone(),
        None => schema.clone(),
    };
    common::api::CATALOGUE
        .iter()
        .map(|spec| {
            let path = format!("/v1/ops/{}", spec.name);
            let schema =
                resolve(&document["paths"][&path]["post"]["requestBody"]["content"]["application/json"]["schema"]);
            let names = schema["properties"].as_object().map(|p| p.keys().cloned().collect()).unwrap_or_default();
            (spec.name.to_string(), names)
        })
        .collect()
}

/// Requests sent and answers received, by HTTP status; hangs and 5xx are listed.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, usize>,
    server_errors: Vec<String>,
    hangs: Vec<String>,
}

impl Tally {
    async fn send(&mut self, what: String, request: reqwest::RequestBuilder) {
        match tokio::time::timeout(HANG, request.send()).await {
            Err(_) => self.hangs.push(what),
            Ok(Err(e)) => self.server_errors.push(format!("{what}: no answer: {e}")),
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                *self.by_status.entry(status).or_default() += 1;
                if status >= 500 {
                    let body = response.text().await.unwrap_or_default();
                    self.server_errors.push(format!("{what}: {status} {}", body.chars().take(300).collect::<String>()));
                }
            }
        }
    }

    fn total(&self) -> usize {
        self.by_status.values().sum::<usize>() + self.hangs.len()
    }

    fn report(&self, name: &str) {
        let statuses: Vec<String> = self.by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        println!(
            "hostile suite, {name}: {} requests; by status {{{}}}; 5xx: {}; hangs: {}",
            self.total(),
            statuses.join(", "),
            self.server_errors.len(),
            self.hangs.len()
        );
        assert!(self.server_errors.is_empty(), "{name}: server errors:\n{}", self.server_errors.join("\n"));
        assert!(self.hangs.is_empty(), "{name}: requests that hung:\n{}", self.hangs.join("\n"));
    }
}

#[tokio::test]
async fn hostile_suite_operations_and_streamed_routes_never_5xx_nor_hang() {
    let stack = TestStack::start_with(MANUAL).await;
    seed_profile(&stack.ctx, "agent-a").await;
    stack.wait_queue_ready().await;
    let http = reqwest::Client::new();
    let values = hostile_values();
    let mut tally = Tally::default();
    let mut seed = 1u64;
    let mut pick = |n: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };

    // Every operation: each argument set to each hostile value once (the others valid-looking
    // or missing), then random mixes.
    for (op, names) in argument_names() {
        let url = stack.http_url(&format!("/v1/ops/{op}"));
        let mut bodies: Vec<Value> = vec![json!({}), json!([]), json!(null), json!("string")];
        for name in &names {
            for value in &values {
                bodies.push(json!({ name.as_str(): long_poll_safe(name, value) }));
            }
        }
        for _ in 0..20 {
            let args: serde_json::Map<String, Value> =
                names.iter().map(|n| (n.clone(), long_poll_safe(n, &values[pick(values.len())]))).collect();
            bodies.push(Value::Object(args));
        }
        for body in bodies {
            let what = format!("{op} {}", body.to_string().chars().take(120).collect::<String>());
            tally.send(what, http.post(&url).bearer_auth(ADMIN_TOKEN).json(&body)).await;
        }
    }

    // Raw bodies no JSON encoder would produce.
    let raw: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"{\"conversationId\":".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
        b"{\"a\":1,\"a\":2}".to_vec(),
        "[".repeat(100_000).into_bytes(),
        pseudo_random(4_096, 7),
        vec![b' '; 3 * 1024 * 1024],
    ];
    for body in raw {
        for op in ["enqueueMessage", "claimNextJob", "upsertAgentProfile", "importPlaintextSecret"] {
            let request =
                http.post(stack.http_url(&format!("/v1/ops/{op}"))).bearer_auth(ADMIN_TOKEN).body(body.clone());
            tally.send(format!("{op} raw body of {} bytes", body.len()), request).await;
        }
    }

    // The streamed routes: hostile ids, content types and bodies.
    let ids = ["x", "*", "a.>", "..%2f..%2fetc", "%00", &"s".repeat(5_000), "conv.snap", "%E2%80%AE"];
    let bodies = [Vec::new(), b"not a tarball".to_vec(), pseudo_random(256 * 1024, 3)];
    for id in ids {
        for body in &bodies {
            let url = stack.http_url(&format!("/v1/snapshots/{id}/archive"));
            tally.send(format!("PUT snapshot {id}"), http.put(&url).bearer_auth(ADMIN_TOKEN).body(body.clone())).await;
        }
        let url = stack.http_url(&format!("/v1/snapshots/{id}/archive"));
        tally.send(format!("GET snapshot {id}"), http.get(&url).bearer_auth(ADMIN_TOKEN)).await;
        let url = stack.http_url(&format!("/v1/media/{id}"));
        tally.send(format!("GET media {id}"), http.get(&url).bearer_auth(ADMIN_TOKEN)).await;
    }
    let content_types = ["", "image/png", "x/y; charset=\u{7f}", &"t".repeat(70_000), "multipart/form-data; boundary="];
    for content_type in content_types {
        for body in &bodies {
            let request = http.post(stack.http_url("/v1/media")).bearer_auth(ADMIN_TOKEN);
            let request = match reqwest::header::HeaderValue::from_str(content_type) {
                Ok(value) => request.header(reqwest::header::CONTENT_TYPE, value),
                Err(_) => request,
            };
            tally.send(format!("POST media {} bytes", body.len()), request.body(body.clone())).await;
        }
    }
    tally.report("operations and streamed routes");
    stack.stop().await;
}

/// Keeps a generated long-poll wait short, so a call whose other arguments happen to be valid
/// answers in time instead of counting as a hang.
fn long_poll_safe(name: &str, value: &Value) -> Value {
    match (name, value.as_i64()) {
        ("waitMs", Some(ms)) if ms > 100 => json!(100),
        _ => value.clone(),
    }
}

/// One entry of a generated tar: a hostile path and kind.
#[derive(Debug, Clone)]
enum Entry {
    File { path: String, len: usize, declared: u64 },
    Dir { path: String },
    Symlink { path: String, target: String },
    HardLink { path: String, target: String },
    Fifo { path: String },
}

fn hostile_path() -> impl Strategy<Value = String> {
    let component = prop_oneof![
        Just("workspace".to_string()),
        Just(".clawdbot".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("link".to_string()),
        Just("outside".to_string()),
        "[a-z]{1,8}",
        "[\\PC]{1,6}",
    ];
    (any::<bool>(), proptest::collection::vec(component, 1..6)).prop_map(|(absolute, parts)| {
        let path = parts.join("/");
        let path = if absolute { format!("/{path}") } else { path };
        path.chars().take(99).collect()
    })
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => (hostile_path(), 0usize..2048, prop_oneof![Just(None), Just(Some(u64::MAX / 2)), Just(Some(64 << 20))])
            .prop_map(|(path, len, declared)| Entry::File { path, len, declared: declared.unwrap_or(len as u64) }),
        1 => hostile_path().prop_map(|path| Entry::Dir { path }),
        2 => (hostile_path(), hostile_path()).prop_map(|(path, target)| Entry::Symlink { path, target }),
        1 => (hostile_path(), hostile_path()).prop_map(|(path, target)| Entry::HardLink { path, target }),
        1 => hostile_path().prop_map(|path| Entry::Fifo { path }),
    ]
}

/// Writes `entries` as a gzipped tar with raw headers (the tar crate's builder would refuse
/// `..`, which is the point).
fn write_archive(entries: &[Entry], out: &Path) {
    use std::io::Write;
    let mut tar = Vec::new();
    for entry in entries {
        let mut header = tar::Header::new_old();
        let (path, kind, link, len, declared) = match entry {
            Entry::File { path, len, declared } => (path, tar::EntryType::Regular, None, *len, *declared),
            Entry::Dir { path } => (path, tar::EntryType::Directory, None, 0, 0),
            Entry::Symlink { path, target } => (path, tar::EntryType::Symlink, Some(target), 0, 0),
            Entry::HardLink { path, target } => (path, tar::EntryType::Link, Some(target), 0, 0),
            Entry::Fifo { path } => (path, tar::EntryType::Fifo, None, 0, 0),
        };
        let raw = header.as_old_mut();
        raw.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(0o644);
        // A size the data does not have: a truncated or "bomb" header.
        header.set_size(declared.min(0o77777777777));
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        let data = vec![b'z'; len];
        tar.extend_from_slice(&data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.resize(tar.len() + 1024, 0);
    let mut gz =
        flate2::write::GzEncoder::new(std::fs::File::create(out).expect("create"), flate2::Compression::fast());
    gz.write_all(&tar).expect("write");
    gz.finish().expect("finish");
}

/// Every path under `dir`, symlinks not followed.
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        out.push(path.clone());
        if path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            stack.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// A hostile snapshot archive never panics the worker, never writes outside the destination
    /// (also not through a symlink it planted), and stays within the configured bounds.
    #[test]
    fn hostile_suite_snapshot_archives_stay_inside_their_destination(entries in proptest::collection::vec(entry(), 1..12)) {
        let root = tempfile::tempdir().expect("temp dir");
        let dest = root.path().join("data");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"untouched").expect("write");
        let archive = root.path().join("a.tar.gz");
        write_archive(&entries, &archive);
        let before = tree(&outside);
        let options = worker_kit::archive::UnpackOptions { max_unpacked_bytes: 1 << 20, max_entries: 64 };
        let _ = worker_kit::archive::unpack_with(&archive, None, &dest, &options);
        prop_assert_eq!(tree(&outside), before);
        prop_assert_eq!(std::fs::read(outside.join("keep")).expect("read"), b"untouched");
        let root_entries: Vec<_> = std::fs::read_dir(root.path()).expect("read").flatten().map(|e| e.file_name()).collect();
        prop_assert_eq!(root_entries.len(), 3, "only data/, outside/ and the archive: {:?}", root_entries);
        let unpacked: u64 = tree(&dest).iter().filter_map(|p| p.symlink_metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum();
        prop_assert!(unpacked <= 1 << 20, "unpacked {} bytes past the bound", unpacked);
    }

    /// A hostile skill bundle is refused or normalised into paths that stay inside its skill
    /// directory: relative, without `..`, `.` or empty components, without control characters.
    #[test]
    fn hostile_suite_skill_bundle_paths_never_escape(paths in proptest::collection::vec(hostile_path(), 1..8), content in "[\\PC]{0,64}") {
        let files: Vec<common::skills::SkillFile> = paths
            .iter()
            .map(|path| common::skills::SkillFile { path: path.clone(), content: content.clone(), sha256: String::new() })
            .collect();
        if let Ok(normalised) = common::skills::normalize_bundle(&files, common::skills::ModuleFormat::Esm) {
            for file in normalised {
                let path = file.path.as_str();
                prop_assert!(!path.starts_with('/'), "{}", path);
                prop_assert!(path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."), "{}", path);
                prop_assert!(!path.chars().any(char::is_control), "{:?}", path);
            }
        }
    }
}
