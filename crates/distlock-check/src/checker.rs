//! The checker: turns a [`History`] into a [`Report`].
//!
//! Definitions (all times on the shared monotonic clock):
//!
//! - A **grant** is a cycle whose `lock()` returned; it was *acquired*
//!   when `lock()` returned.
//! - A worker's **belief** in a grant runs from its acquisition to its
//!   last positive observation of holding in that cycle: an `is_held()`
//!   that returned true, or the sending of a register or counter write.
//!   The worker's own pauses are cut out of it (a frozen process believes
//!   nothing).
//! - A **double grant** is two grants of different workers whose beliefs
//!   overlap.
//! - A **stale write accepted** is a register write the register accepted
//!   although another worker's grant, acquired after the writer's, had
//!   been acquired before the write arrived at the hub.
//! - An **unsignalled loss** is a grant whose release returned Ok and
//!   whose `lost()` never fired (except for the release itself), although
//!   another worker acquired the lock after it and before its release
//!   began.
//! - **Lost updates** are counter increments written minus the counter's
//!   final value.
//! - **Unavailability** after a fault is the longest stretch without a
//!   grant from the fault's start to the first grant after its end (to
//!   the end of the run if none): a grant that lands just after the start
//!   (a request already committed) does not hide the stall behind it.
//! - A **hang** is a gap between consecutive events of one worker (its
//!   start and its exit included) longer than
//!   [`CheckConfig::hang_bound`], its own pauses excluded.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::history::{Fault, History, Step, PAUSE};
use crate::report::{
    DoubleGrant, Hang, Holding, LostUpdates, Report, StaleWrite, Unavailability, UnsignalledLoss,
    WorkerFailure,
};
use crate::{CheckConfig, Timestamp};

/// What the checker gathers about one cycle of one worker.
#[derive(Default)]
struct Cycle {
    acquired: Option<(Timestamp, u64)>,
    last_positive: Option<Timestamp>,
    /// `lost()` fired for a reason other than the worker's own release.
    lost: bool,
    release_started: Option<Timestamp>,
    released_ok: bool,
    completed: bool,
}

/// Checks `history` of a run made with `config` (see the module docs for
/// the definitions).
pub fn check(history: &History, config: &CheckConfig) -> Report {
    let mut cycles: HashMap<(usize, u64), Cycle> = HashMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut writes = Vec::new();
    let (mut writes_accepted, mut writes_refused, mut increments) = (0, 0, 0);
    for event in &history.events {
        let cycle = cycles.entry((event.worker, event.cycle)).or_default();
        match &event.step {
            Step::Acquired { token } => {
                cycle.acquired = Some((event.at, *token));
                cycle.last_positive = Some(event.at);
            }
            Step::HeldChecked { held: true } => positive(cycle, event.at),
            Step::RegisterWritten {
                sent_at, accepted, ..
            } => {
                positive(cycle, *sent_at);
                if *accepted {
                    writes_accepted += 1;
                    writes.push((event.worker, event.cycle, event.at));
                } else {
                    writes_refused += 1;
                }
            }
            Step::CounterWritten { sent_at, .. } => {
                positive(cycle, *sent_at);
                increments += 1;
            }
            Step::Lost {
                released: false, ..
            } => cycle.lost = true,
            Step::ReleaseStarted => cycle.release_started = Some(event.at),
            Step::Released => {
                cycle.released_ok = true;
                cycle.completed = true;
            }
            Step::ReleaseFailed { kind, .. } => {
                cycle.completed = true;
                *errors.entry(format!("release {kind}")).or_default() += 1;
            }
            Step::LockFailed { kind, .. } => {
                *errors.entry(format!("lock {kind}")).or_default() += 1;
            }
            Step::ConnectFailed { .. } => *errors.entry("connect".into()).or_default() += 1,
            Step::Unreadable { .. } => *errors.entry("protocol".into()).or_default() += 1,
            _ => {}
        }
    }

    let pauses: Vec<&Fault> = history.faults.iter().filter(|f| f.kind == PAUSE).collect();
    let holdings = holdings(&cycles);
    let mut cycles_per_worker = vec![0; config.workers];
    for ((worker, _), cycle) in &cycles {
        if cycle.completed && *worker < cycles_per_worker.len() {
            cycles_per_worker[*worker] += 1;
        }
    }

    Report {
        url: distlock::error::redact_url(&config.url),
        key: config.key.clone(),
        workers: config.workers,
        duration: config.duration,
        ttl: config.ttl,
        wait: config.wait,
        pause: config.pause_workers,
        started: history.started,
        cycles: cycles.values().filter(|cycle| cycle.completed).count() as u64,
        cycles_per_worker,
        writes_accepted,
        writes_refused,
        errors,
        faults: history.faults.clone(),
        unavailability: unavailability(history, &holdings),
        double_grants: double_grants(&holdings, &pauses),
        stale_writes_accepted: stale_writes(&writes, &cycles, &holdings),
        unsignalled_losses: unsignalled_losses(&cycles, &holdings),
        lost_updates: LostUpdates {
            expected: increments,
            actual: history.counter_value,
            lost: increments.saturating_sub(history.counter_value),
        },
        hangs: hangs(history, config, &pauses),
        hang_bound: config.hang_bound(),
        worker_failures: worker_failures(history),
    }
}

