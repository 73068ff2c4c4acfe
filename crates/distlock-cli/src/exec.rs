//! `distlock exec`: run a command while holding a lock, like flock(1) for a
//! cluster.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use distlock::{LockGuard, LockOptions, Locker};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::{describe, exit_code_for, resolve_url, EXIT_USAGE};

/// The lock could not be had: busy with `--no-wait`, or `--wait` elapsed.
pub const EXIT_BUSY: u8 = 75;
/// The lock was lost while the command ran (it was stopped).
pub const EXIT_LOST: u8 = 76;
/// The service could not be reached or failed.
pub const EXIT_UNAVAILABLE: u8 = 69;

const EXIT_CODES: &str = "\
Exit status:
  the command's own status (128+N if it died of signal N)
  64   usage error: bad argument or duration, unknown URL scheme, no command
  69   the lock service is unreachable or failed (also the connect timeout)
  70   internal error
  75   the lock could not be had: held elsewhere with --no-wait, or --wait elapsed
  76   the lock was lost while the command ran; the command got SIGTERM, then
       SIGKILL after --kill-after (also when release finds the lock no longer ours)
  126  the command could not be run;  127  the command was not found
  128+N  distlock got signal N before the command started

The command gets DISTLOCK_KEY and DISTLOCK_FENCING_TOKEN in its environment,
and on etcd the token as ETCD_LOCK_REV too, as `etcdctl lock KEY -- CMD` gives
it: the two share locks (docs/interop.md).
SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to distlock are
passed to the command; the lock is released once it exits. If distlock itself
is killed, the command gets SIGTERM (Linux parent-death signal) and the lock
is freed by the backend: at once for file locks, after the TTL for Redis,
after the session timeout for ZooKeeper and etcd.";

/// Arguments of `distlock exec`.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// Lock service URL [default: $DISTLOCK_URL, else file://<temp dir>/distlock]
    #[arg(long, env = "DISTLOCK_URL", value_name = "URL")]
    url: Option<String>,

    /// Lease TTL; renewed every TTL/3 while the command runs. A killed distlock's
    /// lock is freed after it on TTL backends (file locks: at once; the file
    /// is then checked every TTL/3).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = humantime::parse_duration)]
    ttl: Duration,

    /// Wait at most this long for the lock (default: wait until acquired).
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,

    /// Fail with status 75 at once if the lock is held elsewhere.
    #[arg(long)]
    no_wait: bool,

    /// After a lost lock, how long the command has between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = humantime::parse_duration)]
    kill_after: Duration,

    /// Give up connecting to the lock service after this long (status 69);
    /// also bounds the final release.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,

    /// The lock's key (any non-empty text).
    #[arg(value_name = "KEY")]
    key: String,

    /// The command and its arguments (put them after `--`).
    #[arg(value_name = "CMD", required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// Runs `distlock exec`.
pub fn main(args: Args) -> ExitCode {
    crate::run_on_current_thread(run(args))
}

fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("distlock: {message}");
    code
}

async fn run(args: Args) -> u8 {
    if args.key.is_empty() {
        return fail(EXIT_USAGE, "the lock key must not be empty");
    }
    // Listen first: a signal while connecting or waiting ends distlock
    // cleanly, with nothing held.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(err) => return fail(70, format!("cannot listen for signals: {err}")),
    };
    let url = resolve_url(args.url.clone());
    let redacted = distlock::error::redact_url(&url);
    let connect = tokio::time::timeout(args.connect_timeout, distlock::connect(&url));
    let locks = tokio::select! {
        connected = connect => match connected {
            Ok(Ok(locks)) => locks,
            Ok(Err(err)) => return fail(exit_code_for(&err), describe(&err)),
            Err(_) => return fail(
                EXIT_UNAVAILABLE,
                format!("no answer from {redacted} within {} (--connect-timeout)", humantime::format_duration(args.connect_timeout)),
            ),
        },
        signal = signals.recv() => return 128 + signal as i32 as u8,
    };
    let baseline = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let outcome = tokio::select! {
        acquired = acquire(&locks, &args) => acquired,
        signal = signals.recv() => Err(128 + signal as i32 as u8),
    };
    let guard = match outcome {
        Ok(guard) => guard,
        Err(code) => {
            settle(baseline).await;
            return code;
        }
    };
    run_holding(&args, guard, &mut signals).await
}

async fn acquire(locks: &Locker, args: &Args) -> Result<LockGuard, u8> {
    let options = LockOptions::new().ttl(args.ttl).wait_opt(args.wait);
    if args.no_wait {
        return match locks.try_lock(&args.key, &options).await {
            Ok(Some(guard)) => Ok(guard),
            Ok(None) => Err(fail(
                EXIT_BUSY,
                format!("lock {:?} is held by another owner (--no-wait)", args.key),
            )),
            Err(err) => Err(fail(exit_code_for(&err), describe(&err))),
        };
    }
    locks
        .lock(&args.key, &options)
        .await
        .map_err(|err| fail(exit_code_for(&err), describe(&err)))
}

