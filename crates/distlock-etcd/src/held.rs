//! A held lock (release, and the ownership check renewal runs) and the
//! cleanup of abandoned attempts.
//!
//! - Release is one delete of the lock's key; a lock on a lease of its own
//!   also revokes that lease, in the background. A lock whose lease was
//!   lost meanwhile reports `NotHeld` even if its key was still there to
//!   delete: it may have been someone else's in between.
//! - A session-bound lock is kept valid by the session's keep-alive; held
//!   longer than `session_ttl / 3`, its key is watched on the client's one
//!   watch stream (the `liveness` module), so that a key deleted by hand
//!   fires `lost()` with `NotHeld` too, with no request while it is held.
//!   An explicit `extend()` reads the key back (one count-only range). A
//!   lock on a lease of its own renews by refreshing that lease (etcd
//!   leases keep the TTL they were granted with).
//! - A watch (or a check, or a release) that finds a session-bound lock's
//!   key gone
//!   asks etcd whether the session lease is still there (one
//!   `LeaseTimeToLive`, only on that path): a revoked or expired lease
//!   takes its keys with it, and the check can run before the session's
//!   keep-alive learns of it. If the lease is gone, the session ends
//!   first, so that this lock and every other one on the session are lost
//!   with `SessionLost`, as when the keep-alive finds it, not `NotHeld`.
//! - A release whose delete fails (no answer within the timeout, a member
//!   down) returns the error, and the key is removed in the background
//!   ([`remove_in_background`]): retried with backoff (50 ms doubling to
//!   2 s) until etcd confirms it, or the lease it lives on is lost, or the
//!   client is dropped (the task holds it weakly; dropping it revokes the
//!   session lease). Before this, the key stayed on the session lease the
//!   client kept alive, and nobody, this client included, got the lock
//!   until the session ended (issue 12: a 14 s stall, and one to the end
//!   of a run).
//! - A dropped or failed attempt deletes its key in the background, after
//!   its transaction has finished (the key may appear only then): a key
//!   left behind would be a waiter nobody serves, holding up the queue
//!   until its lease ends. A removal that fails is retried the same way.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{
    removal_backoff, retry_in_background, CleanupOnDrop, HeldLock, Lease, Retry,
};
use distlock_core::{Error, LostReason, Result};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnResponse};
use tokio::task::JoinHandle;

use crate::keys::Reservation;
use crate::rpc::{is_interrupted, is_lease_not_found};
use crate::session::{spawn_revoke, Binding, Session, LEASE_GONE};
use crate::{EtcdLock, Inner, NAME};

/// A granted lock: its key, and the lease it lives on.
pub(crate) struct EtcdHeld {
    pub(crate) owner: EtcdLock,
    pub(crate) key: String,
    /// Shared with the client's held-key watch.
    pub(crate) etcd_key: Arc<str>,
    /// The name `etcd_key`'s reservation, given back once the key is
    /// deleted.
    pub(crate) reservation: Reservation,
    /// A second release (the first one's future was dropped midway) may
    /// race a delete still in flight: only the first gives the name back.
    pub(crate) release_started: AtomicBool,
    pub(crate) binding: Binding,
    pub(crate) lease: Lease,
    /// Its watch in the client's held-key watch (`liveness` module), for a
    /// session-bound lock.
    pub(crate) watch_id: Option<i64>,
}

impl Drop for EtcdHeld {
    fn drop(&mut self) {
        if let Some(id) = self.watch_id {
            self.owner.inner.held_keys.remove(id);
        }
    }
}

