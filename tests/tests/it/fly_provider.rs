//! The Fly Machines provider against the stateful fake Fly API (`tests::fake_fly`): the spec
//! §3.16 calls and bodies, the state mapping, dedicated volumes, the stop → wait → destroy
//! teardown (L9), and the error handling — a 5xx is never "gone" (L8), 429/5xx/timeouts are
//! retried within bounds, not-found and precondition answers are told apart. No nats-server and
//! no guessed sleeps: the fake moves machines by explicit steps, and the only waits are the
//! provider's own bounded timeouts or polls of the fake's request log.

use std::collections::BTreeMap;
use std::time::Duration;

use common::config::ProviderSettings;
use providers::fly::FlyProvider;
use providers::{
    Guest, Machine, MachineStatus, Provider, ProviderError, SpawnSpec, Volume, dedicated_volume_name,
    ensure_worker_volume,
};
use tests::fake_fly::FakeFly;

const APP: &str = "af-test";
const REGION: &str = "ams";
const PREFIX: &str = "openclaw_data_test";
const ATTEMPTS: u32 = 3;

fn settings(http_timeout_ms: u64) -> ProviderSettings {
    ProviderSettings {
        fly_base_url: "http://unused".to_string(),
        http_timeout_ms,
        retry_attempts: ATTEMPTS,
        retry_base_delay_ms: 1,
        stop_wait_ms: 5_000,
        local_dir: String::new(),
        worker_binary: String::new(),
    }
}

async fn fake() -> FakeFly {
    let fake = FakeFly::start().await;
    fake.add_app(APP);
    fake
}

fn provider(fake: &FakeFly, http_timeout_ms: u64) -> FlyProvider {
    FlyProvider::new(&fake.base_url(), fake.token(), &settings(http_timeout_ms))
}

async fn setup() -> (FakeFly, FlyProvider) {
    let fake = fake().await;
    let provider = provider(&fake, 5_000);
    (fake, provider)
}

fn spec(worker_id: &str, volume_id: &str) -> SpawnSpec {
    SpawnSpec {
        worker_id: worker_id.to_string(),
        image: "registry.fly.io/af-worker:v1".to_string(),
        region: REGION.to_string(),
        guest: Guest::default(),
        volume_id: volume_id.to_string(),
        volume_path: "/data".to_string(),
        env: BTreeMap::from([("OPENCLAW_CONVERSATION_ID".to_string(), format!("conv-{worker_id}"))]),
    }
}

/// A worker's dedicated volume and its machine, as the scheduler spawns them.
async fn spawn_worker(provider: &FlyProvider, worker_id: &str) -> (Machine, Volume) {
    let volume = ensure_worker_volume(provider, APP, worker_id, REGION, PREFIX, 1).await.expect("worker volume");
    let machine = provider.spawn(APP, &spec(worker_id, &volume.id)).await.expect("spawn");
    (machine, volume)
}

fn machine_path(id: &str) -> String {
    format!("/apps/{APP}/machines/{id}")
}

#[tokio::test]
async fn spawn_sends_image_region_guest_mount_and_env() {
    let (fake, provider) = setup().await;
    let (machine, volume) = spawn_worker(&provider, "afw-1767258000000-0").await;

    assert_eq!(machine.worker_id, "afw-1767258000000-0");
    assert_eq!(machine.region.as_deref(), Some(REGION));
    assert_eq!(machine.image.as_deref(), Some("registry.fly.io/af-worker:v1"));
    assert_eq!((machine.status, machine.raw_state.as_str()), (MachineStatus::Active, "created"));
    assert_eq!(machine.volume_ids, vec![volume.id.clone()]);

    let held = fake.machines(APP);
    assert_eq!(held.len(), 1);
    let m = &held[0];
    assert_eq!(m.id, machine.machine_id);
    assert_eq!(
        (m.name.as_str(), m.region.as_str(), m.image.as_str()),
        ("afw-1767258000000-0", REGION, "registry.fly.io/af-worker:v1")
    );
    assert_eq!((m.guest.cpu_kind.as_str(), m.guest.cpus, m.guest.memory_mb), ("shared", 1, 2048));
    assert_eq!(m.mounts.len(), 1);
    assert_eq!((m.mounts[0].volume.as_str(), m.mounts[0].path.as_str()), (volume.id.as_str(), "/data"));
    assert_eq!(
        m.env,
        BTreeMap::from([
            ("AGENT_FACTORY_WORKER_ID".to_string(), "afw-1767258000000-0".to_string()),
            ("OPENCLAW_CONVERSATION_ID".to_string(), "conv-afw-1767258000000-0".to_string()),
        ])
    );
    assert_eq!(fake.volumes(APP)[0].attached_machine_id.as_deref(), Some(m.id.as_str()));
    assert_eq!(fake.count_requests("POST", &format!("/apps/{APP}/machines")), 1);

    // Keys of the spec's env win over the provider's own.
    let volume = ensure_worker_volume(&provider, APP, "afw-2", REGION, PREFIX, 1).await.unwrap();
    let mut other = spec("afw-2", &volume.id);
    other.env.insert("AGENT_FACTORY_WORKER_ID".to_string(), "from-the-spec".to_string());
    let machine = provider.spawn(APP, &other).await.unwrap();
    let held = fake.machine(APP, &machine.machine_id).unwrap();
    assert_eq!(held.env["AGENT_FACTORY_WORKER_ID"], "from-the-spec");
}

