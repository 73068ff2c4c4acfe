//! etcd backend of distlock: revision-ordered keys on a session lease.
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
//!
//! # URLs
//!
//! `etcd://[user:password@]host:port[,host:port...][/prefix][?options]`
//!
//! - `etcd://127.0.0.1:2379`: one member, locks under `distlock/`.
//! - `etcd://h1:2379,h2:2379,h3:2379/myapp/locks`: several members
//!   (requests are balanced over them), locks under `myapp/locks/`.
//! - `etcd://app:s%40cret@h1:2379/myapp`: etcd authentication; user and
//!   password may be percent-encoded. Errors and logs show `***` for it.
//! - Options: `session_ttl` (default `30s`): TTL of the client's session
//!   lease; `timeout` (default `5s`): bound on each request;
//!   `connect_timeout` (default `5s`): bound on connecting. Durations are
//!   written `500ms`, `10s`, `1m`.
//!
//! # How it works
//!
//! Each client grants one **session lease** at connect and keeps it alive
//! with one keep-alive stream (every `session_ttl / 3`) shared by all of its
//! locks. A lock whose `LockOptions::ttl` differs from the session TTL (in
//! whole seconds), or whose `auto_renew` is off, gets a lease of its own,
//! granted in the acquire path (one more round trip); without renewal that
//! lease expires on the server after its TTL.
//!
//! Acquiring a lock on key `k` is one transaction: if this attempt's key
//! `prefix/<encoded k>/<lease>-<seq>` does not exist, create it on the lease
//! and, in the same transaction, read the two newest keys under
//! `prefix/<encoded k>/` by create revision. The key with the lowest create
//! revision owns the lock, so an attempt that finds no older key holds it:
//! uncontended, that is one round trip, and release is one delete.
//! `try_lock` that finds an older key deletes its own (a second round trip,
//! on the busy path only). `lock` instead watches the next-older key only,
//! opening the watch at the current revision and then re-reading its queue
//! position (a watch opened at a past revision is caught up by etcd 3.4
//! only every ~100 ms; so is one opened at the current revision when a
//! write lands while etcd registers it, hence two watchers per watch
//! stream, registered back to back). When that key is deleted: if it was the oldest key
//! when last read, the lock is ours at once (no key older than ours can
//! appear, as a new key gets a newer revision); if it was a waiter (it may
//! have given up while an older key still holds), one read tells. While
//! the predecessor waits too, the waiter also watches the key older than
//! it and reads again when that one goes, while the predecessor, now
//! usually the owner, holds: so down a queue each handoff is the release
//! and its event, with the read done beforehand. So
//! waiters queue in arrival order (FIFO), a release wakes exactly one
//! waiter, a handoff is the holder's delete plus the watch event, and
//! nobody polls. A dropped or timed-out `lock`
//! deletes its key in the background, after its transaction has finished.
//! A client reuses the `<seq>` of a key whose deletion etcd confirmed:
//! every distinct name under a prefix stays in etcd's index until a
//! compaction and each acquire's range walks them, so fresh names on every
//! attempt would make a much-used lock slower and slower.
//!
//! The fencing token is the lock key's create revision: etcd revisions are
//! global and only grow, so it increases across holders, expiry and server
//! restarts.
//!
//! A guard is vouched for until `sent_at + TTL - drift` of the last
//! successful keep-alive of its lease (`sent_at` is when that keep-alive was
//! sent, the TTL is what etcd answered). `lost()` fires when etcd answers
//! that the lease is gone (revoked or expired) or when no keep-alive
//! succeeds before that deadline. A session-lease lock learns of a
//! revocation at the next keep-alive, within `session_ttl / 3`, and a lock
//! held longer than `session_ttl / 3` reads its key back every
//! `session_ttl / 3` (one count-only range), so that a key deleted by hand
//! fires `lost()` with `NotHeld` too.
//!
//! # Why not etcd's Lock RPC
//!
//! etcd ships a server-side lock service (`v3lockpb.Lock`/`Unlock`, behind
//! `etcdctl lock`) built on a similar recipe. It is not used here because
//! its `Lock` call only ever waits: there is no try-lock, so `try_lock`
//! would have to cancel a wait and race the grant. Bounding its wait has the
//! same race: a grant that lands as the client's deadline fires leaves a
//! held lock nobody knows about until its lease expires. Its key also comes
//! back only in the response, after the grant, so an attempt that is dropped
//! mid-call cannot be found and cleaned up by the client. And on etcd 3.4
//! its waiter opens the watch at the revision of an earlier read, which under
//! contention lands in the server's slowly caught-up watcher group (about
//! 100 ms late per handoff on this project's test machine). Running the
//! recipe in the client gives a one-round-trip try-lock, a key chosen before
//! the request (so abandoned attempts are always removed), watches opened at
//! the current revision, the create revision as fencing token, and the same
//! behaviour on every etcd v3 server.

