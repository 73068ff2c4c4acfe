//! Helpers of the CLI's black-box tests: run the `distlock` binary with
//! deadlines, temp dirs, backend gating, and taking a held lock away from
//! outside (as an operator or a fault would: redis-cli, an etcd client,
//! zkCli).

#![allow(dead_code)]

pub mod clusters;
pub mod serve;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A `distlock` command with a clean environment: no `DISTLOCK_URL`, no
/// `RUST_LOG`.
pub fn distlock() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distlock"));
    command.env_remove("DISTLOCK_URL").env_remove("RUST_LOG");
    command
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "distlock-cli-test-{tag}-{:016x}",
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A key every backend keeps verbatim (only `[a-z0-9-]`), unique per run.
pub fn unique_key(case: &str) -> String {
    format!("cli-{case}-{:016x}", fastrand::u64(..))
}

/// A backend under test.
pub struct Backend {
    pub name: &'static str,
    pub url: String,
    /// Its locks expire by TTL (a killed holder's lock lingers until then).
    pub ttl_expiry: bool,
    /// For `file`: the lock directory (removed at the end).
    pub dir: Option<TempDir>,
}

/// The backend `name`, or `None` (with a note) when its server does not
/// answer or its crate is still a stub in this build.
pub fn backend(name: &'static str) -> Option<Backend> {
    let (url, addr) = match name {
        "file" => {
            let dir = TempDir::new("locks");
            let url = format!("file://{}", dir.path().display());
            return Some(Backend {
                name,
                url,
                ttl_expiry: false,
                dir: Some(dir),
            });
        }
        "redis" => ("redis://127.0.0.1:6379", "127.0.0.1:6379"),
        "zookeeper" => (
            "zk://127.0.0.1:2181/distlock-cli-test?session_ttl=2s",
            "127.0.0.1:2181",
        ),
        "etcd" => (
            "etcd://127.0.0.1:2379/distlock-cli-test?session_ttl=2s",
            "127.0.0.1:2379",
        ),
        other => panic!("unknown backend {other}"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if !distlock_testkit::service_ready(name, addr).await {
            return None;
        }
        match distlock::connect(url).await {
            Ok(client) => Some(Backend {
                name,
                url: url.to_owned(),
                ttl_expiry: client.capabilities().ttl_expiry,
                dir: None,
            }),
            Err(err) => panic!("{name}: cannot connect to {url}: {err}"),
        }
    })
}