#[tokio::test]
async fn listing_maps_states_images_and_volumes() {
    let (fake, provider) = setup().await;
    let mut ids = Vec::new();
    for worker in ["w-a", "w-b", "w-c", "w-d", "w-e"] {
        ids.push(spawn_worker(&provider, worker).await.0.machine_id);
    }
    fake.set_manual_transitions(true);
    for (id, state) in ids.iter().zip(["started", "replacing", "stopped", "failed", "suspended"]) {
        assert!(fake.set_machine_state(APP, id, state));
    }

    let listed = provider.list_machines(APP).await.unwrap();
    assert_eq!(listed.len(), 5);
    let expected = [
        ("w-a", "started", MachineStatus::Active),
        ("w-b", "replacing", MachineStatus::Active),
        ("w-c", "stopped", MachineStatus::Stopped),
        ("w-d", "failed", MachineStatus::Stopped),
        ("w-e", "suspended", MachineStatus::Stopped),
    ];
    for (machine, (worker, raw, status)) in listed.iter().zip(expected) {
        assert_eq!((machine.worker_id.as_str(), machine.raw_state.as_str(), machine.status), (worker, raw, status));
        assert_eq!(machine.image.as_deref(), Some("registry.fly.io/af-worker:v1"));
        assert_eq!(machine.region.as_deref(), Some(REGION));
        let volume =
            fake.volumes(APP).into_iter().find(|v| v.attached_machine_id.as_ref() == Some(&machine.machine_id));
        assert_eq!(machine.volume_ids, vec![volume.unwrap().id]);
    }

    // One machine through the detail call, the same mapping.
    let one = provider.get_machine(APP, &ids[2]).await.unwrap().unwrap();
    assert_eq!(one, listed[2]);
}

#[tokio::test]
async fn automatic_transitions_advance_a_machine_one_step_per_read() {
    let (fake, provider) = setup().await;
    let (machine, _) = spawn_worker(&provider, "w-steps").await;
    let id = machine.machine_id;
    let mut seen = vec![machine.raw_state];
    for _ in 0..3 {
        seen.push(provider.get_machine(APP, &id).await.unwrap().unwrap().raw_state);
    }
    assert_eq!(seen, ["created", "starting", "started", "started"]);
    provider.stop(APP, &id).await.unwrap();
    // Acting never steps: the machine stays `stopping` until it is read.
    assert_eq!(fake.machine(APP, &id).unwrap().state, "stopping");
    let listed = provider.list_machines(APP).await.unwrap();
    assert_eq!((listed[0].raw_state.as_str(), listed[0].status), ("stopped", MachineStatus::Stopped));
}