#![warn(missing_docs)]

mod config;
mod session;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::key::encode_component;
use distlock_core::backend::validity_deadline;
use distlock_core::backend::{self, scheduled_guard, HeldLock, Lease, RenewalScheduler};
use distlock_core::{
    BoxError, Capabilities, DistributedLock, Error, LockGuard, LockOptions, LostReason, Result,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchStream,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use config::lease_seconds;
pub use config::EtcdConfig;
use session::{spawn_revoke, OwnLease, Session};

const NAME: &str = "etcd";
/// Longest encoded key component; longer keys are hashed.
const MAX_KEY_COMPONENT: usize = 200;

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

/// Where one attempt queues: the lock's key (for errors), the lock's
/// prefix in etcd and the attempt's own key under it.
#[derive(Clone, Copy)]
struct Slot<'a> {
    key: &'a str,
    dir: &'a str,
    etcd_key: &'a str,
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
    seq: AtomicU64,
    /// Key numbers whose key is known to be deleted, for reuse. Every new
    /// key name under a lock's prefix stays in etcd's index (as a deleted
    /// key) until a compaction, and each acquire's range walks them all:
    /// fresh names per attempt made a much-used lock slower and slower.
    free_seqs: Mutex<Vec<u64>>,
    /// Starts the periodic work of a held lock when it first falls due
    /// (`ttl / 3`): a lease of its own is kept alive; a session-bound lock
    /// (kept alive by the session) checks that its key is still there.
    renewals: RenewalScheduler,
}

