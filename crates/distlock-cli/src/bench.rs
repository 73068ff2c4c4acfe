//! `distlock bench`: lock+unlock cycles per second and cycle latency of a
//! backend, next to the raw protocol floor of the same server measured in
//! the same run.
//!
//! Everything runs on one tokio `current_thread` runtime (`--runtime
//! multi-thread` to compare): workers are
//! tasks, each with its own lock client (its own connection or session),
//! and the raw floor runs on the same runtime with the same shape, so the
//! ratio compares like with like. (On a 2-core machine a multi-thread
//! runtime adds cross-core wake-ups that cost more than a loopback round
//! trip, to the lock and the floor alike.)
//!
//! Scenarios:
//! - `uncontended`: one worker, one key: `lock` + `release` back to back.
//!   The lock and the floor run in alternating slices so that background
//!   load hits both alike.
//! - `contended`: N workers, each with its own client, on ONE key. Each
//!   holds the lock for `--hold` (1 ms), releases, and waits `--pause`
//!   (1 ms) before its next attempt, so the figures measure hand-offs
//!   rather than a worker re-taking its own lock. A handoff is the time
//!   from the moment a holder starts its release to the moment a
//!   *different* worker's `lock` returns (a shared monotonic clock; the
//!   release round trip is included). A handoff splits at the moment that
//!   release *returns* (the releaser learned its write committed): the
//!   rest, grant minus that return (0 when the grant came first), is the
//!   notification delay beyond the release write. An "inside" counter
//!   checks mutual exclusion on every grant.
//! - `spread`: N workers on N distinct keys; total cycles/s and its ratio
//!   to the single-worker rate.
//!
//! The raw floors (see `floor.rs`): Redis `SET NX PX` + an `EVALSHA`
//! compare-and-delete (Redlock: the SETs on every instance in parallel, then the deletes), rtt =
//! `PING`, write rtt = `SET <key> 1` (Redlock: every instance in
//! parallel); ZooKeeper create ephemeral-sequential + getChildren +
//! delete, rtt = exists, write rtt = setData of a persistent node; etcd
//! txn(create_revision == 0 -> put with a lease granted once per client) +
//! delete, rtt = a one-key range, write rtt = a one-key put; memory a
//! keyed lease table (see `floor.rs`); file open + `flock` + a link check
//! (`fstat`) + a fencing counter increment (`flock` + read + write) +
//! unlink + close; no rtt for
//! the last two. The read and the write round trip are measured once per
//! run, before the scenarios, on one client, alternating sample by sample;
//! their keys and nodes are unique to the run and removed after it.
//!
//! `--json` prints one object per scenario per line: `backend`, `url`,
//! `scenario`, `workers`, `runtime`, `duration_s`, `auto_renew`,
//! `host_steal_pct` (the share of the machine's CPU time the hypervisor
//! took while the scenario ran, from `/proc/stat`; null elsewhere),
//! `floor_only`, `cycles`, `cycles_per_sec`, `p50_us`, `p99_us`,
//! `violations`, `floor`, `floor_cycles_per_sec`, `floor_p50_us`,
//! `floor_p99_us`, `floor_ratio` (p50 / floor p50; null for contended),
//! `rtt_op`, `rtt_us` (a read), `write_rtt_op`, `write_rtt_us`; for
//! `contended` also `hold_ms`, `pause_ms`, `handoffs`, `handoff_p50_us`,
//! `handoff_p99_us`, `handoff_rtt_ratio`, `handoff_write_rtt_ratio`
//! (handoff p50 / write rtt p50), `probe_rtt_us` and `probe_write_rtt_us`
//! (raw round trips taken during the run by one more client, each after
//! `--pause` idle, as a worker's requests start), `handoff_probe_rtt_ratio`,
//! `handoff_probe_write_rtt_ratio`, `handoff_after_release_p50_us`,
//! `handoff_after_release_p99_us` (per handoff: the grant minus the return
//! of the same release, at least 0), `grants_before_release_reply` (the
//! handoffs whose grant came before that return), `release_p50_us`,
//! `regrants`, `per_worker_min`, `per_worker_mean`, `per_worker_max`,
//! `starved_workers` (fewer than a quarter of the mean); for `spread` also
//! `single_worker_cycles_per_sec`, `spread_ratio`,
//! `floor_single_worker_cycles_per_sec`, `floor_spread_ratio`. Lock
//! figures are null with `--floor-only`, `rtt_us` and `write_rtt_us`
//! without a server.

