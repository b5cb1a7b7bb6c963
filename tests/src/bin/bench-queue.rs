//! Queue benchmark: starts its own nats-server and stack (all services in this process, clients
//! over NATS), then measures, in the same run, the agent-factory queue and a raw JetStream
//! work queue with the same concurrency.
//!
//! - Throughput (T): C conversations x M messages, one worker per conversation (as in
//!   production, where each worker serves one conversation), at most `in_flight` enqueues in
//!   flight; workers complete a job and claim the next in one call (`completeAndClaimNext`).
//!   e2e = messages / (last completion - first enqueue).
//! - Dispatch latency (L): idle long-polling workers; one message every `interval_ms`, each on
//!   a new conversation; dispatch = worker has the job - enqueue call returned.
//!
//! Run: `cargo run --release -p tests --bin bench-queue -- --help`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use common::api::queue::{Claim, ClaimArgs, CompleteAndClaimArgs, EnqueueArgs, LeaseArgs};
use common::api::{self, Ignored, Operation};
use common::ids::{AgentKey, ConversationId, WorkerId};
use futures::StreamExt;
use serde_json::{Value, json};
use tests::{Api, TestStack, seed_profile};
use tokio_util::sync::CancellationToken;

/// glibc malloc took about a third of the stack's instructions under load (callgrind, see
/// docs/benchmarks.md); mimalloc's thread-local free lists are much cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Conversations in the throughput run.
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// Messages per conversation in the throughput run.
    #[arg(long, default_value_t = 10)]
    messages: usize,
    /// Enqueues in flight at once.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Messages in the latency run.
    #[arg(long, default_value_t = 2000)]
    latency_messages: usize,
    /// Idle workers in the latency run.
    #[arg(long, default_value_t = 32)]
    latency_workers: usize,
    /// Milliseconds between messages in the latency run.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measure only the agent-factory throughput run, `runs` times on one stack (for
    /// profiling, e.g. under callgrind).
    #[arg(long)]
    profile_throughput: bool,
}

/// CPU time used by nats-server and by this process over a measured window, as % of one core.
struct CpuSplit {
    server: Option<u32>,
    /// nats-server, the stack's threads, the benchmark's clients.
    at: (u64, u64, u64),
    varz: Option<String>,
    msgs: (u64, u64),
    jsz: Option<String>,
    writes: HashMap<String, u64>,
}

impl CpuSplit {
    async fn start(stack: &TestStack) -> Self {
        let server = stack.nats.server.pid();
        let varz = stack.nats.server.monitoring_url().map(|u| format!("{u}/varz"));
        let msgs = server_msgs(varz.as_deref()).await;
        let jsz = stack.nats.server.monitoring_url().map(|u| format!("{u}/jsz?accounts=true&streams=true"));
        let writes = stream_writes(jsz.as_deref()).await;
        let (stack, clients) = own_cpu_ticks();
        Self { server, at: (server.map_or(0, cpu_ticks), stack, clients), varz, msgs, jsz, writes }
    }

    /// Stored writes per processed message since `start`, by stream, busiest first.
    async fn writes_per(&self, processed: usize) -> String {
        let now = stream_writes(self.jsz.as_deref()).await;
        let mut per: Vec<(String, f64)> = now
            .into_iter()
            .map(|(name, seq)| {
                let delta = seq.saturating_sub(self.writes.get(&name).copied().unwrap_or(0));
                (name, delta as f64 / processed.max(1) as f64)
            })
            .filter(|(_, per)| *per >= 0.005)
            .collect();
        per.sort_by(|a, b| b.1.total_cmp(&a.1));
        per.iter().map(|(name, per)| format!("{name} {per:.2}")).collect::<Vec<_>>().join(", ")
    }

    /// Messages into and out of nats-server since `start`, per processed message.
    async fn msgs_per(&self, processed: usize) -> (f64, f64) {
        let (i, o) = server_msgs(self.varz.as_deref()).await;
        let per = |now: u64, then: u64| now.saturating_sub(then) as f64 / processed.max(1) as f64;
        (per(i, self.msgs.0), per(o, self.msgs.1))
    }

