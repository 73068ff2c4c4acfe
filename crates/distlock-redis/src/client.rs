//! The client's shared state: its servers, settings and the helpers every
//! operation uses to run a script on one server or on a Redlock quorum
//! (one server is a quorum of one). Attempts and waiting are in
//! [`acquire`](crate::acquire); release, extend and the cleanup of
//! abandoned attempts in [`held`](crate::held).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::RedisConfig;
use crate::node::{timed_out, Conn, Node};
use crate::renewal::Renewals;
use crate::scripts::{LuaScript, Publishing};
use crate::sentinel::SentinelPrimary;
use crate::subscriber::Subscriber;
use distlock_core::{Error, Result};
use futures::future::join_all;

/// How long the fence counter outlives the last grant. Tokens stay
/// increasing after it expires (they are seeded from the server clock).
pub(crate) const FENCE_IDLE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) struct Shared {
    pub name: &'static str,
    pub nodes: Vec<Node>,
    pub quorum: usize,
    pub prefix: String,
    pub fair: bool,
    pub timeout: Duration,
    pub endpoints: String,
    pub renewals: Arc<Renewals>,
    pub client_id: String,
    /// The scripts that publish: `SPUBLISH` on a Redis Cluster.
    pub scripts: Publishing,
    /// Replicas that must acknowledge a grant (`WAIT`); 0: none.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    seq: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the idle renewal task see that the client is gone.
        self.renewals.wake_task();
    }
}

/// A Redlock operation that no majority of instances agreed on.
#[derive(Debug)]
pub(crate) struct QuorumError {
    /// `acquire`, `release` or `extend`.
    pub operation: &'static str,
    /// Instances that did it.
    pub succeeded: usize,
    /// Instances that answered no (held by another owner, or not ours).
    pub refused: usize,
    pub needed: usize,
    pub total: usize,
    pub first_error: Option<redis::RedisError>,
}

impl QuorumError {
    /// Instances that gave no answer (an error or no reply in time).
    fn unanswered(&self) -> usize {
        self.total - self.succeeded - self.refused
    }

    /// Too few instances answered for any majority to be known.
    fn too_few_answered(&self) -> bool {
        self.succeeded + self.refused < self.needed
    }
}

impl fmt::Display for QuorumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (operation, total, needed) = (self.operation, self.total, self.needed);
        if self.too_few_answered() {
            write!(
                f,
                "{} of {total} Redis instances gave no answer to {operation}; a majority of {needed} must answer",
                self.unanswered()
            )?;
        } else {
            write!(
                f,
                "no majority of {needed} of {total} Redis instances agreed on {operation}: {} did it, {} refused, {} gave no answer",
                self.succeeded,
                self.refused,
                self.unanswered()
            )?;
        }
        if let Some(err) = &self.first_error {
            write!(f, " (first error: {err})")?;
        }
        Ok(())
    }
}

impl std::error::Error for QuorumError {}

