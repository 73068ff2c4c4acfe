//! Options of one acquisition: TTL, wait bound, renewal and retry backoff.

use std::time::Duration;

use crate::{Error, Result};

/// The default lease TTL: 30 seconds.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How a lock is taken and kept.
///
/// ```
/// use std::time::Duration;
/// use distlock_core::LockOptions;
///
/// let options = LockOptions::new()
///     .ttl(Duration::from_secs(10))
///     .wait(Duration::from_secs(2));
/// assert!(options.auto_renew);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LockOptions {
    /// How long the lock lives on the server without renewal. Finite by
    /// design: a crashed holder frees the lock after at most this long.
    /// Session-based backends (ZooKeeper) tie the lock to the client's
    /// session instead and ignore it.
    pub ttl: Duration,
    /// How long `lock` may wait; `None` waits until acquired or dropped.
    /// `try_lock` ignores it.
    pub wait: Option<Duration>,
    /// Renew the lease in the background (about every `ttl / 3`) while
    /// the guard lives.
    pub auto_renew: bool,
    /// Retry delays for backends that must poll, and for retries after
    /// transient errors.
    pub backoff: Backoff,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: DEFAULT_TTL,
            wait: None,
            auto_renew: true,
            backoff: Backoff::default(),
        }
    }
}

impl LockOptions {
    /// The defaults: 30 s TTL, wait forever, renewal on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the lease TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Bounds how long `lock` waits.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Sets or clears the wait bound.
    pub fn wait_opt(mut self, wait: Option<Duration>) -> Self {
        self.wait = wait;
        self
    }

    /// Turns automatic renewal on or off.
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.auto_renew = on;
        self
    }

    /// Sets the retry backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Checks the values; the core calls it before every acquisition.
    pub fn validate(&self) -> Result<()> {
        if self.ttl < Duration::from_millis(10) {
            return Err(Error::InvalidConfig(format!(
                "ttl must be at least 10ms, got {:?}",
                self.ttl
            )));
        }
        if self.ttl > Duration::from_secs(365 * 24 * 3600) {
            return Err(Error::InvalidConfig(format!(
                "ttl must be finite and at most one year, got {:?}",
                self.ttl
            )));
        }
        self.backoff.validate()
    }
}

/// Exponential backoff with jitter.
///
/// The n-th delay is `initial * multiplier^n`, capped at `max`, then
/// scaled by a random factor in `[1 - jitter, 1]` so that contenders
/// spread out instead of retrying in lockstep.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// Growth factor per attempt (at least 1).
    pub multiplier: f64,
    /// Fraction of each delay that is random, in `[0, 1]`.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// A backoff from `initial` to `max` with the default factor and jitter.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            ..Backoff::default()
        }
    }

    /// Sets the jitter fraction.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the growth factor.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.initial.is_zero() || self.max < self.initial {
            return Err(Error::InvalidConfig(format!(
                "backoff needs 0 < initial <= max, got initial {:?} max {:?}",
                self.initial, self.max
            )));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(Error::InvalidConfig(format!(
                "backoff multiplier must be >= 1, got {}",
                self.multiplier
            )));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::InvalidConfig(format!(
                "backoff jitter must be in [0, 1], got {}",
                self.jitter
            )));
        }
        Ok(())
    }

    /// The delay before retry number `attempt` (0-based), with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempt.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        Duration::from_secs_f64(apply_jitter(capped, self.jitter))
    }

    /// An endless iterator of delays.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + '_ {
        (0u32..).map(move |attempt| self.delay(attempt))
    }
}

/// Scales `secs` by a random factor in `[1 - jitter, 1]`.
fn apply_jitter(secs: f64, jitter: f64) -> f64 {
    secs * (1.0 - jitter * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let options = LockOptions::default();
        assert_eq!(options.ttl, Duration::from_secs(30));
        assert_eq!(options.wait, None);
        assert!(options.auto_renew);
        options.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(LockOptions::new().ttl(Duration::ZERO).validate().is_err());
        let bad = LockOptions::new()
            .backoff(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)));
        assert!(bad.validate().is_err());
        let bad = LockOptions::new().backoff(Backoff::default().jitter(2.0));
        assert!(bad.validate().is_err());
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let backoff =
            Backoff::new(Duration::from_millis(10), Duration::from_millis(100)).jitter(0.5);
        for attempt in 0..20 {
            let delay = backoff.delay(attempt);
            let nominal = (10.0 * 2f64.powi(attempt as i32)).min(100.0);
            let ms = delay.as_secs_f64() * 1000.0;
            assert!(
                ms <= nominal + 1e-6 && ms >= nominal * 0.5 - 1e-6,
                "{attempt}: {ms}"
            );
        }
        let no_jitter =
            Backoff::new(Duration::from_millis(10), Duration::from_millis(100)).jitter(0.0);
        assert_eq!(no_jitter.delay(0), Duration::from_millis(10));
        assert_eq!(no_jitter.delay(10), Duration::from_millis(100));
    }
}
