//! The checker's findings: what ran, what went wrong, and whether any of
//! it breaks what a lock promises ([`Report::violations`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::history::Fault;
use crate::Timestamp;

/// The outcome of a check. `Display` is the human report; serialized, it
/// is the `--json` output (durations in milliseconds).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The lock service, password redacted.
    pub url: String,
    /// The key the workers locked.
    pub key: String,
    /// Worker processes.
    pub workers: usize,
    /// How long the workload ran.
    #[serde(rename = "duration_ms", serialize_with = "ms")]
    pub duration: Duration,
    /// The lock's TTL.
    #[serde(rename = "ttl_ms", serialize_with = "ms")]
    pub ttl: Duration,
    /// The bound of each `lock()`.
    #[serde(rename = "wait_ms", serialize_with = "ms")]
    pub wait: Duration,
    /// The length of each pause, if workers were paused.
    #[serde(rename = "pause_ms", serialize_with = "ms_option")]
    pub pause: Option<Duration>,
    /// When the workers started, on the shared clock (ns); times in the
    /// findings are on the same clock.
    pub started: Timestamp,
    /// Completed cycles: lock() returned a guard and release() returned.
    pub cycles: u64,
    /// Completed cycles per worker.
    pub cycles_per_worker: Vec<u64>,
    /// Register writes accepted.
    pub writes_accepted: u64,
    /// Register writes refused because their token was lower than one
    /// already seen (fencing at work).
    pub writes_refused: u64,
    /// Errors by kind, e.g. `lock timeout`, `release not_held`.
    pub errors: BTreeMap<String, u64>,
    /// Every fault: the hub's pauses and those recorded from outside.
    pub faults: Vec<Fault>,
    /// Per fault kind: how long no lock was granted after each fault
    /// (see [`Unavailability`]).
    pub unavailability: BTreeMap<String, Unavailability>,
    /// Two workers that believed they held the lock at the same time.
    pub double_grants: Vec<DoubleGrant>,
    /// Writes the register accepted from a grant already superseded.
    pub stale_writes_accepted: Vec<StaleWrite>,
    /// Locks taken by another worker while their holder saw no `lost()`
    /// and released with Ok.
    pub unsignalled_losses: Vec<UnsignalledLoss>,
    /// The unfenced counter: increments sent against its final value.
    pub lost_updates: LostUpdates,
    /// Workers silent for longer than the hang bound.
    pub hangs: Vec<Hang>,
    /// The hang bound used.
    #[serde(rename = "hang_bound_ms", serialize_with = "ms")]
    pub hang_bound: Duration,
    /// Workers that crashed, or did not exit when told to stop.
    pub worker_failures: Vec<WorkerFailure>,
}

/// Unavailability after the faults of one kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Unavailability {
    /// Faults of this kind.
    pub faults: usize,
    /// Median of the longest stretch without a grant, from each fault's
    /// start to the first grant after its end.
    #[serde(rename = "p50_ms", serialize_with = "ms")]
    pub p50: Duration,
    /// The longest such time.
    #[serde(rename = "max_ms", serialize_with = "ms")]
    pub max: Duration,
    /// Faults after which no lock was granted before the run ended
    /// (counted until the end in `p50`/`max`).
    pub never_recovered: usize,
}

/// One worker's belief that it held the lock, in one cycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holding {
    /// The worker.
    pub worker: usize,
    /// Its cycle.
    pub cycle: u64,
    /// The grant's fencing token.
    pub token: u64,
    /// When `lock()` returned.
    pub acquired: Timestamp,
    /// Its last positive observation of holding.
    pub believed_until: Timestamp,
}

/// Two beliefs of holding that overlap in time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DoubleGrant {
    /// The earlier grant.
    pub first: Holding,
    /// The later grant.
    pub second: Holding,
    /// How long both beliefs overlapped (pauses cut out).
    #[serde(rename = "overlap_ms", serialize_with = "ms")]
    pub overlap: Duration,
}