    /// % of one core used by nats-server, the stack and the clients since `start`.
    fn busy(&self, elapsed: Duration) -> (f64, f64, f64) {
        let pct = |now: u64, then: u64| now.saturating_sub(then) as f64 / USER_HZ / elapsed.as_secs_f64() * 100.0;
        let (stack, clients) = own_cpu_ticks();
        (pct(self.server.map_or(0, cpu_ticks), self.at.0), pct(stack, self.at.1), pct(clients, self.at.2))
    }
}

/// One HTTP client for the monitoring endpoint: building one loads the system's certificates,
/// which costs more than a whole measured window's worth of requests.
fn monitoring_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}

/// A monitoring endpoint's JSON (`null` if there is none or it cannot be read: the figures it
/// feeds are then reported as 0).
async fn monitoring_json(url: Option<&str>) -> Value {
    let Some(url) = url else { return Value::Null };
    match monitoring_client().get(url).send().await {
        Ok(resp) => resp.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    }
}

/// nats-server's `in_msgs` and `out_msgs` counters.
async fn server_msgs(varz: Option<&str>) -> (u64, u64) {
    let v = monitoring_json(varz).await;
    (v["in_msgs"].as_u64().unwrap_or(0), v["out_msgs"].as_u64().unwrap_or(0))
}

/// The last sequence of every JetStream stream: the writes it has taken.
async fn stream_writes(jsz: Option<&str>) -> HashMap<String, u64> {
    let v = monitoring_json(jsz).await;
    let accounts = v["account_details"].as_array().cloned().unwrap_or_default();
    accounts
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| Some((s["name"].as_str()?.to_string(), s["state"]["last_seq"].as_u64()?)))
        .collect()
}

/// The unit of /proc CPU times: fixed at 100 per second by the Linux ABI.
const USER_HZ: f64 = 100.0;

/// This process's CPU ticks: (the stack's `af-stack` threads, every other thread).
fn own_cpu_ticks() -> (u64, u64) {
    let (mut stack, mut clients) = (0, 0);
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let ticks = stat_ticks(&task.path().join("stat"));
        if comm.starts_with("af-stack") { stack += ticks } else { clients += ticks }
    }
    (stack, clients)
}

/// utime + stime of `pid` in clock ticks (0 if it cannot be read).
fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

fn stat_ticks(path: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse::<u64>().ok()).sum()
}

/// Mean time each operation spent inside its service (from the request's arrival to the reply),
/// over the whole benchmark, from the stack's own `af_op_duration_seconds` histogram. Compared
/// with the latency a client sees, it tells transport and queueing from handling.
fn server_side_times() {
    let text = common::telemetry::metrics_handle().render();
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    println!("\n| operation (status 200) | calls | mean time in the service (ms) |\n|---|---|---|");
    let count_prefix = format!("{}_count{{op=\"", common::telemetry::OP_DURATION);
    let mut ops: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&count_prefix))
        .filter(|l| l.contains("status=\"200\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    ops.sort_unstable();
    for op in ops {
        let label = format!("{{op=\"{op}\",status=\"200\"}}");
        let find = |suffix: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{}{suffix}{label}", common::telemetry::OP_DURATION)))
                .and_then(value)
        };
        if let (Some(sum), Some(count)) = (find("_sum"), find("_count")) {
            println!("| {op} | {count:.0} | {:.3} |", sum / count.max(1.0) * 1000.0);
        }
    }
    for line in text.lines().filter(|l| l.contains("_count{") && !l.contains("status=\"200\"")) {
        println!("failed: {line}");
    }
}