#[tokio::test]
async fn ensure_worker_volume_reuses_same_name_and_region_else_creates() {
    let (fake, provider) = setup().await;
    let name = dedicated_volume_name(PREFIX, "worker-cleanup-1");
    assert_eq!(name, "openclaw_data_test_5m6kc0");
    // A volume of that name in another region is not reused.
    let elsewhere = fake.add_volume(APP, &name, "ord", 1);
    fake.add_volume(APP, "someone_else", REGION, 1);

    let created = ensure_worker_volume(&provider, APP, "worker-cleanup-1", REGION, PREFIX, 3).await.unwrap();
    assert_ne!(created.id, elsewhere.id);
    assert_eq!((created.name.as_str(), created.region.as_deref()), (name.as_str(), Some(REGION)));
    assert_eq!(created.attached_machine_id, None);
    let held = fake.volumes(APP).into_iter().find(|v| v.id == created.id).unwrap();
    assert_eq!((held.name.as_str(), held.region.as_str(), held.size_gb), (name.as_str(), REGION, 3));

    let again = ensure_worker_volume(&provider, APP, "worker-cleanup-1", REGION, PREFIX, 3).await.unwrap();
    assert_eq!(again, created);
    assert_eq!(fake.count_requests("POST", &format!("/apps/{APP}/volumes")), 1);
    assert_eq!(fake.volumes(APP).len(), 3);

    let listed = provider.list_volumes(APP).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.contains(&created));
}

#[tokio::test]
async fn stop_wait_destroy_tears_down_and_destroy_before_stopped_is_a_precondition() {
    let (fake, provider) = setup().await;
    let (machine, volume) = spawn_worker(&provider, "w-teardown").await;
    let id = machine.machine_id;

    provider.cordon(APP, &id).await.unwrap();
    assert!(fake.machine(APP, &id).unwrap().cordoned);

    // L9: destroying a running machine, or one still stopping, is refused and changes nothing.
    let err = provider.destroy(APP, &id).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Precondition(m) if m.contains("not currently stopped")), "{err:?}");
    provider.stop(APP, &id).await.unwrap();
    let err = provider.destroy(APP, &id).await.unwrap_err();
    assert!(matches!(err, ProviderError::Precondition(_)), "{err:?}");
    assert_eq!(fake.machine(APP, &id).unwrap().state, "stopping");
    // Nor can the volume go while a live machine mounts it.
    let err = provider.delete_volume(APP, &volume.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::Precondition(_)), "{err:?}");

    provider.wait_for_state(APP, &id, "stopped", provider.stop_wait()).await.unwrap();
    assert_eq!(fake.machine(APP, &id).unwrap().state, "stopped");
    assert!(
        fake.requests().contains(&("GET".to_string(), format!("{}/wait?state=stopped&timeout=5", machine_path(&id))))
    );
    provider.destroy(APP, &id).await.unwrap();

    assert_eq!(fake.live_machine_count(APP), 0);
    assert_eq!(fake.destroyed_machines(APP)[0].id, id);
    assert!(provider.list_machines(APP).await.unwrap().is_empty());
    assert_eq!(provider.get_machine(APP, &id).await.unwrap(), None);
    // Absent things are already gone.
    provider.destroy(APP, &id).await.unwrap();
    provider.delete_volume(APP, &volume.id).await.unwrap();
    assert!(fake.volumes(APP).is_empty());
    provider.delete_volume(APP, &volume.id).await.unwrap();
    // Exactly one successful DELETE per resource, plus the refused and the repeated ones.
    assert_eq!(fake.count_requests("DELETE", &machine_path(&id)), 4);
}

#[tokio::test]
async fn wait_blocks_until_the_machine_reaches_the_state() {
    let (fake, provider) = setup().await;
    fake.set_manual_transitions(true);
    let (machine, _) = spawn_worker(&provider, "w-wait").await;
    let id = machine.machine_id;
    fake.settle();
    provider.stop(APP, &id).await.unwrap();
    assert_eq!(fake.machine(APP, &id).unwrap().state, "stopping");

    let wait_path = format!("{}/wait", machine_path(&id));
    let wait = provider.wait_for_state(APP, &id, "stopped", Duration::from_secs(10));
    let step = async {
        tests::wait_until("the wait request reaches the fake", Duration::from_secs(10), || async {
            (fake.count_requests("GET", &wait_path) > 0).then_some(())
        })
        .await;
        // The wait is held open until the test moves the machine.
        assert_eq!(fake.machine(APP, &id).unwrap().state, "stopping");
        fake.settle();
    };
    let (waited, ()) = tokio::join!(wait, step);
    waited.unwrap();
    assert_eq!(fake.count_requests("GET", &wait_path), 1);
    assert_eq!(fake.machine(APP, &id).unwrap().state, "stopped");
}

