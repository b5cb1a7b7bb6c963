//! Global skills (spec §3.19) through the real operation transport: deploy validation with the
//! original's error strings, releases and the K4 fixes, status and delete, the worker manifest
//! with the K1 fix (a corrupt skill is reported, the others still ship), and a worker
//! materialising two successive manifests with worker-kit.

use common::ErrorCode;
use common::skills::{SkillsManifest, manifest_version, marker_file, sha256_hex};
use common::token::escape;
use serde_json::{Value, json};
use tests::{MANUAL, TestStack};

fn file(path: &str, content: &str) -> Value {
    json!({ "path": path, "content": content, "sha256": sha256_hex(content) })
}

/// A valid esm bundle whose content depends on `tag`.
fn bundle(tag: &str) -> Value {
    json!([
        file("SKILL.md", &format!("# {tag}\n")),
        file("scripts/index.mjs", &format!("export const tag = '{tag}';\n"))
    ])
}

fn deploy_args(slug: &str, version: &str, files: Value) -> Value {
    json!({ "slug": slug, "version": version, "files": files })
}

async fn deploy(stack: &TestStack, slug: &str, version: &str, tag: &str) -> Value {
    stack.admin().ok("deployGlobalSkill", deploy_args(slug, version, bundle(tag))).await
}

async fn manifest(stack: &TestStack) -> SkillsManifest {
    let value = stack.admin().ok("getWorkerGlobalSkillsManifest", json!({})).await;
    serde_json::from_value(value).expect("a manifest")
}

fn slugs(manifest: &SkillsManifest) -> Vec<&str> {
    manifest.skills.iter().map(|s| s.slug.as_str()).collect()
}

async fn list(stack: &TestStack, args: Value) -> Vec<Value> {
    let value = stack.admin().ok("listGlobalSkills", args).await;
    value.as_array().expect("a list").clone()
}

