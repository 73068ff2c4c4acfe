//! The in-process backend (`memory://`): the full contract inside one
//! process, for tests and single-process programs.
//!
//! TTLs expire, fencing tokens come from one counter per store, and
//! waiters are granted the lock in FIFO order by direct hand-off: a
//! release passes the lock to the first waiter and wakes it, so nobody
//! polls. A waiter also wakes when the holder's TTL runs out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::{
    scheduled_guard, validity_deadline, HeldLock, Lease, RenewalScheduler, WeakLease,
};
use crate::{Capabilities, Error, LockGuard, LockOptions, LostReason, Result};

const BACKEND: &str = "memory";

/// An in-process lock service. Clones share the same locks; each
/// [`MemoryLock::new`] is a separate world, and [`MemoryLock::named`]
/// gives the process-wide store of that name (`memory://name`).
#[derive(Clone, Default)]
pub struct MemoryLock {
    store: Arc<Store>,
}

impl std::fmt::Debug for MemoryLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLock")
            .field("locked_keys", &self.locked_keys())
            .finish()
    }
}

#[derive(Default)]
struct Store {
    state: Mutex<StoreState>,
    /// Starts a held lock's renewal once it is due (most are released
    /// sooner).
    renewals: RenewalScheduler,
}

#[derive(Default)]
struct StoreState {
    keys: HashMap<String, KeyState>,
    /// One counter for the store: strictly increasing per key, too, and it
    /// survives a key's state being dropped when idle.
    last_fencing_token: u64,
    last_owner: u64,
}

#[derive(Default)]
struct KeyState {
    holder: Option<Holder>,
    waiters: VecDeque<Waiter>,
}

struct Holder {
    owner: u64,
    expires_at: Instant,
    lease: WeakLease,
}

struct Waiter {
    owner: u64,
    ttl: Duration,
    grant: oneshot::Sender<Lease>,
}

impl MemoryLock {
    /// A new, empty, private store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide store called `name` (`memory://` is the name
    /// `""`).
    pub fn named(name: &str) -> Self {
        static STORES: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
        let stores = STORES.get_or_init(Default::default);
        let mut stores = stores
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        MemoryLock {
            store: stores.entry(name.to_owned()).or_default().clone(),
        }
    }

    /// Takes the lock on `key` away from its holder, as a fault would: the
    /// holder's `lost()` fires and the next waiter gets the lock. Returns
    /// whether there was a holder.
    pub fn revoke(&self, key: &str) -> bool {
        let mut state = self.store.lock();
        let StoreState {
            keys,
            last_fencing_token,
            ..
        } = &mut *state;
        let Some(entry) = keys.get_mut(key) else {
            return false;
        };
        let Some(holder) = entry.holder.take() else {
            return false;
        };
        if let Some(lease) = holder.lease.upgrade() {
            lease.mark_lost(LostReason::Revoked);
        }
        grant_next(key, entry, last_fencing_token);
        forget_if_idle(keys, key);
        true
    }

    /// How many waiters are queued on `key` (for tests and diagnostics).
    pub fn waiters(&self, key: &str) -> usize {
        self.store
            .lock()
            .keys
            .get(key)
            .map_or(0, |entry| entry.waiters.len())
    }

