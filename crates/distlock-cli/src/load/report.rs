//! The records of `distlock load`: one per request, their tally, and the
//! summary (human text or JSON).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::Plan;

/// Violations described in full in the summary; more are only counted.
const VIOLATIONS_SHOWN: usize = 20;

/// Where a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Acquire,
    Release,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Acquire => "acquire",
            Phase::Release => "release",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Ok,
    Failed {
        phase: Phase,
        /// `busy` (one attempt found the key held), else the error's kind
        /// as `distlock check` counts them: `timeout`, `not_held`, ...
        kind: &'static str,
        message: String,
    },
}

/// A mutual-exclusion violation seen by this run.
#[derive(Debug, Clone)]
pub(crate) enum Violation {
    /// A request was granted a key while another request of this run still
    /// vouched for its lease on it.
    TwoHolders {
        key: String,
        holder: u64,
        holder_token: u64,
        newcomer: u64,
        newcomer_token: u64,
    },
    /// A grant's fencing token was not above the previous grant's on its
    /// key.
    TokenNotIncreasing {
        key: String,
        previous: u64,
        previous_token: u64,
        request: u64,
        token: u64,
    },
}

impl Violation {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Violation::TwoHolders { .. } => "two_holders",
            Violation::TokenNotIncreasing { .. } => "token_not_increasing",
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Violation::TwoHolders {
                key,
                holder,
                holder_token,
                newcomer,
                newcomer_token,
            } => json!({
                "kind": self.kind(), "key": key,
                "holder": holder, "holder_token": holder_token,
                "newcomer": newcomer, "newcomer_token": newcomer_token,
            }),
            Violation::TokenNotIncreasing {
                key,
                previous,
                previous_token,
                request,
                token,
            } => json!({
                "kind": self.kind(), "key": key,
                "previous": previous, "previous_token": previous_token,
                "request": request, "token": token,
            }),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::TwoHolders {
                key,
                holder,
                holder_token,
                newcomer,
                newcomer_token,
            } => write!(
                f,
                "{key}: request {newcomer} (token {newcomer_token}) was granted while request {holder} (token {holder_token}) still held it"
            ),
            Violation::TokenNotIncreasing {
                key,
                previous,
                previous_token,
                request,
                token,
            } => write!(
                f,
                "{key}: request {request} got token {token}, not above request {previous}'s {previous_token}"
            ),
        }
    }
}

/// One request, as the log and the tally see it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub seq: u64,
    pub key_index: usize,
    pub started_at: SystemTime,
    /// When it started, from the start of the run.
    pub start_offset: Duration,
    pub outcome: Outcome,
    /// The acquire call, granted or not.
    pub acquire: Option<Duration>,
    /// The release call, if the lock was granted.
    pub release: Option<Duration>,
    /// The whole request: acquire, hold and release.
    pub latency: Duration,
    pub fencing_token: Option<u64>,
    /// The lease was no longer vouched for when the hold ended.
    pub lost_during_hold: bool,
    pub violations: Vec<Violation>,
}

impl Record {
    pub(crate) fn new(seq: u64, key_index: usize, started_at: SystemTime) -> Self {
        Record {
            seq,
            key_index,
            started_at,
            start_offset: Duration::ZERO,
            outcome: Outcome::Ok,
            acquire: None,
            release: None,
            latency: Duration::ZERO,
            fencing_token: None,
            lost_during_hold: false,
            violations: Vec::new(),
        }
    }

    /// Marks the request failed in `phase`; no error means one attempt
    /// found the key busy.
    pub(crate) fn fail(&mut self, phase: Phase, err: Option<&distlock::Error>) {
        self.outcome = match err {
            None => Outcome::Failed {
                phase,
                kind: "busy",
                message: "the key is held (one attempt, --wait 0s)".into(),
            },
            Some(err) => Outcome::Failed {
                phase,
                kind: distlock_check::error_kind(err),
                message: crate::describe(err),
            },
        };
    }

