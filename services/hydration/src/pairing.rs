//! Pairing codes (spec §1.10, §3.9).
//!
//! # Storage (`af_pairing`)
//!
//! * `code.<code>`: a [`PairingRecord`];
//! * `user.<escaped consumerUserId>`: a [`UserPairings`] index of the user's newest codes
//!   (at most [`MAX_CODES_PER_USER`]), newest first.

use common::OpError;
use common::api::pairing::PairingStatus;
use common::clock::Millis;
use common::service::ServiceContext;
use common::token::escape;
use serde::{Deserialize, Serialize};

/// Codes kept in a user's index (spec §3.12.1 looks at the newest 20 of a pair, §3.12.2 at 50
/// pending ones of the user).
pub const MAX_CODES_PER_USER: usize = 50;

/// One pairing code as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairingRecord {
    pub code: String,
    pub consumer_user_id: String,
    pub agent_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_identity: Option<String>,
    pub status: PairingStatus,
    pub created_at: Millis,
    pub expires_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<String>,
}

/// One entry of a user's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexedCode {
    pub code: String,
    pub agent_key: String,
    pub created_at: Millis,
}

/// The user's newest codes, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserPairings {
    pub codes: Vec<IndexedCode>,
}

pub fn code_key(code: &str) -> String {
    format!("code.{code}")
}

pub fn user_key(consumer_user_id: &str) -> String {
    format!("user.{}", escape(consumer_user_id))
}

pub async fn user_index(ctx: &ServiceContext, consumer_user_id: &str) -> Result<UserPairings, OpError> {
    Ok(ctx.buckets.pairing.get::<UserPairings>(&user_key(consumer_user_id)).await?.map(|v| v.value).unwrap_or_default())
}

pub async fn load_code(ctx: &ServiceContext, code: &str) -> Result<Option<PairingRecord>, OpError> {
    Ok(ctx.buckets.pairing.get::<PairingRecord>(&code_key(code)).await?.map(|v| v.value))
}

/// Whether the user has any pairing code for the agent, or a binding to it (spec §3.10 import:
/// "the agent must be known for the user").
pub async fn pair_known(ctx: &ServiceContext, consumer_user_id: &str, agent_key: &str) -> Result<bool, OpError> {
    if user_index(ctx, consumer_user_id).await?.codes.iter().any(|c| c.agent_key == agent_key) {
        return Ok(true);
    }
    let doc = ctx
        .buckets
        .bindings
        .get::<crate::bindings::UserBindings>(&format!("u.{}", escape(consumer_user_id)))
        .await?
        .map(|v| v.value);
    Ok(doc.is_some_and(|d| d.bindings.iter().any(|b| b.agent_key == agent_key)))
}

/// The soft-reset's pairing part: counts pending codes without a bot identity and, when
/// `expire`, marks them expired. Returns (pending found, expired).
pub async fn expire_pairings_missing_bot(ctx: &ServiceContext, expire: bool) -> Result<(u64, u64), OpError> {
    let codes = ctx.buckets.pairing.scan::<PairingRecord>("code.*").await?;
    let (mut pending, mut expired) = (0, 0);
    for (key, record) in codes {
        let r = &record.value;
        if r.status != PairingStatus::Pending || r.bot_identity.as_deref().is_some_and(|b| !b.trim().is_empty()) {
            continue;
        }
        pending += 1;
        if expire {
            let mut next = r.clone();
            next.status = PairingStatus::Expired;
            match ctx.buckets.pairing.update(&key, &next, record.revision).await {
                Ok(_) => expired += 1,
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok((pending, expired))
}
