//! Redis backend of distlock: one Redis server (`redis://`, `rediss://`) or a
//! Redlock quorum of independent servers (`redlock://`).
//!
//! **URLs:** `redis://[user:password@]host[:port][/db]` (port 6379, db 0 by
//! default), `rediss://…` for TLS (rustls, system roots), and
//! `redlock://[user:password@]h1:p1,h2:p2,h3:p3[/db]`. Options: `prefix`
//! (default `distlock`; every key written starts with it; no braces),
//! `fair` (default `true` for one server; Redlock is never fair), `timeout`
//! (default `2s`: the bound on each reply), `connect_timeout` (default
//! `4s`: the bound on connecting), and `tls=true` for `redlock://`. In code: [`RedisLock::with_config`]
//! with a [`RedisConfig`].
//!
//! **What it promises:** acquire, release and extend are one script each
//! (one round trip; Redlock sends it to every server at once). Waiters are
//! woken by releases, and in fair mode get the lock in arrival order. A
//! holder that stops renewing loses the lock after its TTL. `connect`
//! fails with [`Error::Connection`](distlock_core::Error::Connection) when
//! (a majority of) the servers cannot be reached. Later, `try_lock` and
//! `lock` fail with [`Error::Backend`](distlock_core::Error::Backend) when
//! the server (or a majority) does not answer, rather than wait out
//! `wait`; held locks keep renewing through an outage until their deadline.
//!
//! **Under failover:** Redis replicates asynchronously. A primary that
//! fails after granting a lock, before the replica that takes over has the
//! write, lets the new primary grant it again: two holders at once, the
//! first learning it at its next renewal (`lost()` fires with `NotHeld`).
//! Redlock survives the loss of a minority of its servers, assuming bounded
//! clock drift and pauses shorter than the TTL. Where a double grant is
//! unacceptable, check fencing tokens where you write, or use ZooKeeper or
//! etcd. Redis Cluster is not supported (name one primary).
//!
//! **Fencing tokens** come from the script that grants the lock: the
//! server's clock in microseconds, or the key's last token plus one when
//! that is larger. On one server they strictly increase per key, also
//! across a restart that lost the last token, unless the server's clock
//! stepped back. With Redlock a token is the largest of the granting
//! majority, and holders granted by different majorities may get them out
//! of order ([`Capabilities::strict_fencing`] is `false`).
//!
//! ```no_run
//! use std::time::Duration;
//! use distlock_core::{DistributedLock, LockOptions};
//!
//! # #[tokio::main]
//! # async fn main() -> distlock_core::Result<()> {
//! let locks = distlock_redis::connect("redis://127.0.0.1:6379/0?prefix=myapp").await?;
//! let options = LockOptions::new().ttl(Duration::from_secs(10)).wait(Duration::from_secs(5));
//! let guard = locks.lock("billing/run-invoices", &options).await?;
//! // Pass guard.fencing_token() to what you write; watch guard.lost() while you work.
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod acquire;
mod client;
mod cluster;
mod config;
mod held;
mod keys;
mod node;
mod renewal;
mod replicas;
mod scripts;
mod sentinel;
mod subscriber;

use std::sync::Arc;

use async_trait::async_trait;
use distlock_core::backend;
use distlock_core::{Capabilities, DistributedLock, LockGuard, LockOptions, Result};

pub use config::{
    RedisConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX, DEFAULT_TIMEOUT, DEFAULT_WAIT_TIMEOUT,
};

use client::Shared;

/// Connects to the service named by `url` (`redis://`, `rediss://`,
/// `redlock://`); see the crate docs for the forms.
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(RedisLock::connect(url).await?))
}

/// A Redis lock client: one server, or a Redlock quorum. Cheap to clone;
/// clones share the connections.
#[derive(Clone)]
pub struct RedisLock {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLock")
            .field("backend", &self.shared.name)
            .field("endpoints", &self.shared.endpoints)
            .field("prefix", &self.shared.prefix)
            .field("fair", &self.shared.fair)
            .finish()
    }
}

impl RedisLock {
    /// Parses `url` (see [`RedisConfig::from_url`]) and connects.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(RedisConfig::from_url(url)?).await
    }

    /// Checks `config` ([`RedisConfig::validate`]) and connects. Fails with
    /// [`Error::Connection`](distlock_core::Error::Connection) naming the
    /// endpoints when (a majority of) the servers cannot be reached within
    /// the connect timeout plus the timeout.
    pub async fn with_config(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        Ok(RedisLock {
            shared: Arc::new(Shared::connect(config).await?),
        })
    }

    /// The Redis key that holds `key`'s lock, e.g. `distlock:{jobs%2Fnightly}:lock`
    /// (for operators and tests; the fence counter and queue share its tag).
    pub fn redis_key(&self, key: &str) -> String {
        keys::LockKeys::new(&self.shared.prefix, key).lock
    }

    /// The `host:port` of the servers, comma-separated (the Sentinels, or
    /// a Cluster's seed nodes, as configured).
    pub fn endpoints(&self) -> &str {
        &self.shared.endpoints
    }

    /// The `host:port` of the primary in use, for a client that follows
    /// Sentinels (`redis+sentinel://`); `None` for the other topologies.
    pub fn primary(&self) -> Option<String> {
        self.shared.nodes[0].primary()
    }
}

#[async_trait]
impl backend::LockBackend for RedisLock {
    fn backend(&self) -> &'static str {
        self.shared.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fair: self.shared.fair,
            session_based: false,
            ttl_expiry: true,
            // Redlock: see "Fencing tokens" in the crate docs.
            strict_fencing: self.shared.nodes.len() == 1,
            cross_process: true,
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.shared.try_acquire(key, options).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        self.shared.acquire(key, options).await
    }
}