#[tokio::test]
async fn wait_gives_up_after_its_timeout() {
    let (fake, provider) = setup().await;
    fake.set_manual_transitions(true);
    let (machine, _) = spawn_worker(&provider, "w-never-stops").await;
    fake.settle();
    // Never stopped: the fake answers 408 when the call's timeout (1 s, the smallest) passes.
    let err = provider.wait_for_state(APP, &machine.machine_id, "stopped", Duration::from_millis(500)).await;
    let err = err.unwrap_err();
    assert!(matches!(&err, ProviderError::Unavailable(m) if m.contains("did not reach state stopped")), "{err:?}");
    let wait_path = format!("{}/wait?state=stopped&timeout=1", machine_path(&machine.machine_id));
    assert_eq!(fake.count_requests("GET", &wait_path), 1);
    // Waiting on a machine that does not exist is a NotFound, not a timeout.
    let err = provider.wait_for_state(APP, "e784ffffffffff", "stopped", Duration::from_secs(5)).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test]
async fn a_5xx_on_destroy_is_unavailable_and_the_machine_is_never_taken_for_gone() {
    let (fake, provider) = setup().await;
    let (machine, _) = spawn_worker(&provider, "w-l8").await;
    let id = machine.machine_id;
    provider.stop(APP, &id).await.unwrap();
    provider.wait_for_state(APP, &id, "stopped", Duration::from_secs(5)).await.unwrap();

    // L8: even a 5xx whose body reads like "not found" says nothing about the machine.
    let path = machine_path(&id);
    let body = r#"{"error":"internal server error: unknown machine"}"#;
    fake.fail_next_with_body("DELETE", &path, 500, body, ATTEMPTS as usize + 2);
    let err = provider.destroy(APP, &id).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Unavailable(m) if m.contains("internal server error")), "{err:?}");
    assert_eq!(fake.count_requests("DELETE", &path), ATTEMPTS as usize);
    assert_eq!(fake.machine(APP, &id).unwrap().state, "stopped");

    // Nor is a 5xx on the detail call "no such machine".
    fake.fail_next("GET", &path, 503, ATTEMPTS as usize);
    let err = provider.get_machine(APP, &id).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

    fake.clear_faults();
    provider.destroy(APP, &id).await.unwrap();
    assert_eq!(fake.live_machine_count(APP), 0);
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_until_they_pass() {
    let (fake, provider) = setup().await;
    spawn_worker(&provider, "w-429").await;
    let list_path = format!("/apps/{APP}/machines");

    fake.fail_next("GET", &list_path, 429, 2);
    let listed = provider.list_machines(APP).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(fake.count_requests("GET", &list_path), 3);

    fake.clear_requests();
    fake.fail_next("GET", &format!("/apps/{APP}/volumes"), 500, 1);
    fake.fail_next("GET", &format!("/apps/{APP}/volumes"), 503, 1);
    assert_eq!(provider.list_volumes(APP).await.unwrap().len(), 1);
    assert_eq!(fake.count_requests("GET", &format!("/apps/{APP}/volumes")), 3);

    // A failed create is not retried into a second machine: the faulted attempts created nothing.
    fake.fail_next("POST", &list_path, 502, 2);
    let volume = ensure_worker_volume(&provider, APP, "w-502", REGION, PREFIX, 1).await.unwrap();
    provider.spawn(APP, &spec("w-502", &volume.id)).await.unwrap();
    assert_eq!(fake.live_machine_count(APP), 2);

    // Rate limiting that outlasts the attempts is Unavailable.
    fake.fail_next("GET", &list_path, 429, ATTEMPTS as usize);
    let err = provider.list_machines(APP).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Unavailable(m) if m.contains("rate limit")), "{err:?}");
}