impl Inner {
    fn take_seq(&self) -> u64 {
        let free = self.free_seqs.lock().unwrap().pop();
        free.unwrap_or_else(|| self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Only for a key whose deletion etcd confirmed, with no other request
    /// on it left in flight: a later attempt may reuse its name.
    fn give_back_seq(&self, seq: u64) {
        self.free_seqs.lock().unwrap().push(seq);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let session = self.session.lock().unwrap().clone();
        session.close(&self.client, "the client was dropped");
    }
}

/// Why a lock could not be granted on this attempt.
enum Outcome {
    Granted(LockGuard),
    Busy,
    /// The attempt's key or lease vanished (session lost): start over.
    Restart,
}

/// An error and whether waiting longer may help.
struct Failure {
    error: Error,
    retry: bool,
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Self {
        failure.error
    }
}

/// The lease an attempt's key lives on.
#[derive(Clone)]
enum Binding {
    Session(Arc<Session>),
    Own(Arc<OwnLease>),
}

impl Binding {
    fn lease_id(&self) -> i64 {
        match self {
            Binding::Session(session) => session.id,
            Binding::Own(own) => own.id,
        }
    }

    fn own_lease(&self) -> Option<i64> {
        match self {
            Binding::Own(own) => Some(own.id),
            Binding::Session(_) => None,
        }
    }
}

/// The key just older than ours, which a waiter watches (and, while that
/// one waits too, the key just older than it).
#[derive(Clone, Debug)]
struct Predecessor {
    key: Vec<u8>,
    create_revision: i64,
    /// The lease it lives on.
    lease: i64,
    /// It was the oldest key (the owner) when read. Keys older than ours
    /// can only go away (a new key gets a newer create revision), so once
    /// this one is deleted nothing older than ours is left.
    owner: bool,
    /// The key just older than the predecessor, when it is not the owner.
    older: Option<Vec<u8>>,
}

/// How many keys a queue read returns: ours, the predecessor and the one
/// before it.
const QUEUE_READ_LIMIT: i64 = 3;

impl Predecessor {
    /// The predecessor in a range of the lock's keys, newest first and
    /// limited to [`QUEUE_READ_LIMIT`], whose first key is ours.
    fn from_range(range: &etcd_client::GetResponse) -> Option<Self> {
        let kvs = range.kvs();
        kvs.get(1).map(|kv| Predecessor {
            key: kv.key().to_vec(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
            // `more` is false when the limit cut nothing off (etcd sets it
            // after applying `max_create_revision`, unlike `count`).
            owner: kvs.len() < 3 && !range.more(),
            older: kvs.get(2).map(|older| older.key().to_vec()),
        })
    }

    /// The same key instance (the owner flag may have changed).
    fn same_key(&self, other: &Predecessor) -> bool {
        self.key == other.key && self.create_revision == other.create_revision
    }
}

/// Where our key stands in the lock's queue.
enum Position {
    /// Our key is gone (its lease expired or was revoked).
    Gone,
    /// Our key exists; `None` means it is the oldest: the lock is ours.
    Behind(Option<Predecessor>),
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
        // etcd-client connects lazily and queues requests while no member
        // is reachable; a direct TCP probe turns "refused" into a clear,
        // prompt error.
        probe(&config.endpoints, config.connect_timeout)
            .await
            .map_err(|err| fail(err.into()))?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), config.timeout);
        if let Some((user, password)) = &config.user {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let client = bounded(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|err| fail(err.into()))?;
        let session_secs = lease_seconds(config.session_ttl);
        let session = grant_session(
            &client,
            session_secs,
            config.connect_timeout,
            config.timeout,
        )
        .await
        .map_err(|err| fail(err.into()))?;
        tracing::debug!(endpoints = %endpoints, lease_id = session.id, ttl = ?session.ttl, "distlock: etcd session created");
        Ok(EtcdLock {
            inner: Arc::new(Inner {
                client,
                config,
                endpoints,
                session_secs,
                session: Mutex::new(session),
                new_session: tokio::sync::Mutex::new(()),
                seq: AtomicU64::new(0),
                free_seqs: Mutex::new(Vec::new()),
                renewals: RenewalScheduler::new(),
            }),
        })
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
    /// `prefix/<encoded key>/`. Every key under it is a holder or waiter.
    pub fn lock_key_prefix(&self, key: &str) -> String {
        format!(
            "{}/{}/",
            self.inner.config.prefix,
            encode_component(key, MAX_KEY_COMPONENT)
        )
    }

    /// The session, or a new one if it was lost.
    async fn session(&self) -> Result<Arc<Session>, Failure> {
        let current = self.inner.session.lock().unwrap().clone();
        if !current.is_lost() {
            return Ok(current);
        }
        let _one_at_a_time = self.inner.new_session.lock().await;
        let current = self.inner.session.lock().unwrap().clone();
        if !current.is_lost() {
            return Ok(current);
        }
        current.close(
            &self.inner.client,
            "no keep-alive succeeded before the lease's deadline",
        );
        let session = grant_session(
            &self.inner.client,
            self.inner.session_secs,
            self.inner.config.timeout,
            self.inner.config.timeout,
        )
        .await
        .map_err(|source| Failure {
            error: self.error("create session", "", source),
            retry: true,
        })?;
        tracing::info!(lease_id = session.id, "distlock: new etcd session");
        *self.inner.session.lock().unwrap() = session.clone();
        Ok(session)
    }

    /// The lease a new attempt uses: the session's, or its own.
    async fn binding(&self, key: &str, options: &LockOptions) -> Result<Binding, Failure> {
        let secs = lease_seconds(options.ttl);
        if options.auto_renew && secs == self.inner.session_secs {
            return Ok(Binding::Session(self.session().await?));
        }
        let sent_at = Instant::now();
        let granted = self
            .call("grant lease", key, async {
                self.inner.client.lease_client().grant(secs, None).await
            })
            .await?;
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        Ok(Binding::Own(Arc::new(OwnLease::new(
            granted.id(),
            ttl,
            validity_deadline(sent_at, ttl),
        ))))
    }

    fn error(&self, operation: &'static str, key: &str, source: impl Into<BoxError>) -> Error {
        Error::backend(NAME, self.inner.endpoints.clone(), operation, key, source)
    }

    /// Runs one request bounded by the configured timeout.
    async fn call<T>(
        &self,
        operation: &'static str,
        key: &str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Failure> {
        match bounded(self.inner.config.timeout, request).await {
            Ok(value) => Ok(value),
            Err(source) => {
                let retry = is_retryable(&source);
                Err(Failure {
                    error: self.error(operation, key, source),
                    retry,
                })
            }
        }
    }

    /// One acquisition attempt with a fresh key; waits in the queue when
    /// `wait`, otherwise gives up (removing its key) if the lock is held.
    async fn attempt(
        &self,
        key: &str,
        options: &LockOptions,
        wait: bool,
    ) -> Result<Outcome, Failure> {
        let binding = self.binding(key, options).await?;
        let dir = self.lock_key_prefix(key);
        let seq = self.inner.take_seq();
        let etcd_key = format!("{dir}{:016x}-{seq:x}", binding.lease_id());
        let slot = Slot {
            key,
            dir: &dir,
            etcd_key: &etcd_key,
        };
        let mut pending = PendingKey {
            inner: self.inner.clone(),
            etcd_key: etcd_key.clone(),
            seq,
            own_lease: binding.own_lease(),
            txns: Vec::new(),
            armed: true,
        };
        let (my_revision, mut position) =
            self.enqueue(slot, binding.lease_id(), &mut pending).await?;
        if my_revision == 0 {
            if let Binding::Session(session) = &binding {
                session.close(&self.inner.client, "etcd says the session lease is gone");
            }
        }
        let mut waited = false;
        let mut errors: u32 = 0;
        loop {
            let predecessor = match position {
                Position::Gone => {
                    pending.remove_now().await;
                    return Ok(Outcome::Restart);
                }
                Position::Behind(None) => break,
                Position::Behind(Some(predecessor)) => predecessor,
            };
            if !wait {
                pending.remove_now().await;
                return Ok(Outcome::Busy);
            }
            waited = true;
            match self
                .wait_for(slot, my_revision, &predecessor, &binding)
                .await
            {
                Ok(Some(next)) => {
                    errors = 0;
                    position = next;
                }
                Ok(None) => {
                    pending.remove_now().await;
                    return Ok(Outcome::Restart);
                }
                Err(failure) if failure.retry => {
                    tracing::debug!(error = %failure.error, "distlock: etcd wait failed, retrying");
                    tokio::time::sleep(options.backoff.delay(errors)).await;
                    errors += 1;
                    position = Position::Behind(Some(predecessor));
                }
                Err(failure) => return Err(failure),
            }
        }
        // Ours: our key is the oldest under the lock's prefix.
        let fencing_token = my_revision as u64;
        let (lease, core_renewal) = match &binding {
            Binding::Session(session) => {
                let lease = session.attach(|valid_until| {
                    Lease::new(key, fencing_token, session.ttl, Some(valid_until))
                });
                match lease {
                    // The session's keep-alive keeps it valid; the checks
                    // every ttl / 3 (started when due) see a key deleted
                    // behind our back, as an operator or a stray cleanup
                    // would, and fire `lost()`.
                    Some(lease) => (lease, true),
                    None => {
                        pending.remove_now().await;
                        return Ok(Outcome::Restart);
                    }
                }
            }
            Binding::Own(own) => {
                if waited {
                    // Start the lock's TTL now, not at the last keep-alive
                    // of the wait.
                    match own
                        .refresh(&self.inner.client, self.inner.config.timeout)
                        .await
                    {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            pending.remove_now().await;
                            return Ok(Outcome::Restart);
                        }
                        Err(source) => {
                            return Err(Failure {
                                error: self.error("grant", key, source),
                                retry: true,
                            })
                        }
                    }
                }
                let valid_until = own.valid_until();
                if Instant::now() >= valid_until {
                    pending.remove_now().await;
                    return Ok(Outcome::Restart);
                }
                let lease = Lease::new(key, fencing_token, own.ttl, Some(valid_until));
                (lease, options.auto_renew)
            }
        };
        pending.armed = false;
        let held = Arc::new(EtcdHeld {
            owner: self.clone(),
            key: key.to_owned(),
            etcd_key,
            seq,
            release_started: AtomicBool::new(false),
            binding,
            lease: lease.clone(),
        });
        tracing::debug!(fencing_token, "distlock: etcd lock granted");
        Ok(Outcome::Granted(scheduled_guard(
            NAME,
            lease,
            held,
            &self.inner.renewals,
            core_renewal,
        )))
    }

    /// The one transaction of an attempt: create our key if absent and
    /// read the newest two keys of the lock (ours and its predecessor).
    /// Runs in a task of its own, so that a dropped attempt cleans up only
    /// after it finished.
    async fn enqueue(
        &self,
        slot: Slot<'_>,
        lease_id: i64,
        pending: &mut PendingKey,
    ) -> Result<(i64, Position), Failure> {
        let Slot { key, dir, etcd_key } = slot;
        let newest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(QUEUE_READ_LIMIT)
            .with_keys_only();
        let txn = Txn::new()
            .when([Compare::create_revision(etcd_key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(etcd_key, "", Some(PutOptions::new().with_lease(lease_id))),
                TxnOp::get(dir, Some(newest)),
            ])
            .or_else([TxnOp::get(
                etcd_key,
                Some(GetOptions::new().with_keys_only()),
            )]);
        let mut retries: u32 = 0;
        let response = loop {
            let mut kv = self.inner.client.kv_client();
            let txn = txn.clone();
            pending
                .txns
                .push(tokio::spawn(async move { kv.txn(txn).await }));
            let running = pending.txns.last_mut().expect("just pushed");
            let outcome = match tokio::time::timeout(self.inner.config.timeout, running).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(join)) => {
                    return Err(Failure {
                        error: self.error("acquire", key, join),
                        retry: false,
                    })
                }
                // Still running: the cleanup waits for it.
                Err(_) => {
                    return Err(Failure {
                        error: self.error("acquire", key, timed_out(self.inner.config.timeout)),
                        retry: true,
                    })
                }
            };
            // Finished: nothing to wait for before a cleanup.
            pending.txns.pop();
            match outcome {
                Ok(response) => break response,
                // The lease vanished before our keep-alive noticed (revoked,
                // or expired while the server was unreachable): nothing was
                // written; start over on a new lease.
                Err(source) if is_lease_not_found(&source) => return Ok((0, Position::Gone)),
                // The outcome is unknown (the connection broke): the same
                // transaction again either creates the key or finds it.
                Err(source) if is_retryable(&source) && retries < 2 => {
                    tracing::debug!(error = %source, "distlock: etcd acquire txn failed, retrying");
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(20 << retries)).await;
                }
                Err(source) => {
                    let retry = is_retryable(&source);
                    return Err(Failure {
                        error: self.error("acquire", key, source),
                        retry,
                    });
                }
            }
        };
        self.read_enqueued(slot, response).await
    }

