//! The original's retry backoff (spec §2.2), bit for bit: exponential, capped, with a jitter
//! derived from the clock and the attempt number so it is reproducible.

use common::config::RetrySettings;

/// Delay before the next attempt, for the attempt count *after* the failure (`attempts >= 1`).
pub fn retry_delay_ms(settings: &RetrySettings, attempts: u32, now_ms: i64) -> i64 {
    let exponent = attempts.saturating_sub(1) as i32;
    let raw = settings.base_delay_ms as f64 * settings.backoff_factor.powi(exponent);
    let bounded = (settings.max_delay_ms as f64).min((settings.base_delay_ms as f64).max(raw));
    let now32 = (now_ms as u64 & 0xffff_ffff) as u32;
    let mixed = ((attempts as u64).wrapping_mul(2_654_435_761) & 0xffff_ffff) as u32;
    let seed = now32 ^ mixed;
    let pr = (seed % 10_000) as f64 / 10_000.0;
    (bounded + (bounded * settings.jitter_ratio * pr).floor()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> RetrySettings {
        RetrySettings { base_delay_ms: 1000, max_delay_ms: 120_000, backoff_factor: 2.0, jitter_ratio: 0.1 }
    }

    #[test]
    fn acceptance_vector_of_the_spec() {
        let delays: Vec<i64> = (1..=4).map(|a| retry_delay_ms(&defaults(), a, 1_767_258_000_000)).collect();
        assert_eq!(delays, vec![1053, 2183, 4000, 8096]);
    }

    #[test]
    fn delays_stay_within_bounds_and_cap() {
        let s = defaults();
        for now in [0i64, 1, 12_345, 1_767_258_000_000, i64::MAX / 4] {
            for a in 1..=30u32 {
                let d = retry_delay_ms(&s, a, now);
                let base = (1000f64 * 2f64.powi(a as i32 - 1)).min(120_000.0) as i64;
                assert!(d >= base && d <= base + base / 10, "a={a} now={now} d={d}");
            }
        }
    }
}
