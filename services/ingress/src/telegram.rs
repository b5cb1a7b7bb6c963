//! The Telegram webhook, `POST <telegram.webhook_path_prefix>/telegram/webhook` (default
//! `/agent-factory/telegram/webhook`, the original's path).
//!
//! 1. The `X-Telegram-Bot-Api-Secret-Token` header identifies the bot: its SHA-256 names an
//!    index key (`wh.<hex>` in `af_telegram_bots`, written by `configureTelegramWebhook`) whose
//!    stored digest is compared with the presented one in constant time. A missing, malformed or
//!    unknown secret is a **403** `{"ok":false,"error":"missing or invalid telegram webhook
//!    secret token"}` and nothing is stored (S4: the original only checked a guessable prefix).
//! 2. Each bot's updates are rate limited (`rate_limits.webhook_*`): over the limit is a **429**
//!    `{"ok":false,"error":"too many updates, retry later"}` with `Retry-After`, nothing is
//!    stored, and Telegram delivers the update again later.
//! 3. The body must be a JSON object with an integer `update_id`; anything else (invalid JSON or
//!    UTF-8, nesting beyond serde_json's limit, wrong types) is a **400**, a body over
//!    `telegram.max_update_bytes` a **413** — never a 5xx.
//! 4. The raw body is published to `af.telegram.updates.<botIdentity>` with
//!    `Nats-Msg-Id: <botIdentity>:<update_id>`; the stream drops a redelivery within
//!    `telegram.update_dedup_window_ms` (T1). Only after JetStream acknowledged it is the update
//!    answered **200** `{"ok":true}`; if JetStream cannot be reached it is a 503 and Telegram
//!    delivers it again later.
//!
//! Everything else — pairing, routing, attachments, enqueue, replies — happens in the update
//! consumer of the hydration service, asynchronously.
//!
//! Known secrets are mirrored in memory through a watch of the bucket; a secret not (yet) in the
//! mirror is looked up once in KV, so a webhook configured a moment ago works at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::api::telegram::{WebhookSecretIndex, webhook_secret_key};
use common::service::ServiceContext;
use common::topology::telegram_updates_subject;
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header Telegram sends the webhook secret in.
pub(crate) const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

#[derive(Clone)]
struct Webhook {
    ctx: ServiceContext,
    limits: Arc<crate::rate_limit::Limits>,
    /// digest (hex) → index entry.
    secrets: Arc<Mutex<HashMap<String, WebhookSecretIndex>>>,
}

/// The webhook as a service for ingress's router (mounted at the configured path).
pub(crate) fn router(ctx: ServiceContext, limits: Arc<crate::rate_limit::Limits>) -> Router {
    let path = ctx.settings.telegram.webhook_path();
    let max = ctx.settings.telegram.max_update_bytes;
    let webhook = Webhook { ctx, limits, secrets: Arc::default() };
    webhook.start_mirror();
    Router::new().route(&path, post(receive)).layer(DefaultBodyLimit::max(max)).with_state(webhook)
}

impl Webhook {
    /// Mirrors the `wh.*` keys in memory; ends quietly when the connection does.
    fn start_mirror(&self) {
        let store = self.ctx.buckets.telegram_bots.clone();
        let secrets = self.secrets.clone();
        tokio::spawn(async move {
            let Ok(mut watch) = store.raw().watch("wh.*").await else { return };
            while let Some(Ok(entry)) = watch.next().await {
                let digest = entry.key.trim_start_matches("wh.").to_string();
                let mut map = secrets.lock().unwrap_or_else(PoisonError::into_inner);
                match entry.operation {
                    async_nats::jetstream::kv::Operation::Put => {
                        if let Ok(index) = serde_json::from_slice::<WebhookSecretIndex>(&entry.value) {
                            map.insert(digest, index);
                        }
                    }
                    _ => {
                        map.remove(&digest);
                    }
                }
            }
        });
    }

    /// The bot whose webhook secret is `presented`, if any.
    async fn bot_for(&self, presented: &str) -> Option<String> {
        let digest = hex::encode(Sha256::digest(presented.as_bytes()));
        let cached = self.secrets.lock().unwrap_or_else(PoisonError::into_inner).get(&digest).cloned();
        let index = match cached {
            Some(index) => index,
            None => {
                self.ctx
                    .buckets
                    .telegram_bots
                    .get::<WebhookSecretIndex>(&webhook_secret_key(&digest))
                    .await
                    .ok()??
                    .value
            }
        };
        bool::from(index.secret_sha256.as_bytes().ct_eq(digest.as_bytes())).then_some(index.bot_identity)
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

/// The original's 403 body, byte for byte.
const FORBIDDEN_BODY: &str = r#"{"ok":false,"error":"missing or invalid telegram webhook secret token"}"#;

fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], FORBIDDEN_BODY)
        .into_response()
}

/// The part of an update ingress reads: the rest is the consumer's business.
#[derive(serde::Deserialize)]
struct Head {
    update_id: u64,
}

async fn receive(State(webhook): State<Webhook>, request: Request) -> Response {
    let presented = request.headers().get(SECRET_HEADER).and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
    // Telegram's rule for a secret: 1-256 characters of A-Za-z0-9_-.
    let well_formed = !presented.is_empty()
        && presented.len() <= 256
        && presented.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !well_formed {
        return forbidden();
    }
    let presented = presented.to_string();
    let Some(bot) = webhook.bot_for(&presented).await else { return forbidden() };
    if let Err(wait) = webhook.limits.check_webhook(&bot) {
        let refused =
            reply(StatusCode::TOO_MANY_REQUESTS, json!({"ok": false, "error": "too many updates, retry later"}));
        return crate::rate_limit::with_retry_after(refused, wait);
    }
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({"ok": false, "error": "update too large"}));
        }
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"ok": false, "error": "could not read the update"})),
    };
    // serde_json skips the fields `Head` ignores without checking their UTF-8.
    if std::str::from_utf8(&body).is_err() {
        return reply(StatusCode::BAD_REQUEST, json!({"ok": false, "error": "invalid update: not UTF-8"}));
    }
    let head = match serde_json::from_slice::<Head>(&body) {
        Ok(head) => head,
        Err(e) => {
            let error = format!("invalid update: {}", e.to_string().chars().take(200).collect::<String>());
            return reply(StatusCode::BAD_REQUEST, json!({"ok": false, "error": error}));
        }
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{bot}:{}", head.update_id).as_str());
    // The update's processing (hydration) and the message it enqueues continue this trace.
    common::telemetry::inject_current_context(&mut headers);
    match common::store::publish_acked(&webhook.ctx.nats, telegram_updates_subject(&bot), headers, body).await {
        Ok(ack) => {
            metrics::counter!(common::telemetry::TELEGRAM_UPDATES, "duplicate" => if ack.duplicate { "true" } else { "false" })
                .increment(1);
            reply(StatusCode::OK, json!({"ok": true}))
        }
        Err(e) => {
            tracing::warn!(bot_identity = %bot, error = %e, "telegram update not stored; Telegram will deliver it again");
            reply(StatusCode::SERVICE_UNAVAILABLE, json!({"ok": false, "error": "update not stored, try again"}))
        }
    }
}