impl Shared {
    /// Connects to the servers of `config` (validated). Fails with
    /// [`Error::Connection`] naming the endpoints when (a majority of) the
    /// servers cannot be reached within the connect timeout plus the
    /// timeout.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let name = config.backend_name();
        if config.tls {
            // Several rustls providers may be compiled in; pick ours once.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let mut nodes = Vec::with_capacity(config.endpoints.len());
        let all = config.endpoints.join(",");
        if config.sentinel_master.is_some() {
            let primary = SentinelPrimary::connect(&config, retry_message(&client_id))
                .await
                .map_err(|err| Error::connection(name, all.as_str(), err))?;
            nodes.push(Node::sentinel(all.clone(), primary));
        } else if config.cluster {
            let bound = config.connect_timeout + config.timeout;
            let conn =
                match tokio::time::timeout(bound, crate::cluster::connect(&config, None)).await {
                    Ok(conn) => conn,
                    Err(_) => Err(timed_out("no cluster node answered in time")),
                }
                .map_err(|err| Error::connection(name, all.as_str(), err))?;
            let subscriber = Subscriber::cluster(&config, retry_message(&client_id));
            nodes.push(Node::cluster(all.clone(), conn, subscriber));
        }
        let fixed = if nodes.is_empty() {
            &config.endpoints[..]
        } else {
            &[]
        };
        for endpoint in fixed {
            let own_message = retry_message(&client_id);
            let node = config.connection_info(endpoint).and_then(|info| {
                Node::new(
                    endpoint,
                    info,
                    config.timeout,
                    config.connect_timeout,
                    own_message,
                )
            });
            nodes.push(node.map_err(|err| Error::connection(name, endpoint.as_str(), err))?);
        }
        let pings = join_all(
            nodes
                .iter()
                .map(|node| node.ping(config.connect_timeout + config.timeout)),
        )
        .await;
        let quorum = nodes.len() / 2 + 1;
        let reachable = pings.iter().filter(|p| p.is_ok()).count();
        let mut failed = Vec::new();
        let mut first_error = None;
        for (node, ping) in nodes.iter().zip(pings) {
            if let Err(err) = ping {
                failed.push(node.endpoint());
                first_error.get_or_insert(err);
            }
        }
        if reachable < quorum {
            let err = first_error.expect("an unreachable node has an error");
            return Err(Error::connection(name, failed.join(","), err));
        }
        if !failed.is_empty() {
            tracing::warn!(unreachable = %failed.join(","), "distlock: some Redlock instances are unreachable; a majority answers");
        }
        let scripts = Publishing::new(config.cluster);
        Ok(Shared {
            scripts,
            wait_replicas: config.wait_replicas,
            wait_timeout: config.wait_timeout,
            name,
            nodes,
            quorum,
            prefix: config.prefix,
            fair: config.fair,
            timeout: config.timeout,
            endpoints: all,
            renewals: Arc::new(Renewals::default()),
            client_id,
            seq: AtomicU64::new(0),
        })
    }

    /// A value no other attempt of any client uses. It ends in 128 bits
    /// from the OS's CSPRNG: the owner is the lock's resume token, so
    /// knowing one's own owners must not reveal another's.
    pub fn new_owner(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut secret = [0u8; 16];
        getrandom::getrandom(&mut secret).expect("the OS random source failed");
        format!(
            "{}:{seq:x}:{:032x}",
            self.client_id,
            u128::from_le_bytes(secret)
        )
    }

    /// Per-instance bound of a Redlock request: small against the TTL (1%,
    /// at least 50 ms), so a dead or paused instance eats little of the
    /// validity time.
    pub fn node_timeout(&self, ttl: Duration) -> Duration {
        let floor = Duration::from_millis(50);
        (ttl / 100).clamp(floor, self.timeout.max(floor))
    }

    /// The message of this client's split-vote releases.
    pub fn retry_message(&self) -> String {
        retry_message(&self.client_id)
    }

    /// The error of `operation` on one server: [`Error::Unavailable`] when
    /// the server could not be reached (which `lock` retries within its
    /// wait), else [`Error::Backend`] with the server's answer.
    pub fn op_error(&self, operation: &'static str, key: &str, err: redis::RedisError) -> Error {
        let endpoint = self.endpoint();
        if is_unreachable(&err) || is_failing_over(&err) {
            Error::unavailable(self.name, endpoint, operation, key, err)
        } else {
            Error::backend(self.name, endpoint, operation, key, err)
        }
    }

    /// What errors name: the one server (Sentinel: the primary in use),
    /// or every endpoint.
    pub fn endpoint(&self) -> String {
        if self.nodes.len() == 1 {
            self.nodes[0].endpoint()
        } else {
            self.endpoints.clone()
        }
    }

