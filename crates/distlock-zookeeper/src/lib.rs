//! ZooKeeper backend of distlock: the classic lock recipe with ephemeral
//! sequential nodes, a watch on the predecessor only, and the node's
//! creation zxid as the fencing token.
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
//!
//! # URLs
//!
//! `zk://host1:2181,host2:2181/prefix?session_ttl=10s` (or
//! `zookeeper://…`):
//! - hosts: one or more `host[:port]` (port 2181 by default; IPv6 as
//!   `[::1]:2181`). `connect` tries each once and fails with
//!   [`Error::Connection`](distlock_core::Error::Connection) naming them if none answers;
//! - prefix: the node under which each key gets its lock directory
//!   (default [`/distlock`](config::DEFAULT_PREFIX)); created as persistent nodes on first use;
//! - `session_ttl` (default 10s): the session timeout, how long a crashed
//!   or partitioned holder keeps its locks; the server clamps it into its
//!   `minSessionTimeout..maxSessionTimeout`;
//! - `connect_timeout` (default: the session TTL): bound on `connect`.
//!
//! # The recipe
//!
//! Each key maps to the directory `<prefix>/<encoded key>`
//! ([`encode_component`](distlock_core::backend::key::encode_component): no collisions,
//! long keys hashed), a *container* node that the server removes once it
//! is empty again, so directories do not pile up. A contender creates an
//! ephemeral sequential node `_c_<uuid>-lock-<seq>` in it (Curator's
//! "protected" naming: after a connection loss the client finds its node by
//! the uuid instead of creating a second one), lists the directory, and
//! holds the lock if its sequence is the lowest. Otherwise it watches its
//! own node, its immediate predecessor and the node ahead of that (so at
//! most two waiters watch any node: no herd effect). Waiters are served in
//! arrival order.
//!
//! Once the predecessor is the only node ahead, it is the holder, and no
//! node can queue ahead of us any more (sequences only grow; every lower
//! node existed when we listed): its deletion alone grants the lock, with
//! no request after the holder's delete. The waiter further back learns
//! that the node two ahead of it went, and lists again *while* its
//! predecessor holds, so it is in that position by the next handoff. A
//! predecessor that was still waiting when we listed may have abandoned,
//! leaving an earlier holder: its deletion makes us list again, as does a
//! data change, a reconnection of the session in between (the server then
//! replays deletions in no guaranteed order) or our own node being touched
//! or deleted (then the acquisition fails instead of granting a lock
//! without a node).
//!
//! - Uncontended acquisition: 2 requests (create, list) once the directory
//!   exists; release: 1 (delete); `try_lock` on a held key: 3 (create, list,
//!   delete).
//! - A waiter: create, list, and one round trip setting its watches (2 or
//!   3 requests), then nothing while its predecessor holds, except one
//!   listing (plus a watch) when the node two ahead goes. A handoff costs
//!   the holder's delete and nothing else on the critical path: its floor
//!   is the delete's round trip (a quorum write, fsynced), as the server
//!   notifies the watcher when it applies the delete, just before it
//!   answers the holder.
//! - Fencing token: the lock node's `czxid`, the zxid of the transaction
//!   that created it. Zxids grow across the whole ensemble's history, so
//!   tokens keep growing even when the directory is removed and made again
//!   (a sequence number restarts at 0 in a new directory).
//! - A dropped or timed-out `lock`, and a `try_lock` that finds the lock
//!   held, delete their node (in the background when dropped): no orphan
//!   nodes, no ghost waiters.
//!
//! # Lease semantics
//!
//! The session is the lease: the lock lives while the session does, so
//! [`LockOptions::ttl`](distlock_core::LockOptions::ttl) does not bound it on the
//! server (capability `ttl_expiry = false`); it only paces the ownership
//! check below. While connected, a guard's
//! [`valid_until`](distlock_core::backend::Lease::valid_until) is `None` (the session
//! vouches). When the connection is lost the session is *suspended*: the
//! server may expire it one session timeout after it last heard from us,
//! so the guard vouches only for a third of the session timeout from the
//! disconnect (which the client sees at most ~45% of the timeout after the
//! last answer), then reports `lost()`; a reconnection of the same session in
//! time brings it back to `None`. A connection attempt is given up after a
//! sixth of the session timeout, so two fit in that grace (the client
//! crate's default, 2/5, is longer than the grace: one attempt hanging on
//! a server that is still starting lost every lock of the session). An expired or closed session fires
//! `lost()` on every guard at once (one watcher task per client drives all
//! leases). After the session has ended, the next acquisition opens a new
//! one.
//!
//! With `auto_renew` (the default), each guard checks every `ttl / 3`, with
//! one `exists`, that its node still exists and belongs to the session, so
//! a node deleted by an operator also fires `lost()`.
//!
//! # When to choose ZooKeeper
//!
//! ZooKeeper orders every write through a quorum: locks are strongly
//! consistent and fenced, but each acquisition costs a quorum write and a
//! few milliseconds. As the Chubby paper advises, it suits coarse-grained
//! locks held for seconds to hours (leader election, a nightly job, a
//! migration) rather than fine-grained locks taken thousands of times a
//! second; for those, prefer Redis or batch the work under one lock.