fn positive(cycle: &mut Cycle, at: Timestamp) {
    cycle.last_positive = Some(cycle.last_positive.map_or(at, |last| last.max(at)));
}

/// Every grant, in order of acquisition.
fn holdings(cycles: &HashMap<(usize, u64), Cycle>) -> Vec<Holding> {
    let mut holdings: Vec<Holding> = cycles
        .iter()
        .filter_map(|(&(worker, cycle), seen)| {
            let (acquired, token) = seen.acquired?;
            Some(Holding {
                worker,
                cycle,
                token,
                acquired,
                believed_until: seen.last_positive.unwrap_or(acquired),
            })
        })
        .collect();
    holdings.sort_by_key(|holding| (holding.acquired, holding.worker));
    holdings
}

/// The first grant by another worker than `worker` acquired strictly
/// after `after` and strictly before `before`.
fn taken_between(
    holdings: &[Holding],
    worker: usize,
    after: Timestamp,
    before: Timestamp,
) -> Option<&Holding> {
    let from = holdings.partition_point(|holding| holding.acquired <= after);
    holdings[from..]
        .iter()
        .take_while(|holding| holding.acquired < before)
        .find(|holding| holding.worker != worker)
}

/// A belief as time segments: its span less the worker's pauses.
fn belief_segments(holding: &Holding, pauses: &[&Fault]) -> Vec<(Timestamp, Timestamp)> {
    let mut segments = vec![(holding.acquired, holding.believed_until)];
    for pause in pauses
        .iter()
        .filter(|pause| pause.worker == Some(holding.worker))
    {
        segments = segments
            .into_iter()
            .flat_map(|(from, to)| {
                if pause.ended <= from || pause.started >= to {
                    return vec![(from, to)];
                }
                let mut kept = Vec::new();
                if pause.started > from {
                    kept.push((from, pause.started));
                }
                if pause.ended < to {
                    kept.push((pause.ended, to));
                }
                kept
            })
            .collect();
    }
    segments
}

fn double_grants(holdings: &[Holding], pauses: &[&Fault]) -> Vec<DoubleGrant> {
    // Sweep the segments in start order, comparing each with the earlier
    // ones still open; a grant pair is reported once, with its total
    // overlap.
    let mut segments: Vec<(Timestamp, Timestamp, usize)> = holdings
        .iter()
        .enumerate()
        .flat_map(|(index, holding)| {
            belief_segments(holding, pauses)
                .into_iter()
                .map(move |(from, to)| (from, to, index))
        })
        .collect();
    segments.sort();
    let mut overlaps: BTreeMap<(usize, usize), Duration> = BTreeMap::new();
    let mut open: Vec<(Timestamp, Timestamp, usize)> = Vec::new();
    for &(from, to, index) in &segments {
        open.retain(|&(_, open_to, _)| open_to >= from);
        for &(_, open_to, other) in &open {
            if holdings[other].worker != holdings[index].worker {
                let overlap = open_to.min(to).saturating_since(from);
                let pair = (other.min(index), other.max(index));
                *overlaps.entry(pair).or_default() += overlap;
            }
        }
        open.push((from, to, index));
    }
    overlaps
        .into_iter()
        .map(|((first, second), overlap)| DoubleGrant {
            first: holdings[first].clone(),
            second: holdings[second].clone(),
            overlap,
        })
        .collect()
}

fn stale_writes(
    writes: &[(usize, u64, Timestamp)],
    cycles: &HashMap<(usize, u64), Cycle>,
    holdings: &[Holding],
) -> Vec<StaleWrite> {
    writes
        .iter()
        .filter_map(|&(worker, cycle, arrived)| {
            let writer = holdings
                .iter()
                .find(|holding| holding.worker == worker && holding.cycle == cycle)?;
            cycles.get(&(worker, cycle))?.acquired?;
            let later = taken_between(holdings, worker, writer.acquired, arrived)?;
            Some(StaleWrite {
                writer: writer.clone(),
                arrived,
                superseded_by: later.clone(),
            })
        })
        .collect()
}

