//! Request rate limits (`[rate_limits]`): keyed GCRA token buckets from the `governor` crate,
//! driven by the service's clock (`common::clock`, so a manual test clock moves them too).
//!
//! - Operations are limited per bearer token: the key is the token's SHA-256 (the token itself
//!   is never kept or logged). The admin and the app token
//!   have their own, higher quotas; every other token (each worker's, or an unknown one) has
//!   `rate_limits.ops_*`. A request is counted before the owning service authenticates it, so an
//!   unknown token spends only its own bucket.
//! - The Telegram webhook is limited per bot, after the secret check.
//!
//! Memory stays bounded: a key whose bucket is full again is indistinguishable from a new one
//! and is dropped by `retain_recent`, every [`SWEEP_INTERVAL`] and at once when a limiter holds
//! more than [`MAX_KEYS`] keys.

use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use common::config::{RateLimitSettings, Settings};
use governor::{Quota, RateLimiter};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How often idle keys are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Keys one limiter holds before idle ones are dropped at once.
const MAX_KEYS: usize = 100_000;

/// The longest time a [`ServiceClock`] counts: governor keeps times as `u64` nanoseconds (it
/// panics past 584 years), and a manual clock may be set anywhere.
const MAX_CLOCK_MS: i64 = 100 * 365 * 24 * 3_600_000;

/// `common::clock` as a governor clock: milliseconds since the limiters were made, clamped to
/// `0..=MAX_CLOCK_MS` (a manual clock set back, or centuries ahead, cannot break the arithmetic).
#[derive(Clone)]
struct ServiceClock {
    clock: common::clock::Clock,
    origin_ms: i64,
}

impl governor::clock::Clock for ServiceClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        let elapsed = self.clock.now_ms().saturating_sub(self.origin_ms).clamp(0, MAX_CLOCK_MS);
        Duration::from_millis(u64::try_from(elapsed).unwrap_or(0))
    }
}

type Key = [u8; 32];
type Keyed = RateLimiter<
    Key,
    governor::state::keyed::HashMapStateStore<Key>,
    ServiceClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// One keyed limiter.
struct Limiter {
    inner: Keyed,
    clock: ServiceClock,
}

impl Limiter {
    fn new(per_minute: u32, burst: u32, clock: &ServiceClock) -> Self {
        // Validated in config (1..=6,000,000 a minute): the period is at least 10 µs.
        let period = Duration::from_nanos(60_000_000_000 / u64::from(per_minute.max(1)));
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
        Self { inner: RateLimiter::hashmap_with_clock(quota, clock.clone()), clock: clock.clone() }
    }

    /// `Ok` when `key` may go on, else how long until it may.
    fn check(&self, key: &Key) -> Result<(), Duration> {
        if self.inner.len() > MAX_KEYS {
            self.inner.retain_recent();
        }
        self.inner.check_key(key).map_err(|refused| {
            use governor::clock::Clock as _;
            refused.wait_time_from(self.clock.now())
        })
    }

    fn sweep(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// Which quota a bearer token falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Admin,
    App,
    Token,
}

/// The limiters of one ingress.
pub(crate) struct Limits {
    enabled: bool,
    admin_token: Option<Key>,
    app_token: Option<Key>,
    admin: Limiter,
    app: Limiter,
    token: Limiter,
    webhook: Limiter,
}

/// The token of `Bearer <token>` (the scheme in any case, as the services accept it), else the
/// whole value: one token is one key however its header is spelled.
fn bearer_token(authorization: &str) -> &str {
    let value = authorization.trim();
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => value,
    }
}

fn digest(bytes: &[u8]) -> Key {
    Sha256::digest(bytes).into()
}

impl Limits {
    /// The limiters for `settings`, and a task that drops idle keys while they are in use.
    pub(crate) fn start(settings: &Settings, clock: &common::clock::Clock) -> Arc<Self> {
        let limits = Arc::new(Self::new(settings, clock));
        if limits.enabled {
            let weak = Arc::downgrade(&limits);
            tokio::spawn(sweep(weak));
        }
        limits
    }

    fn new(settings: &Settings, clock: &common::clock::Clock) -> Self {
        let r: &RateLimitSettings = &settings.rate_limits;
        let clock = ServiceClock { clock: clock.clone(), origin_ms: clock.now_ms() };
        let token_key =
            |token: &Option<secrecy::SecretString>| token.as_ref().map(|t| digest(t.expose_secret().as_bytes()));
        Self {
            enabled: r.enabled,
            admin_token: token_key(&settings.auth.admin_token),
            app_token: token_key(&settings.auth.app_token),
            admin: Limiter::new(r.admin_ops_per_minute, r.admin_ops_burst, &clock),
            app: Limiter::new(r.app_ops_per_minute, r.app_ops_burst, &clock),
            token: Limiter::new(r.ops_per_minute, r.ops_burst, &clock),
            webhook: Limiter::new(r.webhook_per_minute, r.webhook_burst, &clock),
        }
    }

    fn class(&self, key: &Key) -> Class {
        let is = |configured: &Option<Key>| configured.as_ref().is_some_and(|c| bool::from(c.ct_eq(key)));
        if is(&self.admin_token) {
            Class::Admin
        } else if is(&self.app_token) {
            Class::App
        } else {
            Class::Token
        }
    }

