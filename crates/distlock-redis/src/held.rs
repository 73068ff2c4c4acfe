//! A granted lock: its guard, release and extend, and the cleanup of
//! attempts abandoned before a definite answer.
//!
//! - **Release and extend are one round trip each**: owner-checked scripts
//!   (compare, then `DEL` / `PEXPIRE`), sent to every Redlock server at
//!   once. A stale owner gets `NotHeld` and never touches a newer holder's
//!   lock. In fair mode the release hands the lock to the queue's head in
//!   the same script (see [`acquire`](crate::acquire)).
//! - **Renewal** of auto-renewed locks is batched per client
//!   ([`renewal`](crate::renewal)); a lock handed over for the claim window
//!   only is extended to its TTL at once, by the renewal or, without it,
//!   by one extend in the background.
//! - **An abandoned attempt** (its future dropped, or failed before a
//!   definite answer) may have been granted the lock or queued: its
//!   cleanup deletes the one and leaves the other, and wakes the waiters
//!   if either changed anything.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{self_renewed_guard, validity_deadline, HeldLock, Lease, WeakLease};
use distlock_core::{Error, LockGuard, LockOptions, LostReason, Result};
use tokio::time::Instant;
use tracing::Instrument;

use crate::acquire::{Granted, HANDOFF_CLAIM};
use crate::client::{Shared, FENCE_IDLE_TTL};
use crate::keys::LockKeys;
use crate::renewal::Renewals;
use crate::scripts::{EXTEND, RESUME};

/// One granted lock. Its Redis names are made again from the key when
/// needed rather than kept: a client holding many locks keeps a few
/// hundred bytes less per lock, for a few hundred nanoseconds per release.
struct RedisHeld {
    shared: Arc<Shared>,
    key: String,
    /// Shared with the renewal's entry.
    owner: Arc<str>,
    lease: WeakLease,
    renewal_id: Option<u64>,
}

#[async_trait]
impl HeldLock for RedisHeld {
    async fn release(&self) -> Result<()> {
        if let Some(id) = self.renewal_id {
            self.shared.renewals.remove(id);
        }
        // A finished lease no longer says its TTL: bound by the client's
        // timeout then.
        let ttl = self
            .lease
            .upgrade()
            .map_or(self.shared.timeout * 100, |lease| lease.ttl());
        let keys = LockKeys::new(&self.shared.prefix, &self.key);
        self.shared
            .release(&self.key, &keys, &self.owner, ttl)
            .await
    }

    async fn extend(&self, ttl: Duration) -> Result<()> {
        let keys = LockKeys::new(&self.shared.prefix, &self.key);
        self.shared
            .extend(&self.key, &keys, &self.owner, ttl, &self.lease)
            .await
    }

    fn resume_token(&self) -> Option<String> {
        Some(self.owner.to_string())
    }
}

impl Shared {
    /// The guard of a granted lock. `granted_for` is the TTL the server
    /// set; when a handoff set less than `options.ttl` (the claim window),
    /// the lock is extended to `options.ttl` at once, in the background:
    /// the guard is usable meanwhile, vouched for by the shorter validity.
    pub(crate) fn make_guard(
        self: &Arc<Self>,
        key: &str,
        keys: LockKeys,
        owner: String,
        granted: Granted,
        options: &LockOptions,
    ) -> LockGuard {
        let lease = Lease::new(key, granted.token, options.ttl, Some(granted.valid_until));
        let claimed = granted.granted_for < options.ttl;
        if claimed && !options.auto_renew {
            self.extend_once(key, &keys, &owner, &lease);
        }
        let owner: Arc<str> = owner.into();
        let renewal_id = options.auto_renew.then(|| {
            Renewals::register(
                &self.renewals,
                self,
                &lease,
                keys.lock.into(),
                owner.clone(),
                claimed,
            )
        });
        let held = Arc::new(RedisHeld {
            shared: self.clone(),
            key: key.to_owned(),
            owner,
            lease: lease.downgrade(),
            renewal_id,
        });
        self_renewed_guard(self.name, lease, held)
    }