mod floor;
mod stats;
mod steal;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distlock::{BoxError, LockOptions, Locker};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::{describe, exit_code_for, resolve_url, EXIT_USAGE};
use floor::{RawClient, RawServer};
use stats::Samples;

/// Length of one lock or floor slice in the interleaved scenarios.
const SLICE: Duration = Duration::from_millis(250);
/// Unmeasured cycles per client before measuring (connections, script
/// caches, session setup).
const WARM_UP_CYCLES: usize = 20;

/// Arguments of `distlock bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The lock service, e.g. redis://127.0.0.1:6379 or
    /// etcd://127.0.0.1:2379/bench [default: $DISTLOCK_URL, else the local-file
    /// default].
    #[arg(long, env = "DISTLOCK_URL", hide_env_values = true)]
    url: Option<String>,
    /// Run one scenario (default: all three).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Workers of the contended and spread scenarios, each with its own
    /// client.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,
    /// Measured time of each scenario's lock part (the floor gets as much
    /// again, interleaved).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// How long a contended worker holds the lock.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    hold: Duration,
    /// How long a contended worker waits after a release before trying
    /// again.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pause: Duration,
    /// Take locks without automatic renewal (default: renewal on, as
    /// users get it).
    #[arg(long)]
    no_auto_renew: bool,
    /// Prefix of the lock keys. They are the same in every run (backends
    /// keep a fencing counter per key), so two benches must not share a
    /// server and prefix at once.
    #[arg(long, default_value = "distlock-bench")]
    key_prefix: String,
    /// The tokio runtime flavour of the whole run, lock and floor alike.
    #[arg(long, value_enum, default_value = "current-thread")]
    runtime: Runtime,
    /// Print one JSON object per scenario (one per line) instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure only the raw protocol floor and round trip, not the lock
    /// (e.g. while a backend is not available in this build).
    #[arg(long)]
    floor_only: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("bad duration `{text}`: {err}"))
}

/// The tokio runtime flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Runtime {
    /// One thread: workers are tasks, no cross-core wake-ups.
    CurrentThread,
    /// tokio's work-stealing pool, one thread per core.
    MultiThread,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::CurrentThread => "tokio current_thread",
            Runtime::MultiThread => "tokio multi_thread",
        }
    }
}

/// A bench scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// One worker, one key.
    Uncontended,
    /// N workers, one key, 1 ms hold and 1 ms pause.
    Contended,
    /// N workers on N keys.
    Spread,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Uncontended => "uncontended",
            Scenario::Contended => "contended",
            Scenario::Spread => "spread",
        }
    }
}

/// Runs `distlock bench`.
pub fn main(args: Args) -> ExitCode {
    if args.duration < Duration::from_millis(100) {
        eprintln!("distlock bench: --duration must be at least 100ms");
        return ExitCode::from(EXIT_USAGE);
    }
    let mut builder = match args.runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("distlock bench: cannot start the tokio runtime: {err}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("distlock bench: {message}");
            ExitCode::from(code)
        }
    }
}

/// Exit status of a failing service (sysexits EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status of an internal failure (sysexits EX_SOFTWARE).
const EXIT_SOFTWARE: u8 = 70;

/// Why the bench stopped, and its exit status.
struct Failure {
    code: u8,
    message: String,
}

/// Failures inside a run are the service's (a cycle or a raw client
/// failed).
impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            code: EXIT_UNAVAILABLE,
            message,
        }
    }
}

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
struct Measured {
    cycles: u64,
    elapsed: Duration,
    samples: Samples,
}

impl Measured {
    fn cycles_per_sec(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.cycles as f64 / self.elapsed.as_secs_f64()
        }
    }

    fn add(&mut self, cycles: u64, elapsed: Duration, samples: Samples) {
        self.cycles += cycles;
        self.elapsed += elapsed;
        self.samples.extend(samples);
    }
}

/// One scenario's figures; `None` where not measured.
#[derive(Default)]
struct Report {
    scenario: &'static str,
    workers: usize,
    lock: Option<Measured>,
    violations: u64,
    floor: Measured,
    rtt: RoundTrips,
    contended: Option<ContendedFigures>,
    spread: Option<SpreadFigures>,
    /// The share of CPU time the hypervisor took while it ran (Linux).
    steal_pct: Option<f64>,
}

