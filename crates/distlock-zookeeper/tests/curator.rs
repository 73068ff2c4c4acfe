//! distlock and Apache Curator's `InterProcessMutex` (Debian's
//! libcurator-recipes-java, Curator 5.4) share locks on the shared
//! ZooKeeper: `zk://host/prefix` and key `k` is Curator's lock path
//! `/prefix/k`. Each waits for the other, they queue in one line in
//! arrival order, and a follower's token exceeds the czxid of the Curator
//! node it followed. The Java side (tests/curator/CuratorMutex.java) is
//! compiled here with javac.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use distlock_core::{DistributedLock, LockGuard, LockOptions};
use distlock_zookeeper::ZooKeeperLock;
use futures::FutureExt;
use support::eventually;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

const PREFIX: &str = "/distlock-curator-tests";
const URL: &str = "zk://127.0.0.1:2181/distlock-curator-tests?session_ttl=10s";
/// Bound on each answer awaited here (a JVM starting on a loaded machine).
const WITHIN: Duration = Duration::from_secs(30);
const SOURCE: &str = include_str!("curator/CuratorMutex.java");
/// Debian's jars: Curator, the ZooKeeper client, and what they need.
const JARS: &[&str] = &[
    "curator-recipes",
    "curator-framework",
    "curator-client",
    "zookeeper",
    "zookeeper-jute",
    "guava",
    "slf4j-api",
    "slf4j-nop",
];

/// The compiled program's class directory, when ZooKeeper, the JDK and
/// Curator are there (panics if they are not and
/// `DISTLOCK_REQUIRE_SERVICES=1`).
async fn ready() -> Option<PathBuf> {
    if !distlock_testkit::service_ready("zookeeper", "127.0.0.1:2181").await
        || !distlock_testkit::program_ready("javac", "default-jdk-headless")
    {
        return None;
    }
    if let Some(missing) = JARS.iter().find(|jar| !jar_path(jar).is_file()) {
        let why = format!("{} is missing", jar_path(missing).display());
        if distlock_testkit::services_required() {
            panic!("Curator is required (DISTLOCK_REQUIRE_SERVICES=1) but {why}; install Debian's libcurator-recipes-java with `bash scripts/services.sh install`");
        }
        eprintln!("skipping: {why} (libcurator-recipes-java)");
        return None;
    }
    Some(tokio::task::spawn_blocking(compile).await.unwrap())
}

fn jar_path(name: &str) -> PathBuf {
    Path::new("/usr/share/java").join(format!("{name}.jar"))
}

fn classpath(classes: &Path) -> String {
    let mut entries = vec![classes.to_path_buf()];
    entries.extend(JARS.iter().map(|jar| jar_path(jar)));
    std::env::join_paths(entries)
        .unwrap()
        .into_string()
        .unwrap()
}

