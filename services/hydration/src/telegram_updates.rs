//! The Telegram update consumer: a durable pull consumer (`telegram-updates`) of the
//! `AF_TELEGRAM_UPDATES` stream ingress writes. Part of the message path like enqueue: it runs
//! whenever the hydration service runs, also with `loops.manual` (spec §3.11, with the fixes of
//! §6.5).
//!
//! For each update, in stream order:
//! 1. An update that is not a Bot API update, or of a kind without a message (T3: handled are
//!    `message`, `channel_post` and `business_message`), is acknowledged and dropped.
//! 2. `/start <code>` consumes the pairing code with the bot that received it and **answers in
//!    the chat** on success and on failure (T2); `/start` without a valid code gets an
//!    explanation. Never enqueued.
//! 3. Routing: the active binding of (bot, Telegram user), else of (bot, chat). An unbound user
//!    gets a reply saying how to pair and no job; there is no fallback agent (S8), so an update
//!    is never routed to another bot's agent.
//! 4. `typing` is sent to the chat at once, so the user sees life while a worker cold-starts.
//! 5. Media (photo — the largest size —, video, audio, voice, document, video note, animation,
//!    sticker; T3) are fetched with `getFile` into the media store under a storage id derived
//!    from (bot, update_id, index), so a redelivery rewrites the same object.
//! 6. Enqueue to the binding's conversation with the Telegram message id as idempotency key
//!    (`tg:<bot>:<chat>:<message_id>`), metadata keys of spec §3.11 step 8, then the attachment
//!    records (idempotent).
//!
//! Failures: a transient one (Telegram or the queue unreachable) is retried with a growing delay
//! up to `telegram.consumer_max_deliver` deliveries; a permanent one (the agent was disabled, a
//! file Telegram refuses) is answered in the chat when possible and acknowledged, so nothing
//! retries forever (T1).

use std::collections::BTreeMap;
use std::time::Duration;
use tracing::Instrument;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use bytes::Bytes;
use common::OpError;
use common::api::attachments::AttachmentStatus;
use common::api::pairing::ConsumePairingArgs;
use common::api::queue::PayloadAttachment;
use common::api::telegram::PrepareTelegramAttachmentsArgs;
use common::error::ErrorCode;
use common::ids::{BotIdentity, ConversationId, MessageId, PairingCode, StorageId, TelegramId};
use common::topology::{TELEGRAM_UPDATES_CONSUMER, TELEGRAM_UPDATES_STREAM};
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use telegram_bot::types::{ChatAction, Message};
use telegram_bot::updates::{Update, UpdateContent};
use tokio_util::sync::CancellationToken;

use crate::telegram::Telegram;

/// How long the consumer may hold an update before JetStream redelivers it.
const ACK_WAIT: Duration = Duration::from_secs(120);
/// A raw update larger than this is not copied into the payload's `rawUpdateJson`.
const MAX_RAW_UPDATE_BYTES: usize = 32 * 1024;

pub const REPLY_UNBOUND: &str = "I don't know you yet. Open the app, create a pairing code for this agent and send it \
     here as /start <code>.";
pub const REPLY_MISSING_CODE: &str = "To pair, send /start followed by the pairing code from the app, e.g. /start \
     AB12CD34EF56.";

/// What became of one update.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (or deliberately dropped): acknowledge.
    Done(&'static str),
    /// Try again later.
    Retry(String),
}

/// Consumes updates until `shutdown`.
pub async fn run(telegram: Telegram, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ctx = &telegram.ctx;
    let stream = ctx.js.get_stream(TELEGRAM_UPDATES_STREAM).await?;
    let config = pull::Config {
        durable_name: Some(TELEGRAM_UPDATES_CONSUMER.to_string()),
        description: Some("telegram updates: pairing, routing, attachments, enqueue".to_string()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: ctx.settings.telegram.consumer_max_deliver,
        ..Default::default()
    };
    let consumer = stream.get_or_create_consumer(TELEGRAM_UPDATES_CONSUMER, config).await?;
    let mut messages = consumer.messages().await?;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let Some(next) = next else { return Ok(()) };
        let message = match next {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "telegram update consumer: receive failed");
                continue;
            }
        };
        let bot = message.subject.rsplit('.').next().unwrap_or_default().to_string();
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        // Continues the webhook request's trace (ingress wrote it into the update's headers);
        // the message this update enqueues carries it on.
        let span =
            tracing::info_span!("telegram.update", otel.name = "telegram.update", bot_identity = %bot, delivered);
        common::telemetry::set_parent_from_headers(&span, message.headers.as_ref());
        let outcome = process(&telegram, &bot, &message.payload).instrument(span).await;
        let ack = match &outcome {
            Outcome::Done(what) => {
                tracing::debug!(bot_identity = %bot, what, "telegram update handled");
                metrics::counter!("af_telegram_updates_processed_total", "outcome" => *what).increment(1);
                AckKind::Ack
            }
            Outcome::Retry(why) if delivered >= ctx.settings.telegram.consumer_max_deliver => {
                tracing::error!(bot_identity = %bot, delivered, error = %why, "telegram update given up");
                AckKind::Term
            }
            Outcome::Retry(why) => {
                let delay = Duration::from_millis(500u64.saturating_mul(1 << delivered.clamp(0, 7)));
                tracing::warn!(bot_identity = %bot, delivered, error = %why, "telegram update will be retried");
                AckKind::Nak(Some(delay))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            tracing::warn!(error = %e, "telegram update ack failed; it will be redelivered");
        }
    }
}

