//! The KV compare-and-set layer and JetStream publishes with their acks (`common::store`),
//! against a real nats-server. Every queue lease and worker row is written through these.

use async_nats::jetstream;
use bytes::Bytes;
use common::store::{JsonStore, PublishError, StoreError, publish_acked};
use serde_json::json;
use tests::TestNats;

async fn connect(nats: &TestNats) -> async_nats::Client {
    common::service::connect_nats(nats.url(), "store-test", std::time::Duration::from_secs(5)).await.expect("connect")
}

/// A bucket keeping one entry per key, as every bucket of the stack does.
async fn bucket(nats: &TestNats, name: &str) -> JsonStore {
    let client = connect(nats).await;
    let kv = jetstream::new(client.clone())
        .create_key_value(jetstream::kv::Config { bucket: name.into(), history: 1, ..Default::default() })
        .await
        .expect("bucket");
    JsonStore::new(kv, client)
}

#[tokio::test]
async fn a_compare_and_set_write_wins_once_and_a_stale_revision_is_a_conflict() {
    let nats = TestNats::start().await;
    let store = bucket(&nats, "cas_test").await;

    let first = store.create("k", &json!({"n": 1})).await.expect("create");
    assert!(matches!(store.create("k", &json!({"n": 9})).await, Err(StoreError::Conflict { .. })));
    let second = store.update("k", &json!({"n": 2}), first).await.expect("update at the current revision");
    assert!(second > first);
    // The same revision again lost the race: a conflict, and the stored value is untouched.
    assert!(matches!(store.update("k", &json!({"n": 3}), first).await, Err(StoreError::Conflict { .. })));
    // So is a revision the key never had, and an update of a key that does not exist.
    assert!(matches!(store.update("k", &json!({"n": 4}), second + 100).await, Err(StoreError::Conflict { .. })));
    assert!(matches!(store.update("missing", &json!({"n": 5}), 1).await, Err(StoreError::Conflict { .. })));
    let stored = store.get::<serde_json::Value>("k").await.expect("get").expect("present");
    assert_eq!((stored.value, stored.revision), (json!({"n": 2}), second));
    // A key async-nats refuses is refused here too, not written under a strange subject.
    assert!(store.update("bad key", &json!({}), second).await.is_err());
    // A deleted key can be created again (its last entry is a delete marker, not absence).
    store.delete("k", second).await.expect("delete");
    let again = store.create("k", &json!({"n": 6})).await.expect("create after delete");
    assert_eq!(
        store.get::<serde_json::Value>("k").await.expect("get").map(|e| (e.value, e.revision)),
        Some((json!({"n": 6}), again))
    );
}

#[tokio::test]
async fn publish_acked_reports_the_sequence_duplicates_and_unstored_messages() {
    let nats = TestNats::start().await;
    let client = connect(&nats).await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "ACK_TEST".into(),
        subjects: vec!["ack.test.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    let with_id = |id: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        headers
    };

    let a = publish_acked(&client, "ack.test.a".into(), with_id("one"), Bytes::from_static(b"1")).await.expect("a");
    let b = publish_acked(&client, "ack.test.b".into(), with_id("two"), Bytes::from_static(b"2")).await.expect("b");
    assert_eq!((a.seq, a.duplicate, b.seq, b.duplicate), (1, false, 2, false));
    let again = publish_acked(&client, "ack.test.a".into(), with_id("one"), Bytes::from_static(b"1")).await;
    assert_eq!(again.expect("duplicate"), common::store::Ack { seq: 1, duplicate: true });

    let mut expect_seq = async_nats::HeaderMap::new();
    expect_seq.insert("Nats-Expected-Last-Sequence", "1");
    let refused = publish_acked(&client, "ack.test.c".into(), expect_seq, Bytes::new()).await;
    assert!(matches!(refused, Err(PublishError::Rejected { code: 10071, .. })), "{refused:?}");

    let nowhere = publish_acked(&client, "no.stream.here".into(), async_nats::HeaderMap::new(), Bytes::new()).await;
    assert!(matches!(nowhere, Err(PublishError::NotStored)), "{nowhere:?}");
}

/// A listing (`keys`, `scan`, `all`) holds every key that exists for the whole listing while
/// another client rewrites keys as fast as it can, and never a deleted one. A listing by
/// consumer, stopped when its pending count reads 0, missed a key in about 2% of these.
#[tokio::test]
async fn listings_stay_complete_while_keys_are_rewritten() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const KEYS: usize = 14;
    const LISTINGS: usize = 300;
    let nats = TestNats::start().await;
    let store = Arc::new(bucket(&nats, "listing_test").await);
    let expected: Vec<String> = {
        let mut keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
        keys.sort();
        keys
    };
    for key in &expected {
        store.create(key, &json!({"n": 0})).await.expect("create");
    }
    let gone = store.create("gone", &json!({"n": 0})).await.expect("create");
    store.delete("gone", gone).await.expect("delete");

    let (stop, rewrites) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (store, stop, rewrites) = (store.clone(), stop.clone(), rewrites.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("k{}", n % KEYS as u64);
                store
                    .modify::<serde_json::Value, StoreError, _>(&key, |v| Ok(v.map(|_| json!({"n": n}))))
                    .await
                    .expect("rewrite");
                rewrites.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for listing in 0..LISTINGS {
        let mut keys = store.keys().await.expect("keys");
        keys.sort();
        assert_eq!(keys, expected, "keys, listing {listing}");
        let scanned: Vec<String> =
            store.scan::<serde_json::Value>(">").await.expect("scan").into_iter().map(|(k, _)| k).collect();
        assert_eq!(scanned, expected, "scan, listing {listing}");
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(rewrites.load(Ordering::Relaxed) >= LISTINGS as u64, "the writer ran beside the listings");
    let listed = |filter: &'static str| {
        let store = store.clone();
        async move {
            store.scan::<serde_json::Value>(filter).await.expect("scan").into_iter().map(|(k, _)| k).collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("k13").await, ["k13"], "a filter lists its keys only");
    assert!(listed("nothing").await.is_empty());
}

/// A listing larger than one batch's byte bound (8 MiB) comes in several batches, whole.
#[tokio::test]
async fn a_listing_larger_than_one_batch_is_read_whole() {
    let nats = TestNats::start().await;
    let store = bucket(&nats, "big_listing").await;
    let filler = "x".repeat(512 * 1024);
    for i in 0..40 {
        store.create(&format!("doc{i:02}"), &json!({"i": i, "filler": filler})).await.expect("create");
    }
    let listed = store.scan::<serde_json::Value>(">").await.expect("scan");
    assert_eq!(listed.len(), 40, "20 MiB in batches of at most 8 MiB");
    for (i, (key, entry)) in listed.iter().enumerate() {
        assert_eq!((key.as_str(), &entry.value["i"]), (format!("doc{i:02}").as_str(), &json!(i)));
    }
}
