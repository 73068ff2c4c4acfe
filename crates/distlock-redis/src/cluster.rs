//! `redis+cluster://`: a Redis Cluster, through the redis crate's
//! `cluster_async` connection.
//!
//! - **One slot per lock**: every name of a lock (the lock, its fencing
//!   counter, its fair queue and waiter table, its release and grant
//!   channels) carries the hash tag `{<encoded key>}` (see
//!   [`keys`](crate::keys)), so each script is a single-slot `EVALSHA`
//!   that the connection sends to the slot's primary. It follows `MOVED`
//!   and `ASK` redirections and refreshes its slot map by itself. The
//!   fencing counter lives in the lock's slot, so tokens grow per lock as
//!   on one server (seeded from that primary's clock).
//! - **Pipelines stay within a slot**: the renewal batches the locks of
//!   one slot per pipeline (on one server, all locks share one), and the
//!   `WAIT` after a grant is pipelined behind a write to the lock's slot,
//!   so it reaches that slot's primary on the connection that wrote.
//! - **Notified waiting** uses sharded pub/sub (`SPUBLISH` in the scripts,
//!   `SSUBSCRIBE` over one RESP3 connection per client; see
//!   [`subscriber`](crate::subscriber)).

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, RedisResult};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::RedisConfig;

/// Connects to the Redis Cluster of `config` through its seed nodes;
/// `pushes` (pub/sub connections only) switches to RESP3 and receives the
/// pushes.
pub(crate) async fn connect(
    config: &RedisConfig,
    pushes: Option<UnboundedSender<PushInfo>>,
) -> RedisResult<ClusterConnection> {
    let seeds = config
        .endpoints
        .iter()
        .map(|endpoint| config.connection_info(endpoint))
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.timeout)
        // A few retries (MOVED, ASK, TRYAGAIN, a reconnection), all within
        // twice the reply bound: failures reach the caller promptly.
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(200)
        .overall_response_timeout(Some(config.timeout * 2));
    if config.tls {
        builder = builder.tls(redis::TlsMode::Secure);
    }
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    builder.build()?.get_async_connection().await
}
