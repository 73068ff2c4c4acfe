//! [`PrivateRedis`]: a `redis-server` of one test's own.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{can_start, need_program, Launch, ServerProcess, ServerSpec, Target};

/// The socket the readiness probe speaks to, in the server's directory: it
/// answers whether the server listens on plain TCP, TLS only, or both.
const PROBE_SOCKET: &str = "redis.sock";

/// A `redis-server` owned by one test: on a free port of 127.0.0.1,
/// without persistence, its directory removed and the process killed on
/// drop. Dereferences to its [`ServerProcess`] for
/// [`pause`](ServerProcess::pause), [`resume`](ServerProcess::resume),
/// [`kill`](ServerProcess::kill), [`restart`](ServerProcess::restart) (a
/// restarted Redis starts empty) and [`port`](ServerProcess::port).
#[derive(Debug)]
pub struct PrivateRedis {
    server: ServerProcess,
}

impl PrivateRedis {
    /// Starts a server and waits until it answers PING; `None` (the test
    /// skips) when `redis-server` is not installed, unless services are
    /// required.
    pub async fn start() -> Option<Self> {
        Self::start_with(|_, _| Vec::new()).await
    }

    /// Starts a server with more arguments, made from its port and
    /// directory (the directory is new and empty; `extra_args` may write
    /// files there, e.g. certificates). `--port 0 --tls-port <port>` among
    /// them makes it TLS only. `extra_args` is called again if the server
    /// has to move to another port.
    pub async fn start_with<F>(extra_args: F) -> Option<Self>
    where
        F: Fn(u16, &Path) -> Vec<String> + Send + Sync + 'static,
    {
        if !can_start("redis", need_program("redis-server")) {
            return None;
        }
        let extra_args = Arc::new(extra_args);
        let spec = ServerSpec::new(
            "redis",
            1,
            move |ports, dir| {
                Launch::new("redis-server")
                    .args(["--port", &ports[0].to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no", "--logfile", ""])
                    .arg("--unixsocket")
                    .arg(dir.join(PROBE_SOCKET))
                    .args(["--unixsocketperm", "700"])
                    .args(extra_args(ports[0], dir))
                    .arg("--dir")
                    .arg(dir)
            },
            ping,
        );
        Some(PrivateRedis {
            server: ServerProcess::start(spec).await,
        })
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }
}

/// PING over the server's unix socket. `+PONG`, or `-NOAUTH` from a server
/// with a password, is Redis serving; `-LOADING` and the like are not yet.
async fn ping(target: Target) -> Result<(), String> {
    let path = target.dir.join(PROBE_SOCKET);
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|err| format!("connect to {}: {err}", path.display()))?;
    stream
        .write_all(b"PING\r\n")
        .await
        .map_err(|err| format!("send PING: {err}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .await
        .map_err(|err| format!("read the answer to PING: {err}"))?;
    if answer.starts_with("+PONG") || answer.starts_with("-NOAUTH") {
        Ok(())
    } else {
        Err(format!("PING answered {:?}", answer.trim_end()))
    }
}

impl Deref for PrivateRedis {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.server
    }
}

impl DerefMut for PrivateRedis {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.server
    }
}
