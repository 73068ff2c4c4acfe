//! distlock and `etcdctl lock` (Debian's etcd-client: etcd's own
//! `concurrency.Mutex`) share locks on the test etcd: each waits for the
//! other, they queue in one line in arrival order, and fencing tokens grow
//! across the two (etcdctl's is `ETCD_LOCK_REV`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use distlock_core::{DistributedLock, LockGuard, LockOptions};
use distlock_etcd::EtcdLock;
use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};
use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

const ENDPOINT: &str = "127.0.0.1:2379";
/// No prefix: a lock's keys are under its name as given, as for etcdctl.
const URL: &str = "etcd://127.0.0.1:2379";
/// Bound on every grant and exit awaited here.
const WITHIN: Duration = Duration::from_secs(10);

async fn ready() -> bool {
    distlock_testkit::service_ready("etcd", ENDPOINT).await
        && distlock_testkit::program_ready("etcdctl", "etcd-client")
}

/// One `etcdctl lock NAME -- CMD`: the command prints `ETCD_LOCK_REV` and
/// `ETCD_LOCK_KEY`, then holds the lock until a line is written to its
/// FIFO. etcdctl deletes its key when the command exits.
struct Etcdctl {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    fifo: PathBuf,
}

impl Etcdctl {
    fn lock(name: &str) -> Self {
        let fifo =
            std::env::temp_dir().join(format!("distlock-etcdctl-{:016x}", fastrand::u64(..)));
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success(), "mkfifo {fifo:?}");
        let mut child = Command::new("etcdctl")
            .arg(format!("--endpoints={ENDPOINT}"))
            .args(["lock", name, "--", "sh", "-c"])
            .arg(r#"echo "$ETCD_LOCK_REV $ETCD_LOCK_KEY"; read _ < "$0""#)
            .arg(&fifo)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("etcdctl");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Etcdctl {
            child,
            stdout,
            fifo,
        }
    }

    /// Waits for the grant: `ETCD_LOCK_REV` and `ETCD_LOCK_KEY`.
    async fn granted(&mut self) -> (u64, String) {
        let line = tokio::time::timeout(WITHIN, self.stdout.next_line())
            .await
            .expect("etcdctl was not granted the lock")
            .unwrap()
            .expect("etcdctl exited without the lock");
        let (rev, key) = line.split_once(' ').expect("REV KEY");
        (rev.parse().expect("ETCD_LOCK_REV"), key.to_owned())
    }

    /// True if etcdctl has reported the grant by now.
    fn granted_yet(&mut self) -> bool {
        // `next_line` is cancel-safe: an unfinished line stays buffered.
        self.stdout.next_line().now_or_never().is_some()
    }

    /// Ends the command and waits for etcdctl to unlock and exit.
    async fn release(mut self) {
        let fifo = self.fifo.clone();
        tokio::task::spawn_blocking(move || std::fs::write(fifo, "\n"))
            .await
            .unwrap()
            .unwrap();
        let status = tokio::time::timeout(WITHIN, self.child.wait())
            .await
            .expect("etcdctl did not exit")
            .unwrap();
        assert!(status.success(), "etcdctl: {status}");
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.fifo);
    }
}

/// The keys put under a lock's prefix, in order, seen on a watch opened
/// before anyone queues.
struct Queue {
    raw: etcd_client::Client,
    prefix: String,
    watch: WatchStream,
    /// Puts seen on the watch and not yet asked for.
    puts: std::collections::VecDeque<String>,
}

impl Queue {
    async fn watch(name: &str) -> Self {
        let mut raw = etcd_client::Client::connect([ENDPOINT], None)
            .await
            .unwrap();
        let prefix = format!("{name}/");
        let mut watch = raw
            .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let created = watch.message().await.unwrap().expect("watch created");
        assert!(created.created());
        Queue {
            raw,
            prefix,
            watch,
            puts: Default::default(),
        }
    }

    /// The key of the next holder or waiter that queues.
    async fn next_put(&mut self) -> String {
        tokio::time::timeout(WITHIN, async {
            loop {
                if let Some(key) = self.puts.pop_front() {
                    return key;
                }
                let response = self.watch.message().await.unwrap().expect("watch");
                self.puts.extend(
                    response
                        .events()
                        .iter()
                        .filter(|event| event.event_type() == EventType::Put)
                        .map(|event| event.kv().unwrap().key_str().unwrap().to_owned()),
                );
            }
        })
        .await
        .expect("nobody queued")
    }

    /// The keys under the prefix now.
    async fn keys(&mut self) -> Vec<String> {
        let options = GetOptions::new().with_prefix().with_keys_only();
        let found = self
            .raw
            .get(self.prefix.as_str(), Some(options))
            .await
            .unwrap();
        found
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_owned())
            .collect()
    }
}

fn wait_in_queue(locks: &EtcdLock, name: &str) -> JoinHandle<LockGuard> {
    let (locks, name) = (locks.clone(), name.to_owned());
    tokio::spawn(async move {
        let options = LockOptions::new().wait(Duration::from_secs(30));
        locks.lock(&name, &options).await.expect("distlock lock")
    })
}

