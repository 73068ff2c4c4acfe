//! Attempts and waiting: the lock recipe, run in the client.
//!
//! - The locks of key `k` are the keys under `k/` (see the `keys` module
//!   for the layouts), one per holder or waiter, each living on a lease
//!   (see the `session` module). The key with the lowest create revision
//!   owns the lock. This is the recipe of etcd's `concurrency.Mutex` and
//!   `etcdctl lock` too, so in the mutex layout they share the queue.
//! - An attempt is one transaction: if the attempt's key does not exist,
//!   create it on the lease and, in the same transaction, read the newest
//!   keys under the prefix by create revision (ours, the one just older
//!   and the one before that). An attempt that finds no older key holds
//!   the lock: uncontended, that is one round trip, and release is one
//!   delete. The transaction runs in a task of its own, so that a dropped
//!   attempt removes its key only after the transaction finished (see the
//!   `held` module); a transaction whose outcome is unknown (the
//!   connection broke) is sent again, and either creates the key or finds
//!   it.
//! - `try_lock` that finds an older key deletes its own (a second round
//!   trip, on the busy path only). `lock` waits in the queue for the key
//!   just older than its own to go (see the `watch` module). So waiters
//!   queue in arrival order (FIFO), a release wakes exactly one waiter, and
//!   nobody polls.
//! - A client reuses the name of a key whose deletion etcd confirmed:
//!   every distinct name under a prefix stays in etcd's index until a
//!   compaction and each acquire's range walks them, so fresh names on
//!   every attempt would make a much-used lock slower and slower.
//! - The fencing token is the revision at which the lock became ours: our
//!   key's create revision when the attempt found no older key, else the
//!   revision of the delete (or of the read) that showed none left. Every
//!   earlier holder's key was deleted at or before it, so it exceeds any
//!   revision an earlier holder saw while holding, whatever recipe that
//!   holder ran: Go's `Mutex.Header().Revision` and `etcdctl lock`'s
//!   `ETCD_LOCK_REV` are such revisions. (The create revision alone is not
//!   enough: a key created before a Go waiter was granted can be granted
//!   after it.)
//!
//! # Why not etcd's Lock RPC
//!
//! etcd ships a server-side lock service (`v3lockpb.Lock`/`Unlock`, behind
//! `etcdctl lock`) built on a similar recipe. It is not used here because
//! its `Lock` call only ever waits: there is no try-lock, so `try_lock`
//! would have to cancel a wait and race the grant. Bounding its wait has
//! the same race: a grant that lands as the client's deadline fires leaves
//! a held lock nobody knows about until its lease expires. Its key also
//! comes back only in the response, after the grant, so an attempt that is
//! dropped mid-call cannot be found and cleaned up by the client. And on
//! etcd 3.4 its waiter opens the watch at the revision of an earlier read,
//! which under contention lands in the server's slowly caught-up watcher
//! group (see the `watch` module). Running the recipe in the client gives
//! a one-round-trip try-lock, a key chosen before the request (so
//! abandoned attempts are always removed), watches opened at the current
//! revision, the create revision as fencing token, and the same behaviour
//! on every etcd v3 server.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use distlock_core::backend::{scheduled_guard, CleanupOnDrop, Lease};
use distlock_core::{Backoff, LockGuard, LockOptions};
use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use tokio::time::Instant;

use crate::held::{EtcdHeld, PendingKey};
use crate::keys::Reservation;
use crate::rpc::{interrupted, is_lease_not_found, is_retryable, timed_out, Failure};
use crate::session::Binding;
use crate::{EtcdLock, NAME};

/// How one attempt ended, when it did not fail.
pub(crate) enum Outcome {
    Granted(LockGuard),
    /// Held by another owner (only when not waiting).
    Busy,
    /// The attempt's key or lease vanished (session lost): start over.
    Restart,
}

/// Where one attempt queues: the lock's key (for errors), the lock's
/// prefix in etcd and the attempt's own key under it.
#[derive(Clone, Copy)]
pub(crate) struct Slot<'a> {
    pub(crate) key: &'a str,
    pub(crate) dir: &'a str,
    pub(crate) etcd_key: &'a str,
}

/// The key just older than ours, which a waiter watches (and, while that
/// one waits too, the key just older than it).
#[derive(Clone, Debug)]
pub(crate) struct Predecessor {
    pub(crate) key: Vec<u8>,
    pub(crate) create_revision: i64,
    /// The lease it lives on.
    pub(crate) lease: i64,
    /// It was the oldest key (the owner) when read. Keys older than ours
    /// can only go away (a new key gets a newer create revision), so once
    /// this one is deleted nothing older than ours is left.
    pub(crate) owner: bool,
    /// The key just older than the predecessor, when it is not the owner.
    pub(crate) older: Option<Vec<u8>>,
}

