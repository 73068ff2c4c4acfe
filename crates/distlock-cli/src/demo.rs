//! `distlock demo`: what a lock does for data consistency.
//!
//! Workers read-modify-write one shared record (a value and a version) in
//! a simulated store, with a little latency between the read and the write
//! so that races are real, four ways: no lock, the lock, the lock with a
//! fencing check at the store, and optimistic versioning. One worker pauses
//! once between its read and its write, like a process frozen by a GC pause
//! or a swapped-out VM: on backends whose locks expire by TTL, its lock
//! runs out while it sleeps, and only the fencing check stops its stale
//! write.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::{Backoff, LockOptions, Locker};
use tokio::time::Instant;

use crate::{describe, exit_code_for, resolve_url};

/// Arguments of `distlock demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Lock service URL [default: $DISTLOCK_URL, else file://<temp dir>/distlock]
    #[arg(long, env = "DISTLOCK_URL", value_name = "URL")]
    url: Option<String>,

    /// Concurrent workers, each with its own connection to the lock service.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=256))]
    workers: u16,

    /// How long each of the four strategies runs.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Time between a worker's read and its write (the "modify" step).
    #[arg(long, value_name = "DUR", default_value = "1ms", value_parser = humantime::parse_duration)]
    latency: Duration,

    /// TTL of the locks; the pausing worker sleeps twice this long.
    #[arg(long, value_name = "DUR", default_value = "250ms", value_parser = humantime::parse_duration)]
    ttl: Duration,

    /// Leave out the pausing worker.
    #[arg(long)]
    no_pause: bool,

    /// Give up connecting to the lock service after this long (status 69).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
}

/// Runs `distlock demo`.
pub fn main(args: Args) -> ExitCode {
    crate::run_on_current_thread(run(args))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    NoLock,
    Lock,
    LockAndFencing,
    Optimistic,
}

impl Strategy {
    const ALL: [Strategy; 4] = [
        Strategy::NoLock,
        Strategy::Lock,
        Strategy::LockAndFencing,
        Strategy::Optimistic,
    ];

    fn label(self) -> &'static str {
        match self {
            Strategy::NoLock => "no lock",
            Strategy::Lock => "lock",
            Strategy::LockAndFencing => "lock + fencing",
            Strategy::Optimistic => "optimistic (CAS)",
        }
    }
}

/// The simulated store: one record, plus the highest fencing token it has
/// seen for the fencing strategy.
#[derive(Default)]
struct Store {
    record: Mutex<Record>,
}

#[derive(Clone, Copy, Default)]
struct Record {
    value: u64,
    version: u64,
    highest_token: u64,
}

impl Store {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self) -> (u64, u64) {
        let record = self.record();
        (record.value, record.version)
    }

    fn write(&self, value: u64) {
        let mut record = self.record();
        record.value = value;
        record.version += 1;
    }

    /// A read that presents a fencing token: refused if an newer holder has
    /// been seen. Reads register the token too, so that a stale holder
    /// cannot write between a newer holder's read and its write.
    fn read_fenced(&self, token: u64) -> Option<(u64, u64)> {
        let mut record = self.record();
        if token < record.highest_token {
            return None;
        }
        record.highest_token = token;
        Some((record.value, record.version))
    }

    fn write_fenced(&self, value: u64, token: u64) -> bool {
        let mut record = self.record();
        if token < record.highest_token {
            return false;
        }
        record.highest_token = token;
        record.value = value;
        record.version += 1;
        true
    }

    fn compare_and_set(&self, expected_version: u64, value: u64) -> bool {
        let mut record = self.record();
        if record.version != expected_version {
            return false;
        }
        record.value = value;
        record.version += 1;
        true
    }
}

#[derive(Default)]
struct Tally {
    /// Writes the store accepted, each meant as one increment.
    mutations: u64,
    /// Refused fenced reads/writes, CAS conflicts, lock or release errors.
    errors: u64,
    /// Releases that found the lock already gone (it expired meanwhile).
    late_releases: u64,
    /// Time from the start of an attempt to its accepted write, summed.
    busy: Duration,
    /// The pausing worker's lock expired while it slept.
    pause_lost_lock: bool,
}

struct Row {
    strategy: Strategy,
    tally: Tally,
    final_value: u64,
}

impl Row {
    fn lost_updates(&self) -> u64 {
        self.tally.mutations.saturating_sub(self.final_value)
    }

    fn average(&self) -> Option<Duration> {
        (self.tally.mutations > 0).then(|| self.tally.busy / self.tally.mutations as u32)
    }
}

