//! Listing benchmark: a KV bucket of `--keys` JSON documents on its own nats-server, listed by
//! `JsonStore::scan` and `JsonStore::keys` (the direct-get sweep every bucket listing uses) and,
//! as the raw baseline in the same run, by async-nats's `kv::Store::keys` (a last-per-subject
//! consumer, headers only, which is not complete while keys are rewritten).
//!
//! Run: `cargo run --release -p tests --bin bench-listing -- --help`

use std::time::{Duration, Instant};

use async_nats::jetstream;
use clap::Parser;
use common::store::JsonStore;
use futures::TryStreamExt;
use serde_json::json;
use tests::TestNats;

#[derive(Parser, Debug)]
struct Args {
    /// Documents in the bucket.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Listings of each kind (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.runs > 0, "need runs > 0");
    let nats = TestNats::start().await;
    let client = common::service::connect_nats(nats.url(), "bench-listing", Duration::from_secs(5)).await?;
    let js = jetstream::new(client.clone());
    let kv = js
        .create_key_value(jetstream::kv::Config { bucket: "bench_listing".into(), history: 1, ..Default::default() })
        .await?;
    let store = JsonStore::new(kv, client);
    eprintln!("writing {} documents ...", args.keys);
    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(256) {
        let writes = chunk.iter().map(|i| {
            let doc = json!({"conversationId": format!("conv-{i:06}"), "head": null, "cursor": i});
            let store = store.clone();
            async move { store.create(&format!("conv-{i:06}"), &doc).await }
        });
        for written in futures::future::join_all(writes).await {
            written?;
        }
    }
    let (mut scans, mut keys, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let started = Instant::now();
        let listed = store.scan::<serde_json::Value>(">").await?.len();
        scans.push(started.elapsed());
        let started = Instant::now();
        let named = store.keys().await?.len();
        keys.push(started.elapsed());
        let started = Instant::now();
        let baseline: Vec<String> = store.raw().keys().await?.try_collect().await?;
        raw.push(started.elapsed());
        anyhow::ensure!(listed == args.keys && named == args.keys && baseline.len() == args.keys, "unexpected count");
    }
    println!("\nlisting a bucket of {} documents, median of {} runs", args.keys, args.runs);
    println!("| listing | time (ms) |");
    println!("|---|---|");
    println!("| `JsonStore::scan` (keys, revisions, decoded values) | {:.1} |", median(scans));
    println!("| `JsonStore::keys` | {:.1} |", median(keys));
    println!("| raw: async-nats `kv::Store::keys` (consumer, headers only) | {:.1} |", median(raw));
    Ok(())
}
