//! `distlock load`: a load test of any lock URL (the lock service over
//! `http://`, or a backend directly). It runs N acquire -> hold -> release
//! requests, C at a time, over K keys, through the `distlock` facade, and
//! checks mutual exclusion as it goes: two requests of this run holding
//! one key at once, or a grant whose fencing token is not above the
//! previous grant's on that key, is a violation.

mod log;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use distlock::{LockGuard, LockOptions, Locker};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{describe, exit_code_for, resolve_url, EXIT_USAGE};
use log::RequestLog;
use report::{Outcome, Phase, Record, Summary, Tally, Violation};

/// Exit status when some request failed (and no violation was seen).
const EXIT_FAILED_REQUESTS: u8 = 2;
/// Exit status of a mutual-exclusion violation.
const EXIT_VIOLATION: u8 = 1;
/// Exit status when the log file cannot be created (sysexits EX_CANTCREAT).
const EXIT_CANT_CREATE: u8 = 73;
/// Exit status when the log file could not be written (sysexits EX_IOERR).
const EXIT_IO: u8 = 74;

const EXIT_CODES: &str = "\
Exit status:
  0    every request succeeded, no violation
  1    a mutual-exclusion violation: two requests of this run held one key
       at once, or a grant's fencing token was not above the previous
       grant's on its key
  2    no violation, but some requests failed (see the errors by kind)
  64   usage error: bad argument or duration, unknown URL scheme
  69   the lock service is unreachable
  70   internal error (a worker failed; its requests are not counted)
  73   the --log file cannot be created
  74   the --log file could not be written
  130  interrupted by Ctrl-C (the summary covers the requests that ended;
       a second Ctrl-C abandons those in flight)";

/// Arguments of `distlock load`.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// The lock URL under load: the service (http://127.0.0.1:8181) or a
    /// backend directly (redis://, etcd://, zk://, file://, memory://)
    /// [default: $DISTLOCK_URL, else the local-file default].
    #[arg(long, env = "DISTLOCK_URL", hide_env_values = true)]
    url: Option<String>,
    /// How many acquire -> hold -> release requests to run.
    #[arg(long, short = 'n', default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// How many requests run at once.
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// How many keys the requests spread over (request i takes key i mod K);
    /// fewer keys than --concurrency means contention.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    keys: u32,
    /// How long each request holds its lock.
    #[arg(long, value_name = "DUR", default_value = "10ms", value_parser = parse_duration)]
    hold: Duration,
    /// The lease TTL (renewed in the background while held).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,
    /// How long an acquire may wait for its key; 0s makes one attempt
    /// (a busy key then fails the request as `busy`).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    wait: Duration,
    /// The keys are <prefix>/0 .. <prefix>/K-1 [default:
    /// distlock-load/<random>, so concurrent runs do not share keys].
    #[arg(long)]
    prefix: Option<String>,
    /// Write one JSON line per request to FILE: key, outcome, error kind,
    /// latencies in µs, fencing token, start time.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("bad duration `{text}`: {err}"))
}

/// Runs `distlock load`.
pub fn main(args: Args) -> ExitCode {
    let url = resolve_url(args.url.clone());
    let options = LockOptions::new().ttl(args.ttl).wait(args.wait);
    // Checked before connecting, so bad input is named as such.
    if let Err(err) = options.validate() {
        eprintln!("distlock load: {}", describe(&err));
        return ExitCode::from(EXIT_USAGE);
    }
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("distlock-load/{:016x}", fastrand::u64(..)));
    if prefix.is_empty() {
        eprintln!("distlock load: --prefix must not be empty");
        return ExitCode::from(EXIT_USAGE);
    }
    let log = match &args.log {
        None => None,
        Some(path) => match RequestLog::create(path) {
            Ok(log) => Some(log),
            Err(err) => {
                eprintln!("distlock load: --log {}: {err}", path.display());
                return ExitCode::from(EXIT_CANT_CREATE);
            }
        },
    };
    // Several threads, so that the client's own work does not cap the
    // throughput of a service that can take more.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("distlock load: cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    let status = runtime.block_on(async move {
        let locks = match distlock::connect(&url).await {
            Ok(locks) => locks,
            Err(err) => {
                eprintln!("distlock load: {}", describe(&err));
                return exit_code_for(&err);
            }
        };
        let plan = Plan {
            url: locks.url().to_owned(),
            requests: args.requests,
            concurrency: args.concurrency,
            keys: args.keys,
            prefix,
            hold: args.hold,
            ttl: args.ttl,
            wait: args.wait,
        };
        let run = Arc::new(Run::new(locks, options, &plan, log, args.quiet));
        let summary = drive(&run, &plan).await;
        run.progress.finish_and_clear();
        if args.json {
            println!("{}", summary.to_json());
        } else {
            println!("{summary}");
        }
        if let Some(err) = run.log.as_ref().and_then(RequestLog::finish) {
            eprintln!("distlock load: --log: {err}");
            return EXIT_IO;
        }
        if summary.interrupted {
            130
        } else if !summary.violations.is_empty() {
            EXIT_VIOLATION
        } else if summary.tally.worker_failures > 0 {
            // A worker panicked: its requests are missing from the counts.
            70
        } else if summary.tally.failed > 0 {
            EXIT_FAILED_REQUESTS
        } else {
            0
        }
    });
    // In-flight requests abandoned by a second Ctrl-C must not hold up the
    // exit; their locks end with their TTL.
    runtime.shutdown_background();
    ExitCode::from(status)
}