/// The Telegram identity and text of a message.
struct Incoming<'a> {
    message: &'a Message,
    chat_id: String,
    user_id: String,
    text: String,
}

fn incoming(message: &Message) -> Incoming<'_> {
    let chat_id = message.chat.id.to_string();
    let user_id = message
        .from
        .as_ref()
        .map(|u| u.id.to_string())
        .or_else(|| message.sender_chat.as_ref().map(|c| c.id.to_string()))
        .unwrap_or_else(|| chat_id.clone());
    let text = message.text.as_deref().or(message.caption.as_deref()).unwrap_or_default().trim().to_string();
    Incoming { message, chat_id, user_id, text }
}

/// `/start`, `/start@bot`, with what follows it; `None` for any other text.
pub fn start_command(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("/start")?;
    let rest = match rest.strip_prefix('@') {
        Some(mention) => {
            let end = mention.find(char::is_whitespace).unwrap_or(mention.len());
            if !mention[..end].chars().all(|c| c.is_alphanumeric() || c == '_') {
                return None;
            }
            &mention[end..]
        }
        None => rest,
    };
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    Some(rest.trim())
}

/// One candidate attachment of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub kind: &'static str,
    pub file_id: String,
    pub file_name: Option<String>,
    pub mime_type: Option<String>,
    pub size: Option<u64>,
}

/// The attachment candidates of a message, in the original's order, then the kinds it dropped.
pub fn candidates(m: &Message) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |kind, file_id: &str, file_name: Option<&String>, mime: Option<&str>, size| {
        if !file_id.is_empty() {
            out.push(Candidate {
                kind,
                file_id: file_id.to_string(),
                file_name: file_name.cloned(),
                mime_type: mime.map(str::to_string),
                size,
            });
        }
    };
    if let Some(p) = m.photo.as_ref().and_then(|p| p.last()) {
        push("photo", &p.file_id, None, Some("image/jpeg"), p.file_size);
    }
    if let Some(v) = &m.video {
        push("video", &v.file_id, v.file_name.as_ref(), v.mime_type.as_deref(), v.file_size);
    }
    if let Some(a) = &m.audio {
        push("audio", &a.file_id, a.file_name.as_ref(), a.mime_type.as_deref(), a.file_size);
    }
    if let Some(v) = &m.voice {
        push("voice", &v.file_id, None, v.mime_type.as_deref(), v.file_size);
    }
    if let Some(d) = &m.document {
        push("document", &d.file_id, d.file_name.as_ref(), d.mime_type.as_deref(), d.file_size);
    }
    if let Some(v) = &m.video_note {
        push("video_note", &v.file_id, None, Some("video/mp4"), v.file_size);
    }
    if let Some(a) = &m.animation {
        push("animation", &a.file_id, a.file_name.as_ref(), a.mime_type.as_deref(), a.file_size);
    }
    if let Some(s) = &m.sticker {
        let mime = if s.is_video {
            "video/webm"
        } else if s.is_animated {
            "application/x-tgsticker"
        } else {
            "image/webp"
        };
        push("sticker", &s.file_id, None, Some(mime), s.file_size);
    }
    out
}