/// The benchmark's clients (producers, workers, the raw baseline) run on this one thread, as a
/// lean load generator would: a second client thread only adds wake-ups across threads on a
/// 2-core machine already shared by nats-server and the stack's two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!("starting nats-server and the stack ...");
    // The stack gets a runtime (and threads) of its own, as it would in its own process: the
    // producers and the thousand workers of the benchmark must not queue in its run queues.
    let stack_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("af-stack").enable_all().build()?;
    let stack = stack_runtime.spawn(TestStack::start_with(&[("telemetry.log_filter", "error")])).await?;
    seed_profile(&stack.ctx, "bench").await;
    // Producers and workers get their own connections, as separate processes would have.
    let clients = Clients::connect(&stack).await?;
    if args.profile_throughput {
        for run in 1..=args.runs {
            queue_throughput(&stack, &clients, &args, run).await;
        }
        server_side_times();
        stack.stop().await;
        stack_runtime.shutdown_background();
        return Ok(());
    }
    eprintln!("run 0: operation round trip vs raw NATS request/reply");
    let (op_rate, raw_rate) = op_overhead(&stack, &clients).await?;
    let mut rows = Vec::new();
    for run in 1..=args.runs {
        eprintln!("run {run}/{}: throughput, agent-factory queue", args.runs);
        let queue_t = queue_throughput(&stack, &clients, &args, run).await;
        eprintln!("run {run}/{}: throughput, raw JetStream", args.runs);
        let raw_t = raw_throughput(&stack, &clients, &args, run).await?;
        eprintln!("run {run}/{}: dispatch latency, agent-factory queue", args.runs);
        let queue_l = queue_latency(&stack, &clients, &args, run).await;
        eprintln!("run {run}/{}: dispatch latency, raw JetStream", args.runs);
        let raw_l = raw_latency(&clients, &args, run).await?;
        rows.push((queue_t, raw_t, queue_l, raw_l));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let col = |f: &dyn Fn(&Run) -> f64| median(rows.iter().map(f).collect());
    let (qt, rt) = (col(&|r| r.0), col(&|r| r.1));
    println!(
        "\n## Queue benchmark ({} runs, medians)\n\nthroughput: {} conversations x {} messages, {} enqueues in flight; latency: {} messages, one every {} ms, {} idle workers\n",
        args.runs,
        args.conversations,
        args.messages,
        args.in_flight,
        args.latency_messages,
        args.interval_ms,
        args.latency_workers
    );
    println!("| measurement | agent-factory | raw NATS/JetStream | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| trivial operation round trips, 32 in flight (ops/s) | {op_rate:.0} | {raw_rate:.0} | {:.2} |",
        op_rate / raw_rate
    );
    println!("| end-to-end throughput (msgs/s) | {qt:.0} | {rt:.0} | {:.2} |", qt / rt);
    for (name, f) in [
        ("dispatch p50 (ms)", (&|l: &Latency| l.p50) as &dyn Fn(&Latency) -> f64),
        ("dispatch p90 (ms)", &|l: &Latency| l.p90),
        ("dispatch p99 (ms)", &|l: &Latency| l.p99),
        ("dispatch max (ms)", &|l: &Latency| l.max),
    ] {
        let q = col(&|r| f(&r.2));
        let raw = col(&|r| f(&r.3));
        println!("| {name} | {q:.3} | {raw:.3} | {:.2} |", q / raw.max(1e-9));
    }
    server_side_times();
    stack.stop().await;
    stack_runtime.shutdown_background();
    Ok(())
}

struct Clients {
    producer: common::ops::OpClient,
    workers: common::ops::OpClient,
    /// The baseline's producer and pullers, on a connection of their own too.
    raw: async_nats::jetstream::Context,
}

impl Clients {
    async fn connect(stack: &TestStack) -> anyhow::Result<Self> {
        let client = |name: &'static str| async move {
            let nats = common::service::connect_nats(stack.nats.url(), name, Duration::from_secs(5)).await?;
            anyhow::Ok(common::ops::OpClient::new(nats, Duration::from_secs(10)))
        };
        let raw = common::service::connect_nats(stack.nats.url(), "bench-raw", Duration::from_secs(5)).await?;
        Ok(Self {
            producer: client("bench-producer").await?,
            workers: client("bench-workers").await?,
            raw: async_nats::jetstream::new(raw),
        })
    }

    fn app(&self) -> Api {
        Api { ops: self.producer.clone(), token: tests::APP_TOKEN.to_string() }
    }

    fn worker(&self, stack: &TestStack, id: &str) -> Api {
        Api { ops: self.workers.clone(), token: stack.ctx.auth.mint_worker_token(id).expect("token") }
    }
}

/// One repetition: queue and raw throughput, queue and raw dispatch latency.
type Run = (f64, f64, Latency, Latency);

#[derive(Clone, Copy, Debug)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn latency(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    Latency { p50: at(0.50), p90: at(0.90), p99: at(0.99), max: at(1.0) }
}

/// Calls `O` with its contract types, riding out unavailability. The benchmark's clients are
/// typed, as the worker runtime is: building and dropping `Value` trees would spend the CPU the
/// measured system shares with them.
async fn retry<O: Operation>(api: &Api, args: &O::Args) -> O::Output {
    let call = || api.ops.call_through_failover::<O>(&api.token, args, common::ops::FAILOVER_PATIENCE);
    tests::workload::retrying(call).await.unwrap_or_else(|e| panic!("{} failed: {e:?}", O::SPEC.name))
}