#[tokio::test]
async fn skills_deploy_refuses_bad_bundles_with_the_original_messages() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    let ok = bundle("x");
    let with = |extra: Value| {
        let mut files = ok.as_array().expect("files").clone();
        files.push(extra);
        Value::Array(files)
    };
    let big = "x".repeat(100_000);
    let cases: Vec<(Value, String)> = vec![
        (deploy_args("web", "1.0.0", json!([])), "Global skill bundle must contain at least one file.".into()),
        (deploy_args("web", "1.0.0", with(file("../x", "a"))), "invalid_relative_path:../x".into()),
        (deploy_args("web", "1.0.0", with(file("a/..", "a"))), "invalid_relative_path:a/..".into()),
        (deploy_args("web", "1.0.0", with(file("./a", "a"))), "invalid_relative_path:./a".into()),
        (deploy_args("web", "1.0.0", with(file("C:\\x", "a"))), "invalid_relative_path:C:\\x".into()),
        (deploy_args("web", "1.0.0", with(file("a//b", "a"))), "invalid_relative_path:a//b".into()),
        (deploy_args("web", "1.0.0", with(file("a\u{0}b", "a"))), "invalid_relative_path:a\u{0}b".into()),
        (deploy_args("web", "1.0.0", with(file("", "a"))), "invalid_relative_path:".into()),
        (
            deploy_args("web", "1.0.0", with(file(".af-global-skill.json", "{}"))),
            "Bundle files must not include .af-global-skill.json.".into(),
        ),
        (deploy_args("web", "1.0.0", with(file("/SKILL.md", "b"))), "Duplicate bundle file path: SKILL.md".into()),
        (
            deploy_args(
                "web",
                "1.0.0",
                json!([file("SKILL.md", &big), file("scripts/index.mjs", &big), file("one-more", "y")]),
            ),
            "Global skill bundle too large (max 200KB).".into(),
        ),
        (
            deploy_args("web", "1.0.0", with(json!({"path": "c.txt", "content": "c"}))),
            "Missing bundle checksum for c.txt.".into(),
        ),
        (
            deploy_args("web", "1.0.0", with(json!({"path": "c.txt", "content": "c", "sha256": " "}))),
            "Missing bundle checksum for c.txt.".into(),
        ),
        (
            deploy_args("web", "1.0.0", with(json!({"path": "c.txt", "content": "c", "sha256": sha256_hex("d")}))),
            "Global skill checksum mismatch for c.txt.".into(),
        ),
        (
            deploy_args("web", "1.0.0", json!([file("scripts/index.mjs", "x")])),
            "Global skill bundle must include SKILL.md.".into(),
        ),
        (
            deploy_args("web", "1.0.0", json!([file("SKILL.md", "x")])),
            "Global skill bundle must include scripts/index.mjs.".into(),
        ),
        (
            json!({"slug": "web", "version": "1.0.0", "files": ok, "moduleFormat": "cjs"}),
            "Global skill bundle must include scripts/index.cjs.".into(),
        ),
        // The files are checked before the slug, the slug before the version.
        (deploy_args("No Way", "bad", json!([])), "Global skill bundle must contain at least one file.".into()),
        (
            deploy_args("No Way", "bad", ok.clone()),
            "Invalid skill slug. Use lowercase letters, numbers, '-' and '_'.".into(),
        ),
        (
            deploy_args("a", "1.0.0", ok.clone()),
            "Invalid skill slug. Use lowercase letters, numbers, '-' and '_'.".into(),
        ),
        (deploy_args("web", "1.0", ok.clone()), "Invalid skill version. Use semantic versioning format.".into()),
        (deploy_args("web", "v1.0.0", ok.clone()), "Invalid skill version. Use semantic versioning format.".into()),
        (
            json!({"slug": "web", "version": "1.0.0", "files": ok, "entryPoint": "   "}),
            "entryPoint is required.".into(),
        ),
    ];
    for (args, message) in cases {
        let err = admin.err("deployGlobalSkill", args.clone()).await;
        assert_eq!(err.code, ErrorCode::InvalidInput, "{args}");
        assert_eq!(err.message, message, "{args}");
    }
    let err = admin.err("deployGlobalSkill", json!({"slug": "web", "version": "1.0.0", "files": ok, "bogus": 1})).await;
    assert_eq!(err.code, ErrorCode::InvalidInput);
    assert!(err.message.contains("bogus"), "{}", err.message);
    // Nothing was stored by any refused deploy.
    assert!(list(&stack, json!({})).await.is_empty());
    // Exactly 200 000 bytes is accepted, and slug and version are trimmed (slug lower-cased).
    let done = admin
        .ok(
            "deployGlobalSkill",
            deploy_args(" Big_One ", " 1.0.0-rc.1 ", json!([file("SKILL.md", &big), file("scripts/index.mjs", &big)])),
        )
        .await;
    assert_eq!(done["slug"], "big_one");
    assert_eq!(done["version"], "1.0.0-rc.1");
}