/// How many keys a queue read returns: ours, the predecessor and the one
/// before it.
const QUEUE_READ_LIMIT: i64 = 3;

/// How many times an attempt's transaction is sent again after a failure
/// that left its outcome unknown.
const TXN_RETRIES: u32 = 2;

/// The delays before those retries: 40 ms, then 80 ms.
fn txn_retry() -> Backoff {
    Backoff::new(Duration::from_millis(40), Duration::from_millis(80)).jitter(0.0)
}

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
    pub(crate) fn same_key(&self, other: &Predecessor) -> bool {
        self.key == other.key && self.create_revision == other.create_revision
    }
}

/// Where our key stands in the lock's queue.
pub(crate) enum Position {
    /// Our key is gone (its lease expired or was revoked).
    Gone,
    /// Our key is the oldest: the lock is ours, as etcd showed at this
    /// revision (the fencing token).
    Ours(i64),
    /// Our key waits behind this one.
    Behind(Predecessor),
}

impl Position {
    /// Our position in a range of the lock's keys read at `revision`,
    /// newest first and limited to [`QUEUE_READ_LIMIT`], whose first key
    /// is ours.
    fn from_range(range: &etcd_client::GetResponse, revision: i64) -> Self {
        match Predecessor::from_range(range) {
            Some(predecessor) => Position::Behind(predecessor),
            None => Position::Ours(revision),
        }
    }
}