    async fn read_enqueued(
        &self,
        slot: Slot<'_>,
        response: TxnResponse,
    ) -> Result<(i64, Position), Failure> {
        let Slot { key, etcd_key, .. } = slot;
        let malformed = |what: &str| Failure {
            error: self.error("acquire", key, format!("unexpected txn response: {what}")),
            retry: false,
        };
        let revision = response
            .header()
            .map(|header| header.revision())
            .unwrap_or(0);
        let ops = response.op_responses();
        if response.succeeded() {
            let Some(TxnOpResponse::Get(range)) = ops.get(1) else {
                return Err(malformed("no range"));
            };
            // We created our key at `revision`, after the range's other
            // keys: the range is newest first, so ours comes first.
            match range.kvs().first() {
                Some(kv) if kv.key() == etcd_key.as_bytes() && kv.create_revision() == revision => {
                    Ok((revision, Position::Behind(Predecessor::from_range(range))))
                }
                // Not expected; a plain read places us instead.
                _ => Ok((revision, self.position(slot, revision).await?)),
            }
        } else {
            // The key already existed: a retried transaction whose first
            // try did apply. Our key's own create revision places us.
            let Some(TxnOpResponse::Get(range)) = ops.first() else {
                return Err(malformed("no range"));
            };
            match range.kvs().first() {
                Some(kv) => {
                    let mine = kv.create_revision();
                    Ok((mine, self.position(slot, mine).await?))
                }
                None => Ok((revision, Position::Gone)),
            }
        }
    }