/// The MIME type of a stored file (spec §3.6): the given one unless blank or generic, else
/// from the file name, else the download's, else from the path.
fn mime_for(candidate: &Candidate, downloaded: Option<&str>, file_path: &str) -> String {
    fn by_extension(name: &str) -> Option<&'static str> {
        let lower = name.to_ascii_lowercase();
        let table = [
            (".jpg", "image/jpeg"),
            (".jpeg", "image/jpeg"),
            (".png", "image/png"),
            (".webp", "image/webp"),
            (".mp4", "video/mp4"),
            (".mp3", "audio/mpeg"),
            (".ogg", "audio/ogg"),
            (".oga", "audio/ogg"),
            (".pdf", "application/pdf"),
        ];
        table.iter().find(|(ext, _)| lower.ends_with(ext)).map(|(_, mime)| *mime)
    }
    let generic = |m: &str| m.trim().is_empty() || m.trim().eq_ignore_ascii_case("application/octet-stream");
    candidate
        .mime_type
        .as_deref()
        .filter(|m| !generic(m))
        .map(|m| m.trim().to_ascii_lowercase())
        .or_else(|| candidate.file_name.as_deref().and_then(by_extension).map(str::to_string))
        .or_else(|| downloaded.filter(|m| !generic(m)).map(|m| m.split(';').next().unwrap_or(m).trim().to_string()))
        .or_else(|| by_extension(file_path).map(str::to_string))
        .unwrap_or_else(|| "application/octet-stream".to_string())
}

/// Handles one stored update of `bot`.
pub async fn process(telegram: &Telegram, bot: &str, raw: &Bytes) -> Outcome {
    let Ok(update) = serde_json::from_slice::<Update>(raw) else {
        return Outcome::Done("not a Bot API update");
    };
    let message = match &update.content {
        UpdateContent::Message(m) | UpdateContent::ChannelPost(m) | UpdateContent::BusinessMessage(m) => m,
        _ => return Outcome::Done("update kind without a message"),
    };
    let token = match telegram.bot_token(bot).await {
        Ok(Some(token)) => token.expose_secret().trim().to_string(),
        Ok(None) => return Outcome::Done("bot without a token"),
        Err(e) => return Outcome::Retry(e.message),
    };
    let msg = incoming(message);
    match handle(telegram, bot, &token, &update, &msg, raw).await {
        Ok(outcome) => outcome,
        Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::Conflict) => {
            Outcome::Retry(e.message)
        }
        Err(e) => {
            tracing::info!(bot_identity = %bot, error = %e.message, "telegram update refused");
            reply(
                telegram,
                &token,
                &msg.chat_id,
                &format!("Sorry, this message could not be delivered: {}", e.message),
            )
            .await;
            Outcome::Done("refused")
        }
    }
}

/// Sends `text` to the chat; failures are logged (a reply is best effort).
async fn reply(telegram: &Telegram, token: &str, chat_id: &str, text: &str) {
    if let Err(e) = telegram.api.send_text(token, chat_id, text).await {
        tracing::warn!(chat_id, error = %e, "telegram reply failed");
    }
}

