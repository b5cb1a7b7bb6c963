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

#[tokio::test]
async fn a_compare_and_set_write_wins_once_and_a_stale_revision_is_a_conflict() {
    let nats = TestNats::start().await;
    let client = connect(&nats).await;
    let js = jetstream::new(client.clone());
    let kv = js
        .create_key_value(jetstream::kv::Config { bucket: "cas_test".into(), history: 1, ..Default::default() })
        .await
        .expect("bucket");
    let store = JsonStore::new(kv, client);

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
