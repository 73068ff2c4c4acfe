//! The lock guard and the renewal machinery every backend shares.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::HeldLock;
use crate::lease::{Lease, LostReason};
use crate::renewal::{RenewalScheduler, Scheduled};
use crate::{Backoff, Error, Result};

/// Delays between renewal retries after connection errors: 20 ms doubling
/// to 640 ms, without jitter (each lock retries on its own schedule).
const RENEW_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(20),
    max: Duration::from_millis(640),
    multiplier: 2.0,
    jitter: 0.0,
};

/// A held lock. Ownership is a lease: it is time-bounded and can be lost;
/// watch [`lost`](LockGuard::lost) while you work, and pass
/// [`fencing_token`](LockGuard::fencing_token) to the resources you write.
///
/// Dropping the guard releases the lock in the background (it never
/// blocks); [`release`](LockGuard::release) does it now and reports
/// whether the lock was still ours.
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    backend: &'static str,
    lease: Lease,
    held: Option<Arc<dyn HeldLock>>,
    /// The lock's place in its client's renewal scheduler, if the core
    /// renews it.
    renewal: Option<Scheduled>,
    runtime: Option<Handle>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("backend", &self.backend)
            .field("lease", &self.lease)
            .field("renewing", &self.renewal.is_some())
            .finish()
    }
}

impl LockGuard {
    /// A guard the core does not renew (see
    /// [`backend::self_renewed_guard`](crate::backend::self_renewed_guard)).
    pub(crate) fn unrenewed(backend: &'static str, lease: Lease, held: Arc<dyn HeldLock>) -> Self {
        LockGuard {
            backend,
            lease,
            held: Some(held),
            renewal: None,
            runtime: Handle::try_current().ok(),
        }
    }

    /// A guard renewed by `scheduler` when `renew` (see
    /// [`backend::scheduled_guard`](crate::backend::scheduled_guard)).
    pub(crate) fn scheduled(
        backend: &'static str,
        lease: Lease,
        held: Arc<dyn HeldLock>,
        scheduler: &RenewalScheduler,
        renew: bool,
    ) -> Self {
        // One look-up of the runtime: it serves the renewal and the
        // release on drop.
        let runtime = Handle::try_current().ok();
        let renewal = match &runtime {
            Some(runtime) if renew => {
                Some(scheduler.schedule(backend, &lease, held.clone(), runtime))
            }
            _ => None,
        };
        LockGuard {
            backend,
            lease,
            held: Some(held),
            renewal,
            runtime,
        }
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        self.lease.key()
    }

    /// The fencing token: strictly greater than every earlier holder's
    /// token for this key (see the backend's capabilities for the
    /// exceptions). Hand it to the resource you protect and have it reject
    /// writes with a smaller token.
    pub fn fencing_token(&self) -> u64 {
        self.lease.fencing_token()
    }

    /// The backend that granted the lock, e.g. `redis`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Until when this process vouches for the lock: the last renewal's
    /// deadline, or `None` while a live session vouches for it (ZooKeeper,
    /// etcd, files). Read-only: only the backend moves it.
    pub fn valid_until(&self) -> Option<Instant> {
        self.lease.valid_until()
    }

    /// Time left before [`valid_until`](Self::valid_until); `None` while a
    /// session vouches, zero once lost.
    pub fn remaining(&self) -> Option<Duration> {
        self.lease.remaining()
    }

    /// True while this process can vouch that the lock is ours.
    pub fn is_held(&self) -> bool {
        self.lease.is_held()
    }

