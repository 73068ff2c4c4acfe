//! The scenarios, one module each:
//! - `uncontended`: one worker, one key, the lock beside the floor;
//! - `contended`: N workers on ONE key, measured as hand-offs (its
//!   `handoff` module decomposes them);
//! - `spread`: N workers on N distinct keys, against the single-worker
//!   rate;
//! - `hold`: one client holding many locks at once (not in a default
//!   run).
//!
//! They share this run's single-worker figures: whichever scenario
//! measures them first (uncontended, or a shorter run of its own) keeps
//! them for the others.

mod contended;
mod handoff;
mod hold;
mod spread;
mod uncontended;

pub(crate) use handoff::Handoffs;

use crate::measure::Measured;
use crate::report::Report;
use crate::runner::Bench;

/// A bench scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// One worker, one key.
    Uncontended,
    /// N workers, one key, 1 ms hold and 1 ms pause.
    Contended,
    /// N workers on N keys.
    Spread,
    /// One client takes many locks, holds them all, then releases them.
    Hold,
}

impl Scenario {
    /// The cycle scenarios, in the order a full run takes them (`hold` is
    /// run on its own).
    pub const ALL: [Scenario; 3] = [Scenario::Uncontended, Scenario::Contended, Scenario::Spread];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Uncontended => "uncontended",
            Scenario::Contended => "contended",
            Scenario::Spread => "spread",
            Scenario::Hold => "hold",
        }
    }
}

impl Bench {
    /// Runs one scenario.
    pub(crate) async fn scenario(&mut self, scenario: Scenario) -> Result<Report, String> {
        match scenario {
            Scenario::Uncontended => self.uncontended().await,
            Scenario::Contended => self.contended().await,
            Scenario::Spread => self.spread().await,
            Scenario::Hold => self.hold().await,
        }
    }

    /// Keeps a single-worker measurement for the scenarios after it.
    fn remember_single(&mut self, lock: Option<&Measured>, floor: &mut Measured) {
        if let Some(lock) = lock {
            self.single_lock = Some(lock.cycles_per_sec());
        }
        self.single_floor = Some((
            floor.cycles_per_sec(),
            floor.samples.quantile_us(0.5).unwrap_or_default(),
            floor.samples.quantile_us(0.99).unwrap_or_default(),
        ));
    }
}
