//! Many workers racing over few conversations, in one process and with two queue-manager
//! replicas of which the leader is killed mid-run. Half the workers claim and complete in
//! separate calls, half complete and claim the next job in one (`completeAndClaimNext`, whose
//! completions the queue holds until the next write). Checked: every message completed exactly
//! once, per-conversation order kept, never two jobs of one conversation in flight.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tests::workload::{Ledger, produce, work, work_combined};
use tests::{Api, TestNats, TestStack, seed_profile, wait_until};
use tokio_util::sync::CancellationToken;

const WORKERS: usize = 16;
const CONVERSATIONS: usize = 8;
const PER_CONVERSATION: u64 = 50;

fn conversations() -> Vec<String> {
    (0..CONVERSATIONS).map(|i| format!("race-{i}")).collect()
}

fn start_workers(
    worker_api: impl Fn(&str) -> Api,
    ledger: &Arc<Ledger>,
    stop: &CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..WORKERS {
        let id = format!("racer-{i}");
        let (api, ledger, stop) = (worker_api(&id), ledger.clone(), stop.clone());
        if i % 2 == 0 {
            set.spawn(work(api, id, ledger, stop));
        } else {
            set.spawn(work_combined(api, id, ledger, stop));
        }
    }
    set
}

async fn finish(
    ledger: &Arc<Ledger>,
    stop: CancellationToken,
    mut workers: tokio::task::JoinSet<()>,
    convs: &[String],
) {
    let total = (CONVERSATIONS as u64 * PER_CONVERSATION) as usize;
    wait_until("every message is completed", Duration::from_secs(60), || async {
        (ledger.completed_total() >= total).then_some(())
    })
    .await;
    stop.cancel();
    while let Some(r) = workers.join_next().await {
        r.expect("worker task");
    }
    ledger.assert_exactly_once_in_order(convs, PER_CONVERSATION);
    assert_eq!(ledger.completed_total(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_workers_over_eight_conversations_complete_each_message_once_in_order() {
    let stack = TestStack::start().await;
    seed_profile(&stack.ctx, "racer").await;
    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let workers = start_workers(|id| stack.worker(id), &ledger, &stop);
    let convs = conversations();
    produce(stack.app(), "racer", &convs, PER_CONVERSATION).await;
    finish(&ledger, stop, workers, &convs).await;
}

/// A queue-manager replica as a child process.
struct Replica(tokio::process::Child);

impl Replica {
    fn spawn(binary: &std::path::Path, nats_url: &str) -> Self {
        let mut cmd = tokio::process::Command::new(binary);
        cmd.env_clear()
            .env("AF_NATS__URL", nats_url)
            .env("AF_AUTH__ADMIN_TOKEN", tests::ADMIN_TOKEN)
            .env("AF_AUTH__APP_TOKEN", tests::APP_TOKEN)
            .env("AF_AUTH__WORKER_TOKEN_KEY", tests::WORKER_TOKEN_KEY)
            .env("AF_LOOPS__LEASE_RECOVERY_INTERVAL_MS", "200")
            .env("AF_TELEMETRY__LOG_FILTER", std::env::var("AF_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .kill_on_drop(true);
        Self(cmd.spawn().expect("queue-manager starts"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leading_replica_mid_run_loses_nothing_and_completes_nothing_twice() {
    let binary = tests::workspace_binary("queue-manager", "queue-manager");
    let nats = TestNats::start().await;
    let mut replicas = [Replica::spawn(&binary, nats.url()), Replica::spawn(&binary, nats.url())];
    let dir = tempfile::tempdir().expect("dir");
    // Short request timeouts: a long poll parked on the killed leader is retried sooner.
    let settings = Arc::new(tests::test_settings(dir.path(), &[("nats.request_timeout_ms", "2000")]));
    let ctx = common::service::ServiceContext::connect(settings, nats.url(), "test-client").await.expect("connect");
    seed_profile(&ctx, "racer").await;
    let api = |token: String| Api { ops: ctx.ops.clone(), token };
    let admin = api(tests::ADMIN_TOKEN.to_string());
    wait_until("a replica leads the queue", Duration::from_secs(20), || async {
        admin.call("getQueueStats", json!({})).await.ok()
    })
    .await;

    let ledger = Arc::new(Ledger::default());
    let stop = CancellationToken::new();
    let workers = start_workers(|id| api(ctx.auth.mint_worker_token(id).expect("token")), &ledger, &stop);
    let convs = conversations();
    let app = api(tests::APP_TOKEN.to_string());
    let to_produce = convs.clone();
    let producer = tokio::spawn(async move { produce(app, "racer", &to_produce, PER_CONVERSATION).await });

    let quarter = (CONVERSATIONS as u64 * PER_CONVERSATION / 4) as usize;
    wait_until("a quarter of the messages are done", Duration::from_secs(60), || async {
        (ledger.completed_total() >= quarter).then_some(())
    })
    .await;
    let holder: serde_json::Value =
        ctx.buckets.leaders.get("queue").await.expect("read lease").expect("a leader").value;
    let pid: u32 =
        holder["holder"].as_str().and_then(|h| h.split('-').nth(2)).and_then(|p| p.parse().ok()).expect("pid");
    let victim = replicas.iter().position(|r| r.0.id() == Some(pid)).expect("the leader is one of ours");
    common::nats_server::signal(pid, libc::SIGKILL);
    let _ = replicas[victim].0.wait().await;
    let done_at_kill = ledger.completed_total();

    producer.await.expect("producer");
    finish(&ledger, stop, workers, &convs).await;
    assert!(done_at_kill < (CONVERSATIONS as u64 * PER_CONVERSATION) as usize, "the kill happened mid-run");
    let survivor: serde_json::Value = ctx.buckets.leaders.get("queue").await.expect("read").expect("leader").value;
    assert_ne!(survivor["holder"], holder["holder"], "the standby took over");
}
