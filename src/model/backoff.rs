//! Retry schedule: exponential backoff with bounded jitter.
//!
//! The jitter only ever shortens a delay by up to a fifth, so the minimum time a
//! failing event keeps being retried is predictable (see `min_retry_span`), which
//! is what the "keeps retrying for 24 h by default" promise rests on.

use std::time::Duration;

/// How retries are spaced; read from the `pg_new_user_hook.retry_*` settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub base: Duration,
    pub max: Duration,
    pub max_attempts: u32,
}

/// Jitter never removes more than this share of a delay.
const JITTER_SHARE: f64 = 0.2;

/// Delay before the attempt that follows attempt number `attempt` (1-based).
/// `jitter` is a uniform random number in [0, 1).
pub fn delay(policy: &Policy, attempt: u32, jitter: f64) -> Duration {
    let full = nominal(policy, attempt);
    let jitter = jitter.clamp(0.0, 1.0);
    full.mul_f64(1.0 - JITTER_SHARE * jitter)
}

/// The delay without jitter: base · 2^(attempt-1), capped at `max`.
fn nominal(policy: &Policy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(40);
    let factor = 1u64 << exp;
    let ms = (policy.base.as_millis() as u64).saturating_mul(factor);
    Duration::from_millis(ms)
        .min(policy.max)
        .max(policy.base.min(policy.max))
}

#[cfg(test)]
/// The shortest total time between the first and the last attempt: how long a
/// backend may be down before an event is given up as `failed`.
pub fn min_retry_span(policy: &Policy) -> Duration {
    (1..policy.max_attempts)
        .map(|attempt| delay(policy, attempt, 1.0))
        .sum()
}

/// A jitter value in [0, 1) from the standard library's randomly keyed hasher,
/// so no RNG crate is needed for a value that only spreads retries apart.
pub fn random_jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(base_ms: u64, max_ms: u64, max_attempts: u32) -> Policy {
        Policy {
            base: Duration::from_millis(base_ms),
            max: Duration::from_millis(max_ms),
            max_attempts,
        }
    }

    #[test]
    fn doubles_from_base_until_the_cap() {
        let p = policy(1000, 10_000, 10);
        let nominal: Vec<u64> = (1..=6)
            .map(|a| delay(&p, a, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(nominal, vec![1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn jitter_shortens_by_at_most_a_fifth() {
        let p = policy(1000, 60_000, 10);
        for j in [0.0, 0.3, 0.999, 1.0] {
            let d = delay(&p, 3, j).as_millis();
            assert!((3200..=4000).contains(&d), "jitter {j} gave {d} ms");
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy(1000, 3_600_000, 1000);
        assert_eq!(delay(&p, 999, 0.0), Duration::from_secs(3600));
        assert_eq!(delay(&p, u32::MAX, 0.0), Duration::from_secs(3600));
    }

    #[test]
    fn max_below_base_wins() {
        let p = policy(5000, 1000, 5);
        assert_eq!(delay(&p, 1, 0.0), Duration::from_millis(1000));
    }

    #[test]
    fn defaults_keep_retrying_for_more_than_a_day() {
        use crate::model::names::defaults::{MAX_ATTEMPTS, RETRY_BASE_MS, RETRY_MAX_MS};
        let d = policy(
            RETRY_BASE_MS as u64,
            RETRY_MAX_MS as u64,
            MAX_ATTEMPTS as u32,
        );
        let span = min_retry_span(&d);
        assert!(span >= Duration::from_secs(24 * 3600), "only {span:?}");
    }

    #[test]
    fn random_jitter_is_in_range_and_varies() {
        let values: Vec<f64> = (0..64).map(|_| random_jitter()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let first = values[0];
        assert!(values.iter().any(|v| *v != first));
    }
}
