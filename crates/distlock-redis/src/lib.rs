//! Redis backend of distlock: one Redis server (`redis://`, `rediss://`),
//! the primary that Redis Sentinels name (`redis+sentinel://`), a Redis
//! Cluster (`redis+cluster://`), or a Redlock quorum of independent
//! servers (`redlock://`).
//!
//! **URLs:**
//!
//! | URL | topology |
//! |---|---|
//! | `redis://[user:password@]host[:port][/db]` (port 6379, db 0), `rediss://…` (TLS: rustls, system roots) | one server |
//! | `redis+sentinel://[user:password@]s1:26379,s2:26379,s3:26379/<master name>[?db=N]` (port 26379) | the primary the Sentinels name for the master |
//! | `redis+cluster://[user:password@]h1:7000,h2:7001,...` (any nodes; db 0 only) | Redis Cluster |
//! | `redlock://[user:password@]h1:p1,h2:p2,h3:p3[/db]` | Redlock quorum |
//!
//! Options: `prefix` (default `distlock`; every key written starts with
//! it; no braces), `fair` (default `true` except Redlock, which is never
//! fair), `timeout` (default `2s`: the bound on each reply),
//! `connect_timeout` (default `4s`: the bound on connecting),
//! `wait_replicas` and `wait_timeout` (see "Replica acknowledgements"),
//! `db` (Sentinel, whose path is the master name) and `tls=true` (TLS for
//! every node of `redlock://`, `redis+sentinel://`, `redis+cluster://`).
//! User and password are the data nodes'; Sentinels are reached without
//! them. In code: [`RedisLock::with_config`] with a [`RedisConfig`].
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
//! Sentinel and Cluster keep every one of these promises: a lock lives on
//! one primary, exactly as on one server.
//!
//! **Sentinel:** the client asks the Sentinels for the primary at connect,
//! and follows a failover: it watches every Sentinel's `+switch-master`
//! announcements, and a request that fails the way a failover makes it
//! fail (no connection, `READONLY`, `MASTERDOWN`) asks the Sentinels again
//! before its error ([`Error::Unavailable`](distlock_core::Error::Unavailable),
//! which `lock` retries within its wait) is returned. Waiters move to the
//! new primary at once; held locks keep renewing there, and one the new
//! primary never received fires `lost()` at its next renewal.
//! [`RedisLock::primary`] says which primary is in use.
//!
//! **Cluster:** all names of one lock (the lock, its fencing counter, its
//! fair queue, its channels) share the hash tag `{<key>}`, so every script
//! runs on the slot's primary; the client follows `MOVED` and `ASK`.
//! Waiters are notified with sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`);
//! a message lost while the client resubscribes (a reconnection, a slot
//! moving) delays a waiter to its next timed attempt (at the latest the
//! holder's expiry, or 1 s in fair mode), never past a release.
//!
//! **Under failover:** Redis replicates asynchronously, with one server,
//! Sentinel or Cluster alike. A primary that fails after granting a lock,
//! before the replica that takes over has the write, lets the new primary
//! grant it again: two holders at once, the first learning it at its next
//! renewal (`lost()` fires with `NotHeld`). Redlock survives the loss of a
//! minority of its servers, assuming bounded clock drift and pauses
//! shorter than the TTL. Where a double grant is unacceptable, check
//! fencing tokens where you write, or use ZooKeeper or etcd.
//!
//! **Replica acknowledgements** (`wait_replicas=N`, `wait_timeout`, default
//! [`DEFAULT_WAIT_TIMEOUT`], 100 ms; one primary only): after every grant
//! the client sends `WAIT N <wait_timeout>` to the lock's primary (behind
//! a write of its own to the lock, so the count covers the grant) and
//! hands the lock out only when at least `N` replicas acknowledged it.
//! Otherwise it gives the lock back and fails with
//! [`Error::Unavailable`](distlock_core::Error::Unavailable) naming the
//! key, the primary and how many replicas acknowledged (`lock` retries
//! within its wait). This narrows the window in which a failover forgets
//! a grant: from "until the replicas had it" to "never, if the replica
//! that takes over is one that acknowledged". It does not make Redis
//! strongly consistent: `WAIT` does not make the write durable on the
//! replicas' disks, the failover may still promote a replica that did not
//! acknowledge (Sentinel and Cluster pick by replication offset and
//! priority, not by who acknowledged), a replica that restarts without
//! persistence forgets what it acknowledged, and renewals and releases
//! are not waited for. It costs one round trip per grant, plus the
//! replicas' acknowledgement time, and up to `wait_timeout` when too few
//! replicas are connected.
//! Measured by the fault suite (docs/choosing.md, "Under faults"): with
//! Sentinel, a primary paused for 3 s and resumed after the failover
//! granted the lock to a client that had not switched yet, a double grant
//! in 3 of 5 runs without `wait_replicas`; with `wait_replicas=1` its
//! grants found no replica to acknowledge them, and none of 5 runs had
//! one.
//!
//! **Fencing tokens** come from the script that grants the lock: the
//! server's clock in microseconds, or the key's last token plus one when
//! that is larger. On one server they strictly increase per key, also
//! across a restart that lost the last token, unless the server's clock
//! stepped back. With Sentinel and Cluster the counter lives with the lock
//! (its slot's primary); after a failover that lost it, tokens continue
//! from the new primary's clock, so they keep increasing as long as its
//! clock is not behind the old primary's. With Redlock a token is the largest of the granting
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
/// `redis+sentinel://`, `redis+cluster://`, `redlock://`); see the crate
/// docs for the forms.
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(RedisLock::connect(url).await?))
}

/// A Redis lock client: one server, a Sentinel-managed primary, a Redis
/// Cluster, or a Redlock quorum. Cheap to clone; clones share the
/// connections.
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
            resumable: true,
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.shared.try_acquire(key, options).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        self.shared.acquire(key, options).await
    }

    async fn resume(
        &self,
        key: &str,
        fencing_token: u64,
        resume_token: &str,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        self.shared
            .resume(key, fencing_token, resume_token, options)
            .await
    }
}