    /// Counts one operation call with this Authorization header value; `Err` is the wait.
    pub(crate) fn check_op(&self, authorization: &str) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        let key = digest(bearer_token(authorization).as_bytes());
        let limiter = match self.class(&key) {
            Class::Admin => &self.admin,
            Class::App => &self.app,
            Class::Token => &self.token,
        };
        limiter.check(&key).inspect_err(|_| refused("ops"))
    }

    /// Counts one webhook update of `bot`; `Err` is the wait.
    pub(crate) fn check_webhook(&self, bot: &str) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        self.webhook.check(&digest(bot.as_bytes())).inspect_err(|_| refused("webhook"))
    }

    fn sweep(&self) {
        for limiter in [&self.admin, &self.app, &self.token, &self.webhook] {
            limiter.sweep();
        }
    }
}

fn refused(route: &'static str) {
    metrics::counter!(common::telemetry::RATE_LIMITED, "route" => route).increment(1);
}

async fn sweep(limits: Weak<Limits>) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(limits) = limits.upgrade() else { return };
        limits.sweep();
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Adds `Retry-After` to a refusal.
pub(crate) fn with_retry_after(mut response: Response, wait: Duration) -> Response {
    if let Ok(value) = HeaderValue::from_str(&retry_after_secs(wait).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(overrides: &[(&str, &str)]) -> Settings {
        let mut settings = Settings::from_overrides(overrides).expect("settings");
        settings.auth.admin_token = Some("admin-token-0123456789".into());
        settings.auth.app_token = Some("app-token-0123456789".into());
        settings
    }

    fn advance(clock: &common::clock::Clock, ms: i64) {
        let time =
            common::clock::ManualTime { now_ms: clock.now_ms().saturating_add(ms), revision: clock.revision() + 1 };
        clock.apply_manual(time).expect("manual clock");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
    }

    #[test]
    fn each_token_has_its_own_bucket_and_refills_with_the_clock() {
        let clock = common::clock::Clock::manual(1_767_258_000_000);
        let limits =
            Limits::new(&settings(&[("rate_limits.ops_per_minute", "1"), ("rate_limits.ops_burst", "2")]), &clock);
        assert_eq!(limits.check_op("Bearer one"), Ok(()));
        assert_eq!(limits.check_op("Bearer one"), Ok(()));
        assert_eq!(limits.check_op("Bearer one"), Err(Duration::from_secs(60)));
        assert_eq!(limits.check_op("Bearer two"), Ok(()), "another token is unaffected");
        advance(&clock, 60_000);
        assert_eq!(limits.check_op("Bearer one"), Ok(()), "one request refilled");
        assert!(limits.check_op("Bearer one").is_err());
    }

    #[test]
    fn admin_and_app_tokens_have_their_own_quotas() {
        let clock = common::clock::Clock::manual(0);
        let overrides =
            [("rate_limits.ops_burst", "1"), ("rate_limits.admin_ops_burst", "3"), ("rate_limits.app_ops_burst", "2")];
        let limits = Limits::new(&settings(&overrides), &clock);
        let class = |auth: &str| limits.class(&digest(bearer_token(auth).as_bytes()));
        assert_eq!(class("Bearer admin-token-0123456789"), Class::Admin);
        assert_eq!(class(" bearer  app-token-0123456789 "), Class::App);
        assert_eq!(class("Bearer admin-token-012345678"), Class::Token);
        assert_eq!(class("admin-token-0123456789"), Class::Admin);
        let passed = |auth: &str| (0..5).take_while(|_| limits.check_op(auth).is_ok()).count();
        assert_eq!(passed("Bearer admin-token-0123456789"), 3);
        assert_eq!(passed("Bearer app-token-0123456789"), 2);
        assert_eq!(passed("Bearer worker"), 1);
    }

    #[test]
    fn a_clock_set_back_or_centuries_ahead_breaks_nothing() {
        let clock = common::clock::Clock::manual(1_767_258_000_000);
        let limits = Limits::new(&settings(&[("rate_limits.ops_burst", "1")]), &clock);
        assert!(limits.check_op("Bearer one").is_ok());
        for jump in [-1_767_258_000_000, i64::MAX / 2, i64::MAX / 2, -5, 1000] {
            advance(&clock, jump);
            let _ = limits.check_op("Bearer one");
            let _ = limits.check_webhook("bot");
            limits.sweep();
        }
    }

    #[test]
    fn disabled_limits_nothing_and_idle_keys_are_dropped() {
        let clock = common::clock::Clock::manual(0);
        let off = Limits::new(&settings(&[("rate_limits.enabled", "false"), ("rate_limits.ops_burst", "1")]), &clock);
        assert!((0..10).all(|_| off.check_op("Bearer x").is_ok()));
        let on = Limits::new(&settings(&[("rate_limits.webhook_per_minute", "60")]), &clock);
        for bot in 0..100 {
            assert!(on.check_webhook(&bot.to_string()).is_ok());
        }
        assert_eq!(on.webhook.inner.len(), 100);
        advance(&clock, 2_000);
        on.sweep();
        assert_eq!(on.webhook.inner.len(), 0, "full buckets are forgotten");
    }
}