async fn run(args: Args) -> u8 {
    let url = resolve_url(args.url.clone());
    let redacted = distlock::error::redact_url(&url);
    let mut clients = Vec::new();
    for _ in 0..args.workers {
        match tokio::time::timeout(args.connect_timeout, distlock::connect(&url)).await {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(err)) => {
                eprintln!("distlock: {}", describe(&err));
                return exit_code_for(&err);
            }
            Err(_) => {
                eprintln!(
                    "distlock: no answer from {redacted} within {} (--connect-timeout)",
                    humantime::format_duration(args.connect_timeout)
                );
                return 69;
            }
        }
    }
    let capabilities = clients[0].capabilities();
    let backend = clients[0].backend();
    let pause = (!args.no_pause).then_some(args.ttl * 2);

    println!(
        "distlock demo: {} workers, {} per strategy, {backend} backend at {redacted}",
        args.workers,
        humantime::format_duration(args.duration)
    );
    println!(
        "Each worker repeatedly reads a shared record, waits {} and writes value+1 back.",
        humantime::format_duration(args.latency)
    );
    if let Some(pause) = pause {
        println!(
            "Worker 1 pauses {} once between its read and its write, like a GC pause (lock TTL {}).",
            humantime::format_duration(pause),
            humantime::format_duration(args.ttl)
        );
    }
    println!();

    let mut rows = Vec::new();
    for strategy in Strategy::ALL {
        let row = match run_strategy(strategy, &clients, &args, pause).await {
            Ok(row) => row,
            Err(err) => {
                eprintln!("distlock: {}", describe(&err));
                return exit_code_for(&err);
            }
        };
        rows.push(row);
    }
    print_table(&rows);
    print_legend(&rows, capabilities.ttl_expiry, pause.is_some(), backend);
    0
}

async fn run_strategy(
    strategy: Strategy,
    clients: &[Locker],
    args: &Args,
    pause: Option<Duration>,
) -> distlock::Result<Row> {
    let store = Arc::new(Store::default());
    let key = format!("distlock-demo/record/{:016x}", fastrand::u64(..));
    let deadline = Instant::now() + args.duration;
    let mut tasks = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let worker = Worker {
            strategy,
            client: client.clone(),
            store: store.clone(),
            key: key.clone(),
            latency: args.latency,
            ttl: args.ttl,
            wait: args.duration + Duration::from_secs(30),
            pause: if index == 0 { pause } else { None },
            deadline,
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    let mut tally = Tally::default();
    for task in tasks {
        let worker = task.await.map_err(|err| {
            distlock::Error::InvalidConfig(format!("a demo worker failed: {err}"))
        })??;
        tally.mutations += worker.mutations;
        tally.errors += worker.errors;
        tally.late_releases += worker.late_releases;
        tally.busy += worker.busy;
        tally.pause_lost_lock |= worker.pause_lost_lock;
    }
    let final_value = store.read().0;
    Ok(Row {
        strategy,
        tally,
        final_value,
    })
}

struct Worker {
    strategy: Strategy,
    client: Locker,
    store: Arc<Store>,
    key: String,
    latency: Duration,
    ttl: Duration,
    wait: Duration,
    /// Pause once, on the third attempt, for this long.
    pause: Option<Duration>,
    deadline: Instant,
}

impl Worker {
    async fn run(mut self) -> distlock::Result<Tally> {
        let mut tally = Tally::default();
        let mut attempt = 0u32;
        // Polling backends (file) retry quickly: holds last about a
        // millisecond.
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(10));
        while Instant::now() < self.deadline {
            attempt += 1;
            let pause = if attempt == 3 {
                self.pause.take()
            } else {
                None
            };
            let started = Instant::now();
            let accepted = match self.strategy {
                Strategy::NoLock => {
                    let (value, _) = self.store.read();
                    self.think(pause).await;
                    self.store.write(value + 1);
                    true
                }
                Strategy::Lock | Strategy::LockAndFencing => {
                    // A frozen process renews nothing: the pausing
                    // worker's lock is not renewed.
                    let options = LockOptions::new()
                        .ttl(self.ttl)
                        .wait(self.wait)
                        .auto_renew(pause.is_none())
                        .backoff(backoff.clone());
                    let guard = match self.client.lock(&self.key, &options).await {
                        Ok(guard) => guard,
                        Err(err) if err.is_transient() => {
                            tracing::warn!(error = %describe(&err), "demo: lock failed");
                            tally.errors += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Err(err) => return Err(err),
                    };
                    let token = guard.fencing_token();
                    let accepted = if self.strategy == Strategy::Lock {
                        let (value, _) = self.store.read();
                        self.think(pause).await;
                        self.store.write(value + 1);
                        true
                    } else {
                        match self.store.read_fenced(token) {
                            Some((value, _)) => {
                                self.think(pause).await;
                                self.store.write_fenced(value + 1, token)
                            }
                            None => false,
                        }
                    };
                    if pause.is_some() && !guard.is_held() {
                        tally.pause_lost_lock = true;
                    }
                    match guard.release().await {
                        Ok(()) => {}
                        Err(err) if err.is_not_held() => tally.late_releases += 1,
                        Err(err) => {
                            tracing::warn!(error = %describe(&err), "demo: release failed");
                        }
                    }
                    accepted
                }
                Strategy::Optimistic => {
                    let mut pause = pause;
                    loop {
                        let (value, version) = self.store.read();
                        self.think(pause.take()).await;
                        if self.store.compare_and_set(version, value + 1) {
                            break true;
                        }
                        tally.errors += 1;
                        if Instant::now() >= self.deadline {
                            break false;
                        }
                    }
                }
            };
            if accepted {
                tally.mutations += 1;
                tally.busy += started.elapsed();
            } else if self.strategy == Strategy::LockAndFencing {
                tally.errors += 1;
            }
        }
        Ok(tally)
    }

    /// The "modify" step, plus the pause when it is this worker's turn.
    async fn think(&self, pause: Option<Duration>) {
        tokio::time::sleep(self.latency + pause.unwrap_or_default()).await;
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<18} {:>10} {:>13} {:>17} {:>17}",
        "strategy", "mutations", "lost updates", "errors/conflicts", "avg per mutation"
    );
    for row in rows {
        let average = match row.average() {
            Some(average) => format!("{:.2} ms", average.as_secs_f64() * 1000.0),
            None => "-".to_owned(),
        };
        println!(
            "{:<18} {:>10} {:>13} {:>17} {:>17}",
            row.strategy.label(),
            row.tally.mutations,
            row.lost_updates(),
            row.tally.errors + row.tally.late_releases,
            average
        );
    }
    println!();
}