    /// How many keys have a holder or waiters; idle keys are forgotten.
    pub fn locked_keys(&self) -> usize {
        self.store.lock().keys.len()
    }
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, StoreState> {
        // A panic while holding this mutex cannot leave a half-made
        // change: every critical section is panic-free bookkeeping.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Drops an expired holder, handing the lock to the next waiter.
fn expire_if_due(key: &str, entry: &mut KeyState, last_fencing_token: &mut u64, now: Instant) {
    if let Some(holder) = &entry.holder {
        if holder.expires_at <= now {
            if let Some(lease) = holder.lease.upgrade() {
                lease.mark_lost(LostReason::NotHeld);
            }
            entry.holder = None;
            grant_next(key, entry, last_fencing_token);
        }
    }
}

/// Hands a free lock to the first waiter still listening.
fn grant_next(key: &str, entry: &mut KeyState, last_fencing_token: &mut u64) {
    debug_assert!(entry.holder.is_none());
    while let Some(waiter) = entry.waiters.pop_front() {
        let now = Instant::now();
        *last_fencing_token += 1;
        let lease = Lease::new(
            key,
            *last_fencing_token,
            waiter.ttl,
            Some(validity_deadline(now, waiter.ttl)),
        );
        let holder = Holder {
            owner: waiter.owner,
            expires_at: now + waiter.ttl,
            lease: lease.downgrade(),
        };
        if waiter.grant.send(lease).is_ok() {
            entry.holder = Some(holder);
            return;
        }
    }
}

fn forget_if_idle(keys: &mut HashMap<String, KeyState>, key: &str) {
    if keys
        .get(key)
        .is_some_and(|entry| entry.holder.is_none() && entry.waiters.is_empty())
    {
        keys.remove(key);
    }
}

/// What one look at a key found.
enum Attempt<T> {
    /// The lock is ours, as `owner`.
    Granted(u64, Lease),
    /// Another owner holds it until `expires_at`; `held` is what the
    /// attempt's `when_held` made of it (a place in the queue, or nothing).
    Held { expires_at: Instant, held: T },
}

impl MemoryLock {
    /// Takes the lock if free; otherwise runs `when_held` on the key's
    /// state with a new owner id (a waiter queues itself there). One
    /// critical section either way, and the grant channel is made only by
    /// a waiter that needs it.
    fn attempt<T>(
        &self,
        key: &str,
        ttl: Duration,
        when_held: impl FnOnce(&mut KeyState, u64) -> T,
    ) -> Attempt<T> {
        let mut state = self.store.lock();
        let StoreState {
            keys,
            last_fencing_token,
            last_owner,
        } = &mut *state;
        let now = Instant::now();
        let entry = keys.entry(key.to_owned()).or_default();
        expire_if_due(key, entry, last_fencing_token, now);
        *last_owner += 1;
        let owner = *last_owner;
        if let Some(holder) = &entry.holder {
            let expires_at = holder.expires_at;
            let held = when_held(entry, owner);
            return Attempt::Held { expires_at, held };
        }
        *last_fencing_token += 1;
        let lease = Lease::new(
            key,
            *last_fencing_token,
            ttl,
            Some(validity_deadline(now, ttl)),
        );
        entry.holder = Some(Holder {
            owner,
            expires_at: now + ttl,
            lease: lease.downgrade(),
        });
        Attempt::Granted(owner, lease)
    }

    fn guard(&self, owner: u64, lease: Lease, options: &LockOptions) -> LockGuard {
        let held = Arc::new(MemoryHeld {
            store: self.store.clone(),
            owner,
            lease: lease.clone(),
        });
        scheduled_guard(
            BACKEND,
            lease,
            held,
            &self.store.renewals,
            options.auto_renew,
        )
    }
}

#[async_trait]
impl crate::backend::LockBackend for MemoryLock {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fair: true,
            session_based: false,
            ttl_expiry: true,
            strict_fencing: true,
            cross_process: false,
            resumable: false,
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        match self.attempt(key, options.ttl, |_, _| ()) {
            Attempt::Granted(owner, lease) => Ok(Some(self.guard(owner, lease, options))),
            // A key with a holder is not idle: nothing to forget.
            Attempt::Held { .. } => Ok(None),
        }
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let ttl = options.ttl;
        let queue = |entry: &mut KeyState, owner| {
            let (grant, granted) = oneshot::channel();
            entry.waiters.push_back(Waiter { owner, ttl, grant });
            (owner, granted)
        };
        let (owner, mut grant_rx, mut holder_expires_at) = match self.attempt(key, ttl, queue) {
            Attempt::Granted(owner, lease) => return Ok(self.guard(owner, lease, options)),
            Attempt::Held {
                expires_at,
                held: (owner, granted),
            } => (owner, granted, Some(expires_at)),
        };
        // From here we are queued: the ticket takes us out of the queue, or
        // passes on a lock granted to us, if this future is dropped.
        let mut ticket = QueueTicket {
            lock: self,
            key,
            owner,
            armed: true,
        };
        loop {
            let expiry_timer = async {
                match holder_expires_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                granted = &mut grant_rx => {
                    ticket.armed = false;
                    let lease = granted.map_err(|_| Error::Backend {
                        backend: BACKEND,
                        endpoint: "in-process".into(),
                        operation: "wait",
                        key: key.to_owned(),
                        source: "the waiter queue was dropped".into(),
                    })?;
                    return Ok(self.guard(owner, lease, options));
                }
                _ = expiry_timer => {
                    // The holder's TTL ran out (or was renewed): expire it,
                    // which grants the head of the queue, and look again.
                    let mut state = self.store.lock();
                    let StoreState { keys, last_fencing_token, .. } = &mut *state;
                    let entry = keys.entry(key.to_owned()).or_default();
                    expire_if_due(key, entry, last_fencing_token, Instant::now());
                    holder_expires_at = entry.holder.as_ref().map(|holder| holder.expires_at);
                }
            }
        }
    }
}

/// A queued waiter's place; dropping it armed undoes the wait.
struct QueueTicket<'a> {
    lock: &'a MemoryLock,
    key: &'a str,
    owner: u64,
    armed: bool,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.lock.store.lock();
        let StoreState {
            keys,
            last_fencing_token,
            ..
        } = &mut *state;
        if let Some(entry) = keys.get_mut(self.key) {
            entry.waiters.retain(|waiter| waiter.owner != self.owner);
            if entry
                .holder
                .as_ref()
                .is_some_and(|holder| holder.owner == self.owner)
            {
                // Granted while being dropped: pass it on.
                entry.holder = None;
                grant_next(self.key, entry, last_fencing_token);
            }
        }
        forget_if_idle(keys, self.key);
    }
}

