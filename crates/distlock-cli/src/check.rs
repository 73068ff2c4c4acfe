//! `distlock check`: the command line of the `distlock-check` crate, which
//! runs a multi-process lock workload against a deployment and checks its
//! history. This module turns flags into a `CheckConfig`, prints the
//! report, and maps the outcome to an exit status; `check-worker` is the
//! hidden subcommand each worker process runs.

use std::process::ExitCode;
use std::time::Duration;

use distlock_check::{CheckConfig, CheckError};
use tokio::signal::unix::{signal, SignalKind};

use crate::{describe, exit_code_for, resolve_url, run_on_current_thread, EXIT_USAGE};

/// Exit status when the check found a violation.
const EXIT_VIOLATION: u8 = 1;
/// Exit status of an internal failure (sysexits EX_SOFTWARE).
const EXIT_SOFTWARE: u8 = 70;

const EXIT_CODES: &str = "\
Exit status:
  0    no violation
  1    a violation: double grant, stale write accepted, unsignalled loss,
       lost update, hang, crashed worker, or no cycle completed
  64   usage error: bad argument or duration, unknown URL scheme, memory://
  69   the lock service is unreachable or failed
  70   internal error (a worker could not be started)
  130  interrupted (the workers were killed)";

/// Arguments of `distlock check`.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// The lock service to check, e.g. redis://127.0.0.1:6379 [default:
    /// $DISTLOCK_URL, else the local-file default]. Not memory://: the
    /// workers are separate processes.
    #[arg(long, env = "DISTLOCK_URL", hide_env_values = true)]
    url: Option<String>,
    /// Worker processes contending for the key.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// How long the workload runs.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// The lock's TTL.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
    ttl: Duration,
    /// The bound of each lock() call.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    wait: Duration,
    /// SIGSTOP a worker while it holds the lock, longer than the TTL, a
    /// few times over the run (then SIGCONT).
    #[arg(long)]
    pause_workers: bool,
    /// How long each pause lasts [default: 2 x ttl].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, requires = "pause_workers")]
    pause: Option<Duration>,
    /// The key to lock [default: distlock-check/<random>, so concurrent
    /// checks do not collide].
    #[arg(long)]
    key: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("bad duration `{text}`: {err}"))
}

/// Runs `distlock check`.
pub fn main(args: Args) -> ExitCode {
    let worker_program = match std::env::current_exe() {
        Ok(path) => path,
        Err(err) => {
            eprintln!("distlock check: cannot find the distlock executable to run workers: {err}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    let mut config = CheckConfig::new(
        resolve_url(args.url),
        vec![worker_program.into(), "check-worker".into()],
    );
    if let Some(key) = args.key {
        config.key = key;
    }
    config.workers = usize::from(args.workers);
    config.duration = args.duration;
    config.ttl = args.ttl;
    config.wait = args.wait;
    config.pause_workers = args
        .pause_workers
        .then(|| args.pause.unwrap_or(args.ttl * 2));
    let json = args.json;
    run_on_current_thread(async move {
        let running = match distlock_check::start(config).await {
            Ok(running) => running,
            Err(err) => return failure(&err),
        };
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            eprintln!("distlock check: cannot handle signals");
            return EXIT_SOFTWARE;
        };
        // Dropping the running check (the other branches) kills the workers.
        let report = tokio::select! {
            report = running.finish() => report,
            _ = interrupt.recv() => return interrupted(),
            _ = terminate.recv() => return interrupted(),
        };
        match report {
            Ok(report) => {
                if json {
                    println!("{}", report.to_json());
                } else {
                    println!("{report}");
                }
                if report.violations().is_empty() {
                    0
                } else {
                    EXIT_VIOLATION
                }
            }
            Err(err) => failure(&err),
        }
    })
}

fn interrupted() -> u8 {
    eprintln!("distlock check: interrupted; the workers were killed");
    130
}

/// Prints `err` on one line and returns its exit status.
fn failure(err: &CheckError) -> u8 {
    eprintln!("distlock check: {}", describe(err));
    match err {
        CheckError::Config(_) | CheckError::NotCrossProcess { .. } => EXIT_USAGE,
        CheckError::Connect { source, .. } => exit_code_for(source),
        _ => EXIT_SOFTWARE,
    }
}

/// Runs one worker of a check (the hidden `check-worker` subcommand): the
/// parent `distlock check` talks to it over stdin and stdout.
pub fn worker() -> ExitCode {
    run_on_current_thread(async {
        match distlock_check::run_worker().await {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("distlock check-worker: {}", describe(&err));
                EXIT_SOFTWARE
            }
        }
    })
}