#[tokio::test]
async fn skills_deploy_then_manifest_ships_the_bundle_with_its_marker() {
    let stack = TestStack::start().await;
    let result = stack
        .admin()
        .ok(
            "deployGlobalSkill",
            json!({
                "slug": "Web-Search",
                "displayName": " Web search ",
                "description": " Finds things ",
                "version": "1.2.3",
                "files": [
                    file("\\scripts\\index.mjs", "export default 1;\n"),
                    file("SKILL.md", "# Web\n"),
                    file("docs/usage.md", "use it"),
                ],
                "actor": "alice",
            }),
        )
        .await;
    assert_eq!(result["skillId"], "web-search");
    assert_eq!(result["versionId"], "web-search@1.2.3");
    assert_eq!(result["slug"], "web-search");
    assert_eq!(result["version"], "1.2.3");
    assert_eq!(result["releaseChannel"], "stable");
    assert_eq!(result["status"], "active");
    let release_id = result["releaseId"].as_str().expect("releaseId").to_string();
    deploy(&stack, "calc", "0.1.0", "calc").await;

    let first = manifest(&stack).await;
    assert_eq!(first.layout_version, "openclaw-workspace-skill-v1");
    assert_eq!(first.workspace_id, "default");
    assert_eq!(slugs(&first), ["calc", "web-search"]);
    assert!(first.problems.is_empty());
    let web = &first.skills[1];
    assert_eq!(web.skill_dir_name, "web-search");
    assert_eq!(web.sha256, result["sha256"].as_str().expect("sha256"));
    assert_eq!(web.entry_point, "default");
    let paths: Vec<&str> = web.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["SKILL.md", "docs/usage.md", "scripts/index.mjs", ".af-global-skill.json"]);
    let expected_marker = marker_file("web-search", "1.2.3", &web.sha256, "default", common::skills::ModuleFormat::Esm);
    assert_eq!(web.files[3], expected_marker);
    assert!(web.files[3].content.contains("\"managedBy\": \"agent-factory\""));
    assert_eq!(web.sha256, common::skills::bundle_sha256(&web.files[..3]));

    // The manifest version is the spec's formula, and stable across calls.
    assert_eq!(first.manifest_version, manifest_version(&first.skills));
    let second = manifest(&stack).await;
    assert_eq!(second.manifest_version, first.manifest_version);
    assert_eq!(second.skills, first.skills);

    let skills = list(&stack, json!({})).await;
    assert_eq!(skills.len(), 2);
    let listed = &skills[1];
    assert_eq!(listed["displayName"], "Web search");
    assert_eq!(listed["description"], "Finds things");
    assert_eq!(listed["status"], "active");
    assert_eq!(listed["activeRelease"]["releaseId"], release_id.as_str());
    assert_eq!(listed["activeRelease"]["version"], "1.2.3");
    assert_eq!(listed["activeRelease"]["moduleFormat"], "esm");
    assert_eq!(listed["activeRelease"]["sha256"], web.sha256.as_str());
    assert_eq!(skills[0]["displayName"], "calc", "displayName defaults to the slug");
    assert!(skills[0].get("description").is_none());
    assert_eq!(list(&stack, json!({"limit": 1})).await.len(), 1);
    assert_eq!(list(&stack, json!({"limit": 0})).await.len(), 1, "the limit is clamped to at least 1");
    let canary = list(&stack, json!({"releaseChannel": "canary"})).await;
    assert!(canary.iter().all(|s| s["activeRelease"].is_null()));
    let empty_canary: SkillsManifest = serde_json::from_value(
        stack
            .admin()
            .ok("getWorkerGlobalSkillsManifest", json!({"releaseChannel": "canary", "workspaceId": "ws"}))
            .await,
    )
    .expect("manifest");
    assert!(empty_canary.skills.is_empty());
    assert_eq!(empty_canary.workspace_id, "ws");
    assert_eq!(empty_canary.manifest_version, sha256_hex("empty"));

    // Another stack with the same content computes the same manifest version.
    let other = TestStack::start().await;
    deploy(&other, "calc", "0.1.0", "calc").await;
    other
        .admin()
        .ok(
            "deployGlobalSkill",
            json!({
                "slug": "web-search",
                "version": "1.2.3",
                "files": [
                    file("SKILL.md", "# Web\n"),
                    file("docs/usage.md", "use it"),
                    file("scripts/index.mjs", "export default 1;\n"),
                ],
            }),
        )
        .await;
    assert_eq!(manifest(&other).await.manifest_version, first.manifest_version);
}