    /// Its line in the `--log` file.
    pub(crate) fn to_json(&self, key: &str) -> Value {
        let (outcome, phase, kind, message) = match &self.outcome {
            Outcome::Ok => ("ok", None, None, None),
            Outcome::Failed {
                phase,
                kind,
                message,
            } => ("failed", Some(phase.name()), Some(*kind), Some(message)),
        };
        json!({
            "seq": self.seq,
            "key": key,
            "start": humantime::format_rfc3339_micros(self.started_at).to_string(),
            "start_offset_us": micros(self.start_offset),
            "outcome": outcome,
            "phase": phase,
            "error_kind": kind,
            "error": message,
            "latency_us": micros(self.latency),
            "acquire_us": self.acquire.map(micros),
            "release_us": self.release.map(micros),
            "fencing_token": self.fencing_token,
            "lost_during_hold": self.lost_during_hold,
            "violations": self.violations.iter().map(Violation::to_json).collect::<Vec<_>>(),
        })
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The counts and latency histograms of some requests (one worker's, or
/// the whole run's once merged).
pub(crate) struct Tally {
    pub completed: u64,
    pub successful: u64,
    pub failed: u64,
    /// Failures by `<phase> <kind>`.
    pub errors: BTreeMap<String, u64>,
    pub lost_during_hold: u64,
    /// Granted acquires, in µs.
    pub acquire: Histogram<u64>,
    /// Successful releases, in µs.
    pub release: Histogram<u64>,
    /// Successful requests (acquire + hold + release), in µs.
    pub request: Histogram<u64>,
    pub violations: Vec<Violation>,
    /// Workers that panicked (their requests are missing from the counts).
    pub worker_failures: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits: a fixed bound, never an error.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

impl Tally {
    pub(crate) fn new() -> Self {
        Tally {
            completed: 0,
            successful: 0,
            failed: 0,
            errors: BTreeMap::new(),
            lost_during_hold: 0,
            acquire: histogram(),
            release: histogram(),
            request: histogram(),
            violations: Vec::new(),
            worker_failures: 0,
        }
    }

    pub(crate) fn add(&mut self, record: Record) {
        self.completed += 1;
        self.lost_during_hold += u64::from(record.lost_during_hold);
        if record.fencing_token.is_some() {
            if let Some(acquire) = record.acquire {
                self.acquire.saturating_record(micros(acquire).max(1));
            }
        }
        match &record.outcome {
            Outcome::Ok => {
                self.successful += 1;
                self.request
                    .saturating_record(micros(record.latency).max(1));
            }
            Outcome::Failed { phase, kind, .. } => {
                self.failed += 1;
                *self
                    .errors
                    .entry(format!("{} {kind}", phase.name()))
                    .or_default() += 1;
            }
        }
        let released = !matches!(
            record.outcome,
            Outcome::Failed {
                phase: Phase::Release,
                ..
            }
        );
        if let (Some(release), true) = (record.release, released) {
            self.release.saturating_record(micros(release).max(1));
        }
        self.violations.extend(record.violations);
    }

    pub(crate) fn merge(&mut self, other: Tally) {
        self.completed += other.completed;
        self.successful += other.successful;
        self.failed += other.failed;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.lost_during_hold += other.lost_during_hold;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.acquire.add(&other.acquire);
        let _ = self.release.add(&other.release);
        let _ = self.request.add(&other.request);
        self.violations.extend(other.violations);
        self.worker_failures += other.worker_failures;
    }
}

/// The end of a run.
pub(crate) struct Summary {
    pub plan: Plan,
    pub backend: &'static str,
    /// Whether fencing-token order was checked (backends with strict
    /// fencing only).
    pub tokens_checked: bool,
    pub tally: Tally,
    pub elapsed: Duration,
    pub interrupted: bool,
    pub violations: Vec<Violation>,
}

impl Summary {
    pub(crate) fn new(
        plan: Plan,
        backend: &'static str,
        tokens_checked: bool,
        mut tally: Tally,
        elapsed: Duration,
        interrupted: bool,
    ) -> Self {
        let violations = std::mem::take(&mut tally.violations);
        Summary {
            plan,
            backend,
            tokens_checked,
            tally,
            elapsed,
            interrupted,
            violations,
        }
    }

    fn per_second(&self, count: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            count as f64 / secs
        } else {
            0.0
        }
    }

    fn count_of(&self, kind: &str) -> usize {
        self.violations.iter().filter(|v| v.kind() == kind).count()
    }

    /// The summary as one JSON object (`--json`).
    pub(crate) fn to_json(&self) -> Value {
        let plan = &self.plan;
        json!({
            "url": plan.url,
            "backend": self.backend,
            "prefix": plan.prefix,
            "requests": plan.requests,
            "concurrency": plan.concurrency,
            "keys": plan.keys,
            "hold_ms": plan.hold.as_secs_f64() * 1e3,
            "ttl_ms": plan.ttl.as_secs_f64() * 1e3,
            "wait_ms": plan.wait.as_secs_f64() * 1e3,
            "completed": self.tally.completed,
            "successful": self.tally.successful,
            "failed": self.tally.failed,
            "interrupted": self.interrupted,
            "worker_failures": self.tally.worker_failures,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_per_s": self.per_second(self.tally.completed),
            "successful_per_s": self.per_second(self.tally.successful),
            "latency_us": {
                "acquire": percentiles_json(&self.tally.acquire),
                "release": percentiles_json(&self.tally.release),
                "request": percentiles_json(&self.tally.request),
            },
            "errors": self.tally.errors,
            "lost_during_hold": self.tally.lost_during_hold,
            "violations": {
                "total": self.violations.len(),
                "two_holders": self.count_of("two_holders"),
                "token_not_increasing": self.count_of("token_not_increasing"),
                "tokens_checked": self.tokens_checked,
                "first": self.violations.iter().take(VIOLATIONS_SHOWN).map(Violation::to_json).collect::<Vec<_>>(),
            },
        })
    }
}

fn percentiles_json(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return Value::Null;
    }
    json!({
        "count": histogram.len(),
        "p50": histogram.value_at_quantile(0.50),
        "p95": histogram.value_at_quantile(0.95),
        "p99": histogram.value_at_quantile(0.99),
        "max": histogram.max(),
        "mean": histogram.mean(),
    })
}

/// A latency in µs, in the unit that reads best.
fn human_micros(us: u64) -> String {
    match us {
        0..=999 => format!("{us}µs"),
        1_000..=999_999 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn percentiles_row(f: &mut fmt::Formatter<'_>, name: &str, h: &Histogram<u64>) -> fmt::Result {
    if h.is_empty() {
        return writeln!(f, "    {name:<10} -");
    }
    writeln!(
        f,
        "    {name:<10} {:>9} {:>9} {:>9} {:>9}",
        human_micros(h.value_at_quantile(0.50)),
        human_micros(h.value_at_quantile(0.95)),
        human_micros(h.value_at_quantile(0.99)),
        human_micros(h.max()),
    )
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = &self.plan;
        let tally = &self.tally;
        writeln!(
            f,
            "distlock load: {} ({}), {} requests, concurrency {}, {} keys under {}/, hold {}, ttl {}, wait {}",
            plan.url,
            self.backend,
            plan.requests,
            plan.concurrency,
            plan.keys,
            plan.prefix,
            humantime::format_duration(plan.hold),
            humantime::format_duration(plan.ttl),
            humantime::format_duration(plan.wait),
        )?;
        writeln!(
            f,
            "  requests    {} completed ({} successful, {} failed) in {:.2}s{}",
            tally.completed,
            tally.successful,
            tally.failed,
            self.elapsed.as_secs_f64(),
            if self.interrupted {
                ", interrupted"
            } else {
                ""
            },
        )?;
        writeln!(
            f,
            "  throughput  {:.1} requests/s ({:.1} successful/s)",
            self.per_second(tally.completed),
            self.per_second(tally.successful),
        )?;
        writeln!(f, "  latency          p50       p95       p99       max")?;
        percentiles_row(f, "acquire", &tally.acquire)?;
        percentiles_row(f, "release", &tally.release)?;
        percentiles_row(f, "request", &tally.request)?;
        if tally.errors.is_empty() {
            writeln!(f, "  errors      none")?;
        } else {
            let errors: Vec<String> = tally
                .errors
                .iter()
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect();
            writeln!(f, "  errors      {}", errors.join(", "))?;
        }
        writeln!(f, "  leases lost during hold  {}", tally.lost_during_hold)?;
        if tally.worker_failures > 0 {
            writeln!(
                f,
                "  worker failures  {} (their requests are not counted)",
                tally.worker_failures
            )?;
        }
        writeln!(
            f,
            "  violations  {} (two holders of one key at once: {}; fencing token not above the previous grant's: {})",
            self.violations.len(),
            self.count_of("two_holders"),
            if self.tokens_checked {
                self.count_of("token_not_increasing").to_string()
            } else {
                format!("not checked, {} promises no strict fencing", self.backend)
            },
        )?;
        for violation in self.violations.iter().take(VIOLATIONS_SHOWN) {
            writeln!(f, "    {violation}")?;
        }
        if self.violations.len() > VIOLATIONS_SHOWN {
            writeln!(
                f,
                "    ... and {} more",
                self.violations.len() - VIOLATIONS_SHOWN
            )?;
        }
        if self.violations.is_empty() {
            write!(f, "OK: no mutual-exclusion violation")
        } else {
            write!(f, "VIOLATION: mutual exclusion was broken")
        }
    }
}