    /// One read: is our key still there, and which key is just older?
    async fn position(&self, slot: Slot<'_>, my_revision: i64) -> Result<Position, Failure> {
        let Slot { key, dir, etcd_key } = slot;
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_max_create_revision(my_revision)
            .with_limit(QUEUE_READ_LIMIT)
            .with_keys_only();
        let range = self
            .call("wait", key, async {
                self.inner.client.kv_client().get(dir, Some(options)).await
            })
            .await?;
        let kvs = range.kvs();
        match kvs.first() {
            Some(kv) if kv.key() == etcd_key.as_bytes() => {
                Ok(Position::Behind(Predecessor::from_range(&range)))
            }
            _ => Ok(Position::Gone),
        }
    }

    /// Waits until `predecessor` is deleted and returns our new position;
    /// `None` when our lease is lost meanwhile.
    async fn wait_for(
        &self,
        slot: Slot<'_>,
        my_revision: i64,
        predecessor: &Predecessor,
        binding: &Binding,
    ) -> Result<Option<Position>, Failure> {
        let key = slot.key;
        // Watch from the current revision (etcd's synced watcher group, no
        // catch-up lag; see `watch_key`), then read: the predecessor deleted
        // before the watch started shows in the read, any later delete in
        // the watch.
        let mut watch = self.watch_key(key, &predecessor.key).await?;
        // While the predecessor waits too, also watch the key older than
        // it: when that one goes, read again while the predecessor (now
        // perhaps the owner) holds, so that its release hands the lock
        // over on the event alone, without a read after it.
        let mut older_watch = match (&predecessor.older, predecessor.owner) {
            (Some(older), false) => Some((older.clone(), self.watch_key(key, older).await?)),
            _ => None,
        };
        // The read may have found it the owner by now.
        let mut predecessor = match self.still_behind(slot, my_revision, predecessor).await? {
            Ok(now) => now,
            Err(moved) => return Ok(Some(moved)),
        };
        let deleted = loop {
            let older = match &predecessor.older {
                Some(older) if !predecessor.owner => older.clone(),
                _ => {
                    older_watch = None;
                    break tokio::select! {
                        deleted = wait_for_delete(&mut watch, &predecessor.key) => deleted,
                        () = binding_lost(self, binding) => return Ok(None),
                    };
                }
            };
            if older_watch.as_ref().map(|(watched, _)| watched) != Some(&older) {
                // A new older key: watch it, then read again (it may have
                // gone before the watch started).
                older_watch = Some((older.clone(), self.watch_key(key, &older).await?));
                predecessor = match self.still_behind(slot, my_revision, &predecessor).await? {
                    Ok(now) => now,
                    Err(moved) => return Ok(Some(moved)),
                };
                continue;
            }
            let (_, older_stream) = older_watch.as_mut().expect("watching the older key");
            tokio::select! {
                deleted = wait_for_delete(&mut watch, &predecessor.key) => break deleted,
                older_deleted = wait_for_delete(older_stream, &older) => {
                    older_deleted.map_err(|why| self.watch_broke(key, why))?;
                    older_watch = None;
                    predecessor = match self
                        .still_behind(slot, my_revision, &predecessor)
                        .await?
                    {
                        Ok(now) => now,
                        Err(moved) => return Ok(Some(moved)),
                    };
                }
                () = binding_lost(self, binding) => return Ok(None),
            }
        };
        drop(older_watch);
        drop(watch);
        deleted.map_err(|why| self.watch_broke(key, why))?;
        // The owner is gone and nothing older than our key can appear:
        // the lock is ours without another read. Our key is still there
        // unless our lease ended, which the grant checks (the session's
        // state; a lock's own lease is refreshed before the grant), just
        // as for a held lock. A predecessor on our own lease is read
        // again: revoking that lease deletes both keys in one go.
        if predecessor.owner && predecessor.lease != binding.lease_id() {
            return Ok(Some(Position::Behind(None)));
        }
        // The predecessor was a waiter that may have given up: an older
        // key may still hold the lock.
        Ok(Some(self.position(slot, my_revision).await?))
    }

