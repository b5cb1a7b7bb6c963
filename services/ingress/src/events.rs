//! `GET /console/events`: server-sent events telling the console what changed, fed by NATS.
//!
//! One feed per ingress process, started by the first subscriber: a subscription to the change
//! notices the owning services publish while a console asks for them (`common::console_events`:
//! the queue leader for the queue, dead letters, workers and new messages, hydration for
//! pairing codes). Each notice
//! names a topic (`queue`, `workers`, `pairing`) and, where there is one, the key; the page then
//! reloads that panel through the operations API. No payload, no secret reaches ingress.
//! Nothing polls: with no change, the stream carries only keep-alive comments.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use common::console_events::{SUBJECT, WANTED, WANTED_EVERY, notice};
use common::service::ServiceContext;
use futures::{Stream, StreamExt};
use tokio::sync::{OnceCell, broadcast};
use tokio_util::sync::CancellationToken;

use crate::error_response;

/// Events buffered per subscriber; a subscriber further behind gets a `resync` event instead.
const BUFFER: usize = 256;
/// How long the feed waits before subscribing again after NATS ended its subscription.
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
                // the subscription is in place (or failed, and the feed retries).
                let _ = ready.await;
                tx
            })
            .await;
        tx.subscribe()
    }
}

/// Forwards every notice to the subscribers, subscribing again when NATS ends the subscription;
/// while any page listens, asks the owning services to keep their notices coming.
async fn feed(ctx: ServiceContext, tx: broadcast::Sender<String>, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    loop {
        match ctx.nats.subscribe(SUBJECT).await {
            Ok(mut notices) => {
                let _ = ctx.nats.flush().await;
                // The first page sees every change made after it subscribed: wait until a
                // publisher confirms its watches are in place (none yet, e.g. no queue leader:
                // go on, the next ask starts them).
                let _ = tokio::time::timeout(WANTED_EVERY, ctx.nats.request(WANTED, "".into())).await;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                let mut ask = tokio::time::interval(WANTED_EVERY);
                loop {
                    tokio::select! {
                        message = notices.next() => {
                            let Some(message) = message else { break };
                            // No page right now is fine: the send fails and the notice is dropped.
                            let _ = tx.send(String::from_utf8_lossy(&message.payload).into_owned());
                        }
                        _ = ask.tick() => {
                            if tx.receiver_count() > 0 {
                                let _ = ctx.nats.publish(WANTED, "".into()).await;
                            }
                        }
                    }
                }
                tracing::warn!("console notice subscription ended; subscribing again");
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to console notices; retrying"),
        }
        ready.take();
        tokio::time::sleep(RETRY).await;
        // Whatever happened meanwhile is unknown: the pages reload everything.
        let _ = tx.send(notice("resync", None));
    }
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
            Err(broadcast::error::RecvError::Lagged(_)) => notice("resync", None),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().data(data)), rx))
    })
}
