//! Faults on the test clusters of `scripts/clusters.sh`, through its
//! `cluster leader`, `cluster signal` and `cluster start` commands: the
//! same script CI starts them with, so that a member is always found (and
//! signalled) by its pid file, never by name.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The repository's root (two levels above this crate).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `scripts/services.sh cluster <args>`; its stdout, trimmed, or its
/// stderr as the error.
fn cluster(args: &[&str]) -> Result<String, String> {
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/services.sh"))
        .arg("cluster")
        .args(args)
        .output()
        .map_err(|err| format!("run scripts/services.sh cluster {args:?}: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "scripts/services.sh cluster {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ))
    }
}

/// Whether every cluster answers: `cluster status` exits 0.
pub fn ready() -> bool {
    cluster(&["status"]).is_ok()
}

/// Starts what is missing and resumes what is stopped; returns once every
/// group is ready again.
///
/// # Panics
///
/// If the clusters do not come back (the script's own timeout).
pub fn restore() {
    if let Err(err) = cluster(&["start"]) {
        panic!("the test clusters did not come back: {err}");
    }
}

/// The member that leads `group` now (`etcd`, `zookeeper`, `sentinel`, or
/// `redis-cluster` with the key whose slot counts).
pub fn leader(group: &str, key: Option<&str>) -> Result<String, String> {
    let mut args = vec!["leader", group];
    args.extend(key);
    cluster(&args)
}

/// The leader of `group`, waiting up to `within` for there to be one: the
/// group may still be electing after the last fault.
pub fn settled_leader(group: &str, key: Option<&str>, within: Duration) -> Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let last = leader(group, key);
        if last.is_ok() || Instant::now() >= deadline {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The leader of `group`, waiting up to `within` for there to be one that
/// is not `previous`: after a kill, the survivors' choice.
pub fn new_leader(
    group: &str,
    key: Option<&str>,
    previous: &str,
    within: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let last = leader(group, key);
        if let Ok(name) = &last {
            if name != previous {
                return last;
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{group}: no new leader after {within:?} (last answer: {last:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to `member`.
///
/// # Panics
///
/// If the script refuses (the member is not running).
pub fn signal(member: &str, signal: &str) {
    if let Err(err) = cluster(&["signal", member, signal]) {
        panic!("{err}");
    }
}

/// Cuts `member` (an etcd or ZooKeeper member) off from clients and peers.
///
/// # Panics
///
/// If the script refuses (not root, no iptables, a member that does not
/// run under a user of its own).
pub fn partition(member: &str) {
    if let Err(err) = cluster(&["partition", member]) {
        panic!("{err}");
    }
}

/// Removes `member`'s partition.
///
/// # Panics
///
/// If the script fails.
pub fn heal(member: &str) {
    if let Err(err) = cluster(&["heal", member]) {
        panic!("{err}");
    }
}
