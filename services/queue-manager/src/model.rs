//! What the queue stores: the job published to a conversation's inbox, the per-conversation
//! queue state (the leader's cursor, head job and lease, in `af_queue_state`) and dead-letter
//! records. The argument and result shapes of the queue operations are their contracts in
//! `common::api::queue`, re-exported here.

pub use common::api::queue::*;
use common::clock::Millis;
pub use common::model::{CompletedLease, HeadState, Lease, QueueState};
use serde::{Deserialize, Serialize};

/// A message as enqueued: the body of one inbox stream message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub message_id: String,
    pub conversation_id: String,
    pub agent_key: String,
    /// Kept as the JSON text it was enqueued as: the queue never looks inside it.
    pub payload: Box<serde_json::value::RawValue>,
    pub priority: i64,
    pub scheduled_for: Millis,
    pub max_attempts: u32,
    pub enqueued_at: Millis,
}

/// A dead-lettered job (`af_dead_letters`, key = messageId).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub job: Job,
    pub seq: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub dead_lettered_at: Millis,
}