#[tokio::test]
async fn skills_redeploying_the_active_version_keeps_its_release_k4() {
    let stack = TestStack::start_with(MANUAL).await;
    let first = deploy(&stack, "web", "1.0.0", "a").await;
    let activated_at = list(&stack, json!({})).await[0]["activeRelease"]["activatedAt"].clone();
    stack.admin().ok("advanceTestClock", json!({"ms": 60_000})).await;

    let again = deploy(&stack, "web", "1.0.0", "a").await;
    assert_eq!(again["releaseId"], first["releaseId"], "no new release for the active version");
    assert_eq!(list(&stack, json!({})).await[0]["activeRelease"]["activatedAt"], activated_at);

    let err = stack.admin().err("deployGlobalSkill", deploy_args("web", "1.0.0", bundle("b"))).await;
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(err.message, "Skill web@1.0.0 already exists with a different bundle.");
    let err = stack
        .admin()
        .err("deployGlobalSkill", json!({"slug": "web", "version": "1.0.0", "files": bundle("a"), "entryPoint": "run"}))
        .await;
    assert_eq!(err.code, ErrorCode::Conflict);

    // A new version is a new release; going back to the old one is a release again.
    let second = deploy(&stack, "web", "1.1.0", "b").await;
    assert_ne!(second["releaseId"], first["releaseId"]);
    let back = deploy(&stack, "web", "1.0.0", "a").await;
    assert_ne!(back["releaseId"], first["releaseId"]);
    assert_eq!(manifest(&stack).await.skills[0].version, "1.0.0");
    // The canary channel has releases of its own.
    let canary = stack
        .admin()
        .ok(
            "deployGlobalSkill",
            json!({"slug": "web", "version": "1.1.0", "files": bundle("b"), "releaseChannel": "canary"}),
        )
        .await;
    assert_eq!(canary["releaseChannel"], "canary");
    let canary_manifest: SkillsManifest = serde_json::from_value(
        stack.admin().ok("getWorkerGlobalSkillsManifest", json!({"releaseChannel": "canary"})).await,
    )
    .expect("manifest");
    assert_eq!(canary_manifest.skills[0].version, "1.1.0");
    assert_eq!(manifest(&stack).await.skills[0].version, "1.0.0", "stable is unchanged");

    // A disabled skill stays disabled when deployed again (K4, second half).
    let status = stack.admin().ok("setGlobalSkillStatus", json!({"slug": "web", "status": "disabled"})).await;
    assert_eq!(status, json!({"updated": true, "slug": "web", "status": "disabled"}));
    let redeployed = deploy(&stack, "web", "1.2.0", "c").await;
    assert_eq!(redeployed["status"], "disabled");
    assert!(manifest(&stack).await.skills.is_empty());
    assert_eq!(list(&stack, json!({"status": "disabled"})).await[0]["activeRelease"]["version"], "1.2.0");
}

#[tokio::test]
async fn skills_concurrent_deploys_of_one_slug_keep_both_releases() {
    let stack = TestStack::start().await;
    let (a, b) = tokio::join!(deploy(&stack, "web", "1.0.0", "a"), deploy(&stack, "web", "2.0.0", "b"));
    assert_ne!(a["releaseId"], b["releaseId"]);
    let doc = stack.ctx.buckets.skills.get::<Value>("skill.web").await.expect("read").expect("skill document");
    let releases = doc.value["releases"].as_array().expect("releases");
    assert_eq!(releases.len(), 2, "{releases:?}");
    assert_eq!(releases.iter().filter(|r| r["isActive"] == true).count(), 1);
}

