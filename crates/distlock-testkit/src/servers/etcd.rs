//! [`PrivateEtcd`]: a single-member etcd of one test's own.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use super::{can_start, need_program, Launch, ServerProcess, ServerSpec, Target};

/// A single-member etcd owned by one test: client and peer ports free on
/// 127.0.0.1, its data in its own directory, killed (and the data removed)
/// on drop, also when the test panics. Dereferences to its
/// [`ServerProcess`] for [`pause`](ServerProcess::pause),
/// [`resume`](ServerProcess::resume), [`kill`](ServerProcess::kill),
/// [`restart`](ServerProcess::restart) (same ports and data) and
/// [`port`](ServerProcess::port), the client port.
#[derive(Debug)]
pub struct PrivateEtcd {
    server: ServerProcess,
    http: reqwest::Client,
}

impl PrivateEtcd {
    /// Starts one and waits until `/health` says it serves; `None` (the
    /// test skips) when `etcd` is not installed, unless services are
    /// required.
    pub async fn start() -> Option<Self> {
        if !can_start("etcd", need_program("etcd")) {
            return None;
        }
        let spec = ServerSpec::new("etcd", 2, launch, healthy);
        Some(PrivateEtcd {
            server: ServerProcess::start(spec).await,
            http: http_client(),
        })
    }

    /// `127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// `etcd://127.0.0.1:<client port>/distlock-test?<query>`.
    pub fn url(&self, query: &str) -> String {
        format!("etcd://{}/distlock-test?{query}", self.endpoint())
    }

    /// The body of a GET of `path` (e.g. `/metrics`) on the client port.
    ///
    /// # Panics
    ///
    /// If the request fails or the status is not 200.
    pub async fn get(&self, path: &str) -> String {
        get(&self.http, self.port(), path)
            .await
            .unwrap_or_else(|err| panic!("private etcd on {}: {err}", self.port()))
    }
}

/// A single-member cluster on `ports` (client, peer), data in `dir`.
fn launch(ports: &[u16], dir: &std::path::Path) -> Launch {
    let client_url = format!("http://127.0.0.1:{}", ports[0]);
    let peer_url = format!("http://127.0.0.1:{}", ports[1]);
    let launch = Launch::new("etcd")
        .args(["--name", "private", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("private={peer_url}")])
        .args(["--initial-cluster-state", "new"])
        .args(["--logger", "zap", "--log-outputs", "stderr"])
        .args(["--log-level", "warn"]);
    // etcd 3.4 refuses to start on architectures other than amd64 and
    // ppc64le unless ETCD_UNSUPPORTED_ARCH names it (Go's name).
    match std::env::consts::ARCH {
        "x86_64" | "powerpc64" => launch,
        "aarch64" => launch.env("ETCD_UNSUPPORTED_ARCH", "arm64"),
        "x86" => launch.env("ETCD_UNSUPPORTED_ARCH", "386"),
        other => launch.env("ETCD_UNSUPPORTED_ARCH", other),
    }
}

/// `/health` says true once the member has a leader and serves a read.
async fn healthy(target: Target) -> Result<(), String> {
    let body = get(&http_client(), target.ports[0], "/health").await?;
    if body.contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(format!("/health answered {body:?}"))
    }
}

fn http_client() -> reqwest::Client {
    // Only plain HTTP here, but reqwest builds its TLS setup anyway when the
    // workspace turns rustls on; an error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

async fn get(http: &reqwest::Client, port: u16, path: &str) -> Result<String, String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|err| format!("GET {url}: {err}"))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|err| format!("GET {url}: reading the body: {err}"))?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("GET {url}: {status}: {body}"))
    }
}

impl Deref for PrivateEtcd {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.server
    }
}

impl DerefMut for PrivateEtcd {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.server
    }
}
