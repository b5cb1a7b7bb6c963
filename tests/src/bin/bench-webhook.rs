//! Webhook ingestion benchmark. A stack (own nats-server, all services in this process) with a
//! bot whose webhook is configured against the fake Telegram Bot API (in this process too):
//!
//! - **webhook**: `--updates` Telegram updates (a private text message each, from
//!   `--users` different unbound users) POSTed to `POST /agent-factory/telegram/webhook` with
//!   the bot's secret, `--concurrency` requests in flight over keep-alive connections. Each must
//!   be answered 200 (ingress has then stored it in `AF_TELEGRAM_UPDATES`); updates/s = updates
//!   / (last 200 − first request), and the latency of each request until its 200.
//! - **raw JetStream publish**: as many acknowledged publishes of the same bodies, with the same
//!   `Nats-Msg-Id` deduplication and the same number in flight, to a stream configured like
//!   `AF_TELEGRAM_UPDATES` (file storage, work queue, the same duplicate window), in the same
//!   run on the same server.
//!
//! The update consumer runs meanwhile, as in production: it answers every update of an unbound
//! user with the pairing hint through the fake Bot API. The benchmark also prints how long after
//! the last 200 the consumer had worked through every update. Runs alternate webhook and raw.
//!
//! Run: `cargo build --release -p tests --bin bench-webhook && target/release/bench-webhook`

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tests::TestStack;
use tests::fake_telegram::FakeTelegram;

