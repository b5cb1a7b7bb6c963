//! `GET /console/events`: server-sent events telling the console what changed, fed by NATS.
//!
//! One feed per ingress process, started by the first subscriber: JetStream watches of the
//! queue state, worker, dead-letter and pairing buckets, and a headers-only ordered consumer of
//! the inbox stream (a new message, without its text). Each change becomes a small event
//! naming a topic (`queue`, `workers`, `pairing`) and, where there is one, the key; the page
//! then reloads that panel through the operations API. No payload, no secret leaves the feed.
//! Nothing polls: with no change, the stream carries only keep-alive comments.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, push};
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use common::service::ServiceContext;
use futures::{Stream, StreamExt};
use tokio::sync::{OnceCell, broadcast};
use tokio_util::sync::CancellationToken;

use crate::error_response;

/// Events buffered per subscriber; a subscriber further behind gets a `resync` event instead.
const BUFFER: usize = 256;
/// How long the feed waits before rebuilding its watches after NATS failed them.
const RETRY: Duration = Duration::from_secs(1);

/// The process's feed, started on first use; it and every stream end with `shutdown`.
pub(crate) struct Hub {
    tx: OnceCell<broadcast::Sender<String>>,
    shutdown: CancellationToken,
}

impl Hub {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self { tx: OnceCell::new(), shutdown }
    }

    async fn subscribe(&self, ctx: &ServiceContext) -> broadcast::Receiver<String> {
        let tx = self
            .tx
            .get_or_init(|| async {
                let (tx, _) = broadcast::channel(BUFFER);
                let (ready_tx, ready) = tokio::sync::oneshot::channel();
                let shutdown = self.shutdown.clone();
                let feed = feed(ctx.clone(), tx.clone(), ready_tx);
                tokio::spawn(async move {
                    tokio::select! { _ = shutdown.cancelled() => {}, _ = feed => {} }
                });
                // The first subscriber sees every change made after it subscribed: wait until
                // the watches are in place (or failed, and the feed retries).
                let _ = ready.await;
                tx
            })
            .await;
        tx.subscribe()
    }
}

/// An event naming `topic` and the changed conversation, worker or message (`key`, a subject
/// token or KV key, unescaped).
fn event(topic: &str, key: Option<&str>) -> String {
    let key = key.map(|k| common::token::unescape(k).unwrap_or_else(|| k.to_string()));
    serde_json::json!({ "topic": topic, "key": key }).to_string()
}

/// Forwards every change to the subscribers, rebuilding the watches when NATS fails them.
async fn feed(ctx: ServiceContext, tx: broadcast::Sender<String>, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    loop {
        if let Err(e) = watch(&ctx, &tx, &mut ready).await {
            tracing::warn!(error = %e, "console event feed failed; restarting it");
        }
        tokio::time::sleep(RETRY).await;
        ready.take();
        // Whatever happened meanwhile is unknown: the pages reload everything.
        let _ = tx.send(event("resync", None));
    }
}

async fn watch(
    ctx: &ServiceContext,
    tx: &broadcast::Sender<String>,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<()> {
    let b = &ctx.buckets;
    // Pairing keys hold the codes: their events name no key.
    let kv = |topic: &'static str, watch: async_nats::jetstream::kv::Watch| {
        let keyed = topic != "pairing";
        watch
            .map(move |entry| entry.map(|e| event(topic, keyed.then_some(e.key.as_str()))).map_err(anyhow::Error::from))
            .boxed()
    };
    let inbox = ctx
        .js
        .get_stream(common::topology::INBOX_STREAM)
        .await?
        .create_consumer(push::OrderedConfig {
            deliver_subject: ctx.nats.new_inbox(),
            deliver_policy: DeliverPolicy::New,
            headers_only: true,
            ..Default::default()
        })
        .await?
        .messages()
        .await?
        .map(|m| m.map(|m| event("queue", m.subject.as_str().strip_prefix("af.inbox."))).map_err(anyhow::Error::from))
        .boxed();
    let mut all = futures::stream::select_all([
        kv("queue", b.queue_state.raw().watch_all().await?),
        kv("queue", b.dead_letters.raw().watch_all().await?),
        kv("workers", b.workers.raw().watch_all().await?),
        kv("pairing", b.pairing.raw().watch_all().await?),
        inbox,
    ]);
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    while let Some(next) = all.next().await {
        // No subscriber right now is fine: the send fails and the change is dropped.
        let _ = tx.send(next?);
    }
    anyhow::bail!("a watch ended")
}

/// `GET /console/events`: the event stream of a console session.
pub(crate) async fn stream(
    State(ctx): State<ServiceContext>,
    Extension(hub): Extension<Arc<Hub>>,
    headers: HeaderMap,
) -> Response {
    let session = match crate::session::current(&ctx, &headers).await {
        Ok(session) => session,
        Err(err) => return error_response(&err),
    };
    let rx = hub.subscribe(&ctx).await;
    // The stream ends with the session; the page then finds itself logged out.
    let remaining = Duration::from_millis(session.expires_at.saturating_sub(ctx.clock.now_ms()).max(0) as u64);
    let end = hub.shutdown.clone().cancelled_owned();
    let events = events(rx).take_until(async move {
        tokio::select! { _ = tokio::time::sleep(remaining) => {}, _ = end => {} }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn events(rx: broadcast::Receiver<String>) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(rx, |mut rx| async move {
        let data = match rx.recv().await {
            Ok(data) => data,
            Err(broadcast::error::RecvError::Lagged(_)) => event("resync", None),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().data(data)), rx))
    })
}
