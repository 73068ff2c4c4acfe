//! [`PrivateZooKeeper`]: a standalone ZooKeeper (its own JVM) of one
//! test's own.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{can_start, need_file, need_program, Launch, ServerProcess, ServerSpec, Target};

/// The server's classes, from Debian's `zookeeper` package.
const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
/// An SLF4J binding, so the server logs into its `server.log`.
const SLF4J_SIMPLE: &str = "/usr/share/java/slf4j-simple.jar";

/// A standalone ZooKeeper owned by one test: its own JVM on a free port of
/// 127.0.0.1, its data in its own directory, killed on drop. Never the
/// shared 127.0.0.1:2181. Dereferences to its [`ServerProcess`] for
/// [`pause`](ServerProcess::pause), [`resume`](ServerProcess::resume),
/// [`kill`](ServerProcess::kill) and
/// [`start_again`](ServerProcess::start_again) (same port and data, so
/// sessions survive) and [`port`](ServerProcess::port).
#[derive(Debug)]
pub struct PrivateZooKeeper {
    server: ServerProcess,
}

impl PrivateZooKeeper {
    /// Starts a server and waits until it serves requests (`srvr` reports
    /// its mode); `None` (the test skips) when java or the ZooKeeper jar is
    /// missing, unless services are required.
    pub async fn start() -> Option<Self> {
        Self::start_with(None).await
    }

    /// Like [`start`](Self::start), with the server's container manager
    /// checking for empty containers every `every` (ZooKeeper's default is
    /// a minute).
    pub async fn start_with_container_check(every: Duration) -> Option<Self> {
        Self::start_with(Some(every)).await
    }

    async fn start_with(container_check: Option<Duration>) -> Option<Self> {
        let missing = need_program("java").or_else(|| need_file(Path::new(ZK_JAR)));
        if !can_start("zookeeper", missing) {
            return None;
        }
        let spec = ServerSpec::new(
            "zookeeper",
            1,
            move |ports, dir| launch(ports[0], dir, container_check),
            serving,
        );
        Some(PrivateZooKeeper {
            server: ServerProcess::start(spec).await,
        })
    }

    /// `zk://127.0.0.1:<port>/distlock-test?<options>`.
    pub fn url(&self, options: &str) -> String {
        format!("zk://127.0.0.1:{}/distlock-test?{options}", self.port())
    }

    /// `127.0.0.1:<port>`, for a raw client.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Sends a four-letter command (`srvr`, `mntr`, `wchs`...) and returns
    /// the answer; an error if there is none within 3 s.
    pub async fn four_letter(&self, command: &str) -> std::io::Result<String> {
        four_letter(self.port(), command).await
    }

    /// One value of `mntr`, e.g. `zk_packets_received`.
    ///
    /// # Panics
    ///
    /// If the server does not answer or has no such value.
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
    ///
    /// # Panics
    ///
    /// If the server does not answer as expected.
    pub async fn watch_count(&self) -> u64 {
        let answer = self.four_letter("wchs").await.expect("wchs");
        answer
            .lines()
            .find_map(|line| line.strip_prefix("Total watches:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected wchs answer:\n{answer}"))
    }
}

/// Writes `zoo.cfg` into `dir` and returns the JVM's command line.
fn launch(port: u16, dir: &Path, container_check: Option<Duration>) -> Launch {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("make the server's data dir");
    std::fs::write(
        dir.join("zoo.cfg"),
        format!(
            "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={data}\nclientPort={port}\n\
             clientPortAddress=127.0.0.1\nmaxClientCnxns=0\nminSessionTimeout=1000\n\
             maxSessionTimeout=120000\n4lw.commands.whitelist=*\nadmin.enableServer=false\n\
             standaloneEnabled=true\n",
            data = data.display()
        ),
    )
    .expect("write zoo.cfg");
    Launch::new("java")
        .args([
            "-Xms32m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.4lw.commands.whitelist=*",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        ])
        .args(
            container_check
                .map(|every| format!("-Dznode.container.checkIntervalMs={}", every.as_millis())),
        )
        .arg("-cp")
        .arg(format!("{}:{ZK_JAR}:{SLF4J_SIMPLE}", dir.display()))
        .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
        .arg(dir.join("zoo.cfg"))
}

/// `srvr` reports a mode only once the server serves requests (`ruok`
/// answers as soon as the port is open).
async fn serving(target: Target) -> Result<(), String> {
    let answer = four_letter(target.ports[0], "srvr")
        .await
        .map_err(|err| format!("srvr: {err}"))?;
    if answer.contains("Mode: ") {
        Ok(())
    } else {
        Err(format!("srvr answered {answer:?}"))
    }
}

async fn four_letter(port: u16, command: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(command.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

impl Deref for PrivateZooKeeper {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.server
    }
}

impl DerefMut for PrivateZooKeeper {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.server
    }
}