/// A register write accepted although a later grant already existed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StaleWrite {
    /// The writer's grant.
    pub writer: Holding,
    /// When the write reached the register.
    pub arrived: Timestamp,
    /// The later grant, acquired before the write arrived.
    pub superseded_by: Holding,
}

/// A lock taken by another while its holder never heard of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnsignalledLoss {
    /// The holder that was not told.
    pub holder: Holding,
    /// The grant that took the lock, before the holder released.
    pub taken_by: Holding,
    /// When the holder's release (which returned Ok) began.
    pub release_started: Timestamp,
}

/// The unfenced counter's tally.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LostUpdates {
    /// Increments written (each read-then-write adds one).
    pub expected: u64,
    /// The counter's final value.
    pub actual: u64,
    /// `expected - actual`: increments overwritten by a concurrent one.
    pub lost: u64,
}

/// A worker that went silent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hang {
    /// The worker.
    pub worker: usize,
    /// Its last event before the silence.
    pub from: Timestamp,
    /// Its next event (or its exit).
    pub to: Timestamp,
    /// The silence, less the worker's own pauses.
    #[serde(rename = "silent_ms", serialize_with = "ms")]
    pub silent: Duration,
}

/// A worker that crashed or had to be killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerFailure {
    /// The worker.
    pub worker: usize,
    /// How it ended, e.g. `exit status 101`, `killed after not stopping`.
    pub outcome: String,
    /// Its last stderr lines.
    pub stderr_tail: Vec<String>,
}

impl Report {
    /// Every broken promise, one line each; empty when the run is clean.
    /// Lost updates count: the workload only writes the counter after
    /// `is_held()`, so a lost one means two workers held at once.
    pub fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.cycles == 0 {
            found.push("no lock cycle completed: nothing was checked".to_owned());
        }
        let mut count = |what: &str, n: usize| {
            if n > 0 {
                found.push(format!("{n} {what}"));
            }
        };
        count("double grant(s)", self.double_grants.len());
        count("stale write(s) accepted", self.stale_writes_accepted.len());
        count("unsignalled loss(es)", self.unsignalled_losses.len());
        count(
            "lost update(s) of the counter",
            self.lost_updates.lost as usize,
        );
        count("hang(s)", self.hangs.len());
        for failure in &self.worker_failures {
            found.push(format!("worker {} {}", failure.worker, failure.outcome));
        }
        found
    }

    /// The report as one JSON object: its fields (durations in
    /// milliseconds, times in nanoseconds of the shared clock) plus
    /// `violations`, the list of [`violations`](Self::violations).
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct WithViolations<'a> {
            #[serde(flatten)]
            report: &'a Report,
            violations: Vec<String>,
        }
        let with = WithViolations {
            report: self,
            violations: self.violations(),
        };
        // Plain data with string keys: serializing it cannot fail.
        serde_json::to_string(&with).expect("a report serializes")
    }

    /// `at` as seconds since the start, for the human report.
    fn since_start(&self, at: Timestamp) -> String {
        format!("+{:.3}s", at.saturating_since(self.started).as_secs_f64())
    }

    fn holding(&self, holding: &Holding) -> String {
        format!(
            "worker {} (cycle {}, token {}) from {} to {}",
            holding.worker,
            holding.cycle,
            holding.token,
            self.since_start(holding.acquired),
            self.since_start(holding.believed_until)
        )
    }
}