async fn run_holding(args: &Args, guard: LockGuard, signals: &mut Signals) -> u8 {
    let program = &args.command[0];
    let mut command = tokio::process::Command::new(program);
    command
        .args(&args.command[1..])
        .env("DISTLOCK_KEY", &args.key)
        .env("DISTLOCK_FENCING_TOKEN", guard.fencing_token().to_string());
    if guard.backend() == "etcd" {
        // As `etcdctl lock NAME -- CMD` names it, for scripts moving over;
        // the same revision semantics (see distlock-etcd's fencing tokens).
        command.env("ETCD_LOCK_REV", guard.fencing_token().to_string());
    }
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            // If distlock dies, the command must not run on without the lock.
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                // distlock died before the line above took effect.
                nix::libc::_exit(EXIT_LOST as i32);
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let code = match err.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            let _ = guard.release().await;
            return fail(
                code,
                format!("cannot run {:?}: {err}", program.to_string_lossy()),
            );
        }
    };
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    tracing::debug!(key = %args.key, fencing_token = guard.fencing_token(), ?pid, "running the command under the lock");

    let lost = guard.lost();
    tokio::pin!(lost);
    let mut lost_at: Option<Instant> = None;
    let mut killed = false;
    let status: ExitStatus = loop {
        let kill_deadline = lost_at.map(|at| at + args.kill_after);
        tokio::select! {
            status = child.wait() => match status {
                Ok(status) => break status,
                Err(err) => {
                    // Cannot happen for a child we spawned; keep the lock
                    // safe anyway: stop it.
                    send(pid, Signal::SIGKILL);
                    return fail(70, format!("cannot wait for the command: {err}"));
                }
            },
            signal = signals.recv() => send(pid, signal),
            reason = &mut lost, if lost_at.is_none() => {
                eprintln!(
                    "distlock: lock {:?} lost while the command ran ({reason}); sending it SIGTERM",
                    args.key
                );
                send(pid, Signal::SIGTERM);
                lost_at = Some(Instant::now());
            }
            _ = sleep_until_opt(kill_deadline), if kill_deadline.is_some() && !killed => {
                eprintln!(
                    "distlock: the command is still running {} after SIGTERM; sending SIGKILL",
                    humantime::format_duration(args.kill_after)
                );
                send(pid, Signal::SIGKILL);
                killed = true;
            }
        }
    };
    let code = status_code(status);
    if lost_at.is_some() {
        let _ = tokio::time::timeout(args.connect_timeout, guard.release()).await;
        return EXIT_LOST;
    }
    let held_throughout = guard.is_held();
    // Bounded: an unreachable service must not keep distlock from exiting (the
    // lock then ends with its TTL or session).
    let release = tokio::time::timeout(args.connect_timeout, guard.release()).await;
    let Ok(release) = release else {
        eprintln!(
            "distlock: warning: releasing lock {:?} got no answer within {}; it ends with its TTL or session",
            args.key,
            humantime::format_duration(args.connect_timeout)
        );
        return code;
    };
    match release {
        Ok(()) if held_throughout => code,
        Ok(()) => fail(
            EXIT_LOST,
            format!("lock {:?} was lost as the command finished", args.key),
        ),
        Err(err) if err.is_not_held() => fail(
            EXIT_LOST,
            format!(
                "lock {:?} was no longer held when the command finished (status {code}); it may have run unprotected",
                args.key
            ),
        ),
        Err(err) => {
            // The command ran under the lock; only the release failed, and
            // the lock ends with its TTL or session.
            eprintln!("distlock: warning: releasing lock {:?}: {}", args.key, describe(&err));
            code
        }
    }
}

/// Lets the background cleanup of an abandoned acquisition finish before
/// distlock exits: a `lock` dropped by `--wait` or a signal deletes its waiter
/// record (queue entry, sequential node, key) in a task it spawns, which
/// exiting at once would cut short, leaving the record until the session or
/// TTL ends and blocking the next owner meanwhile. Waits until the runtime's
/// task count is back to what it was before the attempt, for at most 2 s.
async fn settle(baseline: usize) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = Instant::now() + Duration::from_secs(2);
    while metrics.num_alive_tasks() > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 70,
    }
}

fn send(pid: Option<Pid>, signal: Signal) {
    if let Some(pid) = pid {
        // ESRCH: it already exited; its status is about to be read.
        let _ = kill(pid, signal);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The signals distlock passes on to the command.
struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        let forwarded = [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ];
        let mut streams = Vec::new();
        for sig in forwarded {
            streams.push((sig, signal(SignalKind::from_raw(sig as i32))?));
        }
        Ok(Signals { streams })
    }

    /// The next signal received (cancel safe).
    async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (sig, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
