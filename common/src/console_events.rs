//! Change notices for the web console: the services that own the data watch it and publish a
//! small notice per change on [`SUBJECT`] (core NATS: a notice missed is a panel reloaded
//! later, never lost data); ingress forwards them to the console's event streams. A notice
//! names a topic (`queue`, `workers`, `pairing`, or `resync`) and, where there is one, the
//! changed key; never a value. So ingress needs no read access to the inbox or the buckets
//! (`crate::nats_access`).
//!
//! The watches run only while a console is open: ingress asks for them on [`WANTED`] every
//! [`WANTED_EVERY`] while it has a subscriber, and a publisher drops them when no ask came for
//! three periods, so the message path carries no notices nobody reads.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use crate::service::ServiceContext;

pub const SUBJECT: &str = "af.console.events";
/// Requests from ingress: "a console is open, keep the notices coming". A publisher answers once
/// its watches are in place.
pub const WANTED: &str = "af.console.wanted";
pub const WANTED_EVERY: Duration = Duration::from_secs(5);

/// How long a feed waits before rebuilding its watches after NATS failed them.
const RETRY: Duration = Duration::from_secs(1);

/// A notice naming `topic` and the changed conversation, worker or message (`key`, a subject
/// token or KV key, unescaped).
pub fn notice(topic: &str, key: Option<&str>) -> String {
    let key = key.map(|k| crate::token::unescape(k).unwrap_or_else(|| k.to_string()));
    serde_json::json!({ "topic": topic, "key": key }).to_string()
}

/// The notices of a KV watch; `keyed` false leaves the key out (pairing keys hold the codes).
pub fn kv_notices(
    topic: &'static str,
    keyed: bool,
    watch: async_nats::jetstream::kv::Watch,
) -> BoxStream<'static, anyhow::Result<String>> {
    watch.map(move |entry| entry.map(|e| notice(topic, keyed.then_some(e.key.as_str()))).map_err(Into::into)).boxed()
}

/// While a console asks for them, publishes a notice for every item of the streams `watches`
/// builds, until `shutdown`; rebuilds them (and publishes a `resync`) when NATS ends or fails one.
pub async fn publish_changes<F, Fut>(ctx: ServiceContext, shutdown: CancellationToken, watches: F)
where
    F: Fn(ServiceContext) -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<BoxStream<'static, anyhow::Result<String>>>>>,
{
    let run = async {
        let mut asks = match ctx.nats.subscribe(WANTED).await {
            Ok(asks) => asks,
            Err(e) => return tracing::warn!(error = %e, "cannot serve console notices"),
        };
        // Wait for a console, then publish until none has asked for three periods.
        while let Some(ask) = asks.next().await {
            let result: anyhow::Result<()> = async {
                let mut all = futures::stream::select_all(watches(ctx.clone()).await?);
                let answer = |ask: async_nats::Message| async {
                    if let Some(reply) = ask.reply {
                        ctx.nats.publish(reply, "".into()).await?;
                    }
                    anyhow::Ok(())
                };
                answer(ask).await?;
                let mut deadline = tokio::time::Instant::now() + 3 * WANTED_EVERY;
                loop {
                    tokio::select! {
                        notice = all.next() => {
                            let Some(notice) = notice else { anyhow::bail!("a watch ended") };
                            ctx.nats.publish(SUBJECT, notice?.into()).await?;
                        }
                        ask = asks.next() => {
                            let Some(ask) = ask else { return Ok(()) };
                            answer(ask).await?;
                            deadline = tokio::time::Instant::now() + 3 * WANTED_EVERY;
                        }
                        _ = tokio::time::sleep_until(deadline) => return Ok(()),
                    }
                }
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %format!("{e:#}"), "console change notices failed; restarting them");
                tokio::time::sleep(RETRY).await;
                // Whatever changed meanwhile is unknown: the pages reload everything.
                let _ = ctx.nats.publish(SUBJECT, notice("resync", None).into()).await;
            }
        }
    };
    tokio::select! { _ = shutdown.cancelled() => {}, _ = run => {} }
}