/// Findings listed in full before "... and N more".
const LISTED: usize = 5;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "distlock check: {} key {}, {} workers, {}, ttl {}, wait {}",
            self.url,
            self.key,
            self.workers,
            human(self.duration),
            human(self.ttl),
            human(self.wait)
        )?;
        if let Some(pause) = self.pause {
            writeln!(
                f,
                "  pauses of {} (SIGSTOP of a holder, then SIGCONT)",
                human(pause)
            )?;
        }
        let per_worker: Vec<String> = self.cycles_per_worker.iter().map(u64::to_string).collect();
        writeln!(
            f,
            "  cycles                 {} ({} per worker)",
            self.cycles,
            per_worker.join(" / ")
        )?;
        writeln!(
            f,
            "  register writes        {} accepted, {} refused by fencing",
            self.writes_accepted, self.writes_refused
        )?;
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        writeln!(f, "  errors                 {}", none_or(errors.join(", ")))?;
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for fault in &self.faults {
            *by_kind.entry(&fault.kind).or_default() += 1;
        }
        let faults: Vec<String> = by_kind
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        writeln!(f, "  faults                 {}", none_or(faults.join(", ")))?;
        for (kind, unavailable) in &self.unavailability {
            write!(
                f,
                "  unavailable after {kind}: p50 {}, max {}",
                human(unavailable.p50),
                human(unavailable.max)
            )?;
            if unavailable.never_recovered > 0 {
                write!(f, " ({} never recovered)", unavailable.never_recovered)?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  double grants          {}", self.double_grants.len())?;
        for grant in self.double_grants.iter().take(LISTED) {
            writeln!(
                f,
                "    {} overlapped {} for {}",
                self.holding(&grant.first),
                self.holding(&grant.second),
                human(grant.overlap)
            )?;
        }
        more(f, self.double_grants.len())?;
        writeln!(
            f,
            "  stale writes accepted  {}",
            self.stale_writes_accepted.len()
        )?;
        for stale in self.stale_writes_accepted.iter().take(LISTED) {
            writeln!(
                f,
                "    write of {} arrived at {}, after {} was acquired",
                self.holding(&stale.writer),
                self.since_start(stale.arrived),
                self.holding(&stale.superseded_by)
            )?;
        }
        more(f, self.stale_writes_accepted.len())?;
        writeln!(
            f,
            "  unsignalled losses     {}",
            self.unsignalled_losses.len()
        )?;
        for loss in self.unsignalled_losses.iter().take(LISTED) {
            writeln!(
                f,
                "    {} was taken by {}; no lost() and release at {} returned Ok",
                self.holding(&loss.holder),
                self.holding(&loss.taken_by),
                self.since_start(loss.release_started)
            )?;
        }
        more(f, self.unsignalled_losses.len())?;
        writeln!(
            f,
            "  lost updates           {} (unfenced counter: {} increments, final value {})",
            self.lost_updates.lost, self.lost_updates.expected, self.lost_updates.actual
        )?;
        writeln!(
            f,
            "  hangs                  {} (bound {})",
            self.hangs.len(),
            human(self.hang_bound)
        )?;
        for hang in self.hangs.iter().take(LISTED) {
            writeln!(
                f,
                "    worker {} silent for {} from {}",
                hang.worker,
                human(hang.silent),
                self.since_start(hang.from)
            )?;
        }
        more(f, self.hangs.len())?;
        for failure in &self.worker_failures {
            writeln!(f, "  worker {} {}", failure.worker, failure.outcome)?;
            for line in &failure.stderr_tail {
                writeln!(f, "    | {line}")?;
            }
        }
        let violations = self.violations();
        if violations.is_empty() {
            write!(f, "OK: no violations")
        } else {
            write!(f, "FAILED: {}", violations.join("; "))
        }
    }
}

fn more(f: &mut fmt::Formatter<'_>, total: usize) -> fmt::Result {
    if total > LISTED {
        writeln!(f, "    ... and {} more", total - LISTED)?;
    }
    Ok(())
}

fn none_or(text: String) -> String {
    if text.is_empty() {
        "none".to_owned()
    } else {
        text
    }
}

/// `1.5s`, `250ms`, `12.3ms`: short and readable.
pub(crate) fn human(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0).replace(".00s", "s")
    } else if ms >= 10.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.1}ms")
    }
}

fn ms_option<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => ms(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// Serializes a duration as milliseconds (a float, so sub-millisecond
/// figures survive).
fn ms<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64() * 1000.0)
}