#[derive(Parser, Debug)]
struct Args {
    /// Updates per run (and publishes per baseline run).
    #[arg(long, default_value_t = 10_000)]
    updates: usize,
    /// Requests (or publishes) in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Distinct Telegram users sending the updates.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const BOT_ID: u64 = 7_000_001;

/// One run: wall time and every request's latency.
struct Run {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile in milliseconds.
    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted.get(rank - 1).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// A Telegram update as the Bot API sends it: a private text message.
fn update_body(update_id: i64, user: i64) -> bytes::Bytes {
    let body = json!({
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "from": {"id": user, "is_bot": false, "first_name": "Bench", "username": format!("bench{user}")},
            "chat": {"id": user, "type": "private", "first_name": "Bench"},
            "date": 1_767_258_000,
            "text": "hello from the benchmark"
        }
    });
    bytes::Bytes::from(body.to_string())
}

async fn webhook_run(args: &Args, url: &str, secret: &str, first_id: i64) -> anyhow::Result<Run> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(0..args.updates)
        .map(|i| {
            let body = update_body(first_id + i as i64, 1 + (i % args.users) as i64);
            let request = http
                .post(url)
                .header("content-type", "application/json")
                .header("x-telegram-bot-api-secret-token", secret)
                .body(body);
            async move {
                let sent = Instant::now();
                let response = request.send().await?;
                let status = response.status();
                response.bytes().await?;
                anyhow::ensure!(status == 200, "the webhook answered {status}");
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let latencies = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Run { elapsed, latencies })
}

async fn raw_run(args: &Args, nats: &async_nats::Client, first_id: i64) -> anyhow::Result<Run> {
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(0..args.updates)
        .map(|i| {
            let update_id = first_id + i as i64;
            let body = update_body(update_id, 1 + (i % args.users) as i64);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{BOT_ID}:{update_id}").as_str());
            let nats = nats.clone();
            async move {
                let sent = Instant::now();
                let ack =
                    common::store::publish_acked(&nats, format!("BENCH_RAW_UPDATES.{BOT_ID}"), headers, body).await;
                ack.map_err(|e| anyhow::anyhow!("raw publish: {e:?}"))?;
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let latencies = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Run { elapsed, latencies })
}

/// Waits until the update consumer has acknowledged every stored update; returns how long.
async fn consumer_drained(stack: &TestStack) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let stream = stack.ctx.js.get_stream(common::topology::TELEGRAM_UPDATES_STREAM).await?;
    tests::wait_until("the update consumer acknowledged every update", Duration::from_secs(600), || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(common::topology::TELEGRAM_UPDATES_CONSUMER).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    Ok(started.elapsed())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.updates > 0 && args.concurrency > 0 && args.users > 0 && args.runs > 0, "counts must be > 0");
    eprintln!("starting nats-server, the stack and the fake Bot API ...");
    let fake = FakeTelegram::start().await;
    let base = fake.base_url();
    let stack = TestStack::start_with(&[
        ("telemetry.log_filter", "error"),
        ("loops.reconcile", "false"),
        ("loops.push_dispatch", "false"),
        ("telegram.api_base_url", base.as_str()),
    ])
    .await;
    let token = fake.add_bot(BOT_ID, "bench_bot");
    let admin = stack.admin();
    admin
        .ok("upsertAgentProfile", json!({"agentKey": "bench", "version": "1", "secretsRef": [], "enabled": true}))
        .await;
    admin
        .ok(
            "importTelegramTokenForAgent",
            json!({"consumerUserId": "owner", "agentKey": "bench", "plaintextValue": token}),
        )
        .await;
    let configured = admin.ok("configureTelegramWebhook", json!({"agentKey": "bench"})).await;
    anyhow::ensure!(configured["isReady"] == json!(true), "webhook not ready: {configured}");
    let (url, secret) = fake.webhook(BOT_ID).ok_or_else(|| anyhow::anyhow!("no webhook"))?;
    let secret = secret.ok_or_else(|| anyhow::anyhow!("no webhook secret"))?;

    let nats = common::service::connect_nats(stack.nats.url(), "bench-raw", Duration::from_secs(5)).await?;
    let js = async_nats::jetstream::new(nats.clone());
    let settings = &stack.ctx.settings.telegram;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_RAW_UPDATES".to_string(),
        subjects: vec!["BENCH_RAW_UPDATES.>".to_string()],
        storage: async_nats::jetstream::stream::StorageType::File,
        retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
        max_age: Duration::from_millis(settings.update_dedup_window_ms.max(86_400_000)),
        duplicate_window: Duration::from_millis(settings.update_dedup_window_ms),
        ..Default::default()
    })
    .await?;

    // A short warm-up of both paths (connections, the secret mirror, stream files).
    let warm = Args { updates: args.updates.min(500), ..args };
    webhook_run(&warm, &url, &secret, 1).await?;
    raw_run(&warm, &nats, 1).await?;
    consumer_drained(&stack).await?;

    let (mut webhook, mut raw, mut drains) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let first_id = 1_000_000 * (run as i64 + 1);
        let w = webhook_run(&args, &url, &secret, first_id).await?;
        let drain = consumer_drained(&stack).await?;
        let r = raw_run(&args, &nats, first_id).await?;
        eprintln!(
            "run {}: webhook {:.0}/s p99 {:.2} ms (consumer done {:.2} s later); raw {:.0}/s p99 {:.2} ms",
            run + 1,
            w.per_second(),
            w.percentile_ms(99.0),
            drain.as_secs_f64(),
            r.per_second(),
            r.percentile_ms(99.0)
        );
        webhook.push(w);
        raw.push(r);
        drains.push(drain.as_secs_f64());
    }
    let stat = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let rate = |r: &Run| r.per_second();
    let p50 = |r: &Run| r.percentile_ms(50.0);
    let p99 = |r: &Run| r.percentile_ms(99.0);
    println!(
        "\n{} updates per run, {} in flight, {} users, median of {} runs\n",
        args.updates, args.concurrency, args.users, args.runs
    );
    println!("| measurement | webhook (200) | raw JetStream publish | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| throughput (updates/s) | {:.0} | {:.0} | {:.2} |",
        stat(&webhook, &rate),
        stat(&raw, &rate),
        stat(&webhook, &rate) / stat(&raw, &rate)
    );
    println!(
        "| latency p50 (ms) | {:.2} | {:.2} | {:.1} |",
        stat(&webhook, &p50),
        stat(&raw, &p50),
        stat(&webhook, &p50) / stat(&raw, &p50)
    );
    println!(
        "| latency p99 (ms) | {:.2} | {:.2} | {:.1} |",
        stat(&webhook, &p99),
        stat(&raw, &p99),
        stat(&webhook, &p99) / stat(&raw, &p99)
    );
    println!("\nupdate consumer done after the last 200 (median): {:.2} s", median(drains));
    let replies = fake.sent().iter().filter(|s| s.method == "sendMessage").count();
    let total = warm.updates + args.updates * args.runs;
    println!("pairing hints the consumer sent through the fake Bot API: {replies} for {total} updates");
    stack.stop().await;
    Ok(())
}