fn claim_args(worker_id: &WorkerId, conversation_id: Option<&ConversationId>, wait_ms: u64) -> ClaimArgs {
    ClaimArgs {
        worker_id: worker_id.clone(),
        conversation_id: conversation_id.cloned(),
        wait_ms: Some(wait_ms),
        now_ms: Ignored,
    }
}

fn lease_args(worker_id: &WorkerId, job: &Claim) -> LeaseArgs {
    LeaseArgs {
        worker_id: worker_id.clone(),
        message_id: job.message_id.clone(),
        lease_id: job.lease_id.clone(),
        now_ms: Ignored,
        provider_config: Ignored,
    }
}

/// Waits until the queue leader holds `n` parked long-poll claims.
async fn parked(stack: &TestStack, n: usize) {
    tests::wait_until("the workers are parked", Duration::from_secs(30), || async {
        let stats = stack.admin().call("getQueueStats", json!({})).await.ok()?;
        (stats["parkedClaims"].as_u64()? as usize >= n).then_some(())
    })
    .await;
}

/// Waits until the raw consumer has `n` pull requests waiting.
async fn pulling(
    consumer: &async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    n: usize,
) {
    tests::wait_until("the pullers are waiting", Duration::from_secs(30), || async {
        let info = consumer.get_info().await.ok()?;
        (info.num_waiting as usize >= n).then_some(())
    })
    .await;
}

/// Waits until `map` holds `n` entries.
async fn filled(map: &Mutex<HashMap<String, Instant>>, n: usize) {
    tests::wait_until("every message is received", Duration::from_secs(120), || async {
        (map.lock().map(|m| m.len()).unwrap_or(0) >= n).then_some(())
    })
    .await;
}

async fn enqueue(app: &Api, conversation: &ConversationId) {
    let payload = json!({ "provider": "bench", "providerUserId": "u", "messageText": "x" });
    let args = EnqueueArgs {
        conversation_id: conversation.clone(),
        agent_key: AgentKey::trusted("bench"),
        payload: payload.as_object().cloned().unwrap_or_default(),
        priority: None,
        scheduled_for: None,
        max_attempts: None,
        idempotency_key: None,
        now_ms: Ignored,
        provider_config: Ignored,
    };
    retry::<api::EnqueueMessage>(app, &args).await;
}

