//! etcd backend of distlock: revision-ordered keys on a session lease.
//!
//! **URL:** `etcd://[user:password@]host:port[,host:port...][/prefix][?options]`
//! - hosts: one or more members (port 2379 when left out, IPv6 as
//!   `[::1]:2379`); requests are balanced over them. With more than one,
//!   each is asked for its status every 300 ms, and one that does not
//!   answer within 500 ms (stopped, overloaded, cut off) gets no requests
//!   until it answers again; requests in flight then, or when a new leader
//!   is elected, are sent again.
//! - `/prefix`: where the locks live in etcd: lock `name` is `prefix/name`
//!   (with no prefix, `name` itself, as `etcdctl lock name` has it).
//! - `user:password`: etcd authentication, percent-encoded if need be;
//!   errors and logs show `***` for the password.
//! - options, durations written `500ms`, `10s`, `1m`: `session_ttl`
//!   (default `30s`), the TTL of the client's session lease; `timeout`
//!   (`5s`), the bound on each request; `connect_timeout` (`5s`), the
//!   bound on connecting; `layout`, `mutex` (the default) or `distlock`:
//!   how a lock's keys are laid out (see below).
//!
//! **Layout:** by default a lock's keys are those of etcd's own recipe, Go's
//! `concurrency.Mutex` and `etcdctl lock`: `name/<lease id in hex>`, the
//! oldest create revision holding the lock, so distlock, Go programs and
//! `etcdctl lock` exclude each other and queue in one line (docs/interop.md).
//! `layout=distlock` keeps the keys of distlock before this layout
//! (`prefix/<encoded name>/<lease>-<seq>`, prefix `distlock` by default),
//! for sharing locks with older distlock clients; the two layouts do not
//! exclude each other.
//!
//! In code: [`EtcdLock::connect`], or [`EtcdLock::with_config`] with an
//! [`EtcdConfig`].
//!
//! **What it promises:**
//! - A lock lives on the client's session lease, kept alive every
//!   `session_ttl / 3` by one stream for all of its locks; renewed locks
//!   whose `ttl` is not the session's (in whole seconds) share one lease
//!   per TTL, kept alive the same way; a lock without `auto_renew` gets a
//!   lease of its own, which etcd expires after its TTL. A crashed
//!   client's locks go when their lease expires.
//! - Fair: waiters get the lock in arrival order, each watching only the
//!   key ahead of it; a release wakes one waiter and nobody polls. A
//!   dropped or timed-out `lock` leaves no key behind.
//! - Failover: etcd's quorum keeps every grant through a leader election
//!   or a lost member, and a guard is vouched for only until
//!   `sent_at + TTL - drift` of its lease's last successful keep-alive
//!   (`sent_at`: when that keep-alive was sent). `lost()` fires when etcd says the lease is gone (revoked or expired),
//!   when no keep-alive succeeds before that deadline, or, for a lock on
//!   the session lease, when its key is deleted by hand (seen by a watch
//!   on the client's one watch stream, set once the lock is held for
//!   `session_ttl / 3`). A lost session is replaced on the next attempt.
//!
//! **Fencing tokens** are the etcd revision at which the lock became ours:
//! our key's create revision when it was free, else the revision of the
//! delete that freed it. etcd revisions are global and only grow, so
//! tokens increase across holders, expiry and server restarts, and a
//! token exceeds that of every earlier holder, `etcdctl lock`'s
//! `ETCD_LOCK_REV` and Go's `Mutex.Header().Revision` included (both are
//! revisions read while that holder held the lock).
//!
//! ```no_run
//! use std::time::Duration;
//! use distlock_core::{DistributedLock, LockOptions};
//!
//! # #[tokio::main]
//! # async fn main() -> distlock_core::Result<()> {
//! let locks = distlock_etcd::EtcdLock::connect("etcd://127.0.0.1:2379/myapp").await?;
//! let options = LockOptions::new().wait(Duration::from_secs(5));
//! let guard = locks.lock("reports/nightly", &options).await?;
//! // Hand the fencing token to what you write; watch `lost()` while you work.
//! println!("holding with fencing token {}", guard.fencing_token());
//! tokio::select! {
//!     reason = guard.lost() => eprintln!("lost the lock: {reason}"),
//!     _ = tokio::time::sleep(Duration::from_secs(1)) => {}
//! }
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod acquire;
mod config;
mod health;
mod held;
mod keys;
mod liveness;
mod resume;
mod rpc;
mod session;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{self, RenewalScheduler};
use distlock_core::{
    BoxError, Capabilities, DistributedLock, Error, LockGuard, LockOptions, Result,
};
use etcd_client::{Client, ConnectOptions};

use acquire::Outcome;
use config::lease_seconds;
pub use config::{EtcdConfig, Layout};
use health::Health;
use keys::KeyNames;
use liveness::{watch_held_keys, HeldKeys};
use rpc::{bounded, probe};
use session::{grant_session, Session};

const NAME: &str = "etcd";

/// How often each member connection is pinged (HTTP/2 PING), idle or
/// not: a connection to a member that stops answering (a paused process, a
/// partition that keeps TCP up) is closed when a ping goes unanswered for
/// the request timeout. Taking such a member out of the balancer is the
/// `health` module's job, which notices sooner. Pings every second with a
/// 1 s bound closed healthy connections on a loaded machine (a release
/// failed with a broken pipe in CI).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How the client connects to each member (the balancer's connections and
/// the health probes' alike).
fn connect_options(config: &EtcdConfig) -> ConnectOptions {
    let options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_keep_alive(KEEP_ALIVE_INTERVAL, config.timeout)
        .with_keep_alive_while_idle(true);
    match &config.user {
        Some((user, password)) => options
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true),
        None => options,
    }
}