    /// Why the lock is no longer held, if it is not; a passed deadline
    /// counts as [`LostReason::Expired`].
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.lease.lost_reason()
    }

    /// Resolves once ownership is lost or can no longer be vouched for
    /// (renewal refused or failed until the deadline, session or lease
    /// lost, local deadline passed), or the guard is released. Owns what it
    /// needs: keep it in a `select!` beside your work.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.lease.lost()
    }

    /// The secret another client passes to
    /// [`resume`](crate::DistributedLock::resume) to take over this lease
    /// (`None` on backends that cannot, see
    /// [`Capabilities::resumable`](crate::Capabilities::resumable)).
    /// Whoever knows it can extend or release the lock: keep it as secret
    /// as the guard. Never in `Debug` output.
    pub fn resume_token(&self) -> Option<String> {
        self.held.as_ref().and_then(|held| held.resume_token())
    }

    /// Makes the lock live `ttl` from now (and renew with `ttl` from then
    /// on). `Err(NotHeld)` if it is no longer ours; a newer holder's lock
    /// is never touched.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        if ttl < Duration::from_millis(10) {
            return Err(Error::InvalidConfig(format!(
                "ttl must be at least 10ms, got {ttl:?}"
            )));
        }
        if !self.lease.is_held() {
            return Err(Error::not_held(self.key()));
        }
        let Some(held) = &self.held else {
            return Err(Error::not_held(self.key()));
        };
        let span = tracing::debug_span!("distlock.extend", backend = self.backend, key = %self.key(), fencing_token = self.fencing_token(), ?ttl);
        let result = held.extend(ttl).instrument(span).await;
        match &result {
            Ok(()) => self.lease.set_ttl(ttl),
            Err(err) if err.is_not_held() => self.lease.mark_lost(LostReason::NotHeld),
            Err(_) => {}
        }
        result
    }

    /// Releases the lock now. `Err(NotHeld)` if it had expired or been
    /// taken; a newer holder's lock is never deleted. If this future is
    /// dropped midway, the release finishes in the background.
    pub async fn release(mut self) -> Result<()> {
        self.stop_renewal();
        let Some(held) = self.held.take() else {
            return Err(Error::not_held(self.key()));
        };
        let span = tracing::debug_span!("distlock.release", backend = self.backend, key = %self.key(), fencing_token = self.fencing_token());
        let mut pending = ReleaseOnDrop {
            held: Some(held.clone()),
            runtime: self.runtime.clone(),
            lease: self.lease.clone(),
            backend: self.backend,
        };
        let result = held.release().instrument(span).await;
        pending.held = None;
        if matches!(&result, Err(err) if err.is_not_held()) {
            self.lease.mark_lost(LostReason::NotHeld);
        }
        self.lease.mark_lost(LostReason::Released);
        result
    }

    /// Lets go of the guard without releasing the lock: renewal stops and
    /// the lock ends with its TTL, unless whoever
    /// [resumed](crate::DistributedLock::resume) it extends or releases
    /// it. For a holder that handed the lease on, where a release would
    /// end the other's lock.
    pub fn forget(mut self) {
        self.stop_renewal();
        self.held = None;
    }

    fn stop_renewal(&mut self) {
        if let Some(scheduled) = self.renewal.take() {
            scheduled.cancel();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_renewal();
        if let Some(held) = self.held.take() {
            self.lease.mark_lost(LostReason::Released);
            spawn_release(self.runtime.clone(), held, &self.lease, self.backend);
        }
    }
}

/// Finishes a release whose future was dropped.
struct ReleaseOnDrop {
    held: Option<Arc<dyn HeldLock>>,
    runtime: Option<Handle>,
    /// Names the key in the log (a clone, so a release that finishes
    /// allocates nothing for it).
    lease: Lease,
    backend: &'static str,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            spawn_release(self.runtime.clone(), held, &self.lease, self.backend);
        }
    }
}

fn spawn_release(
    runtime: Option<Handle>,
    held: Arc<dyn HeldLock>,
    lease: &Lease,
    backend: &'static str,
) {
    let key = lease.key();
    let runtime = Handle::try_current().ok().or(runtime);
    let Some(runtime) = runtime else {
        tracing::warn!(backend, %key, "distlock: guard dropped outside a runtime; the lock stays until its TTL");
        return;
    };
    let span = tracing::debug_span!("distlock.release", backend, %key, in_background = true);
    runtime.spawn(
        async move {
            match held.release().await {
                Ok(()) => tracing::debug!("released"),
                Err(err) if err.is_not_held() => tracing::debug!("was no longer held"),
                Err(err) => {
                    tracing::warn!(error = %err, "background release failed; the backend retries it where it can, else the lock ends with its TTL or session")
                }
            }
        }
        .instrument(span),
    );
}

/// Renews `lease` through `held` after `first`, then about every
/// `ttl / 3`, until it is lost or the task is aborted. A refusal marks it
/// lost at once; connection errors are retried with a short backoff until
/// the local deadline, which then marks it lost.
pub(crate) async fn renew_until_lost(
    backend: &'static str,
    lease: Lease,
    held: Arc<dyn HeldLock>,
    first: Duration,
) {
    let mut delay = first;
    loop {
        tokio::time::sleep(delay).await;
        delay = lease.ttl() / 3;
        let mut attempt: u32 = 0;
        loop {
            if !lease.is_held() {
                return;
            }
            let ttl = lease.ttl();
            let budget = lease.remaining().unwrap_or(ttl);
            let span = tracing::debug_span!("distlock.renew", backend, key = %lease.key(), fencing_token = lease.fencing_token(), attempt);
            match tokio::time::timeout(budget, held.extend(ttl).instrument(span)).await {
                Ok(Ok(())) => break,
                Ok(Err(err)) if err.is_not_held() => {
                    lease.mark_lost(LostReason::NotHeld);
                    return;
                }
                Ok(Err(err)) => {
                    tracing::warn!(backend, key = %lease.key(), error = %err, "distlock: renewal failed, retrying");
                    let left = lease.remaining().unwrap_or(ttl);
                    if left.is_zero() {
                        lease.mark_lost(LostReason::RenewalFailed(err.to_string()));
                        return;
                    }
                    let delay = RENEW_RETRY.delay(attempt).min(left / 4);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(_) => {
                    lease.mark_lost(LostReason::RenewalFailed(
                        "no answer before the lease's deadline".into(),
                    ));
                    return;
                }
            }
        }
    }
}
