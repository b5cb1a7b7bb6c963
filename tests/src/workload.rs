//! A scripted workload for the concurrency, crash and benchmark runs: producers that enqueue
//! numbered messages per conversation, workers that claim/complete them, and a ledger that
//! records every execution and completion so the run can be checked afterwards.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Api;

/// What the workers saw.
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    in_flight: HashSet<String>,
    /// Per conversation, message numbers in the order their completion was acknowledged.
    completed: HashMap<String, Vec<u64>>,
    overlaps: u64,
    executions: u64,
}

impl Ledger {
    fn begin(&self, conversation: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.executions += 1;
            if !s.in_flight.insert(conversation.to_string()) {
                s.overlaps += 1;
            }
        }
    }

    fn end(&self, conversation: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.in_flight.remove(conversation);
        }
    }

    fn completed(&self, conversation: &str, n: u64) {
        if let Ok(mut s) = self.inner.lock() {
            s.completed.entry(conversation.to_string()).or_default().push(n);
        }
    }

    pub fn completed_total(&self) -> usize {
        self.inner.lock().map(|s| s.completed.values().map(Vec::len).sum()).unwrap_or(0)
    }

    pub fn overlaps(&self) -> u64 {
        self.inner.lock().map(|s| s.overlaps).unwrap_or(0)
    }

    pub fn executions(&self) -> u64 {
        self.inner.lock().map(|s| s.executions).unwrap_or(0)
    }

    /// Panics unless every conversation completed exactly `0..per_conversation`, in order.
    pub fn assert_exactly_once_in_order(&self, conversations: &[String], per_conversation: u64) {
        let s = self.inner.lock().expect("ledger");
        assert_eq!(s.overlaps, 0, "two jobs of one conversation were in flight at once");
        let expected: Vec<u64> = (0..per_conversation).collect();
        for c in conversations {
            let got = s.completed.get(c).cloned().unwrap_or_default();
            assert_eq!(got, expected, "conversation {c}: completions out of order, missing or repeated");
        }
    }
}

/// The message text that identifies message `n` of `conversation`.
pub fn text(conversation: &str, n: u64) -> String {
    format!("{conversation}#{n}")
}

fn parse(text: &str) -> Option<(String, u64)> {
    let (c, n) = text.rsplit_once('#')?;
    Some((c.to_string(), n.parse().ok()?))
}

/// Retries `f` while the queue is unavailable (leader failover, a replica killed). No pause
/// of its own: while no leader serves, `Api::call` already waits for one to take over.
pub async fn retrying<T, F, Fut>(mut f: F) -> Result<T, common::OpError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, common::OpError>>,
{
    loop {
        match f().await {
            Err(e) if matches!(e.code, common::ErrorCode::Unavailable | common::ErrorCode::Conflict) => {
                tokio::task::yield_now().await;
            }
            other => return other,
        }
    }
}

/// Enqueues `per_conversation` numbered messages to each conversation, in order per
/// conversation, with an idempotency key so a retried enqueue is stored once.
pub async fn produce(app: Api, agent: &str, conversations: &[String], per_conversation: u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for c in conversations {
        let (app, agent, c) = (app.clone(), agent.to_string(), c.clone());
        tasks.spawn(async move {
            for n in 0..per_conversation {
                let args = json!({
                    "conversationId": c, "agentKey": agent, "idempotencyKey": format!("{c}-{n}"),
                    "payload": { "provider": "test", "providerUserId": "u", "messageText": text(&c, n) },
                });
                retrying(|| app.call("enqueueMessage", args.clone())).await.expect("enqueue");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("producer task");
    }
}

/// One worker: long-poll claim, record, complete, until `stop`.
pub async fn work(api: Api, worker_id: String, ledger: std::sync::Arc<Ledger>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let claim = tokio::select! {
            _ = stop.cancelled() => return,
            r = retrying(|| api.call("claimNextJob", json!({ "workerId": worker_id, "waitMs": 1000 }))) => r,
        };
        let job = match claim {
            Ok(Value::Null) => continue,
            Ok(job) => job,
            Err(e) => panic!("claim failed: {e:?}"),
        };
        let Some((c, n)) = job["payload"]["messageText"].as_str().and_then(parse) else {
            panic!("unexpected job {job}");
        };
        ledger.begin(&c);
        ledger.end(&c);
        let args = json!({ "workerId": worker_id, "messageId": job["messageId"], "leaseId": job["leaseId"] });
        if retrying(|| api.call("completeJob", args.clone())).await == Ok(Value::Bool(true)) {
            ledger.completed(&c, n);
        }
    }
}

/// One worker that completes each job and asks for the next in the same call
/// (`completeAndClaimNext` with a wait), so its completions are held by the queue until the
/// next job's lease or the end of the wait stores them. Stops between jobs once `stop` is set.
pub async fn work_combined(api: Api, worker_id: String, ledger: std::sync::Arc<Ledger>, stop: CancellationToken) {
    let mut job = Value::Null;
    while !stop.is_cancelled() {
        if job.is_null() {
            job = tokio::select! {
                _ = stop.cancelled() => return,
                r = retrying(|| api.call("claimNextJob", json!({ "workerId": worker_id, "waitMs": 1000 }))) => {
                    r.unwrap_or_else(|e| panic!("claim failed: {e:?}"))
                }
            };
            continue;
        }
        let Some((c, n)) = job["payload"]["messageText"].as_str().and_then(parse) else {
            panic!("unexpected job {job}");
        };
        ledger.begin(&c);
        ledger.end(&c);
        let args = json!({ "workerId": worker_id, "messageId": job["messageId"], "leaseId": job["leaseId"],
                           "waitMs": 1000 });
        // Not abandoned on `stop`: the answer is what says the completion is stored.
        let answer = retrying(|| api.call("completeAndClaimNext", args.clone()))
            .await
            .unwrap_or_else(|e| panic!("completeAndClaimNext failed: {e:?}"));
        if answer["completed"] == Value::Bool(true) {
            ledger.completed(&c, n);
        }
        job = answer["next"].clone();
    }
}