    /// The guard of `key`'s lock held by `owner` (another client's resume
    /// token), if that owner still holds it on a quorum: valid for the
    /// remaining TTL the servers report, counted from when the check was
    /// sent.
    pub(crate) async fn resume(
        self: &Arc<Self>,
        key: &str,
        fencing_token: u64,
        owner: &str,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        if owner.len() < 32 || owner.contains(char::is_whitespace) {
            return Err(Error::not_held(key));
        }
        let keys = LockKeys::new(&self.prefix, key);
        let sent_at = Instant::now();
        let mut command = RESUME.command(1);
        command.arg(&keys.lock).arg(owner);
        let results = self
            .script_on_all::<i64>(self.node_timeout(options.ttl), &RESUME, &command)
            .await;
        let (mut remaining_ms, mut refused, mut first_error) = (Vec::new(), 0, None);
        for result in results {
            match result {
                Ok(ms) if ms > 0 => remaining_ms.push(ms as u64),
                Ok(_) => refused += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if remaining_ms.len() >= self.quorum {
            // The quorum that lives longest vouches until its shortest.
            remaining_ms.sort_unstable_by(|a, b| b.cmp(a));
            let remaining = Duration::from_millis(remaining_ms[self.quorum - 1]);
            let granted = Granted {
                token: fencing_token,
                valid_until: validity_deadline(sent_at, remaining),
                granted_for: options.ttl,
            };
            Ok(self.make_guard(key, keys, owner.to_owned(), granted, options))
        } else if refused > self.nodes.len() - self.quorum {
            Err(Error::not_held(key))
        } else {
            let succeeded = remaining_ms.len();
            Err(self.quorum_or_node_error("resume", key, succeeded, refused, first_error))
        }
    }

    /// Extends a handed-over lock to its lease's TTL once, in the
    /// background (a guard without auto-renewal still gets the TTL it
    /// asked for). A refusal marks the lease lost; an error leaves it to
    /// expire at the claim window's end.
    fn extend_once(self: &Arc<Self>, key: &str, keys: &LockKeys, owner: &str, lease: &Lease) {
        let (shared, key, keys, owner) =
            (self.clone(), key.to_owned(), keys.clone(), owner.to_owned());
        let (lease, ttl) = (lease.downgrade(), lease.ttl());
        let span =
            tracing::debug_span!("distlock.renew", backend = self.name, key = %key, claim = true);
        tokio::spawn(
            async move {
                match shared.extend(&key, &keys, &owner, ttl, &lease).await {
                    Ok(()) => {}
                    Err(err) if err.is_not_held() => {
                        if let Some(lease) = lease.upgrade() {
                            lease.mark_lost(LostReason::NotHeld);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "distlock: could not extend a handed-over lock; it ends with its claim window");
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Owner-checked delete; `ttl` (the lease's) bounds each Redlock
    /// instance's answer.
    pub(crate) async fn release(
        &self,
        key: &str,
        keys: &LockKeys,
        owner: &str,
        ttl: Duration,
    ) -> Result<()> {
        let (script, command) = if self.fair {
            // Fair mode is one server only: hand the lock to the queue's
            // head in the same script.
            let script = self.scripts.release_fair;
            let mut command = keys.script_command(script);
            command
                .arg(owner)
                .arg(&keys.channel)
                .arg(FENCE_IDLE_TTL.as_millis() as u64)
                .arg(HANDOFF_CLAIM.as_millis() as u64);
            (script, command)
        } else {
            let script = self.scripts.release;
            let mut command = script.command(1);
            command
                .arg(&keys.lock)
                .arg(owner)
                .arg(&keys.channel)
                .arg("");
            (script, command)
        };
        let results = self
            .script_on_all::<i64>(self.node_timeout(ttl), script, &command)
            .await;
        let (mut deleted, mut refused, mut first_error) = (0, 0, None);
        for result in results {
            match result {
                Ok(1) => deleted += 1,
                Ok(_) => refused += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if deleted >= self.quorum {
            Ok(())
        } else if refused > self.nodes.len() - self.quorum {
            Err(Error::not_held(key))
        } else {
            Err(self.quorum_or_node_error("release", key, deleted, refused, first_error))
        }
    }

    /// Owner-checked `PEXPIRE`; on success the lease is valid `ttl` from
    /// when the request was sent.
    async fn extend(
        &self,
        key: &str,
        keys: &LockKeys,
        owner: &str,
        ttl: Duration,
        lease: &WeakLease,
    ) -> Result<()> {
        let ttl_ms = ttl.as_millis() as u64;
        let sent_at = Instant::now();
        let mut command = EXTEND.command(1);
        command.arg(&keys.lock).arg(owner).arg(ttl_ms);
        let results = self
            .script_on_all::<i64>(self.node_timeout(ttl), &EXTEND, &command)
            .await;
        let (mut extended, mut refused, mut first_error) = (0, 0, None);
        for result in results {
            match result {
                Ok(1) => extended += 1,
                Ok(_) => refused += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let deadline = validity_deadline(sent_at, ttl);
        if extended >= self.quorum && Instant::now() < deadline {
            if let Some(lease) = lease.upgrade() {
                lease.set_valid_until(Some(deadline));
            }
            Ok(())
        } else if refused > self.nodes.len() - self.quorum {
            Err(Error::not_held(key))
        } else {
            Err(self.quorum_or_node_error("extend", key, extended, refused, first_error))
        }
    }

    /// The cleanup of an attempt whose outcome is unknown or unwanted (its
    /// future was dropped, or it failed before a definite answer): the
    /// script may have granted the lock or queued the waiter. Deletes the
    /// lock if it is this owner's, leaves the queue, and wakes the other
    /// waiters if either changed anything. Owns what it needs, so it can
    /// run after the attempt is gone (the attempt arms it in a
    /// [`CleanupOnDrop`](distlock_core::backend::CleanupOnDrop)).
    pub(crate) fn abandon(
        self: &Arc<Self>,
        keys: &LockKeys,
        owner: &str,
        waiter: &str,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (shared, keys, owner, waiter) = (
            self.clone(),
            keys.clone(),
            owner.to_owned(),
            waiter.to_owned(),
        );
        async move {
            let script = shared.scripts.abandon;
            let mut command = script.command(3);
            command
                .arg(&keys.lock)
                .arg(&keys.queue)
                .arg(&keys.waiters)
                .arg(&owner)
                .arg(&waiter)
                .arg(&keys.channel);
            let results = shared
                .script_on_all::<i64>(shared.timeout, script, &command)
                .await;
            for result in results {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "distlock: cleanup of an abandoned attempt failed; its TTL will end it");
                }
            }
        }
    }
}