struct MemoryHeld {
    store: Arc<Store>,
    owner: u64,
    lease: Lease,
}

impl MemoryHeld {
    /// Runs `change` on the entry if this owner still holds the lock.
    fn if_owner<T>(&self, change: impl FnOnce(&mut KeyState, &mut u64, Instant) -> T) -> Result<T> {
        let key = self.lease.key();
        let mut state = self.store.lock();
        let StoreState {
            keys,
            last_fencing_token,
            ..
        } = &mut *state;
        let now = Instant::now();
        let Some(entry) = keys.get_mut(key) else {
            return Err(Error::not_held(key));
        };
        expire_if_due(key, entry, last_fencing_token, now);
        let result = if entry
            .holder
            .as_ref()
            .is_some_and(|holder| holder.owner == self.owner)
        {
            Ok(change(entry, last_fencing_token, now))
        } else {
            Err(Error::not_held(key))
        };
        forget_if_idle(keys, key);
        result
    }
}

#[async_trait]
impl HeldLock for MemoryHeld {
    async fn release(&self) -> Result<()> {
        let key = self.lease.key();
        self.if_owner(|entry, last_fencing_token, _| {
            entry.holder = None;
            grant_next(key, entry, last_fencing_token);
        })
    }

    async fn extend(&self, ttl: Duration) -> Result<()> {
        self.if_owner(|entry, _, now| {
            if let Some(holder) = &mut entry.holder {
                holder.expires_at = now + ttl;
            }
            self.lease
                .set_valid_until(Some(validity_deadline(now, ttl)));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DistributedLock;

    #[tokio::test]
    async fn release_hands_off_to_the_first_waiter() {
        let locks = MemoryLock::new();
        let options = LockOptions::new();
        let first = locks.try_lock("k", &options).await.unwrap().unwrap();
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock("k", &LockOptions::new()).await }
        });
        while locks.waiters("k") == 0 {
            tokio::task::yield_now().await;
        }
        let token = first.fencing_token();
        first.release().await.unwrap();
        let second = waiter.await.unwrap().unwrap();
        assert!(second.fencing_token() > token);
        drop(second);
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_no_record() {
        let locks = MemoryLock::new();
        let options = LockOptions::new().wait(Duration::from_millis(20));
        let held = locks.try_lock("k", &options).await.unwrap().unwrap();
        let err = locks.lock("k", &options).await.unwrap_err();
        assert!(err.is_timeout());
        assert_eq!(locks.waiters("k"), 0);
        held.release().await.unwrap();
        assert_eq!(locks.locked_keys(), 0);
    }
}