#![warn(missing_docs)]

pub mod config;
mod recipe;
mod session;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use distlock_core::backend::{self, scheduled_guard, CleanupOnDrop, RenewalScheduler};
use distlock_core::{Capabilities, DistributedLock, LockGuard, LockOptions, Result};
use zookeeper_client as zk;

pub use config::ZooKeeperConfig;
use recipe::{delete_abandoned, delete_unnamed, Position, ZooKeeperHeld};
use session::Session;

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
    session: Mutex<Arc<Session>>,
    /// Serialises opening a new session after the old one ended.
    reconnecting: tokio::sync::Mutex<()>,
    /// Starts a held lock's checks when the first falls due (`ttl / 3`):
    /// a lock released before then costs no task.
    renewals: RenewalScheduler,
}

/// How long `kill_session` gives one steal (attaching to the session, then
/// waiting for the close to end it) before it steals the session again.
const KILL_ROUND: std::time::Duration = std::time::Duration::from_secs(2);

/// What an unfinished attempt's cleanup runs: built (and boxed) only when
/// it runs.
type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the armed cleanup deletes, named in its warning if it cannot run.
const ABANDONED_NODE: &str = "a zookeeper lock node";

/// An attempt's node, created and queued (see [`ZooKeeperLock::enqueue`]).
struct Enqueued<F: FnOnce() -> Cleanup> {
    session: Arc<Session>,
    /// The key's lock directory.
    dir: String,
    created: recipe::Created,
    /// The node's path, `<dir>/<name>`.
    path: String,
    /// Deletes the node unless disarmed.
    pending: CleanupOnDrop<F, Cleanup>,
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
    /// Parses `url` and opens a session.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(ZooKeeperConfig::from_url(url)?).await
    }

    /// Checks `config` and opens a session with it.
    pub async fn with_config(config: ZooKeeperConfig) -> Result<Self> {
        config.validate()?;
        let session = Session::connect(&config).await?;
        Ok(ZooKeeperLock {
            inner: Arc::new(Inner {
                config,
                session: Mutex::new(session),
                reconnecting: tokio::sync::Mutex::new(()),
                renewals: RenewalScheduler::new(),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ZooKeeperConfig {
        &self.inner.config
    }

    /// The id of the current session (the `ephemeralOwner` of its nodes).
    pub fn session_id(&self) -> i64 {
        self.current().id
    }

    /// The session TTL (session timeout) the server granted.
    pub fn session_ttl(&self) -> Duration {
        self.current().timeout
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
        let session = self.current();
        let mut states = session.client.state_watcher();
        let deadline = tokio::time::Instant::now() + session.timeout * 2;
        // Why the last steal failed, for the error if none succeeds.
        let mut last_error = None;
        loop {
            let connect = zk::Client::connector()
                .with_session(session.client.session().clone())
                .with_session_timeout(session.timeout)
                // No fail-fast: our own client's reconnection can bump the
                // thief's first connection; it retries until attached.
                .connect(&session.endpoint);
            // Bounded by a round, so a connect that keeps losing the session
            // to our own client is retried (and the session's end looked
            // for) well before the deadline.
            let thief = tokio::time::timeout(KILL_ROUND, connect)
                .await
                .unwrap_or(Err(zk::Error::Timeout));
            match thief {
                // Dropping the only handle sends closeSession from the
                // thief's connection.
                Ok(thief) => drop(thief),
                // An earlier round's close went through.
                Err(zk::Error::SessionExpired) => {}
                // Our own client kept taking the session back until the
                // thief's connect timed out (or the link failed): the
                // session may still have ended; else steal again.
                Err(err) => {
                    tracing::debug!(endpoint = %session.endpoint, error = %err, "zookeeper: could not attach to the session to close it");
                    last_error = Some(err);
                }
            }
            let ended = async {
                let mut state = states.state();
                while !state.is_terminated() {
                    state = states.changed().await;
                }
                state
            };
            // The close is lost when our own client takes the session back
            // first (it reconnects when the thief attaches): steal again.
            let round =
                KILL_ROUND.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if let Ok(state) = tokio::time::timeout(round, ended).await {
                // The watcher task does the same; doing it here too means
                // every lease is marked by the time we return.
                session.on_state(state);
                return Ok(());
            }
            tracing::debug!(endpoint = %session.endpoint, "zookeeper session outlived its close; stealing it again");
            if tokio::time::Instant::now() >= deadline {
                return Err(match last_error {
                    Some(err) => {
                        distlock_core::Error::connection(BACKEND, session.endpoint.clone(), err)
                    }
                    None => distlock_core::Error::backend(
                        BACKEND,
                        session.endpoint.clone(),
                        "kill_session",
                        "",
                        "the session did not end within twice its timeout",
                    ),
                });
            }
        }
    }

    fn current(&self) -> Arc<Session> {
        self.inner.session.lock().unwrap().clone()
    }

    /// The live session, or a new one if it has ended.
    async fn session(&self) -> Result<Arc<Session>> {
        let current = self.current();
        if !current.ended() {
            return Ok(current);
        }
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        let current = self.current();
        if !current.ended() {
            return Ok(current);
        }
        tracing::info!(endpoint = %current.endpoint, "zookeeper session ended; opening a new one");
        let fresh = Session::connect(&self.inner.config).await?;
        *self.inner.session.lock().unwrap() = fresh.clone();
        Ok(fresh)
    }

    /// Creates this attempt's node in `key`'s lock directory. Until
    /// `pending` is disarmed, dropping it (or this future, mid-create)
    /// deletes the node, one whose create answer was lost included.
    async fn enqueue(&self, key: &str) -> Result<Enqueued<impl FnOnce() -> Cleanup + Send>> {
        let session = self.session().await?;
        let dir = self.lock_directory(key);
        let protected = recipe::protected_prefix();
        let creating = CleanupOnDrop::arm(ABANDONED_NODE, {
            let (session, dir, protected) = (session.clone(), dir.clone(), protected.clone());
            move || Box::pin(delete_unnamed(session, dir, protected)) as Cleanup
        });
        let created = match recipe::create_node(&session, &dir, &protected, key).await {
            Ok(created) => created,
            Err(err) => {
                creating.run_now().await;
                return Err(err);
            }
        };
        // No await from here to the return: the named cleanup takes over.
        creating.disarm();
        let path = format!("{dir}/{}", created.name);
        let pending = CleanupOnDrop::arm(ABANDONED_NODE, {
            let (session, path) = (session.clone(), path.clone());
            move || Box::pin(delete_abandoned(session, path)) as Cleanup
        });
        Ok(Enqueued {
            session,
            dir,
            created,
            path,
            pending,
        })
    }

    fn grant(
        &self,
        session: Arc<Session>,
        key: &str,
        created: &recipe::Created,
        path: String,
        options: &LockOptions,
        own_watch: Option<recipe::OwnWatch>,
    ) -> LockGuard {
        // czxid is a positive zxid: (epoch << 32) | counter.
        let fencing_token = created.czxid as u64;
        let lease = session.new_lease(key, fencing_token, options.ttl);
        let held = Arc::new(ZooKeeperHeld {
            path,
            key: key.to_owned(),
            session,
            _own_watch: own_watch,
        });
        tracing::debug!(fencing_token, node = %held.path, "acquired");
        scheduled_guard(
            BACKEND,
            lease,
            held,
            &self.inner.renewals,
            options.auto_renew,
        )
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
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        let Enqueued {
            session,
            dir,
            created,
            path,
            pending,
        } = self.enqueue(key).await?;
        match recipe::position(&session, &dir, &created, key).await {
            Ok(Position::First) => {
                pending.disarm();
                Ok(Some(
                    self.grant(session, key, &created, path, options, None),
                ))
            }
            Ok(Position::Behind { .. }) => {
                pending.run_now().await;
                Ok(None)
            }
            Err(err) => {
                pending.run_now().await;
                Err(err)
            }
        }
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let Enqueued {
            session,
            dir,
            created,
            path,
            pending,
        } = self.enqueue(key).await?;
        let own_watch = match recipe::wait_turn(&session, &dir, &created, key).await {
            Ok(own_watch) => own_watch,
            Err(err) => {
                pending.run_now().await;
                return Err(err);
            }
        };
        // No await between here and the grant: a drop of this future
        // either deletes our node (the pending cleanup) or hands it over.
        pending.disarm();
        Ok(self.grant(session, key, &created, path, options, own_watch))
    }
}