/// Compiles the program once per source text: into a fresh directory,
/// then renamed into place, so that test processes running at once never
/// see a half-written class.
fn compile() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let digest = SOURCE
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        });
    let classes = tmp.join(format!("curator-mutex-{digest:016x}"));
    if classes.join("CuratorMutex.class").is_file() {
        return classes;
    }
    let build = tmp.join(format!("curator-build-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&build).unwrap();
    let source = build.join("CuratorMutex.java");
    std::fs::write(&source, SOURCE).unwrap();
    let output = std::process::Command::new("javac")
        .arg("-d")
        .arg(&build)
        .arg("-cp")
        .arg(classpath(&build))
        .arg(&source)
        .output()
        .expect("javac");
    assert!(
        output.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Another process may have won the race: its classes are as good.
    if std::fs::rename(&build, &classes).is_err() {
        let _ = std::fs::remove_dir_all(&build);
    }
    classes
}

/// One JVM with one `InterProcessMutex` on `path`, driven by commands.
struct Curator {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Curator {
    fn start(classes: &Path, path: &str) -> Self {
        let mut child = Command::new("java")
            .arg("-cp")
            .arg(classpath(classes))
            .args(["CuratorMutex", "127.0.0.1:2181", path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("java");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Curator {
            child,
            stdin,
            stdout,
        }
    }

    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn answer(&mut self) -> String {
        tokio::time::timeout(WITHIN, self.stdout.next_line())
            .await
            .expect("no answer from Curator")
            .unwrap()
            .expect("Curator exited")
    }

    /// Waits for the grant of an `acquire` or `try`: the czxid of the
    /// holder's node.
    async fn acquired(&mut self) -> u64 {
        let answer = self.answer().await;
        let czxid = answer
            .strip_prefix("acquired ")
            .unwrap_or_else(|| panic!("expected a grant, got {answer:?}"));
        czxid.parse().unwrap()
    }

    /// True if Curator has answered by now.
    fn answered_yet(&mut self) -> bool {
        // `next_line` is cancel-safe: an unfinished line stays buffered.
        self.stdout.next_line().now_or_never().is_some()
    }

    async fn release(&mut self) {
        self.send("release").await;
        assert_eq!(self.answer().await, "released");
    }

    async fn quit(mut self) {
        self.send("quit").await;
        let status = tokio::time::timeout(WITHIN, self.child.wait())
            .await
            .expect("Curator did not exit")
            .unwrap();
        assert!(status.success(), "Curator: {status}");
    }
}

/// A key distlock keeps verbatim (letters, digits, `-`, `_`), so that its
/// lock directory is `/prefix/key` for Curator too.
fn plain_key(case: &str) -> String {
    format!("curator-{case}-{:016x}", fastrand::u64(..))
}

async fn setup(case: &str) -> Option<(PathBuf, String, String, zk::Client)> {
    let classes = ready().await?;
    let key = plain_key(case);
    let path = format!("{PREFIX}/{key}");
    let admin = zk::Client::connect("127.0.0.1:2181").await.unwrap();
    Some((classes, key, path, admin))
}

async fn connect() -> ZooKeeperLock {
    ZooKeeperLock::connect(URL).await.unwrap()
}

/// Until `count` contenders have their node in `path`.
async fn queued(admin: &zk::Client, path: &str, count: usize) {
    eventually(
        &format!("{count} contenders queued in {path}"),
        WITHIN,
        || async {
            admin
                .list_children(path)
                .await
                .is_ok_and(|children| children.len() == count)
        },
    )
    .await;
}

fn wait_in_queue(locks: &ZooKeeperLock, key: &str) -> JoinHandle<LockGuard> {
    let (locks, key) = (locks.clone(), key.to_owned());
    tokio::spawn(async move {
        let options = LockOptions::new().wait(Duration::from_secs(60));
        locks.lock(&key, &options).await.expect("distlock lock")
    })
}

async fn granted(waiter: JoinHandle<LockGuard>) -> LockGuard {
    tokio::time::timeout(WITHIN, waiter)
        .await
        .expect("distlock was not granted the lock")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distlock_waits_for_curator_and_follows_it_with_a_greater_token() {
    let Some((classes, key, path, admin)) = setup("holds").await else {
        return;
    };
    let locks = connect().await;
    assert_eq!(locks.lock_directory(&key), path, "the path mapping");
    let mut curator = Curator::start(&classes, &path);
    curator.send("acquire").await;
    let czxid = curator.acquired().await;

    assert!(
        locks
            .try_lock(&key, &LockOptions::new())
            .await
            .unwrap()
            .is_none(),
        "try_lock got a lock Curator holds"
    );
    let waiter = wait_in_queue(&locks, &key);
    queued(&admin, &path, 2).await;
    assert!(!waiter.is_finished(), "granted while Curator holds");

    curator.release().await;
    let guard = granted(waiter).await;
    assert!(
        guard.fencing_token() > czxid,
        "token {} after Curator's czxid {czxid}",
        guard.fencing_token()
    );
    guard.release().await.unwrap();
    curator.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_waits_for_distlock() {
    let Some((classes, key, path, admin)) = setup("waits").await else {
        return;
    };
    let locks = connect().await;
    let guard = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut curator = Curator::start(&classes, &path);
    curator.send("try").await;
    assert_eq!(curator.answer().await, "busy");
    curator.send("acquire").await;
    queued(&admin, &path, 2).await;
    assert!(
        !curator.answered_yet(),
        "Curator granted while distlock holds"
    );

    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let czxid = curator.acquired().await;
    assert!(czxid > token, "Curator's czxid {czxid} after token {token}");
    curator.release().await;
    curator.quit().await;
}

/// distlock holds, Curator queues, another distlock client queues: the
/// lock goes to Curator first, then to the distlock waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distlock_waiter_queues_behind_a_curator_waiter() {
    let Some((classes, key, path, admin)) = setup("behind-curator").await else {
        return;
    };
    let (first, second) = (connect().await, connect().await);
    let holder = first
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut curator = Curator::start(&classes, &path);
    curator.send("acquire").await;
    queued(&admin, &path, 2).await;
    let waiter = wait_in_queue(&second, &key);
    queued(&admin, &path, 3).await;

    holder.release().await.unwrap();
    let czxid = curator.acquired().await;
    assert!(!waiter.is_finished(), "granted while Curator holds");
    curator.release().await;
    let guard = granted(waiter).await;
    assert!(guard.fencing_token() > czxid);
    guard.release().await.unwrap();
    curator.quit().await;
}

/// Curator holds, distlock queues, another Curator queues: the lock goes
/// to distlock first, then to the second Curator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_curator_waiter_queues_behind_a_distlock_waiter() {
    let Some((classes, key, path, admin)) = setup("behind-distlock").await else {
        return;
    };
    let locks = connect().await;
    let mut first = Curator::start(&classes, &path);
    first.send("acquire").await;
    let first_czxid = first.acquired().await;
    let waiter = wait_in_queue(&locks, &key);
    queued(&admin, &path, 2).await;
    let mut second = Curator::start(&classes, &path);
    second.send("acquire").await;
    queued(&admin, &path, 3).await;

    first.release().await;
    let guard = granted(waiter).await;
    assert!(guard.fencing_token() > first_czxid);
    assert!(
        !second.answered_yet(),
        "Curator granted while distlock holds"
    );
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let czxid = second.acquired().await;
    assert!(czxid > token, "Curator's czxid {czxid} after token {token}");
    second.release().await;
    first.quit().await;
    second.quit().await;
}