async fn queue_throughput(stack: &TestStack, clients: &Clients, args: &Args, run: usize) -> f64 {
    let total = args.conversations * args.messages;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finished = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..args.conversations {
        let id = WorkerId::trusted(format!("t{run}-w{c}"));
        let conversation = ConversationId::trusted(format!("t{run}-c{c}"));
        let api = clients.worker(stack, &id);
        let (done, finished, per) = (done.clone(), finished.clone(), args.messages);
        workers.spawn(async move {
            // Claim once, then complete each job and claim the next in one call, as a
            // worker serving one conversation does.
            let mut mine = 0;
            let mut job: Option<Claim> = None;
            while mine < per {
                let Some(current) = &job else {
                    job = retry::<api::ClaimNextJob>(&api, &claim_args(&id, Some(&conversation), 5000)).await;
                    continue;
                };
                let wait = if mine + 1 < per { 5000 } else { 0 };
                let args = CompleteAndClaimArgs {
                    worker_id: id.clone(),
                    message_id: current.message_id.clone(),
                    lease_id: current.lease_id.clone(),
                    wait_ms: Some(wait),
                };
                job = retry::<api::CompleteAndClaimNext>(&api, &args).await.next;
                mine += 1;
                if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == total {
                    finished.cancel();
                }
            }
        });
    }
    // Start the clock only once every worker is parked, as the spike did.
    parked(stack, args.conversations).await;
    let app = clients.app();
    let cpu = CpuSplit::start(stack).await;
    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(|i| {
            let app = app.clone();
            let conversation = ConversationId::trusted(format!("t{run}-c{}", i % args.conversations));
            async move { enqueue(&app, &conversation).await }
        })
        .buffered(args.in_flight)
        .for_each(|_| async {})
        .await;
    let enqueued = started.elapsed();
    finished.cancelled().await;
    let elapsed = started.elapsed();
    let (server_cpu, stack_cpu, client_cpu) = cpu.busy(elapsed);
    let (ins, outs) = cpu.msgs_per(total).await;
    let writes = cpu.writes_per(total).await;
    eprintln!(
        "  enqueue rate {:.0} msgs/s, e2e {:.0} msgs/s; CPU: nats-server {server_cpu:.0} %, stack {stack_cpu:.0} %, clients {client_cpu:.0} %; nats-server msgs in/out per message {ins:.1}/{outs:.1}; stored writes per message: {writes}",
        total as f64 / enqueued.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    while workers.join_next().await.is_some() {}
    total as f64 / elapsed.as_secs_f64()
}

async fn queue_latency(stack: &TestStack, clients: &Clients, args: &Args, run: usize) -> Latency {
    let returned: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.latency_workers {
        let (received, stop, ctx, ops) = (received.clone(), stop.clone(), stack.ctx.clone(), clients.workers.clone());
        workers.spawn(async move {
            // Each job goes to a fresh worker id, as each conversation gets its own worker.
            let mut generation = 0;
            while !stop.is_cancelled() {
                generation += 1;
                let id = WorkerId::trusted(format!("l{run}-w{w}-{generation}"));
                let api = Api { ops: ops.clone(), token: ctx.auth.mint_worker_token(&id).expect("token") };
                let claim = claim_args(&id, None, 2000);
                let job = tokio::select! {
                    _ = stop.cancelled() => return,
                    job = retry::<api::ClaimNextJob>(&api, &claim) => job,
                };
                let Some(job) = job else { continue };
                let at = Instant::now();
                if let Ok(mut m) = received.lock() {
                    m.insert(job.conversation_id.to_string(), at);
                }
                retry::<api::CompleteJob>(&api, &lease_args(&id, &job)).await;
            }
        });
    }
    parked(stack, args.latency_workers).await;
    let app = clients.app();
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..args.latency_messages {
        tick.tick().await;
        let (app, returned) = (app.clone(), returned.clone());
        let conversation = ConversationId::trusted(format!("l{run}-c{i}"));
        sends.spawn(async move {
            enqueue(&app, &conversation).await;
            let at = Instant::now();
            if let Ok(mut m) = returned.lock() {
                m.insert(conversation.into_string(), at);
            }
        });
    }
    while sends.join_next().await.is_some() {}
    let expected = args.latency_messages;
    filled(&received, expected).await;
    stop.cancel();
    while workers.join_next().await.is_some() {}
    let (returned, received) = (returned.lock().expect("map").clone(), received.lock().expect("map").clone());
    latency(received.iter().filter_map(|(c, got)| returned.get(c).map(|sent| signed_ms(*sent, *got))).collect())
}

/// `b - a` in milliseconds, negative when the worker had the job before the enqueue returned.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if b >= a { (b - a).as_secs_f64() * 1000.0 } else { -((a - b).as_secs_f64() * 1000.0) }
}