#[tokio::test]
async fn skills_status_and_delete() {
    let stack = TestStack::start().await;
    let admin = stack.admin();
    deploy(&stack, "web", "1.0.0", "a").await;
    deploy(&stack, "web", "1.1.0", "b").await;
    admin
        .ok(
            "deployGlobalSkill",
            json!({"slug": "web", "version": "1.1.0", "files": bundle("b"), "releaseChannel": "canary"}),
        )
        .await;
    deploy(&stack, "calc", "1.0.0", "c").await;

    let unknown = admin.ok("setGlobalSkillStatus", json!({"slug": "nope", "status": "disabled"})).await;
    assert_eq!(unknown, json!({"updated": false, "slug": "nope", "status": "disabled"}));
    admin.ok("setGlobalSkillStatus", json!({"slug": " CALC ", "status": "disabled", "actor": "bob"})).await;
    assert_eq!(slugs(&manifest(&stack).await), ["web"]);
    let disabled = list(&stack, json!({"status": "disabled"})).await;
    assert_eq!(disabled.len(), 1);
    assert_eq!(disabled[0]["slug"], "calc");
    assert_eq!(list(&stack, json!({"status": "active"})).await[0]["slug"], "web");
    admin.ok("setGlobalSkillStatus", json!({"slug": "calc", "status": "active"})).await;
    assert_eq!(slugs(&manifest(&stack).await), ["calc", "web"]);

    let gone = admin.ok("deleteGlobalSkill", json!({"slug": "web"})).await;
    assert_eq!(gone, json!({"deleted": true, "slug": "web", "deletedVersions": 2, "deletedReleases": 3}));
    let again = admin.ok("deleteGlobalSkill", json!({"slug": "web"})).await;
    assert_eq!(again, json!({"deleted": false, "slug": "web", "deletedVersions": 0, "deletedReleases": 0}));
    assert_eq!(slugs(&manifest(&stack).await), ["calc"]);
    assert_eq!(list(&stack, json!({})).await.len(), 1);
    // No version survives the delete: the same version may now hold a different bundle.
    let fresh = deploy(&stack, "web", "1.0.0", "new").await;
    assert_eq!(fresh["status"], "active");
}

#[tokio::test]
async fn skills_a_corrupt_stored_skill_is_left_out_and_reported_k1() {
    let stack = TestStack::start().await;
    deploy(&stack, "good", "1.0.0", "good").await;
    deploy(&stack, "bad", "1.0.0", "bad").await;
    deploy(&stack, "lost", "2.0.0", "lost").await;
    let store = &stack.ctx.buckets.skills;

    // Tamper with a stored file's content (its recorded checksum unchanged).
    let key = format!("version.{}.{}", escape("bad"), escape("1.0.0"));
    let stored = store.get::<Value>(&key).await.expect("read").expect("version document");
    let mut tampered = stored.value.clone();
    tampered["files"][0]["content"] = json!("# tampered\n");
    store.update(&key, &tampered, stored.revision).await.expect("overwrite");
    // And lose another skill's version document altogether.
    let key = format!("version.{}.{}", escape("lost"), escape("2.0.0"));
    let stored = store.get::<Value>(&key).await.expect("read").expect("version document");
    store.delete(&key, stored.revision).await.expect("delete");

    let m = manifest(&stack).await;
    assert_eq!(slugs(&m), ["good"], "the healthy skill still ships");
    assert_eq!(m.manifest_version, manifest_version(&m.skills));
    assert_eq!(m.problems.len(), 2, "{:?}", m.problems);
    assert_eq!(m.problems[0].slug, "bad");
    assert_eq!(m.problems[0].version, "1.0.0");
    assert_eq!(m.problems[0].error, "Global skill checksum mismatch for SKILL.md.");
    assert_eq!(m.problems[1].slug, "lost");
    assert!(m.problems[1].error.contains("missing"), "{}", m.problems[1].error);

    // A consistent forgery (content and file checksum changed) fails the bundle checksum.
    let key = format!("version.{}.{}", escape("bad"), escape("1.0.0"));
    let stored = store.get::<Value>(&key).await.expect("read").expect("version document");
    let mut forged = stored.value.clone();
    forged["files"][0]["content"] = json!("# forged\n");
    forged["files"][0]["sha256"] = json!(sha256_hex("# forged\n"));
    store.update(&key, &forged, stored.revision).await.expect("overwrite");
    let m = manifest(&stack).await;
    assert_eq!(m.problems[0].error, "Global skill bundle checksum mismatch for bad@1.0.0.");
    // A document that is not even JSON of the right shape is reported too.
    let stored = store.get::<Value>(&key).await.expect("read").expect("version document");
    store.update(&key, &json!({"garbage": true}), stored.revision).await.expect("overwrite");
    let m = manifest(&stack).await;
    assert_eq!(slugs(&m), ["good"]);
    assert!(m.problems[0].error.starts_with("The stored version bad@1.0.0 is not valid"), "{}", m.problems[0].error);
}

