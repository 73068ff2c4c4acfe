//! One Redis "node" of a client: where its requests go, and the shared
//! pub/sub connection of the client's waiters.
//!
//! A node is one fixed server (`redis://`, each Redlock instance), the
//! primary that Sentinels name (it changes on failover; see
//! [`sentinel`](crate::sentinel)), or a whole Redis Cluster, whose
//! connection routes each request to its key's slot (see
//! [`cluster`](crate::cluster)). Every operation reaches it through
//! [`Conn`], which is a `redis::aio::ConnectionLike` whatever the kind.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionInfo, Pipeline, RedisFuture, Value};

use crate::sentinel::SentinelPrimary;
use crate::subscriber::Subscriber;

pub(crate) struct Node {
    /// What errors name: `host:port`, or the Sentinels or Cluster seeds.
    endpoint: String,
    target: Target,
}

enum Target {
    Fixed {
        conn: ConnectionManager,
        subscriber: Arc<Subscriber>,
    },
    Sentinel(Arc<SentinelPrimary>),
    Cluster {
        conn: ClusterConnection,
        subscriber: Arc<Subscriber>,
    },
}

impl Node {
    /// One fixed server, without waiting for the connection (it is made on
    /// first use and remade after failures).
    pub fn new(
        endpoint: &str,
        info: ConnectionInfo,
        timeout: Duration,
        connect_timeout: Duration,
        own_message: String,
    ) -> redis::RedisResult<Self> {
        let (conn, subscriber) = connect_lazy(info, timeout, connect_timeout, own_message)?;
        Ok(Node {
            endpoint: endpoint.to_owned(),
            target: Target::Fixed { conn, subscriber },
        })
    }

    /// The primary that `primary`'s Sentinels name.
    pub fn sentinel(endpoint: String, primary: Arc<SentinelPrimary>) -> Self {
        Node {
            endpoint,
            target: Target::Sentinel(primary),
        }
    }

    /// A Redis Cluster.
    pub fn cluster(endpoint: String, conn: ClusterConnection, subscriber: Arc<Subscriber>) -> Self {
        Node {
            endpoint,
            target: Target::Cluster { conn, subscriber },
        }
    }

    /// What errors name: the server's `host:port`; for Sentinel, the
    /// primary in use and the master name; for a Cluster, its seed nodes.
    pub fn endpoint(&self) -> String {
        match &self.target {
            Target::Sentinel(primary) => primary.describe(),
            _ => self.endpoint.clone(),
        }
    }

    /// The `host:port` of the primary in use (Sentinel only).
    pub fn primary(&self) -> Option<String> {
        match &self.target {
            Target::Sentinel(primary) => Some(primary.current().endpoint.clone()),
            _ => None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    /// The connection for one request (cheap: a handle on a multiplexed
    /// connection).
    pub fn conn(&self) -> Conn {
        match &self.target {
            Target::Fixed { conn, .. } => Conn::Fixed(conn.clone()),
            Target::Sentinel(primary) => {
                let current = primary.current();
                Conn::Sentinel {
                    conn: current.conn.clone(),
                    generation: current.generation,
                    primary: primary.clone(),
                }
            }
            Target::Cluster { conn, .. } => Conn::Cluster(conn.clone()),
        }
    }

    /// The waiters' pub/sub connection (for Sentinel, the current
    /// primary's: a switch closes the old one, which wakes its waiters).
    pub fn subscriber(&self) -> Arc<Subscriber> {
        match &self.target {
            Target::Fixed { subscriber, .. } | Target::Cluster { subscriber, .. } => {
                subscriber.clone()
            }
            Target::Sentinel(primary) => primary.current().subscriber.clone(),
        }
    }

    /// One PING, bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        match tokio::time::timeout(timeout, redis::cmd("PING").query_async::<()>(&mut conn)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out("no answer to PING")),
        }
    }
}

/// A connection manager (lazy, reconnecting) and a subscriber for one
/// server.
pub(crate) fn connect_lazy(
    info: ConnectionInfo,
    timeout: Duration,
    connect_timeout: Duration,
    own_message: String,
) -> redis::RedisResult<(ConnectionManager, Arc<Subscriber>)> {
    let client = redis::Client::open(info)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(timeout))
        // Reconnect attempts per failure; every later request retries
        // again, so a server that comes back is found.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
    let subscriber = Subscriber::new(client, timeout, own_message);
    Ok((conn, subscriber))
}

/// The connection of one request, whatever the topology.
#[derive(Clone)]
pub(crate) enum Conn {
    Fixed(ConnectionManager),
    /// The primary's connection when the request started; an error that
    /// says the primary may have changed asks the Sentinels again before
    /// it is returned, so that the caller's retry reaches the new one.
    Sentinel {
        conn: ConnectionManager,
        generation: u64,
        primary: Arc<SentinelPrimary>,
    },
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Fixed(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
            Conn::Sentinel {
                conn,
                generation,
                primary,
            } => Box::pin(async move {
                let result = conn.req_packed_command(cmd).await;
                if let Err(err) = &result {
                    primary.after_error(*generation, err).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Fixed(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel {
                conn,
                generation,
                primary,
            } => Box::pin(async move {
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(err) = &result {
                    primary.after_error(*generation, err).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Fixed(conn) | Conn::Sentinel { conn, .. } => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

pub(crate) fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}
