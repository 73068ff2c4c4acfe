//! How the lock and the floor are measured side by side: cyclers (one
//! client bound to one key doing whole acquire + release cycles), timed
//! slices of them run in ABBA order, and the raw round trips.
//!
//! The read and the write round trip are measured once per run, before the
//! scenarios, on one client, alternating sample by sample; their keys and
//! nodes are unique to the run and removed after it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock::{BoxError, LockOptions, Locker};
use tokio::time::Instant;

use crate::floor::RawClient;
use crate::report::RoundTrips;
use crate::runner::Bench;
use crate::stats::Samples;

/// Length of one lock or floor slice in the interleaved scenarios.
pub(crate) const SLICE: Duration = Duration::from_millis(250);
/// Unmeasured cycles per client before measuring (connections, script
/// caches, session setup).
const WARM_UP_CYCLES: usize = 20;

/// One client bound to one key, doing whole acquire + release cycles.
#[async_trait]
trait Cycler: Send {
    async fn cycle(&mut self) -> Result<(), BoxError>;
}

#[async_trait]
impl Cycler for Box<dyn RawClient> {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        RawClient::cycle(&mut **self).await
    }
}

/// `lock` + `release` through distlock, checking exclusion on the way.
struct LockCycler {
    locker: Locker,
    key: String,
    options: LockOptions,
    inside: Arc<AtomicUsize>,
    violations: Arc<AtomicU64>,
}

#[async_trait]
impl Cycler for LockCycler {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let guard = self.locker.lock(&self.key, &self.options).await?;
        if self.inside.fetch_add(1, Ordering::SeqCst) != 0 {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        self.inside.fetch_sub(1, Ordering::SeqCst);
        guard.release().await?;
        Ok(())
    }
}

/// What one measured part (lock or floor) produced.
#[derive(Default)]
pub(crate) struct Measured {
    pub(crate) cycles: u64,
    pub(crate) elapsed: Duration,
    pub(crate) samples: Samples,
}

impl Measured {
    pub(crate) fn cycles_per_sec(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.cycles as f64 / self.elapsed.as_secs_f64()
        }
    }

    pub(crate) fn add(&mut self, cycles: u64, elapsed: Duration, samples: Samples) {
        self.cycles += cycles;
        self.elapsed += elapsed;
        self.samples.extend(samples);
    }
}

impl Bench {
    /// p50 of one raw read round trip (PING and the like) and of one raw
    /// durable write (SET and the like), `None` without a server. One
    /// client does both, alternating sample by sample in ABBA order, so
    /// that background load and warm caches hit both alike.
    pub(crate) async fn measure_round_trips(&self) -> Result<RoundTrips, String> {
        let mut client = self.raw_client("rtt").await?;
        let fail = |err: BoxError| format!("raw round trip to {}: {err}", self.redacted());
        let fail_write = |err: BoxError| format!("raw write to {}: {err}", self.redacted());
        let mut with_write = true;
        for _ in 0..WARM_UP_CYCLES {
            if !client.round_trip().await.map_err(fail)? {
                return Ok(RoundTrips::default());
            }
            with_write = client.write_round_trip().await.map_err(fail_write)?;
        }
        let mut reads = Samples::default();
        let mut writes = Samples::default();
        let end = Instant::now() + (self.duration / 10).min(Duration::from_millis(500));
        let mut index = 0usize;
        while Instant::now() < end || reads.len() < 100 || (with_write && writes.len() < 100) {
            let write_first = with_write && index % 2 == 1;
            index += 1;
            for write in [write_first, !write_first] {
                let start = Instant::now();
                if write {
                    if with_write {
                        client.write_round_trip().await.map_err(fail_write)?;
                        writes.push(start.elapsed());
                    }
                } else {
                    client.round_trip().await.map_err(fail)?;
                    reads.push(start.elapsed());
                }
            }
        }
        Ok(RoundTrips {
            read_us: reads.quantile_us(0.5),
            write_us: writes.quantile_us(0.5),
        })
    }