/// p50s of the raw read and write round trips, `None` without a server.
#[derive(Clone, Copy, Default)]
struct RoundTrips {
    read_us: Option<f64>,
    write_us: Option<f64>,
}

struct ContendedFigures {
    handoffs: Handoffs,
    /// Raw round trips (reads, writes) a probe client made during the
    /// run, each after a `pause` of its own like the workers'.
    probe: (Samples, Samples),
    /// Latency of `release` alone: the part of a handoff before the lock
    /// is free on the server.
    releases: Samples,
    per_worker: Vec<u64>,
}

struct SpreadFigures {
    single_lock_cycles_per_sec: Option<f64>,
    single_floor_cycles_per_sec: f64,
}

struct Bench {
    url: String,
    backend: &'static str,
    raw: RawServer,
    options: LockOptions,
    floor_only: bool,
    workers: usize,
    duration: Duration,
    hold: Duration,
    pause: Duration,
    runtime: Runtime,
    /// Unique to this run: the raw floor's keys.
    namespace: String,
    /// The lock keys' prefix: stable across runs, because backends keep a
    /// fencing counter per key forever.
    key_prefix: String,
    progress: ProgressBar,
    raw_keys: Mutex<Vec<String>>,
    /// This run's single-worker rates and floor (cycles/s, p50, p99).
    single_lock: Option<f64>,
    single_floor: Option<(f64, f64, f64)>,
}

async fn run(mut args: Args) -> Result<(), Failure> {
    let url = resolve_url(args.url.take());
    let redacted = distlock::error::redact_url(&url);
    // The lock first: its errors name bad URLs best.
    let backend = if args.floor_only {
        backend_of_scheme(&url)
    } else {
        let locker = distlock::connect(&url).await.map_err(|err| Failure {
            code: exit_code_for(&err),
            message: format!("cannot use {redacted}: {}", describe(&err)),
        })?;
        locker.backend()
    };
    let raw = RawServer::from_url(&url).map_err(|err| Failure {
        code: EXIT_USAGE,
        message: format!("{redacted}: {err}"),
    })?;
    let scenarios = match args.scenario {
        Some(one) => vec![one],
        None => vec![Scenario::Uncontended, Scenario::Contended, Scenario::Spread],
    };
    // The raw floor's keys are unique to this run and removed after it.
    let namespace = format!(
        "distlock-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let progress = progress_bar(&scenarios, args.duration, args.floor_only);
    let mut bench = Bench {
        url,
        backend,
        raw,
        // The default options (30 s TTL), as most users run them: on etcd
        // this TTL matches the session lease, so no lease is granted per lock.
        options: LockOptions::new().auto_renew(!args.no_auto_renew),
        floor_only: args.floor_only,
        workers: usize::from(args.workers),
        duration: args.duration,
        hold: args.hold,
        pause: args.pause,
        runtime: args.runtime,
        namespace,
        key_prefix: args.key_prefix.clone(),
        progress,
        raw_keys: Mutex::new(Vec::new()),
        single_lock: None,
        single_floor: None,
    };
    let started = Instant::now();
    // Only a visible bar needs ticking (it wakes the runtime 10 times a
    // second, a negligible cost next to the measured work).
    let ticker = (!bench.progress.is_hidden()).then(|| {
        let progress = bench.progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                progress.set_position(started.elapsed().as_millis() as u64);
            }
        })
    });

    let result = bench.run_all(&scenarios, args.json).await;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    bench.progress.finish_and_clear();
    let keys = std::mem::take(&mut *bench.raw_keys.lock().unwrap_or_else(|p| p.into_inner()));
    bench.raw.cleanup(&keys).await;
    let values = result?;
    if !args.json {
        print_table(&bench, &values);
    }
    Ok(())
}

fn backend_of_scheme(url: &str) -> &'static str {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("memory") => "memory",
        Some("file") => "file",
        Some("redis" | "rediss") => "redis",
        Some("redlock") => "redlock",
        Some("zk" | "zookeeper") => "zookeeper",
        Some("etcd") => "etcd",
        _ => "unknown",
    }
}