    /// The error of an operation that no majority agreed on: the server's
    /// own error with one server, a [`QuorumError`] with Redlock, as
    /// [`Error::Unavailable`] when too few instances answered to know.
    pub fn quorum_or_node_error(
        &self,
        operation: &'static str,
        key: &str,
        succeeded: usize,
        refused: usize,
        first_error: Option<redis::RedisError>,
    ) -> Error {
        if self.nodes.len() == 1 {
            return self.op_error(
                operation,
                key,
                first_error.unwrap_or_else(|| timed_out("no answer")),
            );
        }
        let quorum_error = QuorumError {
            operation,
            succeeded,
            refused,
            needed: self.quorum,
            total: self.nodes.len(),
            first_error,
        };
        if quorum_error.too_few_answered() {
            Error::unavailable(
                self.name,
                self.endpoints.as_str(),
                operation,
                key,
                quorum_error,
            )
        } else {
            Error::backend(
                self.name,
                self.endpoints.as_str(),
                operation,
                key,
                quorum_error,
            )
        }
    }

    /// Runs `op` on every node at once (one node: directly, bounded by the
    /// connection's reply timeout).
    pub async fn on_all<T, F, Fut>(&self, per_node: Duration, op: F) -> Vec<redis::RedisResult<T>>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.nodes.len() == 1 {
            return vec![op(self.nodes[0].conn()).await];
        }
        join_all(self.nodes.iter().map(|node| {
            let request = op(node.conn());
            async move {
                match tokio::time::timeout(per_node, request).await {
                    Ok(result) => result,
                    Err(_) => Err(timed_out(
                        "no answer within the Redlock per-instance timeout",
                    )),
                }
            }
        }))
        .await
    }

    /// Runs `script`'s `command` on every node at once (see [`on_all`](Self::on_all)).
    pub async fn script_on_all<T: redis::FromRedisValue>(
        &self,
        per_node: Duration,
        script: &LuaScript,
        command: &redis::Cmd,
    ) -> Vec<redis::RedisResult<T>> {
        self.on_all(per_node, |mut conn| async move {
            script.run::<T>(&mut conn, command).await
        })
        .await
    }
}

/// True when `err` says the server could not be reached (refused, dropped,
/// no reply in time) or is still loading its data after a restart: the
/// request's outcome is unknown and a later one may succeed. False for the
/// server's error answers.
pub(crate) fn is_unreachable(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
}

/// True when `err` is an answer a failover gives: a replica refusing a
/// write (`READONLY`: Sentinel switched primaries), a primary cut off from
/// its replicas (`MASTERDOWN`), a Cluster slot that is moving or without a
/// primary (`TRYAGAIN`, `CLUSTERDOWN`). Nothing was done, and a later
/// attempt, on the new primary, may succeed.
pub(crate) fn is_failing_over(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::ReadOnly
                | ServerErrorKind::MasterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
        )
    )
}

/// What a client publishes when it gives back a split vote.
fn retry_message(client_id: &str) -> String {
    format!("retry:{client_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quorum_error(succeeded: usize, refused: usize) -> QuorumError {
        QuorumError {
            operation: "release",
            succeeded,
            refused,
            needed: 2,
            total: 3,
            first_error: None,
        }
    }

    #[test]
    fn a_split_answer_is_not_reported_as_too_few_answers() {
        // One deleted, one refused, one silent: two answered, which is a
        // majority, but they disagree.
        let split = quorum_error(1, 1);
        assert!(!split.too_few_answered());
        assert_eq!(
            split.to_string(),
            "no majority of 2 of 3 Redis instances agreed on release: 1 did it, 1 refused, 1 gave no answer"
        );
        let silent = quorum_error(1, 0);
        assert!(silent.too_few_answered());
        assert_eq!(
            silent.to_string(),
            "2 of 3 Redis instances gave no answer to release; a majority of 2 must answer"
        );
    }

    #[test]
    fn unreachable_servers_are_told_from_error_answers() {
        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(is_unreachable(&refused));
        assert!(is_unreachable(&crate::node::timed_out("no answer")));
        let answer = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        ));
        assert!(!is_unreachable(&answer));
    }
}