#[tokio::test]
async fn not_found_answers() {
    let (fake, provider) = setup().await;
    assert_eq!(provider.get_machine(APP, "e784ffffffffff").await.unwrap(), None);
    provider.check_app(APP).await.unwrap();

    let err = provider.check_app("no-such-app").await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::NotFound(r#"Fly API GET /apps/no-such-app failed: {"error":"app not found"}"#.into())
    );
    assert!(provider.list_machines("no-such-app").await.unwrap_err().is_not_found());
    let err = provider.stop(APP, "e784ffffffffff").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");

    // Ids are path segments, encoded: they cannot reach another resource.
    assert_eq!(provider.get_machine(APP, "x/../../volumes").await.unwrap(), None);
    assert!(fake.requests().contains(&("GET".to_string(), format!("/apps/{APP}/machines/x%2F..%2F..%2Fvolumes"))));
    // Not-found answers were not retried.
    assert_eq!(fake.count_requests("GET", "/apps/no-such-app"), 2);
}

#[tokio::test]
async fn a_failed_create_is_an_error_and_leaves_no_machine() {
    let (fake, provider) = setup().await;
    let volume = ensure_worker_volume(&provider, APP, "w-fail", REGION, PREFIX, 1).await.unwrap();
    fake.fail_create(1);
    let err = provider.spawn(APP, &spec("w-fail", &volume.id)).await.unwrap_err();
    match &err {
        ProviderError::Other(m) => {
            assert!(m.starts_with(&format!("Fly API POST /apps/{APP}/machines failed: ")), "{m}");
            assert!(m.contains("insufficient memory"), "{m}");
        }
        other => panic!("expected Other, got {other:?}"),
    }
    assert_eq!(fake.live_machine_count(APP), 0);
    assert_eq!(fake.volumes(APP)[0].attached_machine_id, None);
    // 422 is definite: one attempt.
    assert_eq!(fake.count_requests("POST", &format!("/apps/{APP}/machines")), 1);

    // The volume is free again for the next try.
    let machine = provider.spawn(APP, &spec("w-fail", &volume.id)).await.unwrap();
    assert_eq!(fake.machines(APP)[0].id, machine.machine_id);
}

#[tokio::test]
async fn spawning_twice_returns_the_existing_machine() {
    let (fake, provider) = setup().await;
    let (first, volume) = spawn_worker(&provider, "w-twice").await;
    // The name is taken (409): it is this worker's machine, not a second one.
    let second = provider.spawn(APP, &spec("w-twice", &volume.id)).await.unwrap();
    assert_eq!(second.machine_id, first.machine_id);
    assert_eq!(fake.live_machine_count(APP), 1);
}

#[tokio::test]
async fn a_bad_token_is_other_with_the_401_message() {
    let fake = fake().await;
    let provider = FlyProvider::new(&fake.base_url(), "not-the-token", &settings(5_000));
    let err = provider.list_machines(APP).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Other(format!(r#"Fly API GET /apps/{APP}/machines failed: {{"error":"unauthorized"}}"#))
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn slow_answers_time_out_are_retried_then_unavailable() {
    let fake = fake().await;
    let provider = provider(&fake, 200);
    let list_path = format!("/apps/{APP}/machines");
    fake.withhold_next("GET", &list_path, ATTEMPTS as usize);
    let err = provider.list_machines(APP).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Unavailable(m) if m.contains("timed out after 200 ms")), "{err:?}");
    assert_eq!(fake.count_requests("GET", &list_path), ATTEMPTS as usize);
    // An answer withheld once is retried and the next attempt succeeds.
    fake.withhold_next("GET", &list_path, 1);
    assert!(provider.list_machines(APP).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_is_found_not_repeated() {
    let fake = fake().await;
    let provider = provider(&fake, 200);
    // The fake creates at once but answers too late: the provider cannot tell whether the
    // create happened, looks, and finds it instead of creating a second one.
    fake.withhold_next("POST", &format!("/apps/{APP}/volumes"), 1);
    let volume = ensure_worker_volume(&provider, APP, "w-lost", REGION, PREFIX, 1).await.unwrap();
    assert_eq!(fake.volumes(APP).len(), 1);
    assert_eq!(fake.volumes(APP)[0].id, volume.id);

    fake.withhold_next("POST", &format!("/apps/{APP}/machines"), 1);
    let machine = provider.spawn(APP, &spec("w-lost", &volume.id)).await.unwrap();
    let held = fake.machines(APP);
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].id.as_str(), held[0].name.as_str()), (machine.machine_id.as_str(), "w-lost"));
    assert_eq!(machine.volume_ids, vec![volume.id]);
    assert_eq!(fake.count_requests("POST", &format!("/apps/{APP}/machines")), 1);
}
