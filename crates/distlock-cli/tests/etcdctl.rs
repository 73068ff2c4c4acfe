//! `distlock exec` as a drop-in for `etcdctl lock NAME -- CMD` (Debian's
//! etcd-client) on the test etcd: the same lock for the same name, and the
//! token in `ETCD_LOCK_REV`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use support::{code, distlock, run_within, stderr, unique_key, TempDir};

const ENDPOINT: &str = "127.0.0.1:2379";
/// No prefix: `distlock exec NAME` and `etcdctl lock NAME` share a lock.
const URL: &str = "etcd://127.0.0.1:2379";
const LIMIT: Duration = Duration::from_secs(30);

fn ready() -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(distlock_testkit::service_ready("etcd", ENDPOINT))
        && distlock_testkit::program_ready("etcdctl", "etcd-client")
}

/// `distlock exec [extra] NAME -- sh -c SCRIPT` on the test etcd.
fn exec(extra: &[&str], name: &str, script: &str) -> Command {
    let mut command = distlock();
    command
        .args(["exec", "--url", URL])
        .args(extra)
        .args([name, "--", "sh", "-c", script]);
    command
}

/// `etcdctl lock NAME -- CMD` whose command prints `ETCD_LOCK_REV`, then
/// holds the lock until a line is written to its FIFO.
struct Etcdctl {
    child: Child,
    stdout: BufReader<ChildStdout>,
    fifo: std::path::PathBuf,
}

impl Etcdctl {
    fn lock(name: &str, work: &TempDir) -> Self {
        let fifo = work.join("release");
        let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let mut child = Command::new("etcdctl")
            .arg(format!("--endpoints={ENDPOINT}"))
            .args(["lock", name, "--", "sh", "-c"])
            .arg(r#"echo "$ETCD_LOCK_REV"; read _ < "$0""#)
            .arg(&fifo)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("etcdctl");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Etcdctl {
            child,
            stdout,
            fifo,
        }
    }

    /// Blocks until etcdctl holds the lock; its `ETCD_LOCK_REV`.
    fn granted(&mut self) -> u64 {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("etcdctl output");
        line.trim().parse().expect("ETCD_LOCK_REV")
    }

    /// Ends the command; etcdctl unlocks and exits.
    fn release(mut self) {
        std::fs::write(&self.fifo, "\n").unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls etcd (no event to await from another process) until `name`'s
/// lock has `count` holders and waiters.
fn wait_until_queued(name: &str, count: usize) {
    let deadline = std::time::Instant::now() + LIMIT;
    while queued(name) < count {
        assert!(
            std::time::Instant::now() < deadline,
            "nobody queued on {name}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_shares_the_lock_of_etcdctl_lock_and_sets_etcd_lock_rev() {
    if !ready() {
        return;
    }
    let work = TempDir::new("etcdctl");
    let name = unique_key("etcdctl");
    let mut etcdctl = Etcdctl::lock(&name, &work);
    let etcdctl_rev = etcdctl.granted();

    let busy = run_within(&mut exec(&["--no-wait"], &name, "true"), LIMIT);
    assert_eq!(code(&busy), 75, "stderr: {}", stderr(&busy));

    // Queued behind etcdctl: the command runs once etcdctl let go.
    let waiting = exec(
        &["--wait", "20s"],
        &name,
        r#"echo "$ETCD_LOCK_REV $DISTLOCK_FENCING_TOKEN""#,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("distlock exec");
    wait_until_queued(&name, 2);
    etcdctl.release();
    let output = waiting.wait_with_output().unwrap();
    assert_eq!(code(&output), 0, "stderr: {}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    let (rev, token) = text.trim().split_once(' ').expect("two numbers");
    assert_eq!(rev, token, "ETCD_LOCK_REV is the fencing token");
    let rev: u64 = rev.parse().unwrap();
    assert!(rev > etcdctl_rev, "{rev} after etcdctl's {etcdctl_rev}");
}

/// How many holders and waiters `name`'s lock has in etcd.
fn queued(name: &str) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut raw = etcd_client::Client::connect([ENDPOINT], None)
            .await
            .unwrap();
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        let found = raw.get(format!("{name}/"), Some(options)).await.unwrap();
        found.count() as usize
    })
}

/// etcdctl queues behind a running `distlock exec` and, once it let go,
/// gets an `ETCD_LOCK_REV` past exec's. (That each waits for the other is
/// tested in distlock-etcd's etcdctl tests.)
#[test]
fn etcdctl_lock_queues_behind_exec() {
    if !ready() {
        return;
    }
    let work = TempDir::new("etcdctl");
    let name = unique_key("exec-holds");
    let log = work.join("log");
    let go_on = work.join("go-on");
    let made = Command::new("mkfifo").arg(&go_on).status().expect("mkfifo");
    assert!(made.success());
    // The command logs its token, then holds until told to go on.
    let script = format!(
        r#"echo "exec $ETCD_LOCK_REV" >> {log}; read _ < {go_on}"#,
        log = log.display(),
        go_on = go_on.display()
    );
    let mut holder = exec(&[], &name, &script)
        .stdin(Stdio::null())
        .spawn()
        .expect("distlock exec");
    let token: u64 = support::wait_for_file(&log, LIMIT)
        .trim()
        .trim_start_matches("exec ")
        .parse()
        .expect("ETCD_LOCK_REV");

    let mut etcdctl = Etcdctl::lock(&name, &work);
    wait_until_queued(&name, 2);
    std::fs::write(&go_on, "\n").unwrap();
    assert!(holder.wait().unwrap().success());
    let etcdctl_rev = etcdctl.granted();
    assert!(etcdctl_rev > token, "{etcdctl_rev} after exec's {token}");
    etcdctl.release();
}
