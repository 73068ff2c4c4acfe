//! The lease state shared by a guard, its renewal and its backend: who
//! vouches for the lock until when, and the lost-lock signal.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a lease stopped being held.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The local deadline passed without a successful renewal: the server
    /// may already have given the lock to someone else.
    Expired,
    /// The server says the lock is gone or belongs to another owner.
    NotHeld,
    /// Renewal kept failing (connection errors) until the deadline.
    RenewalFailed(String),
    /// The session or lease that carried the lock expired or was revoked.
    SessionLost(String),
    /// The lock was taken away administratively (tests, operators).
    Revoked,
    /// The guard was released or dropped by its owner.
    Released,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::Expired => write!(f, "the lease expired before it could be renewed"),
            LostReason::NotHeld => write!(f, "the server no longer has this owner's lock"),
            LostReason::RenewalFailed(why) => write!(f, "renewal failed: {why}"),
            LostReason::SessionLost(why) => write!(f, "the session was lost: {why}"),
            LostReason::Revoked => write!(f, "the lock was revoked"),
            LostReason::Released => write!(f, "the lock was released"),
        }
    }
}

/// Safety margin for clock drift between client and server, as in the
/// Redlock paper: 1% of the TTL plus 2 ms.
pub fn clock_drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// The latest instant at which a lock set with `ttl` by a request sent at
/// `sent_at` is still certainly ours: the server started its TTL no
/// earlier than `sent_at`.
pub fn validity_deadline(sent_at: Instant, ttl: Duration) -> Instant {
    sent_at + ttl.saturating_sub(clock_drift(ttl))
}

#[derive(Clone, Debug)]
struct LeaseState {
    /// Until when we vouch for the lock; `None` means a live session
    /// vouches for it (ZooKeeper, etcd) and only an event ends it.
    valid_until: Option<Instant>,
    lost: Option<LostReason>,
}

struct LeaseInner {
    key: String,
    fencing_token: u64,
    ttl_ms: AtomicU64,
    state: Mutex<LeaseState>,
    /// Wakes the `lost()` futures after every change of `state`. One
    /// `Notify` rather than a `watch` channel: a watch notifies eight
    /// shards on every send, which was a sixth of an in-process cycle,
    /// and most leases are never watched.
    changed: Notify,
}

impl LeaseInner {
    fn state(&self) -> MutexGuard<'_, LeaseState> {
        // Every critical section is a plain field update: a panic cannot
        // leave it half made.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change`; wakes the watchers if it says it changed
    /// something.
    fn update(&self, change: impl FnOnce(&mut LeaseState) -> bool) -> bool {
        let changed = change(&mut self.state());
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }
}

/// One holding of one lock: key, fencing token, validity and the lost
/// signal. Cheap to clone; backends keep clones (or [`WeakLease`]s) to
/// report renewals and losses.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<LeaseInner>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state().clone();
        f.debug_struct("Lease")
            .field("key", &self.inner.key)
            .field("fencing_token", &self.inner.fencing_token)
            .field("valid_until", &state.valid_until)
            .field("lost", &state.lost)
            .finish()
    }
}

impl Lease {
    /// A lease on `key` with `fencing_token`, vouched for until
    /// `valid_until` (`None`: by a session, until an event says otherwise),
    /// renewed with `ttl`.
    pub fn new(
        key: impl Into<String>,
        fencing_token: u64,
        ttl: Duration,
        valid_until: Option<Instant>,
    ) -> Self {
        Lease {
            inner: Arc::new(LeaseInner {
                key: key.into(),
                fencing_token,
                ttl_ms: AtomicU64::new(ttl.as_millis().min(u64::MAX as u128) as u64),
                state: Mutex::new(LeaseState {
                    valid_until,
                    lost: None,
                }),
                changed: Notify::new(),
            }),
        }
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The fencing token of this holding.
    pub fn fencing_token(&self) -> u64 {
        self.inner.fencing_token
    }

    /// The TTL renewals use.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.inner.ttl_ms.load(Ordering::Relaxed))
    }

