//! `spread`: N workers on N distinct keys; total cycles/s and its ratio
//! to the single-worker rate (this run's uncontended one, or a
//! single-worker run of half the duration when `uncontended` did not run
//! first).

use super::Scenario;
use crate::report::{Report, SpreadFigures};
use crate::runner::Bench;

impl Bench {
    pub(super) async fn spread(&mut self) -> Result<Report, String> {
        if self.single_floor.is_none() {
            let (lock, mut floor, _) = self
                .interleaved("spread-single", 1, self.duration / 2, true)
                .await?;
            self.remember_single(lock.as_ref(), &mut floor);
        }
        let (lock, floor, violations) = self
            .interleaved("spread", self.workers, self.duration, true)
            .await?;
        Ok(Report {
            scenario: Scenario::Spread.name(),
            workers: self.workers,
            lock,
            violations,
            floor,
            spread: Some(SpreadFigures {
                single_lock_cycles_per_sec: self.single_lock,
                single_floor_cycles_per_sec: self.single_floor.map_or(0.0, |(rate, ..)| rate),
            }),
            ..Report::default()
        })
    }
}