    /// Reads our position again: `Ok(now)` (its fresh view) while
    /// `predecessor` is still the key just older than ours, `Err` with the
    /// new position once that changed.
    async fn still_behind(
        &self,
        slot: Slot<'_>,
        my_revision: i64,
        predecessor: &Predecessor,
    ) -> Result<std::result::Result<Predecessor, Position>, Failure> {
        Ok(match self.position(slot, my_revision).await? {
            Position::Behind(Some(now)) if now.same_key(predecessor) => Ok(now),
            moved => Err(moved),
        })
    }

    /// A watch that ended or was cancelled while waiting: retried.
    fn watch_broke(&self, key: &str, why: String) -> Failure {
        Failure {
            error: self.error("wait", key, why),
            retry: true,
        }
    }

    /// Opens a watch on `watched` at the current revision and waits until
    /// etcd confirms it, so that nothing after that point is missed.
    ///
    /// Two watchers on one stream, created back to back: etcd reads the
    /// current revision before it registers a watcher, and a write that
    /// lands in between leaves the watcher "unsynced", served by a catch-up
    /// loop that runs every 100 ms instead of at once (the handoff tail
    /// went to 10-50 ms at p99 under contention). The first to report the
    /// delete wins; both are unlikely to lose that race.
    async fn watch_key(&self, key: &str, watched: &[u8]) -> Result<WatchStream, Failure> {
        let watched = watched.to_vec();
        self.call("wait", key, async {
            let mut stream = self
                .inner
                .client
                .watch_client()
                .watch(watched.clone(), None)
                .await?;
            // Sent before the first is confirmed: no extra round trip. Its
            // own confirmation is skipped by `wait_for_delete`.
            stream.watch(watched, None).await?;
            match stream.message().await? {
                Some(response) if response.created() && !response.canceled() => Ok(stream),
                _ => Err(etcd_client::Error::WatchError(
                    "etcd did not create the watch".into(),
                )),
            }
        })
        .await
    }
}

