//! `contended`: N workers, each with its own client, on ONE key. Each
//! holds the lock for `hold` (1 ms), releases, and waits `pause` (1 ms)
//! before its next attempt, so the figures measure hand-offs rather than a
//! worker re-taking its own lock. An "inside" counter checks mutual
//! exclusion on every grant. What a handoff is, and how it splits at the
//! return of its release, is in the `handoff` module.
//!
//! The floor of a contended lock is the raw uncontended cycle (the raw
//! protocol has no waiting of its own), and one more client probes the
//! raw round trips during the run, each after `pause` idle.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use distlock::{BoxError, LockOptions, Locker};
use tokio::time::Instant;

use super::handoff::{handoffs, EventKind, Shared};
use super::Scenario;
use crate::floor::RawClient;
use crate::measure::{Measured, SLICE};
use crate::report::{ContendedFigures, Report};
use crate::runner::Bench;
use crate::stats::Samples;

impl Bench {
    pub(super) async fn contended(&mut self) -> Result<Report, String> {
        // The floor of a contended lock is the raw uncontended cycle (the
        // raw protocol has no waiting of its own): reuse this run's, or
        // measure a short one.
        let mut floor = Measured::default();
        if self.single_floor.is_none() {
            let (_, measured, _) = self
                .interleaved("contended-floor", 1, (self.duration / 4).max(SLICE), false)
                .await?;
            floor = measured;
            self.remember_single(None, &mut floor);
        }
        let mut report = Report {
            scenario: Scenario::Contended.name(),
            workers: self.workers,
            floor,
            ..Report::default()
        };
        if self.floor_only {
            return Ok(report);
        }
        self.progress.set_message("contended: lock");
        let key = format!("{}/contended", self.key_prefix);
        let shared = Arc::new(Shared::default());
        let deadline = Instant::now() + self.duration;
        let mut tasks = Vec::new();
        for worker in 0..self.workers {
            let locker = self.lock_client().await?;
            let key = key.clone();
            let options = self.options.clone();
            let shared = shared.clone();
            let (hold, pause) = (self.hold, self.pause);
            tasks.push(tokio::spawn(contended_worker(
                worker, locker, key, options, shared, deadline, hold, pause,
            )));
        }
        let probe = tokio::spawn(round_trip_probe(
            self.raw_client("rtt-probe").await?,
            deadline,
            self.pause,
        ));
        let started = Instant::now();
        let mut lock = Measured::default();
        let mut per_worker = Vec::new();
        let mut releases = Samples::default();
        for task in tasks {
            let (acquisitions, samples, worker_releases) = task
                .await
                .map_err(|err| format!("contended worker panicked: {err}"))??;
            per_worker.push(acquisitions);
            releases.extend(worker_releases);
            lock.add(acquisitions, Duration::ZERO, samples);
        }
        lock.elapsed = started.elapsed().min(self.duration);
        let events = shared.take_events();
        report.violations = shared.violations.load(Ordering::SeqCst);
        report.lock = Some(lock);
        let probe = probe
            .await
            .map_err(|err| format!("round-trip probe panicked: {err}"))?
            .map_err(|err| format!("raw round trip to {}: {err}", self.redacted()))?;
        report.contended = Some(ContendedFigures {
            handoffs: handoffs(&events),
            probe,
            releases,
            per_worker,
        });
        Ok(report)
    }
}

/// Raw round trips during the contended run, on a client of its own: a
/// read and a write, each after `pause` idle, like a worker's requests
/// after its hold or pause. On a virtual machine a round trip that starts
/// from idle costs several times one in a busy loop (the CPUs' idle
/// exit), so a handoff, which starts from idle too, is compared with
/// these as well as with the busy-loop `rtt_us`.
async fn round_trip_probe(
    mut client: Box<dyn RawClient>,
    deadline: Instant,
    pause: Duration,
) -> Result<(Samples, Samples), BoxError> {
    let (mut reads, mut writes) = (Samples::default(), Samples::default());
    let mut with_write = true;
    loop {
        tokio::time::sleep(pause).await;
        if Instant::now() >= deadline {
            break;
        }
        let start = Instant::now();
        if !client.round_trip().await? {
            break;
        }
        reads.push(start.elapsed());
        if with_write {
            tokio::time::sleep(pause).await;
            let start = Instant::now();
            with_write = client.write_round_trip().await?;
            if with_write {
                writes.push(start.elapsed());
            }
        }
    }
    Ok((reads, writes))
}

/// One contended worker: lock, hold, release, pause, until `deadline`.
/// Returns its acquisitions and the time each cycle spent inside distlock
/// (waiting in `lock` plus `release`, not the hold or the pause) and the
/// latency of each `release`.
#[allow(clippy::too_many_arguments)]
async fn contended_worker(
    worker: usize,
    locker: Locker,
    key: String,
    options: LockOptions,
    shared: Arc<Shared>,
    deadline: Instant,
    hold: Duration,
    pause: Duration,
) -> Result<(u64, Samples, Samples), String> {
    let mut acquisitions = 0;
    let mut samples = Samples::default();
    let mut releases = Samples::default();
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        // Dropping a waiting `lock` at the deadline is cancellation safe
        // by contract.
        let guard = tokio::select! {
            guard = locker.lock(&key, &options) => guard.map_err(|err| format!("contended lock on {key}: {err}"))?,
            () = tokio::time::sleep_until(deadline) => break,
        };
        let granted = Instant::now();
        if shared.inside.fetch_add(1, Ordering::SeqCst) != 0 {
            shared.violations.fetch_add(1, Ordering::SeqCst);
        }
        shared.record(worker, EventKind::Grant);
        acquisitions += 1;
        tokio::time::sleep(hold).await;
        shared.inside.fetch_sub(1, Ordering::SeqCst);
        let releasing = Instant::now();
        shared.record(worker, EventKind::ReleaseStart);
        guard
            .release()
            .await
            .map_err(|err| format!("contended release on {key}: {err}"))?;
        shared.record(worker, EventKind::ReleaseReturn);
        let released = releasing.elapsed();
        releases.push(released);
        samples.push((granted - start) + released);
        tokio::time::sleep(pause).await;
    }
    Ok((acquisitions, samples, releases))
}
