//! Snapshot transfer benchmark: starts its own nats-server and stack, then measures, in the same
//! run, moving one archive (default 50 MB, incompressible):
//!
//! - raw object store: `put` then `get` of the bytes, no agent-factory code (the baseline);
//! - agent-factory over NATS: `prepareDataSnapshotUpload` → object-store put →
//!   `finalizeDataSnapshotUpload` (the server reads the archive back and re-hashes it), and the
//!   restore download as a NATS worker does it;
//! - agent-factory over HTTP: prepare → `PUT /v1/snapshots/<id>/archive` through ingress →
//!   finalize, and `GET` of the archive.
//!
//! Run: `cargo run --release -p tests --bin bench-snapshots -- --help`

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::TestStack;
use tokio::io::AsyncReadExt;

#[derive(Parser, Debug)]
struct Args {
    /// Archive size in MiB.
    #[arg(long, default_value_t = 50)]
    mib: usize,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.mib > 0 && args.runs > 0, "--mib and --runs must be positive");
    eprintln!("starting nats-server and the stack ...");
    let stack = TestStack::start_with(&[("telemetry.log_filter", "error")]).await;
    let data = tests::pseudo_random(args.mib * 1024 * 1024, 0x9e37_79b9_7f4a_7c15);
    let sha = hex::encode(Sha256::digest(&data));
    let chunk = stack.ctx.settings.snapshots.chunk_bytes;
    let admin = stack.admin();
    let assignment = json!({"conversationId": "bench", "agentKey": "bench", "leaseId": "spawn:bench"});
    admin
        .ok(
            "upsertWorkerState",
            json!({"workerId": "bench", "provider": "local", "status": "active", "load": 0, "assignment": assignment}),
        )
        .await;
    let worker = stack.worker("bench");
    let token = stack.ctx.auth.mint_worker_token("bench")?;
    let http = reqwest::Client::new();
    let store = stack.ctx.buckets.snapshot_archives.clone();

    let mut rows: Vec<(&str, Vec<Duration>, Vec<Duration>)> = vec![
        ("raw object store", vec![], vec![]),
        ("agent-factory, NATS", vec![], vec![]),
        ("agent-factory, HTTP shim", vec![], vec![]),
    ];
    for run in 1..=args.runs {
        eprintln!("run {run}/{}", args.runs);
        // Raw baseline, with the same chunk size the service uses.
        let name = format!("raw-{run}");
        let started = Instant::now();
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: name.clone(),
            chunk_size: Some(chunk),
            ..Default::default()
        };
        store.put(meta, &mut &data[..]).await?;
        rows[0].1.push(started.elapsed());
        let started = Instant::now();
        let mut got = Vec::with_capacity(data.len());
        store.get(&name).await?.read_to_end(&mut got).await?;
        rows[0].2.push(started.elapsed());
        anyhow::ensure!(got.len() == data.len(), "raw get returned {} bytes", got.len());
        store.delete(&name).await?;

        // Over NATS, as a worker inside the network.
        let prepare = json!({"workerId": "bench", "agentKey": "bench", "conversationId": "bench", "reason": "manual"});
        let started = Instant::now();
        let prepared = worker.ok("prepareDataSnapshotUpload", prepare.clone()).await;
        let id = prepared["snapshotId"].as_str().unwrap_or_default().to_string();
        let meta = async_nats::jetstream::object_store::ObjectMetadata {
            name: id.clone(),
            chunk_size: Some(chunk),
            ..Default::default()
        };
        store.put(meta, &mut &data[..]).await?;
        let finalize = json!({"workerId": "bench", "snapshotId": id, "sha256": sha, "sizeBytes": data.len()});
        anyhow::ensure!(worker.ok("finalizeDataSnapshotUpload", finalize).await == Value::Bool(true), "finalize");
        rows[1].1.push(started.elapsed());
        let started = Instant::now();
        let lookup = json!({"agentKey": "bench", "conversationId": "bench"});
        let target = worker.ok("getLatestDataSnapshotForRestore", lookup.clone()).await;
        let mut got = Vec::with_capacity(data.len());
        store.get(target["objectName"].as_str().unwrap_or_default()).await?.read_to_end(&mut got).await?;
        rows[1].2.push(started.elapsed());
        anyhow::ensure!(got.len() == data.len(), "NATS download returned {} bytes", got.len());

        // Over HTTP through ingress.
        let started = Instant::now();
        let prepared = worker.ok("prepareDataSnapshotUpload", prepare).await;
        let id = prepared["snapshotId"].as_str().unwrap_or_default().to_string();
        let url = prepared["uploadUrl"].as_str().unwrap_or_default().to_string();
        let response = http.put(&url).bearer_auth(&token).body(data.clone()).send().await?;
        anyhow::ensure!(response.status().is_success(), "upload: {}", response.status());
        let finalize = json!({"workerId": "bench", "snapshotId": id, "sha256": sha, "sizeBytes": data.len()});
        anyhow::ensure!(worker.ok("finalizeDataSnapshotUpload", finalize).await == Value::Bool(true), "finalize");
        rows[2].1.push(started.elapsed());
        let started = Instant::now();
        let target = worker.ok("getLatestDataSnapshotForRestore", lookup).await;
        let response = http.get(target["downloadUrl"].as_str().unwrap_or_default()).bearer_auth(&token).send().await?;
        let mut body = response.bytes_stream();
        let mut received = 0usize;
        while let Some(chunk) = body.next().await {
            received += chunk?.len();
        }
        rows[2].2.push(started.elapsed());
        anyhow::ensure!(received == data.len(), "HTTP download returned {received} bytes");
    }

    println!("\nsnapshot transfer, {} MiB archive, chunk {} KiB, median of {} runs", args.mib, chunk / 1024, args.runs);
    println!("| path | upload (incl. prepare + verified finalize) | download |");
    println!("|---|---|---|");
    for (name, up, down) in rows {
        let (up, down) = (median(up), median(down));
        println!(
            "| {name} | {:.0} MB/s ({:.2} s) | {:.0} MB/s ({:.2} s) |",
            mb_per_s(data.len(), up),
            up.as_secs_f64(),
            mb_per_s(data.len(), down),
            down.as_secs_f64()
        );
    }
    stack.stop().await;
    Ok(())
}
