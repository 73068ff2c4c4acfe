//! `distlock bench`: the command line of the `distlock-bench` crate, which
//! measures lock+unlock cycles per second and cycle latency of a backend,
//! next to the raw protocol floor of the same server measured in the same
//! run. This module turns the flags into a `distlock_bench::Config` and
//! the crate's errors into exit statuses.

use std::process::ExitCode;
use std::time::Duration;

use crate::{describe, exit_code_for, resolve_url, EXIT_USAGE};

/// Arguments of `distlock bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The lock service, e.g. redis://127.0.0.1:6379 or
    /// etcd://127.0.0.1:2379/bench [default: $DISTLOCK_URL, else the local-file
    /// default].
    #[arg(long, env = "DISTLOCK_URL", hide_env_values = true)]
    url: Option<String>,
    /// Run one scenario (default: uncontended, contended and spread).
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
    /// Locks the hold scenario takes and holds at once (for --duration).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    locks: u32,
    /// The locks' TTL [default: distlock's, 30s].
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
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
    /// With an http:// URL (the lock service): the backend the service
    /// fronts, e.g. redis://127.0.0.1:6379. Its raw cycle, beside the
    /// service's HTTP round trip, is the floor.
    #[arg(long)]
    behind: Option<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("bad duration `{text}`: {err}"))
}

/// The tokio runtime flavour (`distlock_bench::Runtime` as a flag value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Runtime {
    /// One thread: workers are tasks, no cross-core wake-ups.
    CurrentThread,
    /// tokio's work-stealing pool, one thread per core.
    MultiThread,
}

impl From<Runtime> for distlock_bench::Runtime {
    fn from(runtime: Runtime) -> Self {
        match runtime {
            Runtime::CurrentThread => distlock_bench::Runtime::CurrentThread,
            Runtime::MultiThread => distlock_bench::Runtime::MultiThread,
        }
    }
}

/// A bench scenario (`distlock_bench::Scenario` as a flag value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// One worker, one key.
    Uncontended,
    /// N workers, one key, 1 ms hold and 1 ms pause.
    Contended,
    /// N workers on N keys.
    Spread,
    /// One client takes --locks locks, holds them for --duration, releases
    /// them: memory, server requests and CPU per held lock.
    Hold,
}

impl From<Scenario> for distlock_bench::Scenario {
    fn from(scenario: Scenario) -> Self {
        match scenario {
            Scenario::Uncontended => distlock_bench::Scenario::Uncontended,
            Scenario::Contended => distlock_bench::Scenario::Contended,
            Scenario::Spread => distlock_bench::Scenario::Spread,
            Scenario::Hold => distlock_bench::Scenario::Hold,
        }
    }
}

impl Args {
    fn into_config(self) -> distlock_bench::Config {
        let mut config = distlock_bench::Config::new(resolve_url(self.url));
        if let Some(one) = self.scenario {
            config.scenarios = vec![one.into()];
        }
        config.workers = usize::from(self.workers);
        config.duration = self.duration;
        config.locks = self.locks as usize;
        config.ttl = self.ttl;
        config.hold = self.hold;
        config.pause = self.pause;
        config.auto_renew = !self.no_auto_renew;
        config.key_prefix = self.key_prefix;
        config.runtime = self.runtime.into();
        config.json = self.json;
        config.floor_only = self.floor_only;
        config.behind = self.behind.clone();
        config
    }
}

/// Exit status of a failing service (sysexits EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status of an internal failure (sysexits EX_SOFTWARE).
const EXIT_SOFTWARE: u8 = 70;

/// Runs `distlock bench`.
pub fn main(args: Args) -> ExitCode {
    if args.duration < Duration::from_millis(100) {
        eprintln!("distlock bench: --duration must be at least 100ms");
        return ExitCode::from(EXIT_USAGE);
    }
    match distlock_bench::run(&args.into_config()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let (code, message) = failure(err);
            eprintln!("distlock bench: {message}");
            ExitCode::from(code)
        }
    }
}

/// The exit status and the one-line message of a failed bench.
fn failure(err: distlock_bench::Error) -> (u8, String) {
    use distlock_bench::Error;
    match err {
        Error::Connect { url, source } => (
            exit_code_for(&source),
            format!("cannot use {url}: {}", describe(&source)),
        ),
        Error::Config(message) => (EXIT_USAGE, message),
        Error::Service(message) => (EXIT_UNAVAILABLE, message),
        err @ Error::Runtime(_) => (EXIT_SOFTWARE, err.to_string()),
        err => (EXIT_SOFTWARE, describe(&err)),
    }
}
