//! One run: the state the scenarios share (the URL, the raw server, the
//! options, this run's single-worker figures), the order of the run
//! (round trips, then each scenario, then the report) and the cleanup of
//! the raw floor's keys.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use distlock::{LockOptions, Locker};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::time::Instant;

use crate::floor::{RawClient, RawServer};
use crate::{report, steal, Config, Error, Runtime, Scenario};

/// A run in progress.
pub(crate) struct Bench {
    pub(crate) url: String,
    pub(crate) backend: &'static str,
    pub(crate) raw: RawServer,
    pub(crate) options: LockOptions,
    pub(crate) floor_only: bool,
    pub(crate) workers: usize,
    pub(crate) locks: usize,
    pub(crate) duration: Duration,
    pub(crate) hold: Duration,
    pub(crate) pause: Duration,
    pub(crate) runtime: Runtime,
    /// Unique to this run: the raw floor's keys.
    namespace: String,
    /// The lock keys' prefix: stable across runs, because backends keep a
    /// fencing counter per key forever.
    pub(crate) key_prefix: String,
    pub(crate) progress: ProgressBar,
    raw_keys: Mutex<Vec<String>>,
    /// This run's single-worker rates and floor (cycles/s, p50, p99).
    pub(crate) single_lock: Option<f64>,
    pub(crate) single_floor: Option<(f64, f64, f64)>,
}

/// Runs `config` on the current runtime and prints its report.
pub(crate) async fn run(config: &Config) -> Result<(), Error> {
    let url = config.url.clone();
    let redacted = distlock::error::redact_url(&url);
    // The lock first: its errors name bad URLs best.
    let backend = if config.floor_only {
        backend_of_scheme(&url)
    } else {
        let locker = distlock::connect(&url)
            .await
            .map_err(|source| Error::Connect {
                url: redacted.clone(),
                source: Box::new(source),
            })?;
        locker.backend()
    };
    let raw = RawServer::from_url(&url, config.behind.as_deref())
        .map_err(|err| Error::Config(format!("{redacted}: {err}")))?;
    let scenarios = &config.scenarios;
    // The raw floor's keys are unique to this run and removed after it.
    let namespace = format!(
        "distlock-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let progress = progress_bar(scenarios, config.duration, config.floor_only);
    let mut bench = Bench {
        url,
        backend,
        raw,
        // The default options (30 s TTL), as most users run them: on etcd
        // this TTL matches the session lease, so no lease is granted per lock.
        options: match config.ttl {
            Some(ttl) => LockOptions::new().ttl(ttl),
            None => LockOptions::new(),
        }
        .auto_renew(config.auto_renew),
        floor_only: config.floor_only,
        workers: config.workers,
        locks: config.locks.max(1),
        duration: config.duration,
        hold: config.hold,
        pause: config.pause,
        runtime: config.runtime,
        namespace,
        key_prefix: config.key_prefix.clone(),
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

    let result = bench.run_all(scenarios, config.json).await;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    bench.progress.finish_and_clear();
    let keys = std::mem::take(&mut *bench.raw_keys.lock().unwrap_or_else(|p| p.into_inner()));
    bench.raw.cleanup(&keys).await;
    let values = result.map_err(Error::Service)?;
    if !config.json {
        report::print_table(&bench, &values);
    }
    Ok(())
}

/// The backend a URL names, for a floor-only run (which opens no lock).
fn backend_of_scheme(url: &str) -> &'static str {
    distlock::Service::of_url(url).map_or("unknown", distlock::Service::name)
}

/// A bar on stderr sized to the planned run, hidden unless stderr is a
/// terminal.
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
            // The idle stretch, the hold, and the acquisitions and
            // releases (not counted).
            Scenario::Hold => duration * 3 / 2,
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
    /// The round trips, then each scenario; with `json_lines` each
    /// scenario's line is printed as soon as it ends.
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
            let mut report = self.scenario(scenario).await?;
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

    /// A raw key unique to this run, remembered for the cleanup.
    fn raw_key(&self, name: &str) -> String {
        let key = format!("{}-{name}", self.namespace);
        self.raw_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(key.clone());
        key
    }

    /// A raw client of its own on a key of its own.
    pub(crate) async fn raw_client(&self, name: &str) -> Result<Box<dyn RawClient>, String> {
        let key = self.raw_key(name);
        self.raw
            .client(&key)
            .await
            .map_err(|err| format!("raw client of {}: {err}", self.redacted()))
    }

    /// The URL without its password.
    pub(crate) fn redacted(&self) -> String {
        distlock::error::redact_url(&self.url)
    }

    /// A lock client of its own (its own connection or session).
    pub(crate) async fn lock_client(&self) -> Result<Locker, String> {
        distlock::connect(&self.url)
            .await
            .map_err(|err| format!("cannot connect to {}: {err}", self.redacted()))
    }
}