async fn handle(
    telegram: &Telegram,
    bot: &str,
    token: &str,
    update: &Update,
    msg: &Incoming<'_>,
    raw: &Bytes,
) -> Result<Outcome, OpError> {
    let ctx = &telegram.ctx;
    if let Some(code) = start_command(&msg.text) {
        let answer = match pair(telegram, bot, code, msg).await {
            Ok(agent_key) => {
                format!("Paired! You are now connected to agent '{agent_key}'. Send a message to start.")
            }
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal) => return Err(e),
            Err(e) if code.is_empty() || e.message.starts_with("invalid pairing code") => {
                REPLY_MISSING_CODE.to_string()
            }
            Err(e) => format!("Pairing failed: {}", e.message),
        };
        reply(telegram, token, &msg.chat_id, &answer).await;
        return Ok(Outcome::Done("pairing"));
    }
    let binding = crate::bindings::resolve_telegram(ctx, bot, Some(&msg.user_id), Some(&msg.chat_id)).await?;
    let Some(binding) = binding else {
        reply(telegram, token, &msg.chat_id, REPLY_UNBOUND).await;
        return Ok(Outcome::Done("unbound"));
    };
    let candidates = candidates(msg.message);
    if msg.text.is_empty() && candidates.is_empty() {
        return Ok(Outcome::Done("nothing to enqueue"));
    }
    // Life signs first: the user sees "typing…" while attachments download and a worker starts.
    if let Err(e) = telegram.api.send_chat_action(token, &msg.chat_id, ChatAction::Typing).await {
        tracing::debug!(error = %e, "typing action failed");
    }
    let max = ctx.settings.attachments.max_per_message;
    let mut attachments = Vec::new();
    let mut metadata = BTreeMap::new();
    metadata.insert("telegramBotIdentity".to_string(), bot.to_string());
    metadata.insert("telegramChatId".to_string(), msg.chat_id.clone());
    metadata.insert("telegramUserId".to_string(), msg.user_id.clone());
    let mut kinds: Vec<&str> = Vec::new();
    for (i, candidate) in candidates.iter().take(max).enumerate() {
        let storage_id = format!("tg{bot}-{}-{i}", update.update_id);
        let (size, mime) = fetch(telegram, token, candidate, &storage_id).await?;
        if !kinds.contains(&candidate.kind) {
            kinds.push(candidate.kind);
        }
        let camel: String = candidate
            .kind
            .split('_')
            .map(|part| {
                let mut c = part.chars();
                c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            })
            .collect();
        metadata.insert(format!("telegram{camel}FileId"), candidate.file_id.clone());
        attachments.push(json!({
            "kind": candidate.kind, "status": "ready", "storageId": storage_id,
            "telegramFileId": candidate.file_id, "fileName": candidate.file_name,
            "mimeType": mime, "sizeBytes": candidate.size.unwrap_or(size),
        }));
    }
    if !kinds.is_empty() {
        metadata.insert("telegramMediaType".to_string(), kinds.join("+"));
    }
    let text =
        if msg.text.is_empty() { format!("[telegram media] {} message", kinds.join(" + ")) } else { msg.text.clone() };
    let mut payload = serde_json::Map::new();
    payload.insert("provider".into(), json!("telegram"));
    payload.insert("providerUserId".into(), json!(msg.user_id));
    payload.insert("messageText".into(), json!(text));
    payload.insert("externalMessageId".into(), json!(msg.message.message_id.to_string()));
    if raw.len() <= MAX_RAW_UPDATE_BYTES {
        payload.insert("rawUpdateJson".into(), json!(String::from_utf8_lossy(raw)));
    }
    payload.insert("metadata".into(), json!(metadata));
    if !attachments.is_empty() {
        payload.insert("attachments".into(), Value::Array(attachments));
    }
    let conversation_id = ConversationId::parse(binding.conversation_id.as_str())?;
    let args = common::api::queue::EnqueueArgs {
        conversation_id: conversation_id.clone(),
        agent_key: common::ids::AgentKey::parse(binding.agent_key.as_str())?,
        payload,
        priority: None,
        scheduled_for: None,
        max_attempts: None,
        idempotency_key: Some(format!("tg:{bot}:{}:{}", msg.chat_id, msg.message.message_id)),
        now_ms: common::api::Ignored,
        provider_config: common::api::Ignored,
    };
    // Enqueue records the payload's attachments before the message is published.
    let message_id: MessageId = ctx.call_service::<common::api::EnqueueMessage>(&args).await?;
    tracing::info!(bot_identity = %bot, agent_key = %binding.agent_key, %message_id, "telegram message enqueued");
    Ok(Outcome::Done("enqueued"))
}

/// `/start <code>`: consumes the code; returns the agent now bound.
async fn pair(telegram: &Telegram, bot: &str, code: &str, msg: &Incoming<'_>) -> Result<String, OpError> {
    let args = ConsumePairingArgs {
        code: PairingCode::parse(code)?,
        bot_identity: Some(BotIdentity::parse(bot)?),
        telegram_user_id: TelegramId::parse(msg.user_id.as_str())?,
        telegram_chat_id: TelegramId::parse(msg.chat_id.as_str())?,
        now_ms: common::api::Ignored,
    };
    let consumed = crate::pairing::consume(&telegram.ctx, args).await?;
    Ok(consumed.binding.agent_key)
}

