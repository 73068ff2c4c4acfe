//! The report: each scenario's figures as one JSON object, and the table
//! (with a note per scenario) printed from those objects at the end.
//!
//! With JSON output the bench prints one object per scenario per line:
//! `backend`, `url`, `scenario`, `workers`, `runtime`, `duration_s`,
//! `auto_renew`, `host_steal_pct` (the share of the machine's CPU time the
//! hypervisor took while the scenario ran, from `/proc/stat`; null
//! elsewhere), `floor_only`, `cycles`, `cycles_per_sec`, `p50_us`,
//! `p99_us`, `violations`, `floor`, `floor_cycles_per_sec`,
//! `floor_p50_us`, `floor_p99_us`, `floor_ratio` (p50 / floor p50; null
//! for contended), `rtt_op`, `rtt_us` (a read), `write_rtt_op`,
//! `write_rtt_us`; for `contended` also `hold_ms`, `pause_ms`, `handoffs`,
//! `handoff_p50_us`, `handoff_p99_us`, `handoff_rtt_ratio`,
//! `handoff_write_rtt_ratio` (handoff p50 / write rtt p50), `probe_rtt_us`
//! and `probe_write_rtt_us` (raw round trips taken during the run by one
//! more client, each after `pause` idle, as a worker's requests start),
//! `handoff_probe_rtt_ratio`, `handoff_probe_write_rtt_ratio`,
//! `handoff_after_release_p50_us`, `handoff_after_release_p99_us` (per
//! handoff: the grant minus the return of the same release, at least 0),
//! `grants_before_release_reply` (the handoffs whose grant came before
//! that return), `release_p50_us`, `regrants`, `per_worker_min`,
//! `per_worker_mean`, `per_worker_max`, `starved_workers` (fewer than a
//! quarter of the mean); for `spread` also `single_worker_cycles_per_sec`,
//! `spread_ratio`, `floor_single_worker_cycles_per_sec`,
//! `floor_spread_ratio`; for `hold` also `locks`, `ttl_ms`,
//! `acquire_s` (all of them, one after another), `first_tenth_acquire_us`
//! and `last_tenth_acquire_us` (mean of the first and last tenth),
//! `release_s`, `bytes_per_lock` (growth of the client's resident
//! memory), `holding_s`, `requests_counter` (which server counter),
//! `idle_requests_per_sec` (the server's rate over an idle stretch before,
//! the client connected), `holding_requests_per_sec`,
//! `net_requests_per_sec` (the difference), `idle_cpu_ms_per_sec`,
//! `holding_cpu_ms_per_sec` (the client process's CPU time per second),
//! `lost` (locks found lost at the end of the hold) and
//! `release_errors`. Lock figures are null when only the floor is
//! measured, `rtt_us` and `write_rtt_us` without a server.

use serde_json::{json, Map, Value};

use crate::measure::Measured;
use crate::runner::Bench;
use crate::scenario::Handoffs;
use crate::stats::Samples;

/// One scenario's figures; `None` where not measured.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) workers: usize,
    pub(crate) lock: Option<Measured>,
    pub(crate) violations: u64,
    pub(crate) floor: Measured,
    pub(crate) rtt: RoundTrips,
    pub(crate) contended: Option<ContendedFigures>,
    pub(crate) spread: Option<SpreadFigures>,
    pub(crate) hold: Option<HoldFigures>,
    /// The share of CPU time the hypervisor took while it ran (Linux).
    pub(crate) steal_pct: Option<f64>,
}

/// p50s of the raw read and write round trips, `None` without a server.
#[derive(Clone, Copy, Default)]
pub(crate) struct RoundTrips {
    pub(crate) read_us: Option<f64>,
    pub(crate) write_us: Option<f64>,
}

pub(crate) struct ContendedFigures {
    pub(crate) handoffs: Handoffs,
    /// Raw round trips (reads, writes) a probe client made during the
    /// run, each after a `pause` of its own like the workers'.
    pub(crate) probe: (Samples, Samples),
    /// Latency of `release` alone: the part of a handoff before the lock
    /// is free on the server.
    pub(crate) releases: Samples,
    pub(crate) per_worker: Vec<u64>,
}