#[async_trait]
impl HeldLock for EtcdHeld {
    async fn release(&self) -> Result<()> {
        let owner = &self.owner;
        // Our own delete is no loss to report.
        if let Some(id) = self.watch_id {
            owner.inner.held_keys.remove(id);
        }
        let first_release = !self.release_started.swap(true, Ordering::AcqRel);
        let delete = || async {
            owner
                .inner
                .client
                .kv_client()
                .delete(&*self.etcd_key, None)
                .await
        };
        let mut deleted = owner.inner.request(delete()).await;
        // Abandoned because a member left the balancer (it may have been
        // stuck there): sent once more, to the members that answer. The
        // first may have landed (on a healthy member) or may still land
        // (when the stopped one resumes), so neither its name is given
        // back nor "nothing deleted" taken as the key being gone already.
        let interrupted = matches!(&deleted, Err(err) if is_interrupted(err));
        if interrupted {
            tracing::debug!(key = %self.etcd_key, "distlock: etcd release interrupted (a member left the balancer or the leader changed), sending it again");
            deleted = owner.inner.request(delete()).await;
        }
        let deleted = match deleted {
            Ok(deleted) => deleted,
            // The key may still be there, on a lease kept alive, holding up
            // every waiter: the caller learns of the failure, and the key
            // is removed in the background. (Its name is not given
            // back: the delete may still land.)
            Err(source) => {
                remove_in_background(
                    &owner.inner,
                    KeyLease::of(&self.binding),
                    self.etcd_key.to_string(),
                    self.key.clone(),
                    "a released etcd lock key",
                );
                return Err(owner.error("release", &self.key, source));
            }
        };
        if first_release && !interrupted {
            // etcd answered the only delete sent: the key is gone and
            // nothing can create it again, so its name may be reused.
            owner
                .inner
                .names
                .give_back(&self.etcd_key, self.reservation);
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
        if deleted.deleted() == 0 && !interrupted {
            self.key_gone().await;
            return Err(Error::not_held(&self.key));
        }
        if lost {
            return Err(Error::not_held(&self.key));
        }
        Ok(())
    }

    fn resume_token(&self) -> Option<String> {
        match &self.binding {
            Binding::Own(own) => Some(crate::resume::token(own, &self.etcd_key)),
            // The session lease lives and dies with this client.
            Binding::Session(_) => None,
        }
    }

    async fn extend(&self, _ttl: Duration) -> Result<()> {
        let owner = &self.owner;
        match &self.binding {
            // The session's keep-alive keeps the validity; check ownership.
            Binding::Session(session) => {
                if !self.key_exists().await? {
                    self.key_gone().await;
                    return Err(Error::not_held(&self.key));
                }
                if session.is_lost() {
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
                        // The lease lives, but the key may be gone: released
                        // by another client that resumed the lock (whose
                        // revoke of the lease runs in the background), or
                        // deleted by hand. Only the key says the lock is ours.
                        if !self.key_exists().await? {
                            return Err(Error::not_held(&self.key));
                        }
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

impl EtcdHeld {
    /// Whether our key is still there (one count-only range).
    async fn key_exists(&self) -> Result<bool> {
        let owner = &self.owner;
        let found = owner
            .call("extend", &self.key, async {
                let options = GetOptions::new().with_count_only();
                owner
                    .inner
                    .client
                    .kv_client()
                    .get(&*self.etcd_key, Some(options))
                    .await
            })
            .await?;
        Ok(found.count() > 0)
    }

    /// Our key is gone: see [`check_session_lease`].
    async fn key_gone(&self) {
        if let Binding::Session(session) = &self.binding {
            check_session_lease(&self.owner.inner, session, &self.key).await;
        }
    }
}

/// The key of `key`'s lock on `session`'s lease is gone. Asks etcd whether
/// the lease went with it (revoked or expired before the session's
/// keep-alive learnt of it) and if so ends the session first, so that
/// every lock on it is lost with `SessionLost` (the first reason wins)
/// rather than with the `NotHeld` the caller reports next. A key deleted
/// by hand leaves a live lease, and the session carries on.
pub(crate) async fn check_session_lease(inner: &Inner, session: &Session, key: &str) {
    if session.is_lost() {
        return;
    }
    let answer = inner
        .request(async {
            inner
                .client
                .lease_client()
                .time_to_live(session.id, None)
                .await
        })
        .await;
    match answer {
        // etcd answers -1 for a lease it does not know; an error
        // saying "lease not found" means the same.
        Ok(answer) if answer.ttl() < 0 => lease_gone(session, key),
        Err(err) if is_lease_not_found(&err) => lease_gone(session, key),
        Ok(_) => {}
        Err(err) => {
            // The key is gone either way: NotHeld stands, and the
            // keep-alive will tell about the lease.
            let error = Error::backend(
                NAME,
                inner.endpoints.clone(),
                "check the session lease",
                key,
                err,
            );
            tracing::debug!(lease_id = session.id, %error, "distlock: etcd could not check the session lease of a lock whose key is gone");
        }
    }
}

/// The session lease of `key`'s lock is gone: the session ends now.
fn lease_gone(session: &Session, key: &str) {
    tracing::debug!(
        lease_id = session.id,
        key,
        "distlock: etcd lock key gone with its session lease"
    );
    session.lose(LEASE_GONE);
}

/// The lease a key lives on, held so that it keeps nothing alive.
#[derive(Clone)]
pub(crate) enum KeyLease {
    /// The client's session lease: once the session is lost (or dropped),
    /// nothing keeps the lease alive, and the key goes with it.
    Session(Weak<Session>),
    /// A lock's own lease: revoking it deletes the key too.
    Own(i64),
}

impl KeyLease {
    pub(crate) fn of(binding: &Binding) -> Self {
        match binding {
            Binding::Session(session) => KeyLease::Session(Arc::downgrade(session)),
            Binding::Own(own) => KeyLease::Own(own.id),
        }
    }

    /// True once the lease is lost to us: the key goes when it ends.
    fn lost(&self) -> bool {
        match self {
            KeyLease::Session(session) => session.upgrade().is_none_or(|session| session.is_lost()),
            // Unknown here; a revoke says if it is gone.
            KeyLease::Own(_) => false,
        }
    }
}

/// Deletes `etcd_key`, or revokes the lock's own lease it lives on (which
/// deletes it too), one request bounded by the configured timeout. A
/// lease or key already gone counts as done.
async fn remove_key(
    inner: &Inner,
    lease: &KeyLease,
    etcd_key: &str,
) -> Result<(), etcd_client::Error> {
    match lease {
        KeyLease::Own(id) => inner
            .request(async { inner.client.lease_client().revoke(*id).await.map(drop) })
            .await
            .or_else(|err| match err {
                // Already gone: so is the key.
                etcd_client::Error::GRpcStatus(status)
                    if status.message().contains("not found") =>
                {
                    Ok(())
                }
                other => Err(other),
            }),
        KeyLease::Session(_) => {
            inner
                .request(async {
                    inner
                        .client
                        .kv_client()
                        .delete(etcd_key, None)
                        .await
                        .map(drop)
                })
                .await
        }
    }
}

/// Removes `etcd_key` (the key of `key`'s lock) in the background, after
/// a removal failed: retried with [`removal_backoff`] until it succeeds,
/// or its lease is lost, or the client is dropped (which ends the session
/// and revokes its lease). Holds the client weakly, so that it does not
/// keep a dropped client's session alive.
pub(crate) fn remove_in_background(
    inner: &Arc<Inner>,
    lease: KeyLease,
    etcd_key: String,
    key: String,
    what: &'static str,
) {
    let inner = Arc::downgrade(inner);
    retry_in_background(what, removal_backoff(), move || {
        let (inner, lease, etcd_key, key) =
            (inner.clone(), lease.clone(), etcd_key.clone(), key.clone());
        async move {
            let Some(inner) = inner.upgrade() else {
                return Retry::Done;
            };
            if lease.lost() {
                return Retry::Done;
            }
            match remove_key(&inner, &lease, &etcd_key).await {
                Ok(()) => Retry::Done,
                Err(err) => Retry::Again(
                    Error::backend(NAME, inner.endpoints.clone(), "remove", &key, err).into(),
                ),
            }
        }
    });
}

/// A transaction of an attempt, spawned so that it finishes even if the
/// attempt is dropped.
pub(crate) type TxnTask = JoinHandle<Result<TxnResponse, etcd_client::Error>>;

/// Waits in the background for copies of a granted attempt's transaction
/// that were still in flight, and deletes a key one of them created that
/// is not the granted one (`granted_revision`): it landed after the
/// release, and nobody holds it. The compare on its create revision
/// leaves any other key alone.
pub(crate) fn delete_stale_creates(
    inner: &Arc<Inner>,
    etcd_key: String,
    granted_revision: i64,
    txns: Vec<TxnTask>,
) {
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        for txn in txns {
            let Ok(Ok(response)) = txn.await else {
                continue;
            };
            let created_at = response.header().map_or(0, |header| header.revision());
            if !response.succeeded() || created_at == granted_revision {
                continue;
            }
            // The client is gone: its lease, and the key with it, go too.
            let Some(inner) = inner.upgrade() else {
                return;
            };
            tracing::debug!(key = %etcd_key, created_at, "distlock: deleting an etcd lock key a late copy of a granted attempt created");
            let delete = Txn::new()
                .when([Compare::create_revision(
                    etcd_key.as_str(),
                    CompareOp::Equal,
                    created_at,
                )])
                .and_then([TxnOp::delete(etcd_key.as_str(), None)]);
            let deleted = inner
                .request(async { inner.client.kv_client().txn(delete).await })
                .await;
            if let Err(err) = deleted {
                tracing::warn!(key = %etcd_key, error = %err, "distlock: could not delete an etcd lock key a late transaction created; it ends with its lease");
            }
        }
    });
}

/// An attempt's key until the lock is granted. The attempt arms a
/// [`CleanupOnDrop`] with [`PendingKey::remove`]: dropped or failed, it
/// deletes the key in the background, after the attempt's transaction
/// finished, so that no waiter record is left behind.
pub(crate) struct PendingKey {
    inner: Arc<Inner>,
    /// The lock's key, for errors.
    key: String,
    pub(crate) etcd_key: String,
    /// The name's reservation, given back once the key is removed in the
    /// attempt's task.
    reservation: Reservation,
    /// The lease the key lives on.
    lease: KeyLease,
    /// Transactions that may still create the key. The attempt holds the
    /// lock while it awaits one, and the cleanup can only run once the
    /// attempt is done or dropped.
    pub(crate) txns: tokio::sync::Mutex<Vec<TxnTask>>,
    /// A removal was started: a later one (the first was dropped midway)
    /// may race that one's delete, still in flight.
    removal_started: AtomicBool,
}

impl PendingKey {
    /// The key `etcd_key` of `key`'s lock, reserved by `reservation`, on
    /// `binding`'s lease.
    pub(crate) fn new(
        inner: &Arc<Inner>,
        key: &str,
        etcd_key: String,
        reservation: Reservation,
        binding: &Binding,
    ) -> Self {
        PendingKey {
            inner: inner.clone(),
            key: key.to_owned(),
            etcd_key,
            reservation,
            lease: KeyLease::of(binding),
            txns: tokio::sync::Mutex::new(Vec::new()),
            removal_started: AtomicBool::new(false),
        }
    }

    /// Removes the key now, in the attempt's task (a busy `try_lock`, a
    /// lost lease). `cleanup` (armed with [`remove`](Self::remove)) stays
    /// armed until etcd answered: if this is dropped midway, the key is
    /// removed again in the background.
    pub(crate) async fn remove_now<F, Fut>(&self, cleanup: CleanupOnDrop<F, Fut>)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.remove().await;
        cleanup.disarm();
    }

    /// Deletes the key (revokes a lock's own lease) once the transactions
    /// that may create it are done; if that fails, the removal goes on in
    /// the background ([`remove_in_background`]).
    pub(crate) async fn remove(&self) {
        let first = !self.removal_started.swap(true, Ordering::AcqRel);
        let txns = std::mem::take(&mut *self.txns.lock().await);
        // The key may appear only once the transactions are done.
        for txn in txns {
            let _ = txn.await;
        }
        match remove_key(&self.inner, &self.lease, &self.etcd_key).await {
            Ok(()) => {
                // Every transaction finished before the delete, which etcd
                // confirmed, and no earlier removal may still be in flight
                // (one dropped midway): a later attempt may reuse the name.
                // A mutex-layout name kept would send every later attempt
                // of this client on this lock to a lease of its own.
                if first {
                    self.inner.names.give_back(&self.etcd_key, self.reservation);
                }
            }
            Err(err) => {
                tracing::debug!(key = %self.etcd_key, error = %err, "distlock: removing an abandoned etcd lock key failed; retrying in the background");
                remove_in_background(
                    &self.inner,
                    self.lease.clone(),
                    self.etcd_key.clone(),
                    self.key.clone(),
                    "an abandoned etcd lock key",
                );
            }
        }
    }
}