/// What the run is asked to do, as the summary repeats it.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub url: String,
    pub requests: u64,
    pub concurrency: u32,
    pub keys: u32,
    pub prefix: String,
    pub hold: Duration,
    pub ttl: Duration,
    pub wait: Duration,
}

/// The requests that ended so far, as the progress bar shows them.
#[derive(Default)]
struct Counts {
    successful: AtomicU64,
    failed: AtomicU64,
}

/// The progress bar on stderr: `[####    ] 70% (70/100) | Successful: 69
/// | Failed: 1`; hidden with --quiet or when stderr is not a terminal.
fn progress_bar(requests: u64, quiet: bool, counts: &Arc<Counts>) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(requests);
    let counts = counts.clone();
    // The counts are read together when the bar is drawn, so that done,
    // successful and failed always add up.
    let render_counts = move |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
        let successful = counts.successful.load(Ordering::Relaxed);
        let failed = counts.failed.load(Ordering::Relaxed);
        let total = state.len().unwrap_or(0);
        let _ = write!(
            out,
            "({}/{total}) | Successful: {successful} | Failed: {failed}",
            successful + failed
        );
    };
    if let Ok(style) = ProgressStyle::with_template("[{bar:40}] {percent:>3}% {counts} {elapsed}") {
        bar.set_style(
            style
                .progress_chars("## ")
                .with_key("counts", render_counts),
        );
    }
    bar
}

/// Who holds a key in this run right now, as far as this run knows.
#[derive(Default)]
struct KeySlot {
    /// The request holding the key, with its guard, so that a newcomer
    /// can ask whether the holder still vouches for its lease.
    holder: Option<(u64, Arc<LockGuard>)>,
    /// The previous grant on the key: its request and fencing token.
    last_grant: Option<(u64, u64)>,
}

/// The state shared by the workers of one run.
struct Run {
    locks: Locker,
    options: LockOptions,
    hold: Duration,
    keys: Vec<String>,
    slots: Vec<Mutex<KeySlot>>,
    /// Token order is a promise only of backends with strict fencing
    /// (not Redlock's best effort).
    check_tokens: bool,
    requests: u64,
    next: AtomicU64,
    stop: AtomicBool,
    counts: Arc<Counts>,
    progress: ProgressBar,
    log: Option<RequestLog>,
    started: Instant,
}

impl Run {
    fn new(
        locks: Locker,
        options: LockOptions,
        plan: &Plan,
        log: Option<RequestLog>,
        quiet: bool,
    ) -> Self {
        let counts = Arc::new(Counts::default());
        let progress = progress_bar(plan.requests, quiet, &counts);
        let keys: Vec<String> = (0..plan.keys)
            .map(|index| format!("{}/{index}", plan.prefix))
            .collect();
        let slots = keys.iter().map(|_| Mutex::default()).collect();
        Run {
            check_tokens: locks.capabilities().strict_fencing,
            locks,
            options,
            hold: plan.hold,
            keys,
            slots,
            requests: plan.requests,
            next: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            counts,
            progress,
            log,
            started: Instant::now(),
        }
    }

