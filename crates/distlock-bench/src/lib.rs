//! The benchmark behind `distlock bench`: lock+unlock cycles per second and
//! cycle latency of a distlock backend, next to the raw protocol floor of
//! the same server measured in the same run.
//!
//! Everything runs on one tokio `current_thread` runtime
//! ([`Runtime::MultiThread`] to compare): workers are tasks, each with its
//! own lock client (its own connection or session), and the raw floor runs
//! on the same runtime with the same shape, so the ratio compares like with
//! like. (On a 2-core machine a multi-thread runtime adds cross-core
//! wake-ups that cost more than a loopback round trip, to the lock and the
//! floor alike.)
//!
//! The [`Scenario`]s are `uncontended`, `contended` and `spread`, and
//! `hold`, which holds [`Config::locks`] locks at once and reports what
//! that costs the client and the server. The raw
//! floor of each backend is the cheapest acquire + release its own client
//! can do, with one raw read and one raw durable write round trip beside it
//! (the `floor` module). The report is a table, or one JSON object per
//! scenario per line (the `report` module lists the fields), on stdout; a
//! progress bar goes to stderr when it is a terminal.
//!
//! ```no_run
//! use distlock_bench::{Config, Scenario};
//!
//! let mut config = Config::new("redis://127.0.0.1:6379");
//! config.scenarios = vec![Scenario::Contended];
//! config.json = true;
//! distlock_bench::run(&config)?;
//! # Ok::<(), distlock_bench::Error>(())
//! ```
//!
//! Cargo features `redis`, `zookeeper`, `etcd` and `file` turn on the
//! distlock backend of that name and, for the servers, the raw client of
//! its floor. `memory://` and the local-file floor need none.

#![warn(missing_docs)]

mod floor;
mod measure;
mod process;
mod report;
mod runner;
mod scenario;
mod server_load;
mod stats;
mod steal;

use std::time::Duration;

pub use scenario::Scenario;

/// What to measure and how; [`Config::new`] gives the defaults of
/// `distlock bench`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The lock service, e.g. `redis://127.0.0.1:6379` or
    /// `etcd://127.0.0.1:2379/bench`.
    pub url: String,
    /// The scenarios to run, in this order (default: all three).
    pub scenarios: Vec<Scenario>,
    /// Workers of the contended and spread scenarios, each with its own
    /// client (default 8; at least 1).
    pub workers: usize,
    /// Measured time of each scenario's lock part; the floor gets as much
    /// again, interleaved (default 5 s; at least 100 ms).
    pub duration: Duration,
    /// Locks the `hold` scenario takes and holds at once (default
    /// 10,000); it holds them for `duration`.
    pub locks: usize,
    /// The locks' TTL (default: distlock's, 30 s).
    pub ttl: Option<Duration>,
    /// How long a contended worker holds the lock (default 1 ms).
    pub hold: Duration,
    /// How long a contended worker waits after a release before trying
    /// again (default 1 ms).
    pub pause: Duration,
    /// Take locks with automatic renewal, as users get them (default
    /// true).
    pub auto_renew: bool,
    /// Prefix of the lock keys (default `distlock-bench`). They are the
    /// same in every run (backends keep a fencing counter per key), so two
    /// benches must not share a server and prefix at once.
    pub key_prefix: String,
    /// The tokio runtime flavour of the whole run, lock and floor alike.
    pub runtime: Runtime,
    /// Print one JSON object per scenario (one per line, as each scenario
    /// ends) instead of a table at the end.
    pub json: bool,
    /// Measure only the raw protocol floor and round trip, not the lock
    /// (e.g. while a backend is not available in this build).
    pub floor_only: bool,
    /// For an `http://` URL (the lock service): the backend the service
    /// fronts, whose raw cycle is the floor beside the service's HTTP
    /// round trip.
    pub behind: Option<String>,
}

impl Config {
    /// The defaults of `distlock bench` for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            scenarios: Scenario::ALL.to_vec(),
            workers: 8,
            duration: Duration::from_secs(5),
            locks: 10_000,
            ttl: None,
            hold: Duration::from_millis(1),
            pause: Duration::from_millis(1),
            auto_renew: true,
            key_prefix: "distlock-bench".to_owned(),
            runtime: Runtime::default(),
            json: false,
            floor_only: false,
            behind: None,
        }
    }
}

/// The tokio runtime flavour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    /// One thread: workers are tasks, no cross-core wake-ups.
    #[default]
    CurrentThread,
    /// tokio's work-stealing pool, one thread per core.
    MultiThread,
}

impl Runtime {
    /// Its name in the report, e.g. `tokio current_thread`.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::CurrentThread => "tokio current_thread",
            Runtime::MultiThread => "tokio multi_thread",
        }
    }
}

/// Why a bench stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot be run: a duration under 100 ms, no
    /// worker, or a URL this build has no raw floor for.
    #[error("{0}")]
    Config(String),
    /// distlock could not open the lock service.
    #[error("cannot use {url}: {source}")]
    Connect {
        /// The service's URL, without its password.
        url: String,
        /// distlock's error (boxed: it is large, and rare).
        source: Box<distlock::Error>,
    },
    /// The service failed during the run: a lock cycle, a raw client or a
    /// round trip.
    #[error("{0}")]
    Service(String),
    /// The tokio runtime could not be started.
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs the bench on a tokio runtime of its own (of
/// [`Config::runtime`]'s flavour) and prints the report on stdout.
///
/// The raw floor's keys and nodes are unique to the run and removed after
/// it, whether it succeeds or not.
pub fn run(config: &Config) -> Result<(), Error> {
    if config.duration < Duration::from_millis(100) {
        return Err(Error::Config(
            "the duration must be at least 100ms".to_owned(),
        ));
    }
    if config.workers == 0 {
        return Err(Error::Config("at least one worker is needed".to_owned()));
    }
    let mut builder = match config.runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder.enable_all().build().map_err(Error::Runtime)?;
    runtime.block_on(runner::run(config))
}