async fn granted(waiter: JoinHandle<LockGuard>) -> LockGuard {
    tokio::time::timeout(WITHIN, waiter)
        .await
        .expect("distlock was not granted the lock")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distlock_waits_for_etcdctl_and_follows_it_with_a_greater_token() {
    if !ready().await {
        return;
    }
    let name = distlock_testkit::unique_key("etcdctl-holds");
    let mut queue = Queue::watch(&name).await;
    let locks = EtcdLock::connect(URL).await.unwrap();
    let mut etcdctl = Etcdctl::lock(&name);
    let (etcdctl_rev, etcdctl_key) = etcdctl.granted().await;
    assert!(etcdctl_key.starts_with(&queue.prefix), "{etcdctl_key}");

    assert!(
        locks
            .try_lock(&name, &LockOptions::new())
            .await
            .unwrap()
            .is_none(),
        "try_lock got a lock etcdctl holds"
    );
    let waiter = wait_in_queue(&locks, &name);
    // etcdctl's put, then the busy try_lock's, then the waiter's.
    assert_eq!(queue.next_put().await, etcdctl_key);
    let mine = format!("{}{:x}", queue.prefix, locks.session_lease_id());
    assert_eq!(queue.next_put().await, mine, "the mutex layout's key");
    assert_eq!(queue.next_put().await, mine);
    assert!(!waiter.is_finished(), "granted while etcdctl holds");

    etcdctl.release().await;
    let guard = granted(waiter).await;
    assert!(
        guard.fencing_token() > etcdctl_rev,
        "token {} after ETCD_LOCK_REV {etcdctl_rev}",
        guard.fencing_token()
    );
    assert_eq!(queue.keys().await, [mine]);
    guard.release().await.unwrap();
    assert!(queue.keys().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_waits_for_distlock_and_follows_it_with_a_greater_token() {
    if !ready().await {
        return;
    }
    let name = distlock_testkit::unique_key("distlock-holds");
    let mut queue = Queue::watch(&name).await;
    let locks = EtcdLock::connect(URL).await.unwrap();
    let guard = locks
        .try_lock(&name, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mine = format!("{}{:x}", queue.prefix, locks.session_lease_id());
    assert_eq!(queue.next_put().await, mine, "the mutex layout's key");

    let mut etcdctl = Etcdctl::lock(&name);
    let etcdctl_key = queue.next_put().await;
    assert_ne!(etcdctl_key, mine);
    assert!(
        !etcdctl.granted_yet(),
        "etcdctl granted while distlock holds"
    );

    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let (etcdctl_rev, granted_key) = etcdctl.granted().await;
    assert_eq!(granted_key, etcdctl_key);
    assert!(
        etcdctl_rev > token,
        "ETCD_LOCK_REV {etcdctl_rev} after token {token}"
    );
    etcdctl.release().await;
    assert!(queue.keys().await.is_empty());
}

/// distlock holds, etcdctl queues, another distlock client queues: the
/// lock goes to etcdctl first, then to the distlock waiter, whose token
/// exceeds etcdctl's `ETCD_LOCK_REV` (which was read after the holder's
/// release, past the distlock waiter's create revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distlock_waiter_queues_behind_an_etcdctl_waiter() {
    if !ready().await {
        return;
    }
    let name = distlock_testkit::unique_key("behind-etcdctl");
    let mut queue = Queue::watch(&name).await;
    let (first, second) = (
        EtcdLock::connect(URL).await.unwrap(),
        EtcdLock::connect(URL).await.unwrap(),
    );
    let holder = first
        .try_lock(&name, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    queue.next_put().await;
    let mut etcdctl = Etcdctl::lock(&name);
    let etcdctl_key = queue.next_put().await;
    let waiter = wait_in_queue(&second, &name);
    let waiter_key = queue.next_put().await;
    assert_eq!(
        waiter_key,
        format!("{}{:x}", queue.prefix, second.session_lease_id())
    );

    holder.release().await.unwrap();
    let (etcdctl_rev, granted_key) = etcdctl.granted().await;
    assert_eq!(granted_key, etcdctl_key);
    assert!(!waiter.is_finished(), "granted while etcdctl holds");
    assert_eq!(queue.keys().await.len(), 2, "etcdctl and the waiter");

    etcdctl.release().await;
    let guard = granted(waiter).await;
    assert!(
        guard.fencing_token() > etcdctl_rev,
        "token {} after ETCD_LOCK_REV {etcdctl_rev}",
        guard.fencing_token()
    );
    guard.release().await.unwrap();
    assert!(queue.keys().await.is_empty());
}

/// etcdctl holds, distlock queues, another etcdctl queues: the lock goes
/// to distlock first, then to the second etcdctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcdctl_waiter_queues_behind_a_distlock_waiter() {
    if !ready().await {
        return;
    }
    let name = distlock_testkit::unique_key("behind-distlock");
    let mut queue = Queue::watch(&name).await;
    let locks = EtcdLock::connect(URL).await.unwrap();
    let mut holder = Etcdctl::lock(&name);
    let (holder_rev, _) = holder.granted().await;
    queue.next_put().await;
    let waiter = wait_in_queue(&locks, &name);
    queue.next_put().await;
    let mut second = Etcdctl::lock(&name);
    let second_key = queue.next_put().await;

    holder.release().await;
    let guard = granted(waiter).await;
    assert!(guard.fencing_token() > holder_rev);
    assert!(
        !second.granted_yet(),
        "etcdctl granted while distlock holds"
    );

    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let (second_rev, granted_key) = second.granted().await;
    assert_eq!(granted_key, second_key);
    assert!(
        second_rev > token,
        "ETCD_LOCK_REV {second_rev} after token {token}"
    );
    second.release().await;
    assert!(queue.keys().await.is_empty());
}