/// `prepareTelegramAttachmentsForEnqueue` (spec §3.6): fetches every file with the agent's bot
/// token into the media store, concurrently; one failure fails the call. The answers are
/// `payload.attachments` items ready for `enqueueMessage`.
pub(crate) async fn prepare_attachments(
    telegram: &Telegram,
    args: PrepareTelegramAttachmentsArgs,
) -> Result<Vec<PayloadAttachment>, OpError> {
    let ctx = &telegram.ctx;
    let max = ctx.settings.attachments.max_per_message;
    if args.attachments.len() > max {
        return Err(OpError::invalid(format!("attachments: at most {max} per message")));
    }
    if let Some(i) =
        args.attachments.iter().position(|a| a.telegram_file_id.is_empty() || a.telegram_file_id.len() > 1024)
    {
        return Err(OpError::invalid(format!("attachments[{i}].telegramFileId: 1 to 1024 bytes")));
    }
    let agent_key = args.agent_key.as_str();
    let profile = crate::profiles::get_profile(ctx, agent_key).await?;
    let Some((_, token)) = telegram.agent_token(profile.as_ref(), agent_key).await? else {
        return Err(OpError::invalid(format!("missing active telegram bot token for agent '{agent_key}'")));
    };
    let expires_at = ctx.clock.now_ms() + crate::attachments::retention_ms(ctx).await?;
    let prepared = args.attachments.into_iter().map(|a| {
        let token = token.expose_secret();
        async move {
            let candidate = Candidate {
                kind: a.kind.as_str(),
                file_id: a.telegram_file_id,
                file_name: a.file_name,
                mime_type: a.mime_type,
                size: a.size_bytes,
            };
            let storage_id = crate::attachments::new_storage_id();
            let (size, mime) = fetch(telegram, token, &candidate, &storage_id).await?;
            Ok::<_, OpError>(PayloadAttachment {
                kind: a.kind,
                status: Some(AttachmentStatus::Ready),
                storage_id: StorageId::trusted(storage_id),
                telegram_file_id: candidate.file_id,
                file_name: candidate.file_name,
                mime_type: Some(mime),
                size_bytes: Some(candidate.size.unwrap_or(size)),
                expires_at: Some(expires_at),
                download_url: common::api::Ignored,
            })
        }
    });
    futures::future::try_join_all(prepared).await
}

/// Downloads one file through `getFile` into the media store as `storage_id`; returns its size
/// and MIME type.
async fn fetch(
    telegram: &Telegram,
    token: &str,
    candidate: &Candidate,
    storage_id: &str,
) -> Result<(u64, String), OpError> {
    let ctx = &telegram.ctx;
    let max = ctx.settings.attachments.max_bytes;
    let file = telegram.api.get_file(token, &candidate.file_id).await.map_err(|e| {
        let message = format!("Telegram getFile failed: {}", e.description());
        if e.is_transient() { OpError::unavailable(message) } else { OpError::invalid(message) }
    })?;
    let Some(path) = file.file_path.filter(|p| !p.is_empty()) else {
        return Err(OpError::invalid("Telegram getFile failed: missing file_path"));
    };
    let (bytes, content_type) = telegram.api.download_file(token, &path, max).await.map_err(|e| match e {
        telegram_bot::BotApiError::TooLarge { .. } => {
            OpError::invalid(format!("the {} is larger than {max} bytes", candidate.kind))
        }
        e if e.is_transient() => OpError::unavailable(format!("Telegram file download failed: {e}")),
        e => OpError::invalid(e.to_string()),
    })?;
    let mime = mime_for(candidate, content_type.as_deref(), &path);
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("uploadedAt".to_string(), ctx.clock.now_ms().to_string());
    metadata.insert("contentType".to_string(), mime.clone());
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: storage_id.to_string(),
        metadata,
        ..Default::default()
    };
    let size = bytes.len() as u64;
    let mut reader = std::io::Cursor::new(bytes);
    ctx.buckets.media.put(meta, &mut reader).await.map_err(|e| {
        OpError::unavailable(format!("Convex storage upload failed for Telegram {} attachment: {e}", candidate.kind))
    })?;
    Ok((size, mime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_commands_are_recognised() {
        assert_eq!(start_command("/start ABCD1234"), Some("ABCD1234"));
        assert_eq!(start_command("/start@sales_bot  ABCD1234 "), Some("ABCD1234"));
        assert_eq!(start_command("/start"), Some(""));
        assert_eq!(start_command("/starts"), None);
        assert_eq!(start_command("/start@bad-name x"), None);
        assert_eq!(start_command("hello /start x"), None);
    }

    #[test]
    fn mime_choice_follows_the_spec_order() {
        let c = |mime: Option<&str>, name: Option<&str>| Candidate {
            kind: "document",
            file_id: "f".into(),
            file_name: name.map(str::to_string),
            mime_type: mime.map(str::to_string),
            size: None,
        };
        assert_eq!(mime_for(&c(Some("Image/PNG"), None), None, "x"), "image/png");
        assert_eq!(mime_for(&c(Some("application/octet-stream"), Some("a.pdf")), None, "x"), "application/pdf");
        assert_eq!(mime_for(&c(None, None), Some("audio/ogg; codecs=opus"), "x"), "audio/ogg");
        assert_eq!(mime_for(&c(None, None), None, "photos/file.jpg"), "image/jpeg");
        assert_eq!(mime_for(&c(None, None), None, "x"), "application/octet-stream");
    }
}
