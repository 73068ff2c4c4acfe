//! Redis backend of distlock: one Redis server (`redis://`, `rediss://`) or a
//! Redlock quorum of independent servers (`redlock://`).
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
//! // Pass the fencing token to what you write; watch guard.lost() while you work.
//! let token = guard.fencing_token();
//! # let _ = token;
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # URLs
//!
//! | URL | meaning |
//! |---|---|
//! | `redis://[user:password@]host[:port][/db]` | one server (port 6379, db 0 by default) |
//! | `rediss://…` | the same over TLS (rustls, system roots) |
//! | `redlock://[user:password@]h1:p1,h2:p2,h3:p3[/db]` | Redlock over independent servers (`?tls=true` for TLS) |
//!
//! Options (query string): `prefix=myapp` (default `distlock`; every key this
//! backend writes starts with it; no braces), `fair=false` (default `true`
//! for one server; Redlock is never fair), `timeout=2s` (bound on
//! connecting and on each reply).
//!
//! # How it works
//!
//! - **Acquire is one round trip**: a Lua script does `SET lock owner NX PX
//!   ttl` and, when it succeeds, increments the lock's fence counter and
//!   returns it as the fencing token. The lock, its counter and its wait
//!   queue share one hash tag (`prefix:{encoded key}:…`), so they live in
//!   one cluster slot; the user's key is percent-encoded (long keys
//!   hashed), so a key holding `{`/`}` cannot move the tag and distinct keys
//!   never collide.
//! - **Release and extend are one round trip each**: owner-checked scripts
//!   (compare, then `DEL` / `PEXPIRE`). A stale owner gets
//!   [`NotHeld`](distlock_core::Error::NotHeld) and never touches a newer
//!   holder's lock.
//! - **Waiting is notified**: release publishes on the lock's channel;
//!   all waiters of a client share one pub/sub connection per server. A
//!   waiter subscribes, then tries again (so a release between its failed
//!   try and its subscription is not missed). A subscription nobody uses
//!   stays on for 2 s: a client that waits on the same lock again within
//!   that time starts waiting with its one failed try. Expiry publishes nothing, so
//!   a waiter also retries when the holder's remaining TTL (returned by the
//!   failed try) runs out, with jitter. A dropped `lock` future
//!   unsubscribes and, in fair mode, leaves the queue (in the background).
//! - **Fair mode** (default for one server): the acquire script keeps a
//!   FIFO of waiters next to the lock; a free lock goes to the head of the
//!   queue, so no contender starves. An uncontended acquire is still one
//!   round trip (the queue is empty). `try_lock` never jumps the queue. A
//!   waiter refreshes its queue entry every second; a crashed waiter's
//!   entry expires after 3 s.
//! - **Direct handoff** (fair mode): the release script itself makes the
//!   queue's head (a waiter whose entry is fresh) the owner, for the TTL
//!   that waiter asked for but at most 3 s (the claim window), with a new
//!   fencing token, and publishes the grant
//!   on the channel of that waiter's client (one message per handoff,
//!   however many clients wait); the waiter holds the lock when the message
//!   arrives, without another round trip. It vouches for the lease from the server clock reading of
//!   its own last attempt (the grant carries the server time it was made
//!   at). A waiter that misses the message (its pub/sub connection died, a
//!   later message overwrote it) learns of the grant from its next attempt
//!   (on any wake-up, at the latest after a second); a waiter dropped at the
//!   moment of the handoff deletes the lock it was given and wakes the next
//!   one. The waiter extends the lock to its TTL as soon as it has the
//!   grant, in the background (with or without auto-renewal); the guard is
//!   usable at once, vouched for by the claim window until then. A waiter
//!   whose process died within 3 s of its last refresh can still be handed
//!   the lock, and then blocks it for the claim window, not for its TTL.
//!   (A waiter of an older distlock version does not read the new grant
//!   message; it finds the lock is its own at its next attempt, within a
//!   second, and its lease then lasts the claim window.)
//! - **Renewal is batched**: one task per client renews all of its
//!   auto-renewed locks with one pipeline per server and tick (about
//!   `ttl / 3`). A lock the server no longer has for this owner is marked
//!   lost at once; while the server cannot be reached, renewal retries until
//!   the lease's local deadline, when `lost()` fires.
//!
//! # Errors and outages
//!
//! `connect` fails with [`Error::Connection`](distlock_core::Error::Connection) naming the endpoint(s) when
//! the server (or a Redlock majority) cannot be reached within about twice
//! `timeout`; it never hangs. Afterwards the connection reconnects by
//! itself. `try_lock` and `lock` return [`Error::Backend`](distlock_core::Error::Backend) at once when the
//! server (or a majority) does not answer, rather than waiting out `wait`:
//! retry at your level if an outage should be ridden out. Held locks keep
//! renewing through short outages until their local deadline.
//!
//! Redis Cluster is not supported as such (point the URL at one primary);
//! the key layout is already slot-safe.
//!
//! # Fencing tokens
//!
//! A token is `max(counter + 1, server time in µs)`. On one server tokens
//! are strictly increasing per key ([`Capabilities::strict_fencing`]
//! is `true`), also across a restart without persistence (the counter is
//! forgotten, but the clock has moved on), **provided the server's clock
//! does not step back** across such a loss of the counter. With Redlock
//! each instance keeps its own counter: the token is the largest of the
//! majority that granted the lock; it is normally increasing but two
//! holders whose majorities differ can get tokens out of order when the
//! instances' clocks disagree, so `strict_fencing` is `false` there.
//!
//! # Failover with asynchronous replication
//!
//! Redis replicates asynchronously. If the primary fails after granting a
//! lock but before the write reached the replica that takes over, the new
//! primary does not know the lock and grants it again: **two holders at
//! once**. The guard of the first holder learns it only at its next
//! renewal (`lost()` fires with `NotHeld`). Tokens stay increasing across
//! such a failover only as far as the servers' clocks agree. If a double
//! grant is unacceptable, use fencing tokens checked by the protected
//! resource, or a consensus-backed service.
//!
//! # Which backend
//!
//! - **One Redis server**: fastest, simplest; a lock is as available as
//!   that server, and lost on failover as above. Good for efficiency locks
//!   (avoid doing work twice).
//! - **Redlock** (3 or 5 independent servers, no replication between
//!   them): survives the loss of a minority of servers, at the cost of N
//!   requests per operation; safety relies on bounded clock drift and
//!   process pauses shorter than the TTL, and its tokens are not strictly
//!   ordered.
//! - **ZooKeeper or etcd**: consensus systems; prefer them when
//!   correctness matters (locks that protect data), since a grant is
//!   linearizable and survives failover, and their fencing tokens (zxid,
//!   revision) are strictly ordered.

#![warn(missing_docs)]

mod acquire;
mod client;
mod config;
mod held;
mod keys;
mod node;
mod renewal;
mod scripts;
mod subscriber;

use std::sync::Arc;

use async_trait::async_trait;
use distlock_core::backend;
use distlock_core::{Capabilities, DistributedLock, LockGuard, LockOptions, Result};

pub use config::{RedisConfig, DEFAULT_PREFIX, DEFAULT_TIMEOUT};

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
    /// about twice the timeout.
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

    /// The `host:port` of the servers, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.shared.endpoints
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
            // One server: see "Fencing tokens" in the crate docs.
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