fn print_legend(rows: &[Row], ttl_expiry: bool, paused: bool, backend: &str) {
    println!("What each row shows (lost updates = accepted writes - final value):");
    for row in rows {
        let lost = row.lost_updates();
        let text = match row.strategy {
            Strategy::NoLock => format!(
                "workers overwrite each other's increments: {lost} of {} writes were lost.",
                row.tally.mutations
            ),
            Strategy::Lock => {
                if row.tally.pause_lost_lock && lost > 0 {
                    format!(
                        "one writer at a time, until the paused worker's lock expired and \
                         another worker took it: the paused worker then wrote a stale value while \
                         the new holder was working, and {lost} update(s) were lost. Its release \
                         found the lock gone ({} late release(s)): too late. A lease alone cannot \
                         stop a writer that does not know it lost the lock.",
                        row.tally.late_releases
                    )
                } else if row.tally.pause_lost_lock {
                    "one writer at a time; the paused worker's lock expired while it slept and it \
                     wrote anyway (its release found the lock gone), but this time no other write \
                     was in flight, so nothing was lost: a race, not a guarantee."
                        .to_owned()
                } else {
                    format!(
                        "one writer at a time: {lost} lost updates; the cost is waiting for the lock."
                    )
                }
            }
            Strategy::LockAndFencing => format!(
                "the store refuses a read or write whose fencing token is older than the newest it \
                 has seen: {} stale operation(s) refused, {} late release(s), {lost} lost updates.",
                row.tally.errors, row.tally.late_releases
            ),
            Strategy::Optimistic => format!(
                "no lock: a write succeeds only if the version is unchanged since the read, \
                 otherwise the worker retries ({} conflicts); needs a store with compare-and-set.",
                row.tally.errors
            ),
        };
        print_wrapped(&format!("  {:<18} ", row.strategy.label()), &text);
    }
    let lock_was_lost = rows.iter().any(|row| row.tally.pause_lost_lock);
    if paused && !lock_was_lost {
        let why = if ttl_expiry {
            "its lock outlived the pause"
        } else {
            "locks do not expire by TTL here: a lock lives as long as its holder's process or session"
        };
        println!();
        print_wrapped(
            "",
            &format!(
                "Note: on the {backend} backend the paused worker kept its lock ({why}), so the \
                 others waited and the fencing check had nothing stale to refuse. To see a stale \
                 writer, try a backend whose locks expire by TTL: `distlock demo --url memory://` \
                 (in-process, no server) or `--url redis://127.0.0.1:6379`."
            ),
        );
    }
}

/// Prints `text` after `lead`, wrapped at 100 columns and indented under
/// its first line.
fn print_wrapped(lead: &str, text: &str) {
    const WIDTH: usize = 100;
    let indent = " ".repeat(lead.chars().count());
    let mut line = lead.to_owned();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            println!("{line}");
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    println!("{line}");
}
