//! A private ZooKeeper server for tests that count requests or inject
//! faults: its own JVM on a free port, its data in a temp dir, killed on
//! drop (also when the test panics). Never the shared 127.0.0.1:2181.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distlock_core::{DistributedLock, LockGuard, LockOptions};
use distlock_zookeeper::ZooKeeperLock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
const SLF4J_SIMPLE: &str = "/usr/share/java/slf4j-simple.jar";

/// A standalone ZooKeeper this test owns.
pub struct PrivateZooKeeper {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    container_check: Option<Duration>,
}

/// Whether a private server can be started here; when it cannot, the test
/// is skipped, or fails under `DISTLOCK_REQUIRE_SERVICES=1`.
pub fn can_start() -> bool {
    let java = Command::new("java")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let ok = java && std::path::Path::new(ZK_JAR).exists();
    if !ok {
        if distlock_testkit::services_required() {
            panic!("a private ZooKeeper needs java and {ZK_JAR} (DISTLOCK_REQUIRE_SERVICES=1); run `bash scripts/services.sh install`");
        }
        eprintln!("skipping: java or {ZK_JAR} missing; run `bash scripts/services.sh install`");
    }
    ok
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

impl PrivateZooKeeper {
    /// Starts a server and waits until it serves requests.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts a server whose container manager checks every
    /// `container_check` (ZooKeeper's default is a minute).
    pub async fn start_with(container_check: Option<Duration>) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "distlock-zk-test-{}-{port}-{:08x}",
            std::process::id(),
            random_u32()
        ));
        std::fs::create_dir_all(dir.join("data")).expect("make the server's temp dir");
        std::fs::write(
            dir.join("zoo.cfg"),
            format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={data}\nclientPort={port}\n\
                 clientPortAddress=127.0.0.1\nmaxClientCnxns=0\nminSessionTimeout=1000\n\
                 maxSessionTimeout=120000\n4lw.commands.whitelist=*\nadmin.enableServer=false\n\
                 standaloneEnabled=true\n",
                data = dir.join("data").display()
            ),
        )
        .expect("write zoo.cfg");
        let mut server = PrivateZooKeeper {
            port,
            dir,
            child: None,
            container_check,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let mut command = Command::new("java");
        command
            .args([
                "-Xms32m",
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
            ])
            .arg("-Djava.net.preferIPv4Stack=true")
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-Dzookeeper.4lw.commands.whitelist=*")
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn");
        if let Some(every) = self.container_check {
            command.arg(format!(
                "-Dznode.container.checkIntervalMs={}",
                every.as_millis()
            ));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("open the server log");
        command
            .arg("-cp")
            .arg(format!("{}:{ZK_JAR}:{SLF4J_SIMPLE}", self.dir.display()))
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.dir.join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        self.child = Some(command.spawn().expect("start java"));
        self.wait_serving().await;
    }

    /// `zk://127.0.0.1:<port>/distlock-test?<options>`.
    pub fn url(&self, options: &str) -> String {
        format!("zk://127.0.0.1:{}/distlock-test?{options}", self.port)
    }

    /// `127.0.0.1:<port>`, for a raw client.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(answer) = self.four_letter("srvr").await {
                if answer.contains("Mode: ") {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                panic!(
                    "private ZooKeeper exited ({status}) on port {}:\n{log}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "private ZooKeeper on port {} did not serve within 30s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a four-letter command and returns the answer.
    pub async fn four_letter(&self, command: &str) -> std::io::Result<String> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.address()).await?;
            stream.write_all(command.as_bytes()).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            Ok(answer)
        };
        tokio::time::timeout(Duration::from_secs(3), exchange)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    /// One value of `mntr`.
    pub async fn mntr(&self, name: &str) -> u64 {
        let answer = self.four_letter("mntr").await.expect("mntr");
        answer
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once('\t')?;
                (key == name).then(|| value.trim().parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no {name} in mntr:\n{answer}"))
    }

    /// Total watches the server holds (`wchs`).
    pub async fn watch_count(&self) -> u64 {
        let answer = self.four_letter("wchs").await.expect("wchs");
        answer
            .lines()
            .find_map(|line| line.strip_prefix("Total watches:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected wchs answer:\n{answer}"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server (SIGKILL); its data stays for [`start_again`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped server again on the same port and data, waiting
    /// until it serves.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.launch().await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateZooKeeper {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish() as u32
}

/// Polls `condition` every 20 ms until it holds or `within` passes: for
/// server-side state that has no event to await (a node deleted in the
/// background, a watch registered).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns `client` waiting in `lock` on `key` with `options`.
pub fn spawn_waiter(
    client: &ZooKeeperLock,
    key: &str,
    options: &LockOptions,
) -> JoinHandle<distlock_core::Result<LockGuard>> {
    let (client, key, options) = (client.clone(), key.to_owned(), options.clone());
    tokio::spawn(async move { client.lock(&key, &options).await })
}