/// Resolves when the watch reports a delete of `watched` (`Ok`) or breaks
/// (`Err`). Progress notifications and other events are skipped.
async fn wait_for_delete(watch: &mut WatchStream, watched: &[u8]) -> Result<(), String> {
    loop {
        match watch.message().await {
            Ok(Some(response)) => {
                if response.canceled() {
                    return Err(format!("watch canceled: {}", response.cancel_reason()));
                }
                if response.events().iter().any(|event| {
                    event.event_type() == EventType::Delete
                        && event.kv().is_some_and(|kv| kv.key() == watched)
                }) {
                    return Ok(());
                }
            }
            Ok(None) => return Err("the watch stream ended".into()),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// Resolves when the lease a waiting key lives on is lost. Keeps a lock's
/// own lease alive while it waits (the session has its own task).
async fn binding_lost(client: &EtcdLock, binding: &Binding) {
    match binding {
        Binding::Session(session) => session.lost().await,
        Binding::Own(own) => loop {
            let deadline = own.valid_until();
            tokio::time::sleep(
                (own.ttl / 3).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
            let timeout = deadline
                .saturating_duration_since(Instant::now())
                .min(client.inner.config.timeout);
            match own
                .refresh(&client.inner.client, timeout.max(Duration::from_millis(1)))
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) if Instant::now() >= own.valid_until() => return,
                Err(err) => {
                    tracing::debug!(error = %err, "distlock: etcd keep-alive of a waiting lock failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
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

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let mut errors: u32 = 0;
        loop {
            match self.attempt(key, options, true).await {
                Ok(Outcome::Granted(guard)) => return Ok(guard),
                Ok(Outcome::Busy | Outcome::Restart) => {}
                Err(failure) if failure.retry => {
                    tracing::warn!(error = %failure.error, "distlock: etcd acquire failed, retrying");
                    tokio::time::sleep(options.backoff.delay(errors)).await;
                    errors += 1;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }
}

/// A granted lock: its key, and the lease it lives on.
struct EtcdHeld {
    owner: EtcdLock,
    key: String,
    etcd_key: String,
    /// The number in `etcd_key`, given back once the key is deleted.
    seq: u64,
    /// A second release (the first one's future was dropped midway) may
    /// race a delete still in flight: only the first gives `seq` back.
    release_started: AtomicBool,
    binding: Binding,
    lease: Lease,
}

#[async_trait]
impl HeldLock for EtcdHeld {
    async fn release(&self) -> Result<()> {
        let owner = &self.owner;
        let first_release = !self.release_started.swap(true, Ordering::AcqRel);
        let deleted = owner
            .call("release", &self.key, async {
                owner
                    .inner
                    .client
                    .kv_client()
                    .delete(self.etcd_key.as_str(), None)
                    .await
            })
            .await?;
        if first_release {
            // etcd answered the only delete sent: the key is gone and
            // nothing can create it again, so its name may be reused.
            owner.inner.give_back_seq(self.seq);
        }
        if let Some(id) = self.binding.own_lease() {
            // Nothing else lives on it; free it without waiting.
            spawn_revoke(owner.inner.client.clone(), id);
        }
        // A lock whose lease was lost may have been someone else's in
        // between, even if its key was still there to delete.
        // (A dropped guard is marked released before this runs.)
        let lost =
            matches!(self.lease.lost_reason(), Some(reason) if reason != LostReason::Released);
        if deleted.deleted() == 0 || lost {
            return Err(Error::not_held(&self.key));
        }
        Ok(())
    }

    async fn extend(&self, _ttl: Duration) -> Result<()> {
        let owner = &self.owner;
        match &self.binding {
            // The session's keep-alive keeps the validity; check ownership.
            Binding::Session(session) => {
                let found = owner
                    .call("extend", &self.key, async {
                        let options = GetOptions::new().with_count_only();
                        owner
                            .inner
                            .client
                            .kv_client()
                            .get(self.etcd_key.as_str(), Some(options))
                            .await
                    })
                    .await?;
                if found.count() == 0 || session.is_lost() {
                    return Err(Error::not_held(&self.key));
                }
                Ok(())
            }
            // etcd leases keep the TTL they were granted with: a refresh
            // restarts it.
            Binding::Own(own) => {
                match own
                    .refresh(&owner.inner.client, owner.inner.config.timeout)
                    .await
                {
                    // A refresh that lands after the local deadline does not
                    // bring the lock back: it may have been lost in between.
                    Ok(Some(deadline)) if self.lease.is_held() => {
                        self.lease.set_valid_until(Some(deadline));
                        Ok(())
                    }
                    Ok(_) => Err(Error::not_held(&self.key)),
                    Err(source) => Err(owner.error("extend", &self.key, source)),
                }
            }
        }
    }
}

/// An attempt's key until the lock is granted: dropping it (a dropped or
/// failed attempt) deletes the key in the background, after the attempt's
/// transaction finished, so that no waiter record is left behind.
struct PendingKey {
    inner: Arc<Inner>,
    etcd_key: String,
    /// The number in `etcd_key`, given back once it is removed here.
    seq: u64,
    /// A lock's own lease: revoking it deletes the key too.
    own_lease: Option<i64>,
    /// Transactions that may still create the key.
    txns: Vec<JoinHandle<Result<TxnResponse, etcd_client::Error>>>,
    armed: bool,
}

impl PendingKey {
    /// Removes the key now (awaited), e.g. after a failed `try_lock`.
    /// Stays armed until done: if this is dropped midway, `Drop` removes
    /// the key again in the background.
    async fn remove_now(&mut self) {
        let removed = remove_key(
            self.inner.clone(),
            self.etcd_key.clone(),
            self.own_lease,
            std::mem::take(&mut self.txns),
        )
        .await;
        self.armed = false;
        if removed {
            // Every transaction finished before the delete, which etcd
            // confirmed. (A removal in the background, after a dropped
            // attempt, does not give its number back: a delete dropped
            // midway here might still be in flight.)
            self.inner.give_back_seq(self.seq);
        }
    }
}

impl Drop for PendingKey {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %self.etcd_key, "distlock: attempt dropped outside a runtime; its key stays until its lease ends");
            return;
        };
        let (inner, etcd_key, own_lease, txns) = (
            self.inner.clone(),
            std::mem::take(&mut self.etcd_key),
            self.own_lease,
            std::mem::take(&mut self.txns),
        );
        runtime.spawn(async move {
            remove_key(inner, etcd_key, own_lease, txns).await;
        });
    }
}

async fn remove_key(
    inner: Arc<Inner>,
    etcd_key: String,
    own_lease: Option<i64>,
    txns: Vec<JoinHandle<Result<TxnResponse, etcd_client::Error>>>,
) -> bool {
    // The key may appear only once the transactions are done.
    for txn in txns {
        let _ = txn.await;
    }
    let timeout = inner.config.timeout;
    let outcome = match own_lease {
        Some(id) => bounded(timeout, async {
            inner.client.lease_client().revoke(id).await.map(drop)
        })
        .await
        .or_else(|err| match err {
            // Already gone: so is the key.
            etcd_client::Error::GRpcStatus(status) if status.message().contains("not found") => {
                Ok(())
            }
            other => Err(other),
        }),
        None => {
            bounded(timeout, async {
                inner
                    .client
                    .kv_client()
                    .delete(etcd_key.as_str(), None)
                    .await
                    .map(drop)
            })
            .await
        }
    };
    match outcome {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(key = %etcd_key, error = %err, "distlock: removing an abandoned etcd lock key failed; it stays until its lease ends");
            false
        }
    }
}

async fn grant_session(
    client: &Client,
    secs: i64,
    timeout: Duration,
    request_timeout: Duration,
) -> Result<Arc<Session>, etcd_client::Error> {
    let sent_at = Instant::now();
    let granted = bounded(timeout, async {
        client.lease_client().grant(secs, None).await
    })
    .await?;
    let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
    let session = Session::new(granted.id(), ttl, validity_deadline(sent_at, ttl));
    session.start(client.clone(), request_timeout);
    Ok(session)
}

async fn bounded<T>(
    timeout: Duration,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(timeout, request).await {
        Ok(outcome) => outcome,
        Err(_) => Err(timed_out(timeout)),
    }
}

fn timed_out(timeout: Duration) -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {timeout:?}"),
    ))
}

/// etcd's answer to a write on a lease it does not know.
fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::NotFound && status.message().contains("lease not found"))
}

/// Whether a failed request may succeed later (connection trouble, a
/// leader election), as opposed to a refusal (auth, bad request).
fn is_retryable(err: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match err {
        E::IoError(_) | E::TransportError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(status) => {
            use tonic::Code;
            matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Unknown
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Internal
                    | Code::ResourceExhausted
            )
        }
        _ => false,
    }
}

/// Connects to each endpoint by TCP; `Ok` as soon as one answers.
async fn probe(endpoints: &[String], timeout: Duration) -> std::io::Result<()> {
    let mut probes = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        probes.spawn(async move {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&endpoint)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(std::io::Error::new(
                    err.kind(),
                    format!("{endpoint}: {err}"),
                )),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{endpoint}: no answer within {timeout:?}"),
                )),
            }
        });
    }
    let mut first_error = None;
    while let Some(outcome) = probes.join_next().await {
        match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(join) => {
                first_error.get_or_insert(std::io::Error::other(join));
            }
        }
    }
    Err(first_error.unwrap_or_else(|| std::io::Error::other("no endpoint")))
}