    /// Runs requests until none is left or the run is stopped; returns
    /// this worker's tally.
    async fn worker(self: Arc<Self>) -> Tally {
        let mut tally = Tally::new();
        while !self.stop.load(Ordering::Relaxed) {
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            if seq >= self.requests {
                break;
            }
            let record = self.request(seq).await;
            if let Some(log) = &self.log {
                log.write(&record, &self.keys[record.key_index]);
            }
            let count = match record.outcome {
                Outcome::Ok => &self.counts.successful,
                Outcome::Failed { .. } => &self.counts.failed,
            };
            count.fetch_add(1, Ordering::Relaxed);
            self.progress.inc(1);
            tally.add(record);
        }
        tally
    }

    /// One acquire -> hold -> release request.
    async fn request(&self, seq: u64) -> Record {
        let key_index = (seq % self.keys.len() as u64) as usize;
        let key = &self.keys[key_index];
        let mut record = Record::new(seq, key_index, SystemTime::now());
        let start = Instant::now();
        record.start_offset = start.duration_since(self.started);
        let acquired = if self.options.wait == Some(Duration::ZERO) {
            match self.locks.try_lock(key, &self.options).await {
                Ok(Some(guard)) => Ok(guard),
                Ok(None) => Err(None),
                Err(err) => Err(Some(err)),
            }
        } else {
            self.locks.lock(key, &self.options).await.map_err(Some)
        };
        record.acquire = Some(start.elapsed());
        let guard = match acquired {
            Ok(guard) => Arc::new(guard),
            Err(err) => {
                record.fail(Phase::Acquire, err.as_ref());
                record.latency = start.elapsed();
                return record;
            }
        };
        record.fencing_token = Some(guard.fencing_token());
        record.violations = self.occupy(key_index, seq, &guard);
        if !self.hold.is_zero() {
            tokio::time::sleep(self.hold).await;
        }
        record.lost_during_hold = !guard.is_held();
        // Left before the release is sent: once it is, the next holder may
        // be granted the key at any moment.
        let guard = self.vacate(key_index, seq, guard);
        let release_start = Instant::now();
        let released = match guard {
            Some(guard) => guard.release().await,
            None => Err(distlock::Error::InvalidConfig(
                "internal: the guard was still shared when its hold ended".into(),
            )),
        };
        record.release = Some(release_start.elapsed());
        if let Err(err) = released {
            record.fail(Phase::Release, Some(&err));
        }
        record.latency = start.elapsed();
        record
    }