#[tokio::test]
async fn skills_a_worker_may_only_ask_for_its_own_manifest() {
    let stack = TestStack::start().await;
    deploy(&stack, "web", "1.0.0", "a").await;
    let worker = stack.worker("w1");
    let err = worker.err("getWorkerGlobalSkillsManifest", json!({"workerId": "w2"})).await;
    assert_eq!(err.code, ErrorCode::Forbidden);
    let own = worker.ok("getWorkerGlobalSkillsManifest", json!({"workerId": "w1"})).await;
    assert_eq!(own["skills"][0]["slug"], "web");
    worker.ok("getWorkerGlobalSkillsManifest", json!({})).await;
    let err = worker.err("deployGlobalSkill", deploy_args("web", "1.0.1", bundle("x"))).await;
    assert_eq!(err.code, ErrorCode::Forbidden, "only admins deploy");
    let err = stack.app().err("getWorkerGlobalSkillsManifest", json!({})).await;
    assert_eq!(err.code, ErrorCode::Forbidden);
}

#[tokio::test]
async fn skills_worker_kit_materialises_successive_manifests() {
    let stack = TestStack::start().await;
    deploy(&stack, "web", "1.0.0", "web").await;
    deploy(&stack, "calc", "1.0.0", "calc").await;
    let worker = stack.worker("w1");
    let fetch = || async {
        let value = worker.ok("getWorkerGlobalSkillsManifest", json!({"workerId": "w1"})).await;
        serde_json::from_value::<SkillsManifest>(value).expect("manifest")
    };
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("skills");

    let first = fetch().await;
    let report = worker_kit::skills::materialise(&first, &dir, "w1").expect("materialised");
    assert_eq!(report.installed, ["calc", "web"]);
    assert_eq!(std::fs::read_to_string(dir.join("web/SKILL.md")).expect("SKILL.md"), "# web\n");
    assert!(dir.join("calc/.af-global-skill.json").is_file());
    std::fs::create_dir_all(dir.join("hand-made")).expect("mkdir");
    std::fs::write(dir.join("hand-made/SKILL.md"), "mine").expect("write");

    stack.admin().ok("setGlobalSkillStatus", json!({"slug": "calc", "status": "disabled"})).await;
    deploy(&stack, "web", "1.1.0", "web2").await;
    let second = fetch().await;
    assert_ne!(second.manifest_version, first.manifest_version);
    let report = worker_kit::skills::materialise(&second, &dir, "w1").expect("materialised");
    assert_eq!(report.installed, ["web"]);
    assert_eq!(report.removed, ["calc"]);
    assert_eq!(report.unmanaged, ["hand-made"]);
    assert!(report.failed.is_empty() && report.shadowed.is_empty());
    assert!(!dir.join("calc").exists());
    assert_eq!(std::fs::read_to_string(dir.join("web/SKILL.md")).expect("SKILL.md"), "# web2\n");
    assert_eq!(std::fs::read_to_string(dir.join("hand-made/SKILL.md")).expect("untouched"), "mine");
    let lock = worker_kit::skills::read_lock(&dir).expect("lock").expect("lock exists");
    assert_eq!(lock.skills, ["web"]);
    assert_eq!(lock.skills_count, 1);
    assert_eq!(lock.manifest_version, second.manifest_version);
    assert_eq!(lock.worker_id, "w1");
    assert_eq!(lock.workspace_id, "default");
}
