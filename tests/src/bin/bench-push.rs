//! Push benchmark. A stack (own nats-server, manual clock) with a push-dispatcher child process
//! that holds the dispatch lease:
//! 1. `--jobs` users, each with an active binding and a daily push job whose slot is the same
//!    minute; the clock moves to that minute and the time until every job's message is in the
//!    queue is measured, with the dispatcher process's peak memory (VmHWM);
//! 2. a broadcast to `--agents` agents of one company: the time until the call returns.
//!
//! Each against a raw JetStream publish (acknowledged, the same number in flight) of as many
//! messages in the same run.
//!
//! Run: `cargo build --release -p push-dispatcher && cargo run --release -p tests --bin bench-push`

use std::time::{Duration, Instant};

use clap::Parser;
use common::api::push::{CatchUp, Periodicity, PushJobView, Schedule};
use common::ids::PushJobId;
use futures::StreamExt;
use serde_json::json;
use tests::TestStack;

#[derive(Parser, Debug)]
struct Args {
    /// Push jobs due in the same minute.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Agents of the broadcast's company.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Jobs or targets in flight (`push.concurrency`), and publishes in flight for the baseline.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

/// 2026-01-02T07:59:00Z; the slot is 08:00.
const START: i64 = 1_767_340_740_000;
const SLOT: i64 = START + 60_000;

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn inbox_messages(stack: &TestStack) -> anyhow::Result<u64> {
    let mut stream = stack.ctx.js.get_stream(common::topology::INBOX_STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

/// `n` acknowledged publishes to a raw stream, `in_flight` at a time.
async fn raw_publish(stack: &TestStack, name: &str, n: usize, in_flight: usize) -> anyhow::Result<Duration> {
    let nats = common::service::connect_nats(stack.nats.url(), "bench-raw", Duration::from_secs(5)).await?;
    let js = async_nats::jetstream::new(nats.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{name}.>")],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 300]);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (nats, payload) = (nats.clone(), payload.clone());
            async move {
                common::store::publish_acked(&nats, format!("{name}.c{i}"), Default::default(), payload).await
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|r| async move {
            r.expect("raw publish");
        })
        .await;
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dispatcher_bin = std::env::current_exe()?.with_file_name("push-dispatcher");
    anyhow::ensure!(dispatcher_bin.exists(), "build it first: cargo build --release -p push-dispatcher");
    let concurrency = args.concurrency.to_string();
    eprintln!("starting nats-server and the stack ...");
    let stack = TestStack::start_with(&[
        ("telemetry.log_filter", "error"),
        ("clock.mode", "manual"),
        ("clock.start_ms", &START.to_string()),
        ("loops.reconcile", "false"),
        ("loops.push_dispatch", "false"),
        ("push.concurrency", &concurrency),
    ])
    .await;
    let ctx = stack.ctx.clone();

    // 1. Seed users, bindings and jobs straight into KV (the same documents the operations write).
    eprintln!("seeding {} users with a binding and a daily 08:00 job ...", args.jobs);
    tests::seed_profile(&ctx, "bench").await;
    futures::stream::iter(0..args.jobs)
        .for_each_concurrent(256, |i| {
            let ctx = ctx.clone();
            async move {
                let user = format!("u{i:06}");
                let binding = json!({"consumerUserId": user, "bindings": [{
                    "agentKey": "bench", "conversationId": format!("user-agent:bench:{user}"),
                    "status": "active", "source": "api", "boundAt": 0}]});
                ctx.buckets.bindings.create(&format!("u.{user}"), &binding).await.expect("binding");
                let id = format!("pj{i:06}");
                let job = PushJobView {
                    id: PushJobId::trusted(id.clone()),
                    company_id: "bench".into(),
                    consumer_user_id: user.clone(),
                    agent_key: Some("bench".into()),
                    source_template_id: None,
                    title: "Check-in".into(),
                    text: "How is it going?".into(),
                    periodicity: Periodicity::Daily,
                    timezone: "UTC".into(),
                    schedule: Schedule::Daily { time: "08:00".into() },
                    enabled: true,
                    next_run_at: Some(SLOT),
                    last_run_at: None,
                    last_run_key: None,
                    catch_up: CatchUp::Skip,
                    created_at: START,
                    updated_at: START,
                };
                ctx.buckets.push_jobs.create(&push_dispatcher::jobs::job_key(&user, &id), &job).await.expect("job");
            }
        })
        .await;

    eprintln!("starting the push-dispatcher process ...");
    let mut child = tokio::process::Command::new(&dispatcher_bin)
        .env_clear()
        .env("AF_NATS__URL", stack.nats.url())
        .env("AF_AUTH__ADMIN_TOKEN", tests::ADMIN_TOKEN)
        .env("AF_AUTH__APP_TOKEN", tests::APP_TOKEN)
        .env("AF_AUTH__WORKER_TOKEN_KEY", tests::WORKER_TOKEN_KEY)
        .env("AF_CLOCK__MODE", "manual")
        .env("AF_PUSH__CONCURRENCY", &concurrency)
        .env("AF_TELEMETRY__LOG_FILTER", "error")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    tests::wait_until("the dispatcher leads", Duration::from_secs(30), || async {
        ctx.buckets.leaders.get::<serde_json::Value>(push_dispatcher::LEASE).await.ok().flatten().map(|_| ())
    })
    .await;
    // The leader indexes the jobs through a watch of the bucket (an ordered consumer of its
    // stream): wait until a consumer of that stream has delivered every job, so the measured
    // time is the dispatch alone.
    let jobs_stream = format!("KV_{}", common::topology::PUSH_JOBS);
    tests::wait_until("the dispatcher has indexed every job", Duration::from_secs(600), || async {
        let mut stream = ctx.js.get_stream(&jobs_stream).await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let mut consumers = stream.consumers();
        while let Some(Ok(info)) = consumers.next().await {
            if info.num_pending == 0 && info.delivered.stream_sequence >= last {
                return Some(());
            }
        }
        None
    })
    .await;
    let rss_before = peak_rss_mb(pid);
    eprintln!("moving the clock to the slot ...");
    let started = Instant::now();
    stack.admin().ok("setTestClock", json!({"nowMs": SLOT})).await;
    let jobs = args.jobs as u64;
    tests::wait_until(&format!("{jobs} pushes are enqueued"), Duration::from_secs(1800), || async {
        (inbox_messages(&stack).await.ok()? >= jobs).then_some(())
    })
    .await;
    let push_time = started.elapsed();
    let rss_peak = peak_rss_mb(pid);
    let raw_jobs = raw_publish(&stack, "BENCH_RAW_JOBS", args.jobs, args.concurrency).await?;
    child.kill().await?;

    // 2. A broadcast to a company's agents.
    eprintln!("seeding {} agents ...", args.agents);
    futures::stream::iter(0..args.agents)
        .for_each_concurrent(256, |i| {
            let ctx = ctx.clone();
            async move {
                let profile = common::model::AgentProfile {
                    agent_key: format!("agent-{i:06}"),
                    version: "1.0.0".into(),
                    secrets_ref: vec![],
                    bot_identity: None,
                    bridge_config: None,
                    enabled: true,
                    company_id: Some("big".into()),
                    created_at: 0,
                    updated_at: 0,
                };
                ctx.buckets.profiles.create(&profile.agent_key, &profile).await.expect("profile");
            }
        })
        .await;
    let client = common::ops::OpClient::new(ctx.nats.clone(), Duration::from_secs(1800));
    let broadcast = common::api::push::BroadcastArgs {
        company_id: "big".parse()?,
        title: "News".into(),
        text: "We ship today.".into(),
        requested_by: "bench".into(),
        now_ms: Default::default(),
        provider_config: Default::default(),
    };
    let before = inbox_messages(&stack).await?;
    let started = Instant::now();
    let result = client.call::<common::api::SendBroadcastToAllActiveAgents>(tests::ADMIN_TOKEN, &broadcast).await?;
    let broadcast_time = started.elapsed();
    anyhow::ensure!(result.enqueued == args.agents as u64, "broadcast enqueued {} of {}", result.enqueued, args.agents);
    anyhow::ensure!(inbox_messages(&stack).await? - before == args.agents as u64, "one message per agent");
    let raw_broadcast = raw_publish(&stack, "BENCH_RAW_BROADCAST", args.agents, args.concurrency).await?;

    let secs = |d: Duration| d.as_secs_f64();
    println!("| measurement | agent-factory | raw JetStream publish | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| {} push jobs due in one minute: until all enqueued (s) | {:.2} | {:.2} | {:.1} |",
        args.jobs,
        secs(push_time),
        secs(raw_jobs),
        secs(push_time) / secs(raw_jobs)
    );
    println!(
        "| broadcast to {} agents: until the call returns (s) | {:.2} | {:.2} | {:.1} |",
        args.agents,
        secs(broadcast_time),
        secs(raw_broadcast),
        secs(broadcast_time) / secs(raw_broadcast)
    );
    println!(
        "\npush-dispatcher process: peak RSS {rss_before:.0} MiB with the {} jobs indexed, {rss_peak:.0} MiB after dispatching them",
        args.jobs
    );
    stack.stop().await;
    Ok(())
}
