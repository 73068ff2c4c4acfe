//! The one clock of a check: CLOCK_MONOTONIC, which every process on the
//! host reads alike. Workers stamp their steps with it and the hub stamps
//! what it receives with it, so the checker can order events of different
//! processes without any clock synchronisation.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};
use serde::{Deserialize, Serialize};

/// A reading of the host's monotonic clock, in nanoseconds since an
/// arbitrary origin (boot) that all processes on the host share.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The timestamp `nanos` nanoseconds after the clock's origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// Nanoseconds since the clock's origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, rhs: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_nanos(rhs)))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;

    fn sub(self, rhs: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_nanos(rhs)))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Now, on the shared monotonic clock (`clock_gettime(CLOCK_MONOTONIC)`).
pub fn now() -> Timestamp {
    // CLOCK_MONOTONIC exists on every Linux and BSD; the call cannot fail
    // with a valid clock id, so a failure is a broken platform.
    let spec = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock_gettime(CLOCK_MONOTONIC)");
    let seconds = u64::try_from(spec.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(spec.tv_nsec()).unwrap_or(0);
    Timestamp(seconds * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward_and_matches_std() {
        let before = now();
        std::thread::sleep(Duration::from_millis(5));
        let after = now();
        assert!(after.saturating_since(before) >= Duration::from_millis(5));
        assert_eq!(
            before + Duration::from_millis(1) - Duration::from_millis(1),
            before
        );
        assert_eq!(before.saturating_since(after), Duration::ZERO);
    }
}