/// Connects to the service named by `url` (see the crate docs for the
/// forms).
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(EtcdLock::connect(url).await?))
}

/// A client of the etcd lock recipe: one connection and one session lease.
/// Cheap to clone; clones share both. When the last clone and the last
/// guard are gone, the session lease is revoked.
#[derive(Clone)]
pub struct EtcdLock {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLock")
            .field("config", &self.inner.config)
            .field("session_lease", &self.session_lease_id())
            .finish()
    }
}

struct Inner {
    client: Client,
    config: EtcdConfig,
    endpoints: String,
    /// The session lease's TTL in whole seconds, as asked.
    session_secs: i64,
    session: Mutex<Arc<Session>>,
    /// One new session at a time after a loss.
    new_session: tokio::sync::Mutex<()>,
    /// The layout's key names, reserved per attempt.
    names: KeyNames,
    /// Starts the keep-alive of a lock on a lease of its own when it first
    /// falls due (`ttl / 3`).
    renewals: RenewalScheduler,
    /// Which members answer; see the `health` module.
    health: Health,
    /// The held session-bound keys, watched for deletion (`liveness`).
    held_keys: Arc<HeldKeys>,
    /// Session leases for locks whose TTL is not the session's, one per
    /// TTL in whole seconds, shared by every lock of that TTL.
    ttl_sessions: Mutex<HashMap<i64, Arc<Session>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.health.stop();
        self.held_keys.end();
        let session = self.session.lock().unwrap().clone();
        session.close(&self.client, "the client was dropped");
        for (_, session) in self.ttl_sessions.lock().unwrap().drain() {
            session.close(&self.client, "the client was dropped");
        }
    }
}

impl EtcdLock {
    /// Connects to `url` (see the crate docs) and creates the session.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(EtcdConfig::from_url(url)?).await
    }

    /// Connects with `config` and creates the session lease. Fails with
    /// [`Error::Connection`] naming the endpoints, within about
    /// `connect_timeout`, when no member answers.
    pub async fn with_config(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let endpoints = config.endpoints_label();
        let fail = |source: BoxError| Error::connection(NAME, endpoints.clone(), source);
        probe(&config.endpoints, config.connect_timeout)
            .await
            .map_err(|err| fail(err.into()))?;
        let options = connect_options(&config);
        let client = bounded(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(options.clone())),
        )
        .await
        .map_err(|err| fail(err.into()))?;
        let session_secs = lease_seconds(config.session_ttl);
        let health = Health::new();
        let session = grant_session(
            &client,
            &health,
            session_secs,
            config.connect_timeout,
            config.timeout,
        )
        .await
        .map_err(|err| fail(err.into()))?;
        tracing::debug!(endpoints = %endpoints, lease_id = session.id, ttl = ?session.ttl, "distlock: etcd session created");
        let names = KeyNames::new(config.layout, &config.prefix);
        let inner = Arc::new(Inner {
            client,
            config,
            endpoints,
            session_secs,
            session: Mutex::new(session),
            new_session: tokio::sync::Mutex::new(()),
            names,
            renewals: RenewalScheduler::new(),
            health,
            held_keys: Arc::new(HeldKeys::default()),
            ttl_sessions: Mutex::new(HashMap::new()),
        });
        Health::start(&inner, options);
        tokio::spawn(watch_held_keys(
            Arc::downgrade(&inner),
            inner.held_keys.clone(),
        ));
        Ok(EtcdLock { inner })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The id of the current session lease (it changes after a loss).
    pub fn session_lease_id(&self) -> i64 {
        self.inner.session.lock().unwrap().id
    }

    /// The etcd key prefix under which the queue of `key`'s lock lives:
    /// `[prefix/]key/` in the mutex layout, `prefix/<encoded key>/` in the
    /// distlock layout. Every key under it is a holder or waiter.
    pub fn lock_key_prefix(&self, key: &str) -> String {
        self.inner.names.dir(key)
    }
}

#[async_trait]
impl backend::LockBackend for EtcdLock {
    fn backend(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fair: true,
            session_based: true,
            ttl_expiry: true,
            strict_fencing: true,
            cross_process: true,
            // Locks on a lease of their own (no renewal, or a TTL other
            // than the session's); session-bound ones give no resume token.
            resumable: true,
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        // A lost session is replaced once; a second loss is an error.
        for _ in 0..2 {
            match self.attempt(key, options, false).await? {
                Outcome::Granted(guard) => return Ok(Some(guard)),
                Outcome::Busy => return Ok(None),
                Outcome::Restart => continue,
            }
        }
        Err(self.error(
            "acquire",
            key,
            "the lease was lost during the attempt twice",
        ))
    }

    async fn resume(
        &self,
        key: &str,
        fencing_token: u64,
        resume_token: &str,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        self.resume_lock(key, fencing_token, resume_token, options)
            .await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let mut errors: u32 = 0;
        loop {
            match self.attempt(key, options, true).await {
                Ok(Outcome::Granted(guard)) => return Ok(guard),
                Ok(Outcome::Busy | Outcome::Restart) => {}
                Err(failure) if failure.retry => {
                    tracing::warn!(error = ?failure.error, "distlock: etcd acquire failed, retrying");
                    tokio::time::sleep(options.backoff.delay(errors)).await;
                    errors += 1;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }
}
