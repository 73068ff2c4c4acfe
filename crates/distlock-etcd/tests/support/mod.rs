//! A private etcd process per test (free ports, temp data dir), for tests
//! that count requests or inject faults: the shared server on 2379 is used
//! by everyone else at the same time.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running etcd owned by one test; killed (and its data removed) on drop,
/// also when the test panics.
pub struct PrivateEtcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|path| path.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateEtcd {
    /// Starts one, or returns `None` (skip) when the binary is missing and
    /// services are not required.
    pub async fn start() -> Option<Self> {
        if etcd_binary().is_none() {
            if distlock_testkit::services_required() {
                panic!("etcd binary not found (DISTLOCK_REQUIRE_SERVICES=1)");
            }
            eprintln!("skipping: no etcd binary on PATH");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "distlock-etcd-test-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut etcd = PrivateEtcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
        };
        etcd.spawn();
        etcd.wait_ready().await;
        Some(etcd)
    }

    fn spawn(&mut self) {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(etcd_binary().unwrap());
        command
            .arg("--name")
            .arg("private")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("private={peer_url}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let arch = match std::env::consts::ARCH {
            "x86_64" | "powerpc64" => None,
            "aarch64" => Some("arm64"),
            "x86" => Some("386"),
            other => Some(other),
        };
        if let Some(arch) = arch {
            command.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        self.child = Some(command.spawn().expect("start etcd"));
    }

    /// Waits until `/health` says the member serves (no event to await
    /// from another process, so this polls).
    async fn wait_ready(&self) {
        for _ in 0..400 {
            if let Ok(body) = self.http_get("/health").await {
                if body.contains("\"health\":\"true\"") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "private etcd on {} did not become healthy",
            self.client_port
        );
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A plain etcd client of this server, to read or change keys behind the locks' backs.
    pub async fn raw_client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .unwrap()
    }

    /// `etcd://127.0.0.1:<port>/<prefix>?<query>`.
    pub fn url(&self, query: &str) -> String {
        format!("etcd://{}/distlock-test?{query}", self.endpoint())
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// SIGSTOP: the process stops answering but keeps its sockets.
    pub fn pause(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    }

    /// Kills the process (SIGKILL) and starts it again on the same ports
    /// and data.
    pub async fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn http_get(&self, path: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(self.endpoint()).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.endpoint());
        stream.write_all(request.as_bytes()).await?;
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut body))
            .await
            .map_err(|_| std::io::Error::other("no answer"))??;
        Ok(body)
    }

    /// etcd's own gRPC counters: `<counter>/<method>` summed over codes,
    /// e.g. `grpc_server_handled_total/Txn`.
    pub async fn grpc_counters(&self) -> HashMap<String, f64> {
        let body = self.http_get("/metrics").await.expect("read /metrics");
        let mut counters = HashMap::new();
        for line in body.lines() {
            let Some(rest) = [
                "grpc_server_handled_total",
                "grpc_server_started_total",
                "grpc_server_msg_received_total",
            ]
            .iter()
            .find_map(|name| line.strip_prefix(name).map(|rest| (*name, rest))) else {
                continue;
            };
            let (name, rest) = rest;
            let Some(method) = rest
                .split("grpc_method=\"")
                .nth(1)
                .and_then(|tail| tail.split('"').next())
            else {
                continue;
            };
            let value: f64 = rest
                .rsplit(' ')
                .next()
                .and_then(|value| value.parse().ok())
                .unwrap_or(0.0);
            *counters.entry(format!("{name}/{method}")).or_insert(0.0) += value;
        }
        counters
    }
}

/// What grew between two snapshots of [`PrivateEtcd::grpc_counters`].
pub fn grown(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> HashMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, value)| {
            let delta = value - before.get(name).copied().unwrap_or(0.0);
            (delta != 0.0).then(|| (name.clone(), delta))
        })
        .collect()
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused process must be resumed to die promptly.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
