//! The lock guard and the renewal machinery every backend shares.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::lease::{Lease, LostReason};
use crate::renewal::{RenewalScheduler, Scheduled};
use crate::{Error, Result};

/// What a backend does for one lock it granted. The core's [`LockGuard`]
/// calls it; both methods must be owner-checked on the server, so a stale
/// holder never touches a newer holder's lock.
#[async_trait]
pub trait HeldLock: Send + Sync + 'static {
    /// Deletes the lock if it is still this owner's; `Err(NotHeld)`
    /// otherwise.
    async fn release(&self) -> Result<()>;

    /// Makes the lock live `ttl` from now if it is still this owner's,
    /// and records the new validity on the lease; `Err(NotHeld)`
    /// otherwise. Session-based backends check ownership and leave the
    /// validity to the session.
    async fn extend(&self, ttl: Duration) -> Result<()>;
}

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
    renewal: Option<Renewal>,
    runtime: Option<Handle>,
}

/// Who renews a guard's lock.
enum Renewal {
    /// A task of its own.
    Task(AbortHandle),
    /// A client's scheduler, which starts a task when renewal falls due.
    Scheduled(Scheduled),
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
    /// Wraps a granted lock. With `core_renewal`, the core renews it every
    /// `ttl / 3` through [`HeldLock::extend`] and fires `lost` when the
    /// server refuses or cannot be reached before the deadline; without it
    /// the backend keeps the lease up to date itself (session events,
    /// batched renewal) or nothing renews it.
    ///
    /// Must be called within a tokio runtime.
    pub fn new(
        backend: &'static str,
        lease: Lease,
        held: Arc<dyn HeldLock>,
        core_renewal: bool,
    ) -> Self {
        Self::with_renewal(
            backend,
            lease,
            held,
            core_renewal,
            |runtime, lease, held| {
                let first = lease.ttl() / 3;
                let task = runtime.spawn(renew_until_lost(
                    backend,
                    lease.clone(),
                    held.clone(),
                    first,
                ));
                Renewal::Task(task.abort_handle())
            },
        )
    }

    /// Like [`new`](Self::new) with `core_renewal`, but the renewal (when
    /// `renew`) is started by the client's `scheduler` once it falls due,
    /// so a lock released within `ttl / 3` never has a task of its own.
    /// The memory, file, ZooKeeper and etcd backends use it; `new` with
    /// `core_renewal` spawns the task at once.
    ///
    /// Must be called within a tokio runtime.
    pub fn scheduled(
        backend: &'static str,
        lease: Lease,
        held: Arc<dyn HeldLock>,
        scheduler: &RenewalScheduler,
        renew: bool,
    ) -> Self {
        Self::with_renewal(backend, lease, held, renew, |runtime, lease, held| {
            Renewal::Scheduled(scheduler.schedule(backend, lease, held.clone(), runtime))
        })
    }

    /// The guard, with its renewal started by `start` on the current
    /// runtime when `renew` (and there is a runtime).
    fn with_renewal(
        backend: &'static str,
        lease: Lease,
        held: Arc<dyn HeldLock>,
        renew: bool,
        start: impl FnOnce(&Handle, &Lease, &Arc<dyn HeldLock>) -> Renewal,
    ) -> Self {
        let runtime = Handle::try_current().ok();
        let renewal = runtime
            .as_ref()
            .filter(|_| renew)
            .map(|runtime| start(runtime, &lease, &held));
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

    /// The lease behind this guard.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// True while this process can vouch that the lock is ours.
    pub fn is_held(&self) -> bool {
        self.lease.is_held()
    }

    /// Resolves once ownership is lost or can no longer be vouched for
    /// (renewal refused or failed until the deadline, session or lease
    /// lost, local deadline passed), or the guard is released. Owns what it
    /// needs: keep it in a `select!` beside your work.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.lease.lost()
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

    fn stop_renewal(&mut self) {
        match self.renewal.take() {
            Some(Renewal::Task(task)) => task.abort(),
            Some(Renewal::Scheduled(scheduled)) => scheduled.cancel(),
            None => {}
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
                    tracing::warn!(error = %err, "background release failed; the lock stays until its TTL")
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
                    let delay = Duration::from_millis(20 << attempt.min(5)).min(left / 4);
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