fn progress_bar(scenarios: &[Scenario], duration: Duration, floor_only: bool) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let parts = if floor_only { 1 } else { 2 };
    let planned: Duration = scenarios
        .iter()
        .map(|scenario| match scenario {
            Scenario::Uncontended => duration * parts,
            // Without `uncontended` first, spread measures a single-worker
            // baseline of half its length.
            Scenario::Spread if !scenarios.contains(&Scenario::Uncontended) => {
                duration * parts * 3 / 2
            }
            Scenario::Spread => duration * parts,
            Scenario::Contended => duration + duration / 4,
        })
        .sum::<Duration>()
        + Duration::from_millis(500);
    let bar = ProgressBar::new(planned.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg:<32} [{bar:30}] {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

impl Bench {
    async fn run_all(
        &mut self,
        scenarios: &[Scenario],
        json_lines: bool,
    ) -> Result<Vec<Value>, String> {
        self.progress.set_message("round trip");
        let rtt = self.measure_round_trips().await?;
        let mut values = Vec::new();
        for &scenario in scenarios {
            let cpu_before = steal::CpuTimes::now();
            let mut report = match scenario {
                Scenario::Uncontended => self.uncontended().await?,
                Scenario::Contended => self.contended().await?,
                Scenario::Spread => self.spread().await?,
            };
            report.steal_pct = steal::CpuTimes::now()
                .zip(cpu_before)
                .and_then(|(after, before)| after.steal_pct_since(before));
            report.rtt = rtt;
            let value = self.to_json(&mut report);
            if json_lines {
                self.progress.suspend(|| println!("{value}"));
            }
            values.push(value);
        }
        Ok(values)
    }

    fn raw_key(&self, name: &str) -> String {
        let key = format!("{}-{name}", self.namespace);
        self.raw_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(key.clone());
        key
    }

    async fn raw_client(&self, name: &str) -> Result<Box<dyn RawClient>, String> {
        let key = self.raw_key(name);
        self.raw
            .client(&key)
            .await
            .map_err(|err| format!("raw client of {}: {err}", self.redacted()))
    }

    fn redacted(&self) -> String {
        distlock::error::redact_url(&self.url)
    }

    async fn lock_client(&self) -> Result<Locker, String> {
        distlock::connect(&self.url)
            .await
            .map_err(|err| format!("cannot connect to {}: {err}", self.redacted()))
    }

    /// p50 of one raw read round trip (PING and the like) and of one raw
    /// durable write (SET and the like), `None` without a server. One
    /// client does both, alternating sample by sample in ABBA order, so
    /// that background load and warm caches hit both alike.
    async fn measure_round_trips(&self) -> Result<RoundTrips, String> {
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
    /// `total`). Returns the lock's part (unless `--floor-only`), the
    /// floor's part and the violations seen.
    async fn interleaved(
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

    async fn uncontended(&mut self) -> Result<Report, String> {
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

    async fn spread(&mut self) -> Result<Report, String> {
        if self.single_floor.is_none() {
            let (lock, mut floor, _) = self
                .interleaved("spread-single", 1, self.duration / 2, true)
                .await?;
            self.remember_single(lock.as_ref(), &mut floor);
        }
        let (lock, floor, violations) = self
            .interleaved("spread", self.workers, self.duration, true)
            .await?;
        Ok(Report {
            scenario: Scenario::Spread.name(),
            workers: self.workers,
            lock,
            violations,
            floor,
            spread: Some(SpreadFigures {
                single_lock_cycles_per_sec: self.single_lock,
                single_floor_cycles_per_sec: self.single_floor.map_or(0.0, |(rate, ..)| rate),
            }),
            ..Report::default()
        })
    }

    async fn contended(&mut self) -> Result<Report, String> {
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
        let events = std::mem::take(&mut *shared.events.lock().unwrap_or_else(|p| p.into_inner()));
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

    fn to_json(&self, report: &mut Report) -> Value {
        let mut object = Map::new();
        let mut put = |key: &str, value: Value| {
            object.insert(key.to_owned(), value);
        };
        let info = self.raw.info();
        put("backend", json!(self.backend));
        put("url", json!(self.redacted()));
        put("scenario", json!(report.scenario));
        put("workers", json!(report.workers));
        put("runtime", json!(self.runtime.name()));
        put("duration_s", json!(self.duration.as_secs_f64()));
        put("floor_only", json!(self.floor_only));
        put("auto_renew", json!(self.options.auto_renew));
        put(
            "host_steal_pct",
            json!(report.steal_pct.map(|pct| round(pct, 1))),
        );
        let (p50, p99) = match &mut report.lock {
            Some(lock) => (
                lock.samples.quantile_us(0.5),
                lock.samples.quantile_us(0.99),
            ),
            None => (None, None),
        };
        put(
            "cycles",
            json!(report.lock.as_ref().map(|lock| lock.cycles)),
        );
        put(
            "cycles_per_sec",
            json!(report
                .lock
                .as_ref()
                .map(|lock| round(lock.cycles_per_sec(), 1))),
        );
        put("p50_us", json!(p50.map(|v| round(v, 1))));
        put("p99_us", json!(p99.map(|v| round(v, 1))));
        put(
            "violations",
            json!((!self.floor_only).then_some(report.violations)),
        );
        let (floor_rate, floor_p50, floor_p99) = if report.floor.cycles > 0 {
            (
                report.floor.cycles_per_sec(),
                report.floor.samples.quantile_us(0.5).unwrap_or_default(),
                report.floor.samples.quantile_us(0.99).unwrap_or_default(),
            )
        } else {
            self.single_floor.unwrap_or_default()
        };
        put("floor", json!(info.cycle));
        put("floor_cycles_per_sec", json!(round(floor_rate, 1)));
        put("floor_p50_us", json!(round(floor_p50, 1)));
        put("floor_p99_us", json!(round(floor_p99, 1)));
        // A contended cycle includes waiting for the others: its ratio to
        // the floor would say nothing.
        put(
            "floor_ratio",
            json!(p50
                .filter(|_| floor_p50 > 0.0 && report.contended.is_none())
                .map(|p50| round(p50 / floor_p50, 2))),
        );
        put("rtt_op", json!(info.round_trip));
        put("rtt_us", json!(report.rtt.read_us.map(|v| round(v, 1))));
        put("write_rtt_op", json!(info.write_round_trip));
        put(
            "write_rtt_us",
            json!(report.rtt.write_us.map(|v| round(v, 1))),
        );
        if let Some(contended) = &mut report.contended {
            let handoffs = &mut contended.handoffs;
            let handoff_p50 = handoffs.samples.quantile_us(0.5);
            let ratio_to = |rtt: Option<f64>| {
                json!(handoff_p50
                    .zip(rtt)
                    .filter(|(_, rtt)| *rtt > 0.0)
                    .map(|(handoff, rtt)| round(handoff / rtt, 2)))
            };
            put("hold_ms", json!(self.hold.as_secs_f64() * 1000.0));
            put("pause_ms", json!(self.pause.as_secs_f64() * 1000.0));
            put("handoffs", json!(handoffs.samples.len()));
            put("handoff_p50_us", json!(handoff_p50.map(|v| round(v, 1))));
            put(
                "handoff_p99_us",
                json!(handoffs.samples.quantile_us(0.99).map(|v| round(v, 1))),
            );
            put("handoff_rtt_ratio", ratio_to(report.rtt.read_us));
            put("handoff_write_rtt_ratio", ratio_to(report.rtt.write_us));
            let probe_read = contended.probe.0.quantile_us(0.5);
            let probe_write = contended.probe.1.quantile_us(0.5);
            put("probe_rtt_us", json!(probe_read.map(|v| round(v, 1))));
            put(
                "probe_write_rtt_us",
                json!(probe_write.map(|v| round(v, 1))),
            );
            put("handoff_probe_rtt_ratio", ratio_to(probe_read));
            put("handoff_probe_write_rtt_ratio", ratio_to(probe_write));
            put(
                "handoff_after_release_p50_us",
                json!(handoffs.after_release.quantile_us(0.5).map(|v| round(v, 1))),
            );
            put(
                "handoff_after_release_p99_us",
                json!(handoffs
                    .after_release
                    .quantile_us(0.99)
                    .map(|v| round(v, 1))),
            );
            put(
                "grants_before_release_reply",
                json!(handoffs.grants_before_release_reply),
            );
            put(
                "release_p50_us",
                json!(contended.releases.quantile_us(0.5).map(|v| round(v, 1))),
            );
            put("regrants", json!(handoffs.regrants));
            let min = contended.per_worker.iter().min().copied().unwrap_or(0);
            let max = contended.per_worker.iter().max().copied().unwrap_or(0);
            let mean = contended.per_worker.iter().sum::<u64>() as f64
                / contended.per_worker.len().max(1) as f64;
            put("per_worker_min", json!(min));
            put("per_worker_max", json!(max));
            put("per_worker_mean", json!(round(mean, 1)));
            put(
                "starved_workers",
                json!(contended
                    .per_worker
                    .iter()
                    .filter(|&&n| (n as f64) < mean / 4.0)
                    .count()),
            );
        }
        if let Some(spread) = &report.spread {
            put(
                "single_worker_cycles_per_sec",
                json!(spread.single_lock_cycles_per_sec.map(|v| round(v, 1))),
            );
            put(
                "spread_ratio",
                json!(spread
                    .single_lock_cycles_per_sec
                    .zip(report.lock.as_ref())
                    .filter(|(single, _)| *single > 0.0)
                    .map(|(single, lock)| round(lock.cycles_per_sec() / single, 2))),
            );
            put(
                "floor_single_worker_cycles_per_sec",
                json!(round(spread.single_floor_cycles_per_sec, 1)),
            );
            put(
                "floor_spread_ratio",
                json!((spread.single_floor_cycles_per_sec > 0.0).then(|| round(
                    report.floor.cycles_per_sec() / spread.single_floor_cycles_per_sec,
                    2
                ))),
            );
        }
        Value::Object(object)
    }
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
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

/// What the contended workers share: the exclusion check and the event
/// log (all on one thread, so the log's order is the clock's order).
#[derive(Default)]
struct Shared {
    inside: AtomicUsize,
    violations: AtomicU64,
    events: Mutex<Vec<Event>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum EventKind {
    /// `lock` returned.
    Grant,
    /// The holder is about to call `release`.
    ReleaseStart,
    /// `release` returned: the releaser learned its release committed.
    ReleaseReturn,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    at: Instant,
    worker: usize,
    kind: EventKind,
}

impl Shared {
    fn record(&self, worker: usize, kind: EventKind) {
        let event = Event {
            at: Instant::now(),
            worker,
            kind,
        };
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

/// The contended run's handoffs, decomposed.
#[derive(Debug, Default)]
struct Handoffs {
    /// From the start of a release by one worker to the next grant, when
    /// that grant went to a different worker.
    samples: Samples,
    /// For each of those: the grant minus the return of that same release,
    /// 0 when the grant came first (the notification delay beyond the
    /// release write).
    after_release: Samples,
    /// The handoffs whose grant came before the releaser saw its reply.
    grants_before_release_reply: u64,
    /// Grants that went back to the worker that had just released.
    regrants: u64,
}

/// Decomposes the event log into handoffs.
fn handoffs(events: &[Event]) -> Handoffs {
    let mut events = events.to_vec();
    // Stable: equal instants keep the order they were recorded in.
    events.sort_by_key(|event| event.at);
    // A worker's own events alternate grant, release start, release
    // return: pair each release start with its worker's next return.
    let mut returned_at: Vec<Option<Instant>> = vec![None; events.len()];
    let mut unanswered: HashMap<usize, usize> = HashMap::new();
    for (index, event) in events.iter().enumerate() {
        match event.kind {
            EventKind::ReleaseStart => {
                unanswered.insert(event.worker, index);
            }
            EventKind::ReleaseReturn => {
                if let Some(start) = unanswered.remove(&event.worker) {
                    returned_at[start] = Some(event.at);
                }
            }
            EventKind::Grant => {}
        }
    }
    let mut handoffs = Handoffs::default();
    let mut last_release: Option<usize> = None;
    for (index, event) in events.iter().enumerate() {
        match event.kind {
            EventKind::ReleaseStart => last_release = Some(index),
            EventKind::ReleaseReturn => {}
            EventKind::Grant => {
                let Some(start) = last_release.take() else {
                    continue;
                };
                let release = &events[start];
                if release.worker == event.worker {
                    handoffs.regrants += 1;
                    continue;
                }
                handoffs.samples.push(event.at - release.at);
                // Every release of a finished run returned (a failed one
                // fails the bench), so `None` does not occur.
                if let Some(returned) = returned_at[start] {
                    let after = event.at.saturating_duration_since(returned);
                    if event.at < returned {
                        handoffs.grants_before_release_reply += 1;
                    }
                    handoffs.after_release.push(after);
                }
            }
        }
    }
    handoffs
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

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_table(bench: &Bench, values: &[Value]) {
    let info = bench.raw.info();
    println!(
        "distlock bench  {}  backend {}  runtime {} (lock and floor alike; workers are tasks, one client each)  {:?} per scenario{}",
        bench.redacted(),
        bench.backend,
        bench.runtime.name(),
        bench.duration,
        if bench.floor_only { "  FLOOR ONLY" } else { "" }
    );
    println!(
        "{:<12} {:>7} {:>9} {:>11} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10}",
        "scenario",
        "workers",
        "cycles",
        "cycles/s",
        "p50 µs",
        "p99 µs",
        "floor µs",
        "p50/floor",
        "rtt µs",
        "violations"
    );
    let mut notes = Vec::new();
    for value in values {
        let f = |key: &str| value.get(key).and_then(Value::as_f64);
        println!(
            "{:<12} {:>7} {:>9} {:>11} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10}",
            value["scenario"].as_str().unwrap_or_default(),
            value["workers"].as_u64().unwrap_or_default(),
            value["cycles"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            fmt_opt(f("cycles_per_sec"), 0),
            fmt_opt(f("p50_us"), 1),
            fmt_opt(f("p99_us"), 1),
            fmt_opt(f("floor_p50_us"), 1),
            f("floor_ratio").map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x")),
            fmt_opt(f("rtt_us"), 1),
            value["violations"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        );
        match value["scenario"].as_str() {
            Some("contended") if value.get("handoffs").is_some() => notes.push(format!(
                "contended: {} acquisitions/s; handoff p50 {} µs{}{}, p99 {} µs over {} handoffs (from the start of a release, whose own p50 is {} µs, to another worker's grant){}; after the release returned: p50 {} µs, p99 {} µs ({} grants came before the releaser's reply); acquisitions per worker min {} / mean {} / max {}, {} starved (< mean/4); {} re-grants to the releasing worker; hold {} ms, pause {} ms",
                fmt_opt(f("cycles_per_sec"), 0),
                fmt_opt(f("handoff_p50_us"), 1),
                f("handoff_rtt_ratio").map_or_else(String::new, |ratio| format!(" ({ratio:.2}x rtt)")),
                f("handoff_write_rtt_ratio").map_or_else(String::new, |ratio| format!(" ({ratio:.2}x write rtt)")),
                fmt_opt(f("handoff_p99_us"), 1),
                value["handoffs"],
                fmt_opt(f("release_p50_us"), 1),
                match (f("write_rtt_us"), f("probe_rtt_us")) {
                    (write, Some(probe)) => format!(
                        "{}; in-run round trips after a pause: {probe:.1} µs ({:.2}x){}",
                        write.map_or_else(String::new, |write| format!("; write rtt {write:.1} µs")),
                        f("handoff_probe_rtt_ratio").unwrap_or_default(),
                        f("probe_write_rtt_us").map_or_else(String::new, |w| format!(", write {w:.1} µs ({:.2}x)", f("handoff_probe_write_rtt_ratio").unwrap_or_default())),
                    ),
                    (write, None) => write.map_or_else(String::new, |write| format!("; write rtt {write:.1} µs")),
                },
                fmt_opt(f("handoff_after_release_p50_us"), 1),
                fmt_opt(f("handoff_after_release_p99_us"), 1),
                value["grants_before_release_reply"],
                value["per_worker_min"],
                value["per_worker_mean"],
                value["per_worker_max"],
                value["starved_workers"],
                value["regrants"],
                value["hold_ms"],
                value["pause_ms"],
            )),
            Some("contended") => notes.push(
                "contended: floor only (the raw protocol has no waiting of its own; its floor is the uncontended raw cycle)".to_owned(),
            ),
            Some("spread") => {
                let lock = match f("spread_ratio") {
                    Some(ratio) => format!(
                        "{} cycles/s = {ratio:.2}x the single-worker rate ({}/s); ",
                        fmt_opt(f("cycles_per_sec"), 0),
                        fmt_opt(f("single_worker_cycles_per_sec"), 0),
                    ),
                    None => String::new(),
                };
                notes.push(format!(
                    "spread: {lock}raw floor {}/s = {}x its single-worker rate ({}/s)",
                    fmt_opt(f("floor_cycles_per_sec"), 0),
                    fmt_opt(f("floor_spread_ratio"), 2),
                    fmt_opt(f("floor_single_worker_cycles_per_sec"), 0),
                ));
            }
            _ => {}
        }
    }
    let steal: Vec<String> = values
        .iter()
        .filter_map(|value| {
            let pct = value.get("host_steal_pct")?.as_f64()?;
            Some(format!(
                "{} {pct:.1}%",
                value["scenario"].as_str().unwrap_or_default()
            ))
        })
        .collect();
    if !steal.is_empty() {
        notes.push(format!(
            "CPU time taken by the hypervisor (steal) while each scenario ran: {}; runs with much steal are not comparable",
            steal.join(", ")
        ));
    }
    for note in notes {
        println!("{note}");
    }
    println!(
        "cycle = lock + release (contended: time inside lock and release, without the hold); floor = {}{}{}",
        info.cycle,
        info.round_trip
            .map_or_else(String::new, |op| format!("; rtt = one {op}")),
        info.write_round_trip
            .map_or_else(String::new, |op| format!("; write rtt = one {op}")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events `(micros, worker, kind)`, each `micros` after one origin.
    fn timeline(events: &[(u64, usize, EventKind)]) -> Vec<Event> {
        let origin = Instant::now();
        events
            .iter()
            .map(|&(micros, worker, kind)| Event {
                at: origin + Duration::from_micros(micros),
                worker,
                kind,
            })
            .collect()
    }

    #[test]
    fn a_handoff_splits_at_the_return_of_its_release() {
        use EventKind::{Grant, ReleaseReturn, ReleaseStart};
        let mut events = timeline(&[
            // Worker 0 releases (300 µs); worker 1's grant comes 200 µs
            // after that release returned.
            (0, 0, Grant),
            (1_000, 0, ReleaseStart),
            (1_300, 0, ReleaseReturn),
            (1_500, 1, Grant),
            // Worker 2 is granted before worker 1 sees its release's
            // reply: the part after the release saturates at 0 and counts.
            (2_500, 1, ReleaseStart),
            (2_700, 2, Grant),
            (2_900, 1, ReleaseReturn),
            // Worker 2 takes its own lock again: a regrant, no handoff.
            (3_700, 2, ReleaseStart),
            (3_900, 2, ReleaseReturn),
            (4_000, 2, Grant),
        ]);
        // The log's order is not the clock's under a multi-thread runtime.
        events.reverse();

        let mut handoffs = handoffs(&events);
        assert_eq!(handoffs.samples.len(), 2);
        assert_eq!(handoffs.samples.quantile_us(0.0), Some(200.0));
        assert_eq!(handoffs.samples.quantile_us(1.0), Some(500.0));
        assert_eq!(handoffs.after_release.len(), 2);
        assert_eq!(handoffs.after_release.quantile_us(0.0), Some(0.0));
        assert_eq!(handoffs.after_release.quantile_us(1.0), Some(200.0));
        assert_eq!(handoffs.grants_before_release_reply, 1);
        assert_eq!(handoffs.regrants, 1);
    }

    #[test]
    fn overlapping_releases_pair_with_their_own_worker() {
        use EventKind::{Grant, ReleaseReturn, ReleaseStart};
        // Worker 1 is granted and starts its own release before worker 0's
        // release returns: each handoff measures against its own release.
        let events = timeline(&[
            (0, 0, ReleaseStart),
            (100, 1, Grant),
            (150, 1, ReleaseStart),
            (400, 2, Grant),
            (500, 0, ReleaseReturn),
            (600, 1, ReleaseReturn),
        ]);
        let mut handoffs = handoffs(&events);
        // 0 -> 1: 100 µs, 1 -> 2: 250 µs; both grants precede the reply.
        assert_eq!(handoffs.samples.quantile_us(0.0), Some(100.0));
        assert_eq!(handoffs.samples.quantile_us(1.0), Some(250.0));
        assert_eq!(handoffs.after_release.quantile_us(1.0), Some(0.0));
        assert_eq!(handoffs.grants_before_release_reply, 2);
        assert_eq!(handoffs.regrants, 0);
    }
}
