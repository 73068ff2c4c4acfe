//! `distlock`: run a command under a distributed lock (`exec`), show what a
//! lock does for data consistency (`demo`), measure a backend (`bench`),
//! check a deployment's consistency under load and pauses (`check`), run
//! the HTTP lock service (`serve`), and load-test any lock URL (`load`).

mod bench;
mod check;
mod demo;
mod exec;
mod load;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status of a usage error (sysexits EX_USAGE): bad arguments, bad
/// durations, unknown URL schemes.
pub const EXIT_USAGE: u8 = 64;

/// Distributed locks from the command line.
#[derive(Parser, Debug)]
#[command(name = "distlock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command while holding a lock, like flock(1) for a cluster.
    Exec(exec::Args),
    /// Show lost updates without a lock, and how locks and fencing fix them.
    Demo(demo::Args),
    /// Measure lock+unlock cycles against the raw protocol floor.
    Bench(bench::Args),
    /// Check a deployment: N worker processes, pauses, and a checker of
    /// their history (double grants, stale writes, lost updates...).
    Check(check::Args),
    /// Run the HTTP lock service in front of a backend.
    Serve(serve::Args),
    /// Load-test a lock URL: N acquire -> hold -> release requests, C at a
    /// time, with latency percentiles and a mutual-exclusion check.
    Load(load::Args),
    /// One worker of `distlock check` (run by it, not by hand).
    #[command(hide = true)]
    CheckWorker,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("distlock: {}", one_line(&err.to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_tracing();
    match cli.command {
        Command::Exec(args) => exec::main(args),
        Command::Demo(args) => demo::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Check(args) => check::main(args),
        Command::Serve(args) => serve::main(args),
        Command::Load(args) => load::main(args),
        Command::CheckWorker => check::worker(),
    }
}

/// A clap error on one line: its message without the usage block.
fn one_line(rendered: &str) -> String {
    let message = rendered
        .split("\n\nUsage:")
        .next()
        .unwrap_or(rendered)
        .split("\n\nFor more information")
        .next()
        .unwrap_or(rendered);
    let message = message.trim().trim_start_matches("error:").trim();
    let joined: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    format!("{} (see --help)", joined.join(" "))
}

/// Logs go to stderr (stdout belongs to the command and to reports);
/// `RUST_LOG` overrides the default of warnings only (minus the lease's
/// own "lock lost" warning, which the commands report themselves).
fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,distlock_core::lease=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs a subcommand on a single-threaded tokio runtime (enough for one
/// lock and one child, and it keeps wake-ups on one core); the future's
/// output is the exit status.
pub fn run_on_current_thread(subcommand: impl std::future::Future<Output = u8>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => ExitCode::from(runtime.block_on(subcommand)),
        Err(err) => {
            eprintln!("distlock: cannot start the async runtime: {err}");
            ExitCode::from(70)
        }
    }
}

/// The lock URL to use: `--url`, else `$DISTLOCK_URL` (clap reads it into
/// `--url`), else the embedded default: a directory `distlock` under the
/// system temp dir, with the local-file backend.
pub fn resolve_url(url: Option<String>) -> String {
    match url {
        Some(url) if !url.trim().is_empty() => url,
        _ => format!("file://{}", std::env::temp_dir().join("distlock").display()),
    }
}

/// Exit status for an error, following sysexits(3): bad input 64
/// (EX_USAGE), an unreachable or failing service 69 (EX_UNAVAILABLE), a lock
/// that could not be had in time 75 (EX_TEMPFAIL), a lock lost 76, anything
/// else 70 (EX_SOFTWARE).
pub fn exit_code_for(err: &distlock::Error) -> u8 {
    use distlock::Error;
    match err {
        Error::InvalidKey { .. }
        | Error::InvalidConfig(_)
        | Error::InvalidUrl { .. }
        | Error::FeatureNotEnabled { .. } => EXIT_USAGE,
        Error::Connection { .. } | Error::Unavailable { .. } | Error::Backend { .. } => 69,
        Error::Timeout { .. } => 75,
        Error::NotHeld { .. } => 76,
        _ => 70,
    }
}

pub use distlock::error::describe;
