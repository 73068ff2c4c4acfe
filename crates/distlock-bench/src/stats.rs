//! Latency samples and their percentiles.

use std::time::Duration;

/// Latencies in nanoseconds (exact: a bench run holds at most a few
/// million samples).
#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    nanos: Vec<u64>,
    sorted: bool,
}

impl Samples {
    /// Records one latency.
    pub(crate) fn push(&mut self, latency: Duration) {
        self.nanos
            .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        self.sorted = false;
    }

    /// Adds all of `other`'s samples.
    pub(crate) fn extend(&mut self, other: Samples) {
        self.nanos.extend(other.nanos);
        self.sorted = false;
    }

    /// How many samples.
    pub(crate) fn len(&self) -> usize {
        self.nanos.len()
    }

    /// The `q`-quantile (nearest rank) in microseconds, `None` when empty.
    pub(crate) fn quantile_us(&mut self, q: f64) -> Option<f64> {
        if self.nanos.is_empty() {
            return None;
        }
        if !self.sorted {
            self.nanos.sort_unstable();
            self.sorted = true;
        }
        let rank = (q * self.nanos.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.nanos.len()) - 1;
        Some(self.nanos[index] as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut samples = Samples::default();
        assert_eq!(samples.quantile_us(0.5), None);
        for micros in (1..=100).rev() {
            samples.push(Duration::from_micros(micros));
        }
        assert_eq!(samples.quantile_us(0.5), Some(50.0));
        assert_eq!(samples.quantile_us(0.99), Some(99.0));
        assert_eq!(samples.quantile_us(1.0), Some(100.0));
        assert_eq!(samples.quantile_us(0.0), Some(1.0));
        assert_eq!(samples.len(), 100);
    }
}