impl EtcdLock {
    /// One acquisition attempt with a fresh key; waits in the queue when
    /// `wait`, otherwise gives up (removing its key) if the lock is held.
    pub(crate) async fn attempt(
        &self,
        key: &str,
        options: &LockOptions,
        wait: bool,
    ) -> Result<Outcome, Failure> {
        let dir = self.lock_key_prefix(key);
        let (binding, etcd_key, reservation) = self.reserve_key(key, &dir, options).await?;
        let pending = Arc::new(PendingKey::new(
            &self.inner,
            key,
            etcd_key,
            reservation,
            &binding,
        ));
        let cleanup = CleanupOnDrop::arm("an etcd lock key", {
            let pending = pending.clone();
            move || async move {
                pending.remove().await;
            }
        });
        let slot = Slot {
            key,
            dir: &dir,
            etcd_key: &pending.etcd_key,
        };
        let (my_revision, mut position) = self
            .enqueue(slot, binding.lease_id(), binding.key_value(), &pending)
            .await?;
        if my_revision == 0 {
            if let Binding::Session(session) = &binding {
                session.close(&self.inner.client, "etcd says the session lease is gone");
            }
        }
        let mut waited = false;
        let mut errors: u32 = 0;
        let granted_at = loop {
            let predecessor = match position {
                Position::Gone => {
                    pending.remove_now(cleanup).await;
                    return Ok(Outcome::Restart);
                }
                Position::Ours(revision) => break revision,
                Position::Behind(predecessor) => predecessor,
            };
            if !wait {
                pending.remove_now(cleanup).await;
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
                    pending.remove_now(cleanup).await;
                    return Ok(Outcome::Restart);
                }
                Err(failure) if failure.retry => {
                    tracing::debug!(error = %failure.error, "distlock: etcd wait failed, retrying");
                    tokio::time::sleep(options.backoff.delay(errors)).await;
                    errors += 1;
                    position = Position::Behind(predecessor);
                }
                Err(failure) => return Err(failure),
            }
        };
        // Ours: our key is the oldest under the lock's prefix.
        let fencing_token = granted_at as u64;
        let (lease, core_renewal) = match &binding {
            Binding::Session(session) => {
                let lease = session.attach(|valid_until| {
                    Lease::new(key, fencing_token, session.ttl, Some(valid_until))
                });
                match lease {
                    // The session's keep-alive keeps it valid; the
                    // client's held-key watch (from ttl / 3 on) sees a key
                    // deleted behind our back, as an operator or a stray
                    // cleanup would, and fires `lost()`.
                    Some(lease) => (lease, false),
                    None => {
                        pending.remove_now(cleanup).await;
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
                            pending.remove_now(cleanup).await;
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
                    pending.remove_now(cleanup).await;
                    return Ok(Outcome::Restart);
                }
                let lease = Lease::new(key, fencing_token, own.ttl, Some(valid_until));
                (lease, options.auto_renew)
            }
        };
        cleanup.disarm();
        // Copies of our transaction still in flight (sent again when a
        // member left the balancer: the first may be stuck on it) could
        // create the key again after its release, when that member
        // resumes: a key nobody holds, on our lease, which would take the
        // lock until the lease ends. Such a key is deleted when its
        // transaction finishes, and the name is not reused on this lease.
        let stale_txns = std::mem::take(&mut *pending.txns.lock().await);
        let reservation = if stale_txns.is_empty() {
            reservation
        } else {
            crate::held::delete_stale_creates(
                &self.inner,
                pending.etcd_key.clone(),
                my_revision,
                stale_txns,
            );
            Reservation::OwnLease
        };
        // The cleanup's clone went with it.
        let etcd_key: Arc<str> = Arc::try_unwrap(pending)
            .map_or_else(
                |pending| pending.etcd_key.clone(),
                |pending| pending.etcd_key,
            )
            .into();
        let watch_id = match &binding {
            Binding::Session(session) => Some(self.inner.held_keys.insert(
                etcd_key.clone(),
                my_revision,
                &lease,
                session,
            )),
            Binding::Own(_) => None,
        };
        let held = Arc::new(EtcdHeld {
            owner: self.clone(),
            key: key.to_owned(),
            etcd_key,
            reservation,
            release_started: AtomicBool::new(false),
            binding,
            lease: lease.clone(),
            watch_id,
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

    /// The lease of an attempt's key and the key's name: on the session
    /// lease when the options allow, except in the mutex layout while
    /// another attempt of this client holds or queues for the same lock on
    /// it (the layout has one name per lease and lock): then on a lease of
    /// the attempt's own, with the session's TTL, kept alive while it
    /// waits and renewed while held like any own lease.
    async fn reserve_key(
        &self,
        key: &str,
        dir: &str,
        options: &LockOptions,
    ) -> Result<(Binding, String, Reservation), Failure> {
        let binding = self.binding(key, options).await?;
        let on_session = matches!(binding, Binding::Session(_));
        if let Some((name, reservation)) =
            self.inner
                .names
                .reserve(dir, binding.lease_id(), on_session)
        {
            return Ok((binding, name, reservation));
        }
        let binding = self.own_binding(key, self.inner.session_secs).await?;
        let (name, reservation) = self
            .inner
            .names
            .reserve(dir, binding.lease_id(), false)
            .expect("a name on a lease of the attempt's own is always free");
        Ok((binding, name, reservation))
    }

    /// The one transaction of an attempt: create our key if absent and
    /// read the newest keys of the lock (ours and its predecessors).
    /// Runs in a task of its own, so that a dropped attempt cleans up only
    /// after it finished.
    async fn enqueue(
        &self,
        slot: Slot<'_>,
        lease_id: i64,
        value: &str,
        pending: &PendingKey,
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
                TxnOp::put(
                    etcd_key,
                    value,
                    Some(PutOptions::new().with_lease(lease_id)),
                ),
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
            let mut txns = pending.txns.lock().await;
            txns.push(tokio::spawn(async move { kv.txn(txn).await }));
            let running = txns.last_mut().expect("just pushed");
            let waited = tokio::select! {
                waited = tokio::time::timeout(self.inner.config.timeout, running) => waited,
                // It may be stuck on a member that stopped answering: sent
                // again, to the others. It stays in `txns` (still running)
                // for the cleanup to wait for.
                () = self.inner.health.disrupted() => {
                    if retries < TXN_RETRIES {
                        tracing::debug!("distlock: etcd acquire txn interrupted (a member left the balancer or the leader changed), sending it again");
                        retries += 1;
                        continue;
                    }
                    return Err(Failure {
                        error: self.error("acquire", key, interrupted()),
                        retry: true,
                    });
                }
            };
            let outcome = match waited {
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
            txns.pop();
            drop(txns);
            match outcome {
                Ok(response) => break response,
                // The lease vanished before our keep-alive noticed (revoked,
                // or expired while the server was unreachable): nothing was
                // written; start over on a new lease.
                Err(source) if is_lease_not_found(&source) => return Ok((0, Position::Gone)),
                // The outcome is unknown (the connection broke): the same
                // transaction again either creates the key or finds it.
                Err(source) if is_retryable(&source) && retries < TXN_RETRIES => {
                    tracing::debug!(error = %source, "distlock: etcd acquire txn failed, retrying");
                    tokio::time::sleep(txn_retry().delay(retries)).await;
                    retries += 1;
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

    /// Places our key from the transaction's answer: our create revision
    /// and our position in the queue.
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
                    Ok((revision, Position::from_range(range, revision)))
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
    pub(crate) async fn position(
        &self,
        slot: Slot<'_>,
        my_revision: i64,
    ) -> Result<Position, Failure> {
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
        let revision = range.header().map_or(0, |header| header.revision());
        match range.kvs().first() {
            Some(kv) if kv.key() == etcd_key.as_bytes() => {
                Ok(Position::from_range(&range, revision))
            }
            _ => Ok(Position::Gone),
        }
    }
}