    /// Takes the key's slot for request `seq` just granted `guard`, and
    /// returns the violations this grant shows: another request of this
    /// run still vouching for the key, or a fencing token not above the
    /// previous grant's.
    fn occupy(&self, key_index: usize, seq: u64, guard: &Arc<LockGuard>) -> Vec<Violation> {
        let mut violations = Vec::new();
        let token = guard.fencing_token();
        let mut slot = self.slots[key_index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A grant whose own lease already ended (a stall longer than its
        // TTL between the grant and here) may be older than one recorded
        // since: it takes no part in the checks.
        if !guard.is_held() {
            return violations;
        }
        if let Some((holder, holder_guard)) = &slot.holder {
            if holder_guard.is_held() {
                violations.push(Violation::TwoHolders {
                    key: self.keys[key_index].clone(),
                    holder: *holder,
                    holder_token: holder_guard.fencing_token(),
                    newcomer: seq,
                    newcomer_token: token,
                });
            }
        }
        if self.check_tokens {
            if let Some((previous, previous_token)) = slot.last_grant {
                if token <= previous_token {
                    violations.push(Violation::TokenNotIncreasing {
                        key: self.keys[key_index].clone(),
                        previous,
                        previous_token,
                        request: seq,
                        token,
                    });
                }
            }
        }
        if slot.last_grant.is_none_or(|(_, previous)| token > previous) {
            slot.last_grant = Some((seq, token));
        }
        // A holder whose lease ended is replaced (its Arc dropped here).
        slot.holder = Some((seq, guard.clone()));
        violations
    }

    /// Leaves the key's slot if request `seq` still has it, and returns the
    /// guard, no longer shared.
    fn vacate(&self, key_index: usize, seq: u64, guard: Arc<LockGuard>) -> Option<LockGuard> {
        let mut slot = self.slots[key_index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot
            .holder
            .as_ref()
            .is_some_and(|(holder, _)| *holder == seq)
        {
            slot.holder = None;
        }
        drop(slot);
        Arc::into_inner(guard)
    }
}

/// Runs the plan: C workers, a first Ctrl-C stops dispatching (requests in
/// flight finish), a second abandons them.
async fn drive(run: &Arc<Run>, plan: &Plan) -> Summary {
    let workers = u64::from(plan.concurrency).min(plan.requests);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        tasks.spawn(run.clone().worker());
    }
    let mut tally = Tally::new();
    let mut interrupted = false;
    let mut abandoned = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(worker)) => tally.merge(worker),
                // Abandoned by a second Ctrl-C: its requests are not counted.
                Some(Err(err)) if err.is_cancelled() => {}
                Some(Err(err)) => {
                    eprintln!("distlock load: a worker failed: {err}");
                    tally.worker_failures += 1;
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c(), if !abandoned => {
                if interrupted {
                    abandoned = true;
                    tasks.abort_all();
                } else {
                    interrupted = true;
                    run.stop.store(true, Ordering::Relaxed);
                    run.progress.suspend(|| eprintln!(
                        "distlock load: interrupted; finishing the requests in flight (Ctrl-C again to abandon them)"
                    ));
                }
            }
        }
    }
    Summary::new(
        plan.clone(),
        run.locks.backend(),
        run.check_tokens,
        tally,
        run.started.elapsed(),
        interrupted,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            url: "memory://".into(),
            requests: 1,
            concurrency: 1,
            keys: 1,
            prefix: format!("load-unit/{:016x}", fastrand::u64(..)),
            hold: Duration::ZERO,
            ttl: Duration::from_secs(10),
            wait: Duration::from_secs(1),
        }
    }

    /// A run over a fresh memory store, and a separate store: two stores
    /// each grant the same key, as a broken backend would.
    async fn run_and_rogue(case: &str) -> (Run, Locker) {
        let tag = fastrand::u64(..);
        let locks = distlock::connect(&format!("memory://load-{case}-{tag}"))
            .await
            .unwrap();
        let rogue = distlock::connect(&format!("memory://load-{case}-rogue-{tag}"))
            .await
            .unwrap();
        let run = Run::new(locks, LockOptions::new(), &plan(), None, true);
        (run, rogue)
    }

    #[tokio::test]
    async fn a_grant_while_the_holder_still_vouches_is_a_violation() {
        let (run, rogue) = run_and_rogue("double").await;
        let key = run.keys[0].clone();
        let first = Arc::new(run.locks.lock(&key, &run.options).await.unwrap());
        assert!(run.occupy(0, 0, &first).is_empty());
        // The rogue store's first token equals the first grant's.
        let second = Arc::new(rogue.lock(&key, &run.options).await.unwrap());
        let violations = run.occupy(0, 1, &second);
        let kinds: Vec<&str> = violations.iter().map(Violation::kind).collect();
        assert_eq!(
            kinds,
            ["two_holders", "token_not_increasing"],
            "{violations:?}"
        );
        assert!(run.vacate(0, 0, first).is_some());
        assert!(run.vacate(0, 1, second).is_some());
        assert!(run.slots[0].lock().unwrap().holder.is_none());
    }

    #[tokio::test]
    async fn a_grant_after_the_holders_lease_ended_is_no_violation() {
        let (run, rogue) = run_and_rogue("expired").await;
        let key = run.keys[0].clone();
        let short = LockOptions::new()
            .ttl(Duration::from_millis(20))
            .auto_renew(false);
        let first = Arc::new(run.locks.lock(&key, &short).await.unwrap());
        assert!(run.occupy(0, 0, &first).is_empty());
        first.lost().await;
        // Two grants on the rogue store first, so its token is above the
        // first grant's, as a next holder's must be.
        for _ in 0..2 {
            let guard = rogue.lock(&key, &run.options).await.unwrap();
            guard.release().await.unwrap();
        }
        let second = Arc::new(rogue.lock(&key, &run.options).await.unwrap());
        assert!(second.fencing_token() > first.fencing_token());
        assert!(run.occupy(0, 1, &second).is_empty());
        // The first request was replaced: its guard is no longer shared.
        assert!(run.vacate(0, 0, first).is_some());
        assert_eq!(
            run.slots[0].lock().unwrap().holder.as_ref().map(|h| h.0),
            Some(1)
        );
    }
}
