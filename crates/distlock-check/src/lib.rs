//! `distlock check`: does a lock deployment keep its promises under load
//! and faults?
//!
//! A check runs N worker *processes* against one key of the user's
//! deployment. Each loops: take the lock, read a fenced register passing
//! the fencing token, ask `is_held()`, write the register with the token
//! and bump an unfenced counter (read, then write), release. The parent
//! process is the **hub**: it hosts the register and the counter (both
//! reached over the workers' stdin/stdout as JSON lines), records every
//! step, and with `pause_workers` SIGSTOPs a worker that holds the lock for
//! longer than the TTL. When the run ends, the **checker** reads the
//! history and returns a [`Report`]: double grants, stale writes the
//! register accepted, losses never signalled, lost updates of the counter,
//! unavailability after each fault, hangs, and crashed workers.
//!
//! Every process stamps events with the host's monotonic clock ([`now`]),
//! so events of different processes are ordered without clock sync.
//!
//! ```no_run
//! # async fn demo() -> Result<(), distlock_check::CheckError> {
//! use std::time::Duration;
//! let mut config = distlock_check::CheckConfig::new(
//!     "redis://127.0.0.1:6379",
//!     vec!["/usr/local/bin/distlock".into(), "check-worker".into()],
//! );
//! config.duration = Duration::from_secs(10);
//! let running = distlock_check::start(config).await?;
//! let fault_start = distlock_check::now();
//! // ... kill a leader, restart it ...
//! running.record_fault("leader-kill", fault_start, distlock_check::now());
//! let report = running.finish().await?;
//! assert!(report.violations().is_empty(), "{report}");
//! # Ok(())
//! # }
//! ```
//!
//! The worker side is [`run_worker`]: the program named by
//! [`CheckConfig::worker_command`] must call it (the `distlock` binary
//! does, as its hidden `check-worker` subcommand).

#![warn(missing_docs)]

mod checker;
mod clock;
pub mod history;
mod hub;
mod protocol;
mod report;
mod worker;

use std::ffi::OsString;
use std::time::Duration;

pub use checker::check;
pub use clock::{now, Timestamp};
pub use hub::{start, RunningCheck};
pub use report::{
    DoubleGrant, Hang, Holding, LostUpdates, Report, StaleWrite, Unavailability, UnsignalledLoss,
    WorkerFailure,
};
pub use worker::run_worker;

/// What to run: the deployment, the workload, the faults.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// The lock service, as `distlock::connect` takes it. Must be shared
    /// across processes: `memory://` is refused.
    pub url: String,
    /// The key every worker locks. [`CheckConfig::new`] picks a random
    /// `distlock-check/<hex>`, so concurrent checks do not collide.
    pub key: String,
    /// How many worker processes (at least 1).
    pub workers: usize,
    /// How long the workload runs before the workers are stopped.
    pub duration: Duration,
    /// The lock's TTL (`LockOptions::ttl`).
    pub ttl: Duration,
    /// The bound on each `lock()` (`LockOptions::wait`).
    pub wait: Duration,
    /// SIGSTOP a worker that holds the lock for this long, a few times
    /// over the run; `None` turns pauses off. Longer than the TTL makes
    /// the lease expire under the paused holder.
    pub pause_workers: Option<Duration>,
    /// The worker program and the arguments that make it call
    /// [`run_worker`], e.g. `["/usr/bin/distlock", "check-worker"]`.
    pub worker_command: Vec<OsString>,
    /// How long workers have to release and exit once told to stop;
    /// those still running are killed, and that is reported.
    pub stop_timeout: Duration,
    /// Draw a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

impl CheckConfig {
    /// A config with the defaults: a random key, 4 workers, 30 s, TTL
    /// 2 s, wait 10 s, no pauses, 10 s to stop, progress bar on.
    pub fn new(url: impl Into<String>, worker_command: Vec<OsString>) -> Self {
        CheckConfig {
            url: url.into(),
            key: random_key(),
            workers: 4,
            duration: Duration::from_secs(30),
            ttl: Duration::from_secs(2),
            wait: Duration::from_secs(10),
            pause_workers: None,
            worker_command,
            stop_timeout: Duration::from_secs(10),
            progress: true,
        }
    }

    /// The longest a worker may go without an event before it counts as
    /// hung: a `lock()` may wait `wait`, and a holder's requests and
    /// release are bounded by about one TTL; 2 s more absorbs scheduling
    /// on a loaded host. A worker's own pauses do not count.
    pub fn hang_bound(&self) -> Duration {
        self.wait + self.ttl + Duration::from_secs(2)
    }

    /// Checks the values before anything starts; the error names the
    /// field.
    pub fn validate(&self) -> Result<(), CheckError> {
        let invalid = |message: String| Err(CheckError::Config(message));
        if self.workers == 0 {
            return invalid("workers must be at least 1".into());
        }
        if self.key.is_empty() {
            return invalid("key must not be empty".into());
        }
        if self.duration.is_zero() {
            return invalid("duration must be more than zero".into());
        }
        if self.ttl < Duration::from_millis(10) {
            return invalid(format!("ttl must be at least 10ms, got {:?}", self.ttl));
        }
        if self.wait.is_zero() {
            return invalid("wait must be more than zero".into());
        }
        if self.worker_command.is_empty() {
            return invalid("worker_command must name the worker program".into());
        }
        if let Some(pause) = self.pause_workers {
            if pause.is_zero() {
                return invalid("the pause must be more than zero".into());
            }
            // One pause needs a TTL of warm-up before it and a TTL of
            // recovery after it, inside the run.
            let needed = self.ttl + pause + self.ttl;
            if self.duration < needed {
                return invalid(format!(
                    "duration {:?} is too short to pause a worker: it needs ttl + pause + ttl = {:?}",
                    self.duration, needed
                ));
            }
        }
        Ok(())
    }
}

/// A fresh key `distlock-check/<16 hex digits>`.
pub fn random_key() -> String {
    format!("distlock-check/{:016x}", fastrand::u64(..))
}

/// Why a check could not run (a violation is not an error: it is in the
/// [`Report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The configuration cannot work; the message names the field.
    #[error("{0}")]
    Config(String),
    /// The URL names an in-process backend, which separate worker
    /// processes cannot share.
    #[error("{url} is an in-process lock: the check's workers are separate processes and would not see each other's locks; use a shared service, or file:///some/dir for a local check")]
    NotCrossProcess {
        /// The URL, password redacted.
        url: String,
    },
    /// The lock service could not be used.
    #[error("cannot use {url}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// distlock's error.
        #[source]
        source: Box<distlock::Error>,
    },
    /// A worker process could not be started.
    #[error("cannot start worker {worker} ({program})")]
    Spawn {
        /// The worker.
        worker: usize,
        /// The program run.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the hub or a worker failed (a worker's side).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not the protocol.
    #[error("{0}")]
    Protocol(String),
}

/// The kind of a distlock error, as the report counts them: `timeout`,
/// `not_held`, `unavailable`, `connection`, `backend`, `invalid` or
/// `other`.
pub fn error_kind(err: &distlock::Error) -> &'static str {
    use distlock::Error;
    match err {
        Error::Timeout { .. } => "timeout",
        Error::NotHeld { .. } => "not_held",
        Error::Unavailable { .. } => "unavailable",
        Error::Connection { .. } => "connection",
        Error::Backend { .. } => "backend",
        Error::InvalidKey { .. }
        | Error::InvalidConfig(_)
        | Error::InvalidUrl { .. }
        | Error::FeatureNotEnabled { .. } => "invalid",
        _ => "other",
    }
}

pub(crate) use distlock::error::describe;
