//! The one source of time for every service. Production reads the system clock; the `manual`
//! mode (enabled only by configuration) holds a time that operators and black-box tests move with
//! `setTestClock` / `advanceTestClock`. Background loops sleep on this clock, so moving it wakes
//! them. Nothing else in the workspace may read the wall clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::OpError;

/// Milliseconds since the Unix epoch, as the original's `nowMs`.
pub type Millis = i64;

#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

enum Inner {
    System,
    Manual(watch::Sender<ManualTime>),
}

/// The manual clock's value and the revision of the stored clock record it came from, so a
/// request that was issued after a clock change can wait until this process has seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManualTime {
    pub now_ms: Millis,
    pub revision: u64,
}

impl Clock {
    pub fn system() -> Self {
        Self { inner: Arc::new(Inner::System) }
    }

    pub fn manual(start_ms: Millis) -> Self {
        let (tx, _) = watch::channel(ManualTime { now_ms: start_ms, revision: 0 });
        Self { inner: Arc::new(Inner::Manual(tx)) }
    }

    pub fn is_manual(&self) -> bool {
        matches!(*self.inner, Inner::Manual(_))
    }

    pub fn now_ms(&self) -> Millis {
        match &*self.inner {
            Inner::System => system_now_ms(),
            Inner::Manual(tx) => tx.borrow().now_ms,
        }
    }

    /// The revision of the clock record this process has applied (0 for the system clock).
    pub fn revision(&self) -> u64 {
        match &*self.inner {
            Inner::System => 0,
            Inner::Manual(tx) => tx.borrow().revision,
        }
    }

    /// Moves a manual clock. Older revisions are ignored so a late watch delivery never moves
    /// time back to a superseded value.
    pub fn apply_manual(&self, time: ManualTime) -> Result<(), OpError> {
        match &*self.inner {
            Inner::System => Err(test_clock_disabled()),
            Inner::Manual(tx) => {
                tx.send_if_modified(|current| {
                    if time.revision >= current.revision && *current != time {
                        *current = time;
                        true
                    } else {
                        false
                    }
                });
                Ok(())
            }
        }
    }

    /// Sleeps until the clock reads at least `deadline_ms`. On the manual clock this returns as
    /// soon as someone moves the time past the deadline.
    pub async fn sleep_until(&self, deadline_ms: Millis) {
        match &*self.inner {
            Inner::System => {
                let wait = deadline_ms.saturating_sub(system_now_ms());
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
            }
            Inner::Manual(tx) => {
                let mut rx = tx.subscribe();
                // An error means the sender is gone, which cannot happen while `self` lives.
                let _ = rx.wait_for(|t| t.now_ms >= deadline_ms).await;
            }
        }
    }

    /// Resolves when the manual clock changes; never resolves on the system clock. Event loops
    /// select on this to recompute their timers after a test moves time.
    pub async fn changed(&self) {
        match &*self.inner {
            Inner::System => std::future::pending::<()>().await,
            Inner::Manual(tx) => {
                let mut rx = tx.subscribe();
                let _ = rx.changed().await;
            }
        }
    }

    /// Waits (bounded) until this process has applied clock revision `revision`.
    pub async fn wait_for_revision(&self, revision: u64, timeout: Duration) {
        if let Inner::Manual(tx) = &*self.inner {
            let mut rx = tx.subscribe();
            let _ = tokio::time::timeout(timeout, rx.wait_for(|t| t.revision >= revision)).await;
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.inner {
            Inner::System => f.write_str("Clock::System"),
            Inner::Manual(tx) => write!(f, "Clock::Manual({:?})", *tx.borrow()),
        }
    }
}

pub fn test_clock_disabled() -> OpError {
    OpError::conflict("the test clock is disabled: set clock.mode = \"manual\" to move time")
}

#[allow(clippy::disallowed_methods)] // The one sanctioned read of the wall clock.
fn system_now_ms() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleep_wakes_when_time_moves() {
        let clock = Clock::manual(1_000);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(5_000).await }
        });
        clock.apply_manual(ManualTime { now_ms: 4_999, revision: 1 }).unwrap();
        assert!(!sleeper.is_finished());
        clock.apply_manual(ManualTime { now_ms: 5_000, revision: 2 }).unwrap();
        sleeper.await.unwrap();
        assert_eq!(clock.now_ms(), 5_000);
    }

    #[test]
    fn stale_revisions_are_ignored_and_time_may_go_back() {
        let clock = Clock::manual(1_000);
        clock.apply_manual(ManualTime { now_ms: 9_000, revision: 3 }).unwrap();
        clock.apply_manual(ManualTime { now_ms: 2_000, revision: 2 }).unwrap();
        assert_eq!(clock.now_ms(), 9_000);
        clock.apply_manual(ManualTime { now_ms: 500, revision: 4 }).unwrap();
        assert_eq!(clock.now_ms(), 500);
    }

    #[test]
    fn system_clock_refuses_manual_moves() {
        let clock = Clock::system();
        assert!(clock.apply_manual(ManualTime { now_ms: 1, revision: 1 }).is_err());
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds (`2026-01-01T09:00:00.000Z`).
/// Out-of-range values (beyond year 9999) print as the raw number.
pub fn iso_utc(ms: Millis) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// The UTC calendar date (`YYYY-MM-DD`) of a time in milliseconds since the epoch.
pub fn utc_date(ms: Millis) -> String {
    iso_utc(ms).chars().take(10).collect()
}

/// The UTC time of day (`HH:MM:SS`) of a time in milliseconds since the epoch.
pub fn utc_time(ms: Millis) -> String {
    iso_utc(ms).chars().skip(11).take(8).collect()
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn utc_formatting_of_known_instants() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_utc(1_767_258_000_000), "2026-01-01T09:00:00.000Z");
        assert_eq!(iso_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso_utc(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(utc_date(1_767_258_000_000), "2026-01-01");
        assert_eq!(utc_time(1_767_258_000_000), "09:00:00");
    }
}
