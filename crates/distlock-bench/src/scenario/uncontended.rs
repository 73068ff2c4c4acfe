//! `uncontended`: one worker, one key: `lock` + `release` back to back.
//! The lock and the floor run in alternating slices so that background
//! load hits both alike.

use super::Scenario;
use crate::report::Report;
use crate::runner::Bench;

impl Bench {
    pub(super) async fn uncontended(&mut self) -> Result<Report, String> {
        let (lock, mut floor, violations) = self
            .interleaved("uncontended", 1, self.duration, true)
            .await?;
        self.remember_single(lock.as_ref(), &mut floor);
        Ok(Report {
            scenario: Scenario::Uncontended.name(),
            workers: 1,
            lock,
            violations,
            floor,
            ..Report::default()
        })
    }
}