async fn raw_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let _ = js.delete_stream(name).await;
    Ok(js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{name}.>")],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

async fn raw_consumer(
    stream: &async_nats::jetstream::stream::Stream,
) -> anyhow::Result<async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>> {
    Ok(stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("workers".to_string()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?)
}

/// The baseline: publish with ack -> pull one at a time -> ack, same concurrency, no
/// per-conversation order or exclusivity.
async fn raw_throughput(stack: &TestStack, clients: &Clients, args: &Args, run: usize) -> anyhow::Result<f64> {
    let name = format!("BENCH_T{run}");
    let stream = raw_stream(&clients.raw, &name).await?;
    let consumer = raw_consumer(&stream).await?;
    let total = args.conversations * args.messages;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finished = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.in_flight {
        let (consumer, done, finished) = (consumer.clone(), done.clone(), finished.clone());
        workers.spawn(async move {
            while !finished.is_cancelled() {
                let batch = consumer.fetch().max_messages(1).expires(Duration::from_millis(500)).messages().await;
                let Ok(mut batch) = batch else { continue };
                while let Some(Ok(msg)) = batch.next().await {
                    let _ = msg.ack().await;
                    if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == total {
                        finished.cancel();
                    }
                }
            }
        });
    }
    pulling(&consumer, args.in_flight).await;
    let js = clients.raw.clone();
    let cpu = CpuSplit::start(stack).await;
    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(|i| {
            let js = js.clone();
            let subject = format!("{name}.c{}", i % args.conversations);
            async move { js.publish(subject, "x".into()).await.expect("publish").await.expect("ack") }
        })
        .buffered(args.in_flight)
        .for_each(|_| async {})
        .await;
    finished.cancelled().await;
    let elapsed = started.elapsed();
    let (server_cpu, stack_cpu, client_cpu) = cpu.busy(elapsed);
    let (ins, outs) = cpu.msgs_per(total).await;
    eprintln!(
        "  e2e {:.0} msgs/s; CPU: nats-server {server_cpu:.0} %, idle stack {stack_cpu:.0} %, clients {client_cpu:.0} %; nats-server msgs in/out per message {ins:.1}/{outs:.1}",
        total as f64 / elapsed.as_secs_f64()
    );
    while workers.join_next().await.is_some() {}
    let _ = clients.raw.delete_stream(&name).await;
    Ok(total as f64 / elapsed.as_secs_f64())
}

async fn raw_latency(clients: &Clients, args: &Args, run: usize) -> anyhow::Result<Latency> {
    let name = format!("BENCH_L{run}");
    let stream = raw_stream(&clients.raw, &name).await?;
    let consumer = raw_consumer(&stream).await?;
    let returned: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.latency_workers {
        let (consumer, received, stop) = (consumer.clone(), received.clone(), stop.clone());
        workers.spawn(async move {
            while !stop.is_cancelled() {
                let batch = consumer.fetch().max_messages(1).expires(Duration::from_millis(500)).messages().await;
                let Ok(mut batch) = batch else { continue };
                while let Some(Ok(msg)) = batch.next().await {
                    let at = Instant::now();
                    if let Ok(mut m) = received.lock() {
                        m.insert(msg.subject.to_string(), at);
                    }
                    let _ = msg.ack().await;
                }
            }
        });
    }
    pulling(&consumer, args.latency_workers).await;
    let js = clients.raw.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..args.latency_messages {
        tick.tick().await;
        let (js, returned) = (js.clone(), returned.clone());
        let subject = format!("{name}.c{i}");
        sends.spawn(async move {
            js.publish(subject.clone(), "x".into()).await.expect("publish").await.expect("ack");
            let at = Instant::now();
            if let Ok(mut m) = returned.lock() {
                m.insert(subject, at);
            }
        });
    }
    while sends.join_next().await.is_some() {}
    filled(&received, args.latency_messages).await;
    stop.cancel();
    while workers.join_next().await.is_some() {}
    let _ = clients.raw.delete_stream(&name).await;
    let (returned, received) = (returned.lock().expect("map").clone(), received.lock().expect("map").clone());
    Ok(latency(received.iter().filter_map(|(s, got)| returned.get(s).map(|sent| signed_ms(*sent, *got))).collect()))
}

/// The cost of the operation layer itself: a trivial operation (`getTestClock`) against a
/// plain NATS echo responder, both with 32 requests in flight.
async fn op_overhead(stack: &TestStack, clients: &Clients) -> anyhow::Result<(f64, f64)> {
    const N: usize = 20_000;
    let api = Api { ops: clients.producer.clone(), token: tests::ADMIN_TOKEN.to_string() };
    let started = Instant::now();
    futures::stream::iter(0..N)
        .map(|_| {
            let api = api.clone();
            async move { api.call("getTestClock", json!({})).await.expect("getTestClock") }
        })
        .buffer_unordered(32)
        .for_each(|_| async {})
        .await;
    let op_rate = N as f64 / started.elapsed().as_secs_f64();
    let server = common::service::connect_nats(stack.nats.url(), "bench-echo", Duration::from_secs(5)).await?;
    let mut sub = server.subscribe("bench.echo").await?;
    server.flush().await?;
    let echo = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = server.publish(reply, m.payload).await;
            }
        }
    });
    let client = common::service::connect_nats(stack.nats.url(), "bench-echo-client", Duration::from_secs(5)).await?;
    let started = Instant::now();
    futures::stream::iter(0..N)
        .map(|_| {
            let client = client.clone();
            async move { client.request("bench.echo", "{}".into()).await.expect("echo") }
        })
        .buffer_unordered(32)
        .for_each(|_| async {})
        .await;
    let raw_rate = N as f64 / started.elapsed().as_secs_f64();
    echo.abort();
    Ok((op_rate, raw_rate))
}
