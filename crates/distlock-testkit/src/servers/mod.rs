//! Private servers for tests that count requests or inject faults (feature
//! `servers`).
//!
//! The shared test services (`scripts/services.sh`) serve every test at
//! once, so a test that counts what a server received, pauses it, kills it
//! or restarts it starts a server of its own: [`PrivateRedis`],
//! [`PrivateZooKeeper`], [`PrivateEtcd`], each a [`ServerProcess`] on ports
//! from [`free_port`], with its own directory, killed when dropped (also
//! when the test panics).
//!
//! ```ignore
//! use distlock_testkit::servers::PrivateRedis;
//!
//! #[tokio::test]
//! async fn survives_a_restart() {
//!     // None: redis-server is not installed, and the test is skipped
//!     // (a panic instead under DISTLOCK_REQUIRE_SERVICES=1).
//!     let Some(mut server) = PrivateRedis::start().await else { return };
//!     // ... connect to server.url() ...
//!     server.pause(); // SIGSTOP
//!     server.resume(); // SIGCONT
//!     server.restart().await; // SIGKILL, then the same port and directory
//! }
//! ```
//!
//! A start waits for a protocol-level answer (PING, `srvr`, `/health`)
//! from the process it spawned, for at most 60 s, and panics with the
//! server's name, port and the tail of its log if none comes or the
//! process exits. A server that exits because one of its ports was taken
//! after [`free_port`] found it free starts again on new ports, with a line
//! on stderr saying so.

mod etcd;
mod process;
mod redis;
mod zookeeper;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub use etcd::PrivateEtcd;
pub use process::{Launch, ServerProcess, ServerSpec, Target};
pub use redis::PrivateRedis;
pub use zookeeper::PrivateZooKeeper;

use crate::services_required;

/// How long a private server may take to answer its first probe: a JVM or
/// an etcd starting on a loaded 2-core machine takes seconds, not a minute.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// A TCP port on 127.0.0.1 that nothing listens on right now, and that this
/// process has not handed out before.
///
/// It is picked at random below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), which outgoing connections take their
/// local ports from, so no client of any test can take it before the server
/// binds it. What is left is another process binding the same port in the
/// meantime, which [`ServerProcess::start`] detects and retries.
///
/// # Panics
///
/// If no free port is found in 1000 tries.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (low, high) = candidate_ports();
    for _ in 0..1000 {
        let port = fastrand::u16(low..high);
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|err| err.into_inner());
        let handed_out = handed_out.get_or_insert_with(HashSet::new);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {low}..{high} after 1000 tries");
}

/// The ports [`free_port`] picks from: below the ephemeral range if there
/// is room, else above it, else anywhere unprivileged.
fn candidate_ports() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        });
    match range {
        Some((low, _)) if low >= 8192 => (low / 2, low),
        Some((_, high)) if high <= 61439 => (high + 1, 65535),
        _ => (1024, 65535),
    }
}

/// Whether `program` is an executable file in one of `PATH`'s directories.
fn on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// Whether a private `server` can be started, given whether what it
/// needs (`missing` names it when not) is here. When not: panics under
/// [`services_required`], else prints a skip note and returns false.
fn can_start(server: &str, missing: Option<String>) -> bool {
    let Some(missing) = missing else {
        return true;
    };
    if services_required() {
        panic!(
            "a private {server} needs {missing} (DISTLOCK_REQUIRE_SERVICES=1); \
             run `bash scripts/services.sh install`"
        );
    }
    eprintln!(
        "skipping: a private {server} needs {missing}; run `bash scripts/services.sh install`"
    );
    false
}

/// `program` if it is on `PATH`, else what to say is missing.
fn need_program(program: &str) -> Option<String> {
    on_path(program)
        .is_none()
        .then(|| format!("`{program}` on PATH"))
}

/// `path` if it exists, else what to say is missing.
fn need_file(path: &Path) -> Option<String> {
    (!path.exists()).then(|| path.display().to_string())
}
