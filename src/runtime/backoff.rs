//! Capped, jittered exponential backoff for every retry loop in the system.
//!
//! Full jitter (a uniform draw below the capped exponential) keeps many pods that lost the
//! same Redis master from reconnecting in lockstep.

use std::time::Duration;

/// Backoff state for one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubling per attempt up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The next delay: uniform in `[ceiling/2, ceiling]`, where the ceiling doubles per
    /// attempt up to the cap. Half the ceiling is kept so a retry is never immediate.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Attempts made since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `d` with ±`fraction` uniform jitter, for periodic timers that should not align across pods.
pub fn jitter(d: Duration, fraction: f64) -> Duration {
    let f = 1.0 + fraction * (2.0 * fastrand::f64() - 1.0);
    d.mul_f64(f.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_stays_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(200)));
        assert!(
            delays[11] >= Duration::from_millis(100),
            "reaches the cap region"
        );
        b.reset();
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn jitter_stays_in_band() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(3), 0.2);
            assert!(d >= Duration::from_millis(2400) && d <= Duration::from_millis(3600));
        }
    }
}