    /// Changes the TTL later renewals use.
    pub fn set_ttl(&self, ttl: Duration) {
        self.inner.ttl_ms.store(
            ttl.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Until when the lock is vouched for (`None`: by a live session).
    pub fn valid_until(&self) -> Option<Instant> {
        self.inner.state().valid_until
    }

    /// Records a successful renewal (or a session's suspension, with a
    /// deadline, or its recovery, with `None`). Ignored once lost: a lost
    /// lease never comes back, and a lease whose deadline has already
    /// passed is lost even if nobody looked at it in time.
    pub fn set_valid_until(&self, valid_until: Option<Instant>) {
        let now = Instant::now();
        let mut expired = false;
        self.inner.update(|state| {
            if state.lost.is_some() || state.valid_until == valid_until {
                return false;
            }
            if state.valid_until.is_some_and(|deadline| deadline <= now) {
                expired = true;
                return false;
            }
            state.valid_until = valid_until;
            true
        });
        if expired {
            self.mark_lost(LostReason::Expired);
        }
    }

    /// Marks the lease lost. The first reason wins; later calls do nothing.
    pub fn mark_lost(&self, reason: LostReason) {
        let marked = self.inner.update(|state| {
            if state.lost.is_some() {
                return false;
            }
            state.lost = Some(reason.clone());
            true
        });
        if marked && reason != LostReason::Released {
            tracing::warn!(key = %self.inner.key, fencing_token = self.inner.fencing_token, %reason, "distlock: lock lost");
        }
    }

    /// Why the lease ended, if it has; a passed deadline counts as
    /// [`LostReason::Expired`].
    pub fn lost_reason(&self) -> Option<LostReason> {
        let state = self.inner.state();
        if let Some(reason) = &state.lost {
            return Some(reason.clone());
        }
        match state.valid_until {
            Some(deadline) if Instant::now() >= deadline => Some(LostReason::Expired),
            _ => None,
        }
    }

    /// True while the lock is ours as far as this process can vouch.
    pub fn is_held(&self) -> bool {
        self.lost_reason().is_none()
    }

    /// Time left before the deadline; `None` when a session vouches.
    /// Zero once lost.
    pub fn remaining(&self) -> Option<Duration> {
        if !self.is_held() {
            return Some(Duration::ZERO);
        }
        self.valid_until()
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Resolves once the lease is lost, expired or released. Owns what it
    /// needs, so it can be spawned or kept after the guard is gone.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let lease = self.clone();
        async move {
            loop {
                // Registered before the state is read, so a change made
                // after the read still wakes it.
                let changed = lease.inner.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let deadline = {
                    let state = lease.inner.state();
                    if let Some(reason) = &state.lost {
                        return reason.clone();
                    }
                    state.valid_until
                };
                match deadline {
                    Some(deadline) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(deadline) => {
                                if lease.valid_until() == Some(deadline) {
                                    lease.mark_lost(LostReason::Expired);
                                }
                            }
                            _ = changed => {}
                        }
                    }
                    None => changed.await,
                }
            }
        }
    }

    /// A reference that does not keep the lease alive.
    pub fn downgrade(&self) -> WeakLease {
        WeakLease {
            inner: Arc::downgrade(&self.inner),
        }
    }
}

/// A weak reference to a [`Lease`], for backend registries that must not
/// keep finished leases alive.
#[derive(Clone, Debug)]
pub struct WeakLease {
    inner: Weak<LeaseInner>,
}

impl WeakLease {
    /// The lease, if anyone still holds it.
    pub fn upgrade(&self) -> Option<Lease> {
        self.inner.upgrade().map(|inner| Lease { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lost_fires_at_the_deadline_unless_renewed() {
        let ttl = Duration::from_secs(3);
        let lease = Lease::new("k", 1, ttl, Some(Instant::now() + ttl));
        let lost = tokio::spawn(lease.lost());
        tokio::time::sleep(Duration::from_secs(2)).await;
        lease.set_valid_until(Some(Instant::now() + ttl));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(lease.is_held(), "renewal moved the deadline");
        assert!(!lost.is_finished());
        assert_eq!(lost.await.unwrap(), LostReason::Expired);
        assert!(!lease.is_held());
        // A late renewal does not resurrect it.
        lease.set_valid_until(Some(Instant::now() + ttl));
        assert!(!lease.is_held());
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_is_final_even_unobserved() {
        let lease = Lease::new(
            "k",
            1,
            Duration::from_secs(1),
            Some(Instant::now() + Duration::from_secs(1)),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Nobody awaited lost(); a session coming back must not revive it.
        lease.set_valid_until(None);
        assert_eq!(lease.lost_reason(), Some(LostReason::Expired));
    }

    #[tokio::test]
    async fn first_reason_wins_and_session_leases_wait_for_events() {
        let lease = Lease::new("k", 7, Duration::from_secs(1), None);
        assert_eq!(lease.remaining(), None);
        let lost = tokio::spawn(lease.lost());
        tokio::task::yield_now().await;
        assert!(!lost.is_finished());
        lease.mark_lost(LostReason::SessionLost("expired".into()));
        lease.mark_lost(LostReason::Released);
        assert_eq!(
            lost.await.unwrap(),
            LostReason::SessionLost("expired".into())
        );
        assert_eq!(lease.remaining(), Some(Duration::ZERO));
    }

    #[test]
    fn validity_keeps_a_drift_margin() {
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        assert_eq!(
            validity_deadline(now, ttl),
            now + Duration::from_millis(9898)
        );
        assert_eq!(
            clock_drift(Duration::from_millis(100)),
            Duration::from_millis(3)
        );
    }
}