/// What holding many locks cost (the `hold` scenario's module says how
/// each is measured).
pub(crate) struct HoldFigures {
    pub(crate) locks: usize,
    pub(crate) ttl: std::time::Duration,
    pub(crate) acquire: std::time::Duration,
    pub(crate) first_tenth_acquire_us: Option<f64>,
    pub(crate) last_tenth_acquire_us: Option<f64>,
    pub(crate) release: std::time::Duration,
    pub(crate) bytes_per_lock: Option<f64>,
    pub(crate) holding: std::time::Duration,
    pub(crate) idle_requests_per_sec: Option<f64>,
    pub(crate) requests_per_sec: Option<f64>,
    pub(crate) idle_cpu_ms_per_sec: Option<f64>,
    pub(crate) cpu_ms_per_sec: Option<f64>,
    pub(crate) lost: usize,
    pub(crate) release_errors: usize,
}

pub(crate) struct SpreadFigures {
    pub(crate) single_lock_cycles_per_sec: Option<f64>,
    pub(crate) single_floor_cycles_per_sec: f64,
}

impl Bench {
    /// The scenario's JSON object (the fields are in the module docs).
    pub(crate) fn to_json(&self, report: &mut Report) -> Value {
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
        if let Some(hold) = &report.hold {
            let opt = |value: Option<f64>, decimals| json!(value.map(|v| round(v, decimals)));
            put("locks", json!(hold.locks));
            put("ttl_ms", json!(hold.ttl.as_millis() as u64));
            put("acquire_s", json!(round(hold.acquire.as_secs_f64(), 3)));
            put(
                "first_tenth_acquire_us",
                opt(hold.first_tenth_acquire_us, 1),
            );
            put("last_tenth_acquire_us", opt(hold.last_tenth_acquire_us, 1));
            put("release_s", json!(round(hold.release.as_secs_f64(), 3)));
            put("bytes_per_lock", opt(hold.bytes_per_lock, 0));
            put("holding_s", json!(round(hold.holding.as_secs_f64(), 3)));
            put("requests_counter", json!(self.raw.requests_counter()));
            put("idle_requests_per_sec", opt(hold.idle_requests_per_sec, 1));
            put("holding_requests_per_sec", opt(hold.requests_per_sec, 1));
            put(
                "net_requests_per_sec",
                opt(
                    hold.requests_per_sec
                        .zip(hold.idle_requests_per_sec)
                        .map(|(holding, idle)| holding - idle),
                    1,
                ),
            );
            put("idle_cpu_ms_per_sec", opt(hold.idle_cpu_ms_per_sec, 2));
            put("holding_cpu_ms_per_sec", opt(hold.cpu_ms_per_sec, 2));
            put("lost", json!(hold.lost));
            put("release_errors", json!(hold.release_errors));
        }
        Value::Object(object)
    }
}

/// The `hold` scenario's line.
fn hold_note(value: &Value) -> String {
    let f = |key: &str| value.get(key).and_then(Value::as_f64);
    if value.get("locks").is_none() {
        return "hold: nothing to measure without the lock".to_owned();
    }
    format!(
        "hold: {} locks (ttl {} ms) taken in {} s (mean {} µs each over the first tenth, {} µs over the last), released in {} s; {} bytes of client memory per held lock; while holding for {} s: server {} requests/s ({} idle, so {} for the locks; {}), client CPU {} ms/s ({} idle); {} lost, {} failed releases",
        value["locks"],
        value["ttl_ms"],
        fmt_opt(f("acquire_s"), 2),
        fmt_opt(f("first_tenth_acquire_us"), 0),
        fmt_opt(f("last_tenth_acquire_us"), 0),
        fmt_opt(f("release_s"), 2),
        fmt_opt(f("bytes_per_lock"), 0),
        fmt_opt(f("holding_s"), 1),
        fmt_opt(f("holding_requests_per_sec"), 1),
        fmt_opt(f("idle_requests_per_sec"), 1),
        fmt_opt(f("net_requests_per_sec"), 1),
        value["requests_counter"].as_str().unwrap_or("no server counter"),
        fmt_opt(f("holding_cpu_ms_per_sec"), 2),
        fmt_opt(f("idle_cpu_ms_per_sec"), 2),
        value["lost"],
        value["release_errors"],
    )
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Prints the table of `values` (the scenarios' JSON objects) and a note
/// per scenario.
pub(crate) fn print_table(bench: &Bench, values: &[Value]) {
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
        if value["scenario"].as_str() == Some("hold") {
            notes.push(hold_note(value));
            continue;
        }
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
