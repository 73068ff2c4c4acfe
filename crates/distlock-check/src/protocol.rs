//! The JSON lines between the hub and a worker: the worker's stdout
//! carries [`ToHub`], its stdin [`ToWorker`]. A worker has at most one
//! request (register or counter) outstanding, so replies need no ids.

use serde::{Deserialize, Serialize};

use crate::history::Step;
use crate::Timestamp;

/// What the worker needs to know, sent as its first stdin line (so the
/// worker command line stays the caller's own).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct WorkerSettings {
    pub worker: usize,
    pub url: String,
    pub key: String,
    pub ttl_ms: u64,
    pub wait_ms: u64,
}

/// A line on a worker's stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ToHub {
    /// A step of the worker's own (no reply).
    Step {
        cycle: u64,
        at: Timestamp,
        #[serde(flatten)]
        step: Step,
    },
    /// Read the fenced register; reply [`ToWorker::RegisterValue`].
    ReadRegister { cycle: u64, token: u64 },
    /// Write the fenced register; reply [`ToWorker::WriteOutcome`].
    WriteRegister {
        cycle: u64,
        sent_at: Timestamp,
        token: u64,
        value: u64,
    },
    /// Read the unfenced counter; reply [`ToWorker::CounterValue`].
    ReadCounter { cycle: u64 },
    /// Write the unfenced counter; reply [`ToWorker::WriteOutcome`].
    WriteCounter {
        cycle: u64,
        sent_at: Timestamp,
        value: u64,
    },
}

/// A line on a worker's stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ToWorker {
    /// The first line.
    Settings(WorkerSettings),
    RegisterValue {
        value: u64,
    },
    WriteOutcome {
        accepted: bool,
    },
    CounterValue {
        value: u64,
    },
    /// Finish the cycle in hand (release), then exit.
    Stop,
}
