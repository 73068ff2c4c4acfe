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
//! - A dropped or failed attempt deletes its key in the background, after
//!   its transaction has finished (the key may appear only then): a key
//!   left behind would be a waiter nobody serves, holding up the queue
//!   until its lease ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{HeldLock, Lease};
use distlock_core::{Error, LostReason, Result};
use etcd_client::{GetOptions, TxnResponse};
use tokio::task::JoinHandle;

use crate::rpc::bounded;
use crate::session::{spawn_revoke, Binding};
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
pub(crate) struct PendingKey {
    pub(crate) inner: Arc<Inner>,
    pub(crate) etcd_key: String,
    /// The number in `etcd_key`, given back once it is removed here.
    pub(crate) seq: u64,
    /// A lock's own lease: revoking it deletes the key too.
    pub(crate) own_lease: Option<i64>,
    /// Transactions that may still create the key.
    pub(crate) txns: Vec<JoinHandle<Result<TxnResponse, etcd_client::Error>>>,
    pub(crate) armed: bool,
}

impl PendingKey {
    /// Removes the key now (awaited), e.g. after a failed `try_lock`.
    /// Stays armed until done: if this is dropped midway, `Drop` removes
    /// the key again in the background.
    pub(crate) async fn remove_now(&mut self) {
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
