//! One Redis server of a client: a multiplexed connection that reconnects
//! by itself, and the shared pub/sub connection of the client's waiters.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::ConnectionInfo;

use crate::subscriber::Subscriber;

pub(crate) struct Node {
    pub endpoint: String,
    pub conn: ConnectionManager,
    pub subscriber: Arc<Subscriber>,
}

impl Node {
    /// Builds the node without waiting for the connection (it is made on
    /// first use and remade after failures).
    pub fn new(
        endpoint: &str,
        info: ConnectionInfo,
        timeout: Duration,
        connect_timeout: Duration,
        own_message: String,
    ) -> redis::RedisResult<Self> {
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
        Ok(Node {
            endpoint: endpoint.to_owned(),
            conn,
            subscriber: Subscriber::new(client, timeout, own_message),
        })
    }

    /// One PING, bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(timeout, redis::cmd("PING").query_async::<()>(&mut conn)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out("no answer to PING")),
        }
    }
}

pub(crate) fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}