fn unsignalled_losses(
    cycles: &HashMap<(usize, u64), Cycle>,
    holdings: &[Holding],
) -> Vec<UnsignalledLoss> {
    let mut losses: Vec<UnsignalledLoss> = holdings
        .iter()
        .filter_map(|holder| {
            let cycle = cycles.get(&(holder.worker, holder.cycle))?;
            if cycle.lost || !cycle.released_ok {
                return None;
            }
            let release_started = cycle.release_started?;
            let taken_by =
                taken_between(holdings, holder.worker, holder.acquired, release_started)?;
            Some(UnsignalledLoss {
                holder: holder.clone(),
                taken_by: taken_by.clone(),
                release_started,
            })
        })
        .collect();
    losses.sort_by_key(|loss| loss.holder.acquired);
    losses
}

fn unavailability(history: &History, holdings: &[Holding]) -> BTreeMap<String, Unavailability> {
    let mut gaps: BTreeMap<String, (Vec<Duration>, usize)> = BTreeMap::new();
    for fault in &history.faults {
        let (kind_gaps, never) = gaps.entry(fault.kind.clone()).or_default();
        // The grants from the fault's start through the first one after
        // its end (the recovery); the longest stretch without one, counted
        // from the fault's start, is how long the lock was unavailable. A
        // grant just after the start (a request already committed) does
        // not hide the stall that follows it.
        let first = holdings.partition_point(|h| h.acquired <= fault.started);
        let recovery = first + holdings[first..].partition_point(|h| h.acquired <= fault.ended);
        let (until, recovered) = match holdings.get(recovery) {
            Some(holding) => (holding.acquired, true),
            None => (history.ended, false),
        };
        let mut longest = Duration::ZERO;
        let mut previous = fault.started;
        let grants = holdings[first..recovery.min(holdings.len())]
            .iter()
            .map(|h| h.acquired);
        for at in grants.chain(std::iter::once(until)) {
            longest = longest.max(at.saturating_since(previous));
            previous = at;
        }
        kind_gaps.push(longest);
        if !recovered {
            *never += 1;
        }
    }
    gaps.into_iter()
        .map(|(kind, (mut kind_gaps, never_recovered))| {
            kind_gaps.sort();
            let unavailable = Unavailability {
                faults: kind_gaps.len(),
                p50: kind_gaps[(kind_gaps.len() - 1) / 2],
                max: *kind_gaps.last().expect("a kind has at least one fault"),
                never_recovered,
            };
            (kind, unavailable)
        })
        .collect()
}

fn hangs(history: &History, config: &CheckConfig, pauses: &[&Fault]) -> Vec<Hang> {
    let bound = config.hang_bound();
    let mut times: Vec<Vec<Timestamp>> = vec![vec![history.started]; config.workers];
    for event in &history.events {
        if let Some(worker_times) = times.get_mut(event.worker) {
            worker_times.push(event.at);
        }
    }
    for (worker, worker_times) in times.iter_mut().enumerate() {
        let exit = history.exits.iter().find(|exit| exit.worker == worker);
        worker_times.push(exit.map_or(history.ended, |exit| exit.at));
        worker_times.sort();
    }
    let mut found = Vec::new();
    for (worker, worker_times) in times.iter().enumerate() {
        for pair in worker_times.windows(2) {
            let (from, to) = (pair[0], pair[1]);
            let paused: Duration = pauses
                .iter()
                .filter(|pause| pause.worker == Some(worker))
                .map(|pause| {
                    pause
                        .ended
                        .min(to)
                        .saturating_since(pause.started.max(from))
                })
                .sum();
            let silent = to.saturating_since(from).saturating_sub(paused);
            if silent > bound {
                found.push(Hang {
                    worker,
                    from,
                    to,
                    silent,
                });
            }
        }
    }
    found
}

fn worker_failures(history: &History) -> Vec<WorkerFailure> {
    history
        .exits
        .iter()
        .filter(|exit| !exit.clean())
        .map(|exit| {
            let outcome = match (exit.killed_at_stop, exit.code, exit.signal) {
                (true, _, _) => "did not exit when told to stop and was killed".to_owned(),
                (false, Some(code), _) => format!("crashed: exit status {code}"),
                (false, None, Some(signal)) => format!("crashed: killed by signal {signal}"),
                (false, None, None) => "ended without a status".to_owned(),
            };
            WorkerFailure {
                worker: exit.worker,
                outcome,
                stderr_tail: exit.stderr_tail.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
