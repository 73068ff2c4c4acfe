//! What a run leaves for the checker: every step of every worker, what the
//! hub's register and counter saw, the pauses and other faults, and how
//! each worker ended. All times are on the shared monotonic clock.
//!
//! The types are public so that a history can be built by hand (the
//! checker's tests do) and checked with [`check`](crate::check).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// The record of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct History {
    /// When the workers were started.
    pub started: Timestamp,
    /// When the last worker had exited (or was killed).
    pub ended: Timestamp,
    /// Every step, in the order the hub received them (not necessarily
    /// time order across workers).
    pub events: Vec<Event>,
    /// Faults: the hub's pauses (kind [`PAUSE`]) and those recorded from
    /// outside with [`RunningCheck::record_fault`](crate::RunningCheck::record_fault).
    pub faults: Vec<Fault>,
    /// How each worker ended.
    pub exits: Vec<WorkerExit>,
    /// The unfenced counter's final value.
    pub counter_value: u64,
}

/// The fault kind of the hub's SIGSTOP/SIGCONT of a worker.
pub const PAUSE: &str = "pause";

/// One step of one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The worker (0-based).
    pub worker: usize,
    /// The worker's lock cycle the step belongs to (0 before the first).
    pub cycle: u64,
    /// When it happened: the worker's clock for its own steps, the hub's
    /// arrival time for requests to the register and counter.
    pub at: Timestamp,
    /// What happened.
    pub step: Step,
}

/// What happened in an [`Event`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The worker process runs (before it connects).
    Started,
    /// It connected to the lock service.
    Connected,
    /// It could not connect (it retries).
    ConnectFailed {
        /// The error and its sources.
        error: String,
    },
    /// `lock()` was called.
    LockStarted,
    /// `lock()` returned a guard.
    Acquired {
        /// The guard's fencing token.
        token: u64,
    },
    /// `lock()` failed.
    LockFailed {
        /// The error's kind (see [`error_kind`](crate::error_kind)).
        kind: String,
        /// The error and its sources.
        error: String,
    },
    /// `is_held()` was asked.
    HeldChecked {
        /// Its answer.
        held: bool,
    },
    /// The guard's `lost()` fired.
    Lost {
        /// `lost_reason()`, as text.
        reason: String,
        /// True when the reason is the worker's own release, which is not
        /// a loss.
        released: bool,
    },
    /// `release()` was called.
    ReleaseStarted,
    /// `release()` returned Ok.
    Released,
    /// `release()` failed.
    ReleaseFailed {
        /// The error's kind.
        kind: String,
        /// The error and its sources.
        error: String,
    },
    /// The worker was told to stop and is leaving its loop.
    Stopping,
    /// The hub could not read a line from the worker (counted as an error
    /// of kind `protocol`).
    Unreadable {
        /// The parse error and the line.
        error: String,
    },
    /// The hub answered a read of the fenced register.
    RegisterRead {
        /// The token the read carried.
        token: u64,
        /// The value returned.
        value: u64,
    },
    /// The hub received a write to the fenced register.
    RegisterWritten {
        /// The token the write carried.
        token: u64,
        /// When the worker sent it.
        sent_at: Timestamp,
        /// False when the token was lower than the highest one seen.
        accepted: bool,
    },
    /// The hub answered a read of the unfenced counter.
    CounterRead {
        /// The value returned.
        value: u64,
    },
    /// The hub received a write of the unfenced counter (one increment).
    CounterWritten {
        /// The value written.
        value: u64,
        /// When the worker sent it.
        sent_at: Timestamp,
    },
}

/// A fault window: a pause of a worker, or a fault injected from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// What it was: [`PAUSE`], or the kind given to `record_fault`.
    pub kind: String,
    /// The worker it hit, for pauses.
    pub worker: Option<usize>,
    /// When it began.
    pub started: Timestamp,
    /// When it ended.
    pub ended: Timestamp,
}

impl Fault {
    /// How long it lasted.
    pub fn length(&self) -> Duration {
        self.ended.saturating_since(self.started)
    }
}

/// How a worker process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerExit {
    /// The worker.
    pub worker: usize,
    /// When its exit was seen.
    pub at: Timestamp,
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// It did not exit within the stop bound and was killed.
    pub killed_at_stop: bool,
    /// The last lines it wrote on stderr (for the report of a crash).
    pub stderr_tail: Vec<String>,
}

impl WorkerExit {
    /// Exited with status 0 on its own.
    pub fn clean(&self) -> bool {
        self.code == Some(0) && !self.killed_at_stop
    }
}
