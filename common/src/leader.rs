//! Leader leases in KV: one holder per name across all replicas. The lease is a key in the
//! `af_leaders` bucket, whose max age expires it unless the holder renews it by CAS. Leader
//! liveness is a property of processes, so it runs on real time even under the manual clock.
//! Being leader is advisory; correctness still rests on the CAS revisions of every write.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::JsonStore;
use crate::topology::LEADER_TTL;

#[derive(serde::Serialize, serde::Deserialize)]
struct Lease {
    holder: String,
}

/// Runs `lead` each time this process wins the lease named `name`, with a token that is
/// cancelled when the lease is lost. Returns when `shutdown` is cancelled (releasing the lease).
pub async fn run_elected<F, Fut>(store: JsonStore, name: &str, holder: &str, shutdown: CancellationToken, mut lead: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let poll = Duration::from_millis(200);
    let renew_every = LEADER_TTL / 3;
    while !shutdown.is_cancelled() {
        let revision = match store.create(name, &Lease { holder: holder.to_string() }).await {
            Ok(rev) => rev,
            Err(e) => {
                if !e.is_conflict() {
                    tracing::warn!(lease = name, error = %e, "leader lease check failed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(poll) => continue,
                }
            }
        };
        tracing::info!(lease = name, holder, "acquired leadership");
        let leadership = shutdown.child_token();
        let renewer = tokio::spawn(renew(
            store.clone(),
            name.to_string(),
            holder.to_string(),
            revision,
            renew_every,
            leadership.clone(),
        ));
        lead(leadership.clone()).await;
        leadership.cancel();
        if let Ok(Some(rev)) = renewer.await {
            // Step down explicitly so a standby takes over at once instead of after the TTL.
            let _ = store.delete(name, rev).await;
        }
        tracing::info!(lease = name, holder, "gave up leadership");
    }
}

/// Renews the lease until `leadership` is cancelled or renewal fails for too long; returns the
/// last revision held, if the lease is still ours.
async fn renew(
    store: JsonStore,
    name: String,
    holder: String,
    mut revision: u64,
    every: Duration,
    leadership: CancellationToken,
) -> Option<u64> {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = leadership.cancelled() => return Some(revision),
            _ = tokio::time::sleep(every) => {}
        }
        match store.update(&name, &Lease { holder: holder.clone() }, revision).await {
            Ok(rev) => {
                revision = rev;
                last_ok = tokio::time::Instant::now();
            }
            Err(e) if e.is_conflict() => {
                tracing::warn!(lease = %name, "leader lease taken over by another holder");
                leadership.cancel();
                return None;
            }
            Err(e) => {
                tracing::warn!(lease = %name, error = %e, "leader lease renewal failed");
                // Give up before the TTL can run out under us, so two leaders never overlap
                // on purpose; CAS fencing covers the remaining window.
                if last_ok.elapsed() > LEADER_TTL * 2 / 3 {
                    leadership.cancel();
                    return None;
                }
            }
        }
    }
}
