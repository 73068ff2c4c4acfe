//! ZooKeeper backend of distlock: the classic lock recipe with ephemeral
//! sequential nodes, a watch on the predecessor only, and the node's
//! creation zxid as the fencing token.
//!
//! **URL:** `zk://host1:2181,host2:2181/prefix?session_ttl=10s` (or
//! `zookeeper://…`); in code, [`ZooKeeperLock::with_config`] with a
//! [`ZooKeeperConfig`].
//! - hosts: one or more `host[:port]` (port 2181 by default; IPv6 as
//!   `[::1]:2181`). `connect` tries each once and fails with
//!   [`Error::Connection`](distlock_core::Error::Connection) naming them if
//!   none answers;
//! - prefix: the node under which each key gets its lock directory
//!   (default [`/distlock`](config::DEFAULT_PREFIX)), created on first use;
//! - `session_ttl` (default 10s): the session timeout, how long a crashed
//!   or partitioned holder keeps its locks; the server clamps it into its
//!   `minSessionTimeout..maxSessionTimeout`;
//! - `connect_timeout` (default: the session TTL): bound on `connect`.
//!
//! **What it promises:** waiters are served in arrival order. The session
//! is the lease: a lock lives while the client's session does
//! (`LockOptions::ttl` only paces the ownership check; capability
//! `ttl_expiry = false`). When the connection to the ensemble is lost, a
//! guard vouches for its lock for a third of the session TTL, then fires
//! `lost()` unless the session reconnected in time; an expired or closed
//! session fires `lost()` on every guard at once, and the next acquisition
//! opens a new session. A node deleted by an operator fires `lost()`
//! through one persistent recursive watch per session on the prefix (set
//! when a lock is first held for `ttl / 3`; ZooKeeper 3.6+), without a
//! request per held lock: at once while the watch is set, else within
//! `ttl / 3` of the grant. A dropped, timed-out or failed
//! attempt deletes its node: no orphan nodes, no ghost waiters.
//!
//! **Fencing tokens** are the lock node's `czxid`, the zxid of the
//! transaction that created it: it grows across the ensemble's whole
//! history, so tokens keep growing across lock directories and leaders.
//!
//! **Curator:** lock nodes are named `_c_<uuid>-lock-<seq>` and ordered by
//! sequence, like Apache Curator's `InterProcessMutex` (protected mode), so
//! a Curator mutex on a key's [lock directory](ZooKeeperLock::lock_directory)
//! queues with distlock's clients (tested against Curator 5.4 in
//! `tests/curator.rs`; docs/interop.md).
//!
//! ```no_run
//! use std::time::Duration;
//! use distlock_core::{DistributedLock, LockOptions};
//! use distlock_zookeeper::ZooKeeperLock;
//!
//! # #[tokio::main]
//! # async fn main() -> distlock_core::Result<()> {
//! // One session for this client, shared by all its locks.
//! let locks = ZooKeeperLock::connect("zk://zk1:2181,zk2:2181,zk3:2181/myapp/locks?session_ttl=10s").await?;
//! let options = LockOptions::new().wait(Duration::from_secs(30));
//! let guard = locks.lock("billing/nightly-run", &options).await?;
//! tokio::select! {
//!     _ = async { /* the work, passing guard.fencing_token() to what it writes */ } => {}
//!     reason = guard.lost() => eprintln!("lock lost ({reason}); stopping"),
//! }
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod acquire;
pub mod config;
mod held;
mod liveness;
mod node;
mod session;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend;
use distlock_core::{Capabilities, DistributedLock, LockGuard, LockOptions, Result};

pub use config::ZooKeeperConfig;
use session::SessionSlot;

pub(crate) const BACKEND: &str = "zookeeper";

/// Longest encoded key used as a directory name; longer keys are hashed.
const MAX_DIR_NAME: usize = 200;

/// Connects to the ZooKeeper ensemble named by `url` (see the crate docs
/// for the URL forms).
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(ZooKeeperLock::connect(url).await?))
}

/// A ZooKeeper lock client: one session, shared by all the locks it takes.
/// Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct ZooKeeperLock {
    inner: Arc<Inner>,
}

struct Inner {
    config: ZooKeeperConfig,
    sessions: SessionSlot,
}

impl std::fmt::Debug for ZooKeeperLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZooKeeperLock")
            .field("hosts", &self.inner.config.hosts)
            .field("prefix", &self.inner.config.prefix)
            .field("session_id", &format_args!("{:#x}", self.session_id()))
            .finish()
    }
}

impl ZooKeeperLock {
    /// Parses `url` (see [`ZooKeeperConfig::from_url`]) and opens a
    /// session.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(ZooKeeperConfig::from_url(url)?).await
    }

    /// Checks `config` and opens a session with it.
    pub async fn with_config(config: ZooKeeperConfig) -> Result<Self> {
        config.validate()?;
        let sessions = SessionSlot::connect(&config).await?;
        Ok(ZooKeeperLock {
            inner: Arc::new(Inner { config, sessions }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ZooKeeperConfig {
        &self.inner.config
    }

    /// The id of the current session (the `ephemeralOwner` of its nodes).
    pub fn session_id(&self) -> i64 {
        self.inner.sessions.current().id
    }

    /// The session TTL (session timeout) the server granted.
    pub fn session_ttl(&self) -> Duration {
        self.inner.sessions.current().ttl
    }

    /// The ZooKeeper path of `key`'s lock directory, for operators and
    /// tests.
    pub fn lock_directory(&self, key: &str) -> String {
        format!(
            "{}/{}",
            self.inner.config.prefix,
            distlock_core::backend::key::encode_component(key, MAX_DIR_NAME)
        )
    }

    /// Ends the current session on the server, as an expiry would: it
    /// attaches a second connection to the session and closes the session
    /// there. Returns once this client has seen its session end (every lock
    /// held through it has then fired `lost()`); the next acquisition opens
    /// a new session. For fault injection in tests and drills.
    pub async fn kill_session(&self) -> Result<()> {
        self.inner.sessions.current().kill().await
    }
}

#[async_trait]
impl backend::LockBackend for ZooKeeperLock {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fair: true,
            session_based: true,
            ttl_expiry: false,
            strict_fencing: true,
            cross_process: true,
            resumable: false,
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.attempt(key, options).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        self.acquire(key, options).await
    }
}