    /// Runs `workers` lock cyclers and as many raw ones, on `workers`
    /// distinct keys each, in alternating slices of `total` (each side gets
    /// `total`). Returns the lock's part (unless floor only), the floor's
    /// part and the violations seen.
    pub(crate) async fn interleaved(
        &self,
        name: &str,
        workers: usize,
        total: Duration,
        with_lock: bool,
    ) -> Result<(Option<Measured>, Measured, u64), String> {
        let with_lock = with_lock && !self.floor_only;
        let violations = Arc::new(AtomicU64::new(0));
        let mut lock_cyclers: Vec<Box<dyn Cycler>> = Vec::new();
        if with_lock {
            for worker in 0..workers {
                lock_cyclers.push(Box::new(LockCycler {
                    locker: self.lock_client().await?,
                    key: format!("{}/{name}/{worker}", self.key_prefix),
                    options: self.options.clone(),
                    inside: Arc::new(AtomicUsize::new(0)),
                    violations: violations.clone(),
                }));
            }
        }
        let mut floor_cyclers: Vec<Box<dyn Cycler>> = Vec::new();
        for worker in 0..workers {
            floor_cyclers.push(Box::new(
                self.raw_client(&format!("{name}-{worker}")).await?,
            ));
        }
        for cycler in lock_cyclers.iter_mut().chain(floor_cyclers.iter_mut()) {
            for _ in 0..WARM_UP_CYCLES {
                cycler
                    .cycle()
                    .await
                    .map_err(|err| format!("warm-up cycle: {err}"))?;
            }
        }

        let slices = (total.as_secs_f64() / SLICE.as_secs_f64()).round().max(1.0) as u32;
        let slice = total / slices;
        let mut lock = Measured::default();
        let mut floor = Measured::default();
        for index in 0..slices {
            // ABBA order, so drift in background load cancels out.
            let lock_first = index % 2 == 1;
            for part in [lock_first, !lock_first] {
                if part && with_lock {
                    self.progress.set_message(format!("{name}: lock"));
                    let (back, cycles, elapsed, samples) = run_slice(lock_cyclers, slice).await?;
                    lock_cyclers = back;
                    lock.add(cycles, elapsed, samples);
                } else if !part {
                    self.progress.set_message(format!("{name}: raw floor"));
                    let (back, cycles, elapsed, samples) = run_slice(floor_cyclers, slice).await?;
                    floor_cyclers = back;
                    floor.add(cycles, elapsed, samples);
                }
            }
        }
        let lock = with_lock.then_some(lock);
        Ok((lock, floor, violations.load(Ordering::SeqCst)))
    }
}

/// Runs every cycler as its own task until `length` has passed; gives the
/// cyclers back with the cycles, the time it took and the latencies.
async fn run_slice(
    cyclers: Vec<Box<dyn Cycler>>,
    length: Duration,
) -> Result<(Vec<Box<dyn Cycler>>, u64, Duration, Samples), String> {
    let started = Instant::now();
    let end = started + length;
    let tasks: Vec<_> = cyclers
        .into_iter()
        .map(|mut cycler| {
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut outcome = Ok(());
                while Instant::now() < end {
                    let start = Instant::now();
                    if let Err(err) = cycler.cycle().await {
                        outcome = Err(err.to_string());
                        break;
                    }
                    samples.push(start.elapsed());
                }
                (cycler, samples, outcome)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    let mut all = Samples::default();
    let mut first_error = None;
    for task in tasks {
        let (cycler, samples, outcome) = task
            .await
            .map_err(|err| format!("bench worker panicked: {err}"))?;
        back.push(cycler);
        all.extend(samples);
        if let Err(err) = outcome {
            first_error.get_or_insert(err);
        }
    }
    if let Some(err) = first_error {
        return Err(format!("cycle failed: {err}"));
    }
    let cycles = all.len() as u64;
    Ok((back, cycles, started.elapsed(), all))
}
