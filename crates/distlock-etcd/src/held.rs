//! A held lock (release, and the ownership check renewal runs) and the
//! cleanup of abandoned attempts.
//!
//! - Release is one delete of the lock's key; a lock on a lease of its own
//!   also revokes that lease, in the background. A lock whose lease was
//!   lost meanwhile reports `NotHeld` even if its key was still there to
//!   delete: it may have been someone else's in between.
//! - A session-bound lock is kept valid by the session's keep-alive; held
//!   longer than `session_ttl / 3`, it reads its key back every
//!   `session_ttl / 3` (one count-only range), so that a key deleted by
//!   hand fires `lost()` with `NotHeld` too. A lock on a lease of its own
//!   renews by refreshing that lease (etcd leases keep the TTL they were
//!   granted with).
//! - A check (or a release) that finds a session-bound lock's key gone
//!   asks etcd whether the session lease is still there (one
//!   `LeaseTimeToLive`, only on that path): a revoked or expired lease
//!   takes its keys with it, and the check can run before the session's
//!   keep-alive learns of it. If the lease is gone, the session ends
//!   first, so that this lock and every other one on the session are lost
//!   with `SessionLost`, as when the keep-alive finds it, not `NotHeld`.
//! - A dropped or failed attempt deletes its key in the background, after
//!   its transaction has finished (the key may appear only then): a key
//!   left behind would be a waiter nobody serves, holding up the queue
//!   until its lease ends.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{CleanupOnDrop, HeldLock, Lease};
use distlock_core::{Error, LostReason, Result};
use etcd_client::{GetOptions, TxnResponse};
use tokio::task::JoinHandle;

use crate::rpc::{bounded, is_lease_not_found};
use crate::session::{spawn_revoke, Binding, Session, LEASE_GONE};
use crate::{EtcdLock, Inner};

/// A granted lock: its key, and the lease it lives on.
pub(crate) struct EtcdHeld {
    pub(crate) owner: EtcdLock,
    pub(crate) key: String,
    pub(crate) etcd_key: String,
    /// The number in `etcd_key`, given back once the key is deleted.
    pub(crate) seq: u64,
    /// A second release (the first one's future was dropped midway) may
    /// race a delete still in flight: only the first gives `seq` back.
    pub(crate) release_started: AtomicBool,
    pub(crate) binding: Binding,
    pub(crate) lease: Lease,
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
        if deleted.deleted() == 0 {
            self.key_gone().await;
            return Err(Error::not_held(&self.key));
        }
        if lost {
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
                if found.count() == 0 {
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
    /// Our key is gone. On a session lease, asks etcd whether the lease
    /// went with it (revoked or expired before the session's keep-alive
    /// learnt of it) and if so ends the session first, so that every lock
    /// on it is lost with `SessionLost` (the first reason wins) rather than
    /// with the `NotHeld` the caller reports next. A key deleted by hand
    /// leaves a live lease, and the session carries on.
    async fn key_gone(&self) {
        let Binding::Session(session) = &self.binding else {
            return;
        };
        if session.is_lost() {
            return;
        }
        let inner = &self.owner.inner;
        let answer = bounded(inner.config.timeout, async {
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
            Ok(answer) if answer.ttl() < 0 => lease_gone(session, &self.key),
            Err(err) if is_lease_not_found(&err) => lease_gone(session, &self.key),
            Ok(_) => {}
            Err(err) => {
                // The key is gone either way: NotHeld stands, and the
                // keep-alive will tell about the lease.
                let error = self.owner.error("check the session lease", &self.key, err);
                tracing::debug!(lease_id = session.id, %error, "distlock: etcd could not check the session lease of a lock whose key is gone");
            }
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

/// A transaction of an attempt, spawned so that it finishes even if the
/// attempt is dropped.
pub(crate) type TxnTask = JoinHandle<Result<TxnResponse, etcd_client::Error>>;

/// An attempt's key until the lock is granted. The attempt arms a
/// [`CleanupOnDrop`] with [`PendingKey::remove`]: dropped or failed, it
/// deletes the key in the background, after the attempt's transaction
/// finished, so that no waiter record is left behind.
pub(crate) struct PendingKey {
    inner: Arc<Inner>,
    pub(crate) etcd_key: String,
    /// The number in `etcd_key`, given back once it is removed in the
    /// attempt's task.
    seq: u64,
    /// A lock's own lease: revoking it deletes the key too.
    own_lease: Option<i64>,
    /// Transactions that may still create the key. The attempt holds the
    /// lock while it awaits one, and the cleanup can only run once the
    /// attempt is done or dropped.
    pub(crate) txns: tokio::sync::Mutex<Vec<TxnTask>>,
}

impl PendingKey {
    /// The key `etcd_key`, numbered `seq`, on the session lease or on
    /// `own_lease`.
    pub(crate) fn new(
        inner: &Arc<Inner>,
        etcd_key: String,
        seq: u64,
        own_lease: Option<i64>,
    ) -> Self {
        PendingKey {
            inner: inner.clone(),
            etcd_key,
            seq,
            own_lease,
            txns: tokio::sync::Mutex::new(Vec::new()),
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
        let removed = self.remove().await;
        cleanup.disarm();
        if removed {
            // Every transaction finished before the delete, which etcd
            // confirmed. (A removal in the background, after a dropped
            // attempt, does not give its number back: a delete dropped
            // midway here might still be in flight.)
            self.inner.give_back_seq(self.seq);
        }
    }

    /// Deletes the key (revokes a lock's own lease) once the transactions
    /// that may create it are done; false if that failed.
    pub(crate) async fn remove(&self) -> bool {
        let txns = std::mem::take(&mut *self.txns.lock().await);
        // The key may appear only once the transactions are done.
        for txn in txns {
            let _ = txn.await;
        }
        let inner = &self.inner;
        let timeout = inner.config.timeout;
        let outcome = match self.own_lease {
            Some(id) => bounded(timeout, async {
                inner.client.lease_client().revoke(id).await.map(drop)
            })
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
            None => {
                bounded(timeout, async {
                    inner
                        .client
                        .kv_client()
                        .delete(self.etcd_key.as_str(), None)
                        .await
                        .map(drop)
                })
                .await
            }
        };
        match outcome {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(key = %self.etcd_key, error = %err, "distlock: removing an abandoned etcd lock key failed; it stays until its lease ends");
                false
            }
        }
    }
}
