//! [`BackoffPolicy`]: how long the next refresh waits after failures in a row.

use std::time::Duration;

/// The back-off of failed refreshes: `initial`, doubling with each failure in a row up to
/// `max`, of which a random part (`jitter`, from 0 to 1) is taken off, so that processes
/// that failed together (a token server's outage seen by a fleet) do not retry in step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackoffPolicy {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) jitter: f64,
}

impl BackoffPolicy {
    /// 500 ms, doubling up to 30 s, with up to half of each wait taken off at random.
    pub(crate) const DEFAULT: Self = Self {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        jitter: 0.5,
    };

    /// The wait after the `failures`-th failure in a row (from 1): the doubled delay, less
    /// up to `jitter` of it.
    pub(crate) fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let delay = self.initial.saturating_mul(1 << exponent).min(self.max);
        if self.jitter == 0.0 {
            return delay;
        }
        delay.mul_f64(1.0 - self.jitter * unit())
    }
}

/// A random number in `[0, 1)` from the operating system's source (a failed refresh is rare
/// enough for a system call); 0, so no jitter, if the source fails.
fn unit() -> f64 {
    let mut bytes = [0; 8];
    match getrandom::getrandom(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_jitter_the_delay_doubles_up_to_its_bound() {
        let backoff = BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
            jitter: 0.0,
        };
        let delays: Vec<_> = (1..=6).map(|n| backoff.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 4, 4, 4]);
        assert_eq!(
            backoff.delay(u32::MAX),
            Duration::from_secs(4),
            "no overflow"
        );
    }

    #[test]
    fn jitter_takes_at_most_its_share_off_and_spreads_the_waits() {
        let backoff = BackoffPolicy {
            initial: Duration::from_secs(8),
            max: Duration::from_secs(8),
            jitter: 0.5,
        };
        let delays: Vec<_> = (0..64).map(|_| backoff.delay(1)).collect();
        for delay in &delays {
            assert!(
                (Duration::from_secs(4)..=Duration::from_secs(8)).contains(delay),
                "{delay:?} outside [4 s, 8 s]"
            );
        }
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 32,
            "64 draws gave {} waits",
            distinct.len()
        );
        let below_half = delays
            .iter()
            .filter(|d| **d < Duration::from_secs(6))
            .count();
        assert!(
            (8..=56).contains(&below_half),
            "{below_half} of 64 in the lower half"
        );
    }
}
