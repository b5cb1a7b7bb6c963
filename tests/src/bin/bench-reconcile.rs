//! Reconcile benchmark: a stack (own nats-server) against the fake Fly API with 10,000 active
//! conversations and 1,000 worker rows with live machines, then times `reconcileWorkerPool`:
//! a cycle with nothing to change, and one that must spawn 100 workers. In the same run it
//! times the raw reads a cycle is made of (one KV scan of the worker rows and one Fly machine
//! listing) as the floor.
//!
//! Run: `cargo run --release -p tests --bin bench-reconcile -- --help`

use std::time::{Duration, Instant};

use clap::Parser;
use providers::Provider;
use serde_json::{Value, json};
use tests::fake_fly::FakeFly;
use tests::{TestStack, message, seed_profile};

const APP: &str = "af-bench";

#[derive(Parser, Debug)]
struct Args {
    /// Active conversations (each with one queued message).
    #[arg(long, default_value_t = 10_000)]
    conversations: usize,
    /// Worker rows, each with a live machine and pinned to one of the conversations.
    #[arg(long, default_value_t = 1_000)]
    workers: usize,
    /// Spawns the second measurement needs.
    #[arg(long, default_value_t = 100)]
    spawns: usize,
    /// Repetitions of the no-change cycle (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.workers <= args.conversations && args.runs > 0, "need workers <= conversations and runs > 0");
    let fake = FakeFly::start().await;
    fake.add_app(APP);
    let url = fake.base_url();
    eprintln!("starting nats-server and the stack ...");
    let stack = TestStack::start_with(&[
        ("telemetry.log_filter", "error"),
        ("loops.manual", "true"),
        ("providers.fly_base_url", url.as_str()),
        ("scheduler.default_provider", "none"),
    ])
    .await;
    seed_profile(&stack.ctx, "bench").await;
    let admin = stack.admin();
    admin.ok("importPlaintextSecret", json!({"secretRef": "fly.apiToken", "plaintextValue": fake.token()})).await;
    let config = json!({"kind": "fly", "appName": APP, "organizationSlug": "org", "image": "af-worker:1", "region": "iad",
                        "volumeName": "openclaw_data", "volumePath": "/data", "volumeSizeGb": 1});
    admin.ok("setProviderRuntimeConfig", json!({"providerConfig": config})).await;
    let policy = |max: usize| {
        json!({"scalingPolicy": {"maxWorkers": max, "spawnStep": 1000, "idleTimeoutMs": 86_400_000,
                                 "reconcileIntervalMs": 15_000, "drainDeadlineMs": 900_000}})
    };
    admin.ok("setScalingRuntimeConfig", policy(args.workers)).await;
    stack.wait_queue_ready().await;

    eprintln!("enqueueing {} conversations ...", args.conversations);
    let app = stack.app();
    let conversation = |i: usize| format!("conv-{i:05}");
    for chunk in (0..args.conversations).collect::<Vec<_>>().chunks(64) {
        let calls = chunk.iter().map(|i| app.call("enqueueMessage", message(&conversation(*i), "bench", "hi")));
        for r in futures::future::join_all(calls).await {
            r.map_err(|e| anyhow::anyhow!("enqueue: {e}"))?;
        }
    }
    eprintln!("spawning {} machines and worker rows ...", args.workers);
    let provider = providers::fly::FlyProvider::new(&url, fake.token(), &stack.ctx.settings.providers);
    for i in 0..args.workers {
        let worker = format!("bench-{i:05}");
        let spec = providers::SpawnSpec {
            worker_id: worker.clone(),
            image: "af-worker:1".into(),
            region: "iad".into(),
            guest: Default::default(),
            volume_id: String::new(),
            volume_path: "/data".into(),
            env: Default::default(),
        };
        let machine = provider.spawn(APP, &spec).await?;
        let assignment = json!({"conversationId": conversation(i), "agentKey": "bench", "leaseId": "bench"});
        admin
            .ok(
                "upsertWorkerState",
                json!({"workerId": worker, "provider": "fly", "status": "active", "load": 0, "machineId": machine.machine_id,
                       "appName": APP, "region": "iad", "assignment": assignment, "scheduledShutdownAt": i64::MAX / 2}),
            )
            .await;
    }
    fake.settle();

    eprintln!("timing ...");
    let mut raw = Vec::new();
    let mut no_change = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let rows = stack.ctx.buckets.workers.scan::<Value>(">").await?;
        let machines = provider.list_machines(APP).await?;
        raw.push(started.elapsed());
        anyhow::ensure!(rows.len() == args.workers && machines.len() == args.workers, "unexpected state");
        let started = Instant::now();
        let result = admin.ok("reconcileWorkerPool", json!({})).await;
        no_change.push(started.elapsed());
        anyhow::ensure!(result["spawned"] == 0, "the no-change cycle spawned: {result}");
    }
    admin.ok("setScalingRuntimeConfig", policy(args.workers + args.spawns)).await;
    let started = Instant::now();
    let result = admin.ok("reconcileWorkerPool", json!({})).await;
    let with_spawns = started.elapsed();
    anyhow::ensure!(result["spawned"] == args.spawns, "expected {} spawns: {result}", args.spawns);

    println!(
        "\nreconcile, {} active conversations, {} worker rows with live machines (fake Fly API, in-process)",
        args.conversations, args.workers
    );
    println!("| measurement | time |");
    println!("|---|---|");
    println!(
        "| raw reads: KV scan of the worker rows + one machine listing (median of {}) | {:.1} ms |",
        args.runs,
        ms(median(raw))
    );
    println!("| reconcile, nothing to change (median of {}) | {:.1} ms |", args.runs, ms(median(no_change)));
    println!("| reconcile with {} spawns | {:.1} ms |", args.spawns, ms(with_spawns));
    stack.stop().await;
    Ok(())
}