/// Runs `command` to completion within `limit`, killing it (and failing
/// the test) if it overruns.
pub fn run_within(command: &mut Command, limit: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn distlock");
    // Read both pipes while it runs, so a full pipe never stalls it.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let stdout = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let stderr = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let status = Running(Some(child)).wait_within(limit);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A running `distlock` that is killed if the test ends before it does.
pub struct Running(pub Option<Child>);

impl Running {
    /// Starts `command` with stdout and stderr discarded (they would fill
    /// an unread pipe).
    pub fn spawn(command: &mut Command) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn distlock");
        Running(Some(child))
    }

    pub fn pid(&self) -> i32 {
        self.0.as_ref().expect("child").id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).expect("kill");
    }

    /// Waits for the exit, failing the test after `limit`.
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        let child = self.0.as_mut().expect("child");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("distlock did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Waits until `path` exists and is non-empty: the child writes it once
/// it runs under the lock. Polls, as a file gives no event to await here.
pub fn wait_for_file(path: &Path, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        assert!(
            started.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` is gone (or a zombie) within `limit`.
pub fn process_gone_within(pid: i32, limit: Duration) -> bool {
    let started = Instant::now();
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            // The state letter follows the command in parentheses.
            Ok(stat)
                if stat
                    .rsplit(") ")
                    .next()
                    .is_some_and(|rest| rest.starts_with('Z')) =>
            {
                return true
            }
            Ok(_) => {}
        }
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The exit code, panicking with stderr if the process died of a signal.
pub fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or_else(|| {
        panic!(
            "distlock died of a signal: {:?}; stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Takes the held lock on `key` away from outside, as an operator or a
/// fault would. Returns false (with a note) when this backend has no tool
/// for it here.
pub fn take_away(backend: &Backend, key: &str) -> bool {
    match backend.name {
        "file" => {
            let dir = backend.dir.as_ref().expect("file backend dir");
            let path = dir.join(&format!("{key}.lock"));
            std::fs::remove_file(&path)
                .unwrap_or_else(|err| panic!("deleting {}: {err}", path.display()));
            true
        }
        "redis" => take_away_redis(key),
        "etcd" => take_away_etcd(key),
        "zookeeper" => take_away_zookeeper(key),
        _ => false,
    }
}

/// Deletes every Redis key that contains `key` (the lock; a fencing
/// counter of this unique key, if any, goes too).
fn take_away_redis(key: &str) -> bool {
    let Ok(scan) = Command::new("redis-cli")
        .args(["-p", "6379", "--scan", "--pattern"])
        .arg(format!("*{key}*"))
        .output()
    else {
        eprintln!("skipping the take-away: redis-cli is not installed");
        return false;
    };
    let names: Vec<String> = String::from_utf8_lossy(&scan.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|name| !name.is_empty())
        .collect();
    assert!(!names.is_empty(), "no Redis key holds the lock {key}");
    let deleted = Command::new("redis-cli")
        .args(["-p", "6379", "DEL"])
        .args(&names)
        .output()
        .expect("redis-cli DEL");
    assert!(deleted.status.success(), "redis-cli DEL failed");
    true
}

/// Revokes the lease of every etcd key that contains `key` (the holder's
/// session); keys without a lease are deleted.
#[cfg(feature = "etcd")]
fn take_away_etcd(key: &str) -> bool {
    use etcd_client::{Client, GetOptions};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut etcd = Client::connect(["127.0.0.1:2379"], None)
            .await
            .expect("connect to etcd");
        let all = etcd
            .get("", Some(GetOptions::new().with_all_keys()))
            .await
            .expect("etcd range of all keys");
        let mut found = false;
        let mut revoked = Vec::new();
        for kv in all.kvs() {
            if !String::from_utf8_lossy(kv.key()).contains(key) {
                continue;
            }
            found = true;
            match kv.lease() {
                0 => {
                    etcd.delete(kv.key(), None).await.expect("etcd delete");
                }
                lease if !revoked.contains(&lease) => {
                    etcd.lease_revoke(lease).await.expect("etcd lease revoke");
                    revoked.push(lease);
                }
                _ => {}
            }
        }
        assert!(found, "no etcd key holds the lock {key}");
    });
    true
}

/// Without the etcd feature there is no client to take the lock with.
#[cfg(not(feature = "etcd"))]
fn take_away_etcd(_key: &str) -> bool {
    eprintln!("skipping the take-away: built without the etcd feature");
    false
}

/// Deletes the ZooKeeper lock nodes under `key`'s directory, with zkCli.
/// Not the directory: it is a container node that the server (or the
/// backend) removes once it is empty, so deleting it too raced that
/// removal and failed now and then with "node does not exist".
fn take_away_zookeeper(key: &str) -> bool {
    let cli = Path::new("/usr/share/zookeeper/bin/zkCli.sh");
    if !cli.exists() {
        eprintln!("skipping the take-away: zkCli.sh is not installed");
        return false;
    }
    let listing = Command::new(cli)
        .args([
            "-server",
            "127.0.0.1:2181",
            "ls",
            "-R",
            "/distlock-cli-test",
        ])
        .output()
        .expect("zkCli ls");
    let nodes: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|line| line.starts_with('/') && line.contains(&format!("{key}/")))
        .map(str::to_owned)
        .collect();
    assert!(!nodes.is_empty(), "no ZooKeeper node holds the lock {key}");
    for node in nodes {
        let status = Command::new(cli)
            .args(["-server", "127.0.0.1:2181", "deleteall", &node])
            .output()
            .expect("zkCli deleteall");
        assert!(status.status.success(), "zkCli deleteall {node} failed");
    }
    true
}
