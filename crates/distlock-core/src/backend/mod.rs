//! What a backend implements, and the parts of the core it builds on.
//!
//! Users never need this module: they call [`DistributedLock`](crate::DistributedLock)
//! and hold [`LockGuard`]s. A backend crate implements [`LockBackend`] (one
//! attempt, a waiting acquisition) and a [`HeldLock`] per granted lock, and
//! gets the user-facing [`DistributedLock`](crate::DistributedLock) for
//! free: key and option checks, the `wait` bound and tracing spans.
//!
//! For every granted lock the backend makes a [`Lease`] (key, fencing
//! token, validity, lost signal), keeps a [`WeakLease`] where it learns of
//! renewals and losses (a session's events, a batched renewal), and wraps
//! the lease in a guard with [`scheduled_guard`] (the core renews it
//! through [`HeldLock::extend`]) or [`self_renewed_guard`] (the backend
//! renews it itself). An attempt that can be dropped midway arms a
//! [`CleanupOnDrop`] for what it wrote on the server. A session-based
//! backend keeps the leases of the locks granted through a session in a
//! [`SessionLeases`], which moves their validity with the session's and
//! marks them all lost when it ends.
//!
//! `docs/architecture.md` walks through a `lock()` call with the memory
//! backend as the reference.

pub mod key;
mod retry;
mod session_leases;
pub mod url;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Handle;
use tracing::Instrument;

pub use crate::lease::{clock_drift, validity_deadline, Lease, WeakLease};
pub use crate::renewal::RenewalScheduler;
use crate::{Capabilities, LockGuard, LockOptions, Result};
pub use retry::{removal_backoff, retry_in_background, Retry};
pub use session_leases::SessionLeases;

/// The part of a lock service a backend implements; every `LockBackend` is
/// a [`DistributedLock`](crate::DistributedLock), with the same method
/// names. Keys and options arrive already validated, inside the core's
/// tracing span.
///
/// Implement it by path (`impl backend::LockBackend for MyLock`) rather
/// than importing the trait, so that `my_lock.lock(..)` in the crate and
/// its tests resolves to the checked [`DistributedLock`](crate::DistributedLock)
/// method without ambiguity.
#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    /// The backend's name, e.g. `redis`.
    fn backend(&self) -> &'static str;

    /// What the backend promises.
    fn capabilities(&self) -> Capabilities;

    /// One attempt: `Ok(None)` when held elsewhere. Must leave nothing
    /// behind when it fails or is dropped.
    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>>;

    /// Waits until acquired. The core bounds it by `options.wait` by
    /// dropping it, so it must be cancellation safe: a dropped future
    /// leaves no lock and no waiter record behind.
    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard>;

    /// Rebuilds the guard of a lock granted to another client, from the
    /// [`HeldLock::resume_token`] it gave, after checking on the server
    /// that the lease is still that holder's (`Err(NotHeld)` otherwise).
    /// Backends whose locks live in their holder's session keep the
    /// default: `Err(Unsupported)`.
    async fn resume(
        &self,
        key: &str,
        fencing_token: u64,
        resume_token: &str,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        let _ = (key, fencing_token, resume_token, options);
        Err(crate::Error::Unsupported {
            backend: self.backend(),
            operation: "resume a lock granted to another client",
            reason: "the lock lives in its holder's session (or process)",
        })
    }
}

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

    /// What another client needs to [`resume`](LockBackend::resume) this
    /// lock: a secret that proves ownership on the server (at least 128
    /// random bits), or `None` where the lock cannot move.
    fn resume_token(&self) -> Option<String> {
        None
    }
}

/// A guard whose renewal (when `renew`) the client's `scheduler` starts
/// once it falls due, through [`HeldLock::extend`], so a lock released
/// within `ttl / 3` never has a task of its own. Renewal fires `lost` when
/// the server refuses, or cannot be reached before the lease's deadline.
///
/// Must be called within a tokio runtime for renewal and release on drop.
pub fn scheduled_guard(
    backend: &'static str,
    lease: Lease,
    held: Arc<dyn HeldLock>,
    scheduler: &RenewalScheduler,
    renew: bool,
) -> LockGuard {
    LockGuard::scheduled(backend, lease, held, scheduler, renew)
}

/// A guard the core does not renew: the backend keeps the lease up to date
/// itself (Redis's batched renewal), or nothing renews it.
pub fn self_renewed_guard(
    backend: &'static str,
    lease: Lease,
    held: Arc<dyn HeldLock>,
) -> LockGuard {
    LockGuard::unrenewed(backend, lease, held)
}

/// Runs a cleanup in the background if an attempt is dropped (or fails)
/// before it [`disarm`](Self::disarm)s it: the one way every backend
/// removes what an abandoned attempt wrote (a queued key, a sequential
/// node, a queue entry).
///
/// The cleanup is built only when it runs, so an attempt that finishes
/// costs no allocation for it. It is spawned on the runtime current at
/// drop time, else on the runtime that armed it; with neither (the
/// runtime is gone) it cannot run, and a warning names `what` is left
/// behind, to expire with its TTL or session. A cleanup started with
/// [`run_now`](Self::run_now) whose caller is dropped midway finishes in
/// the background the same way.
#[must_use = "dropping it at once runs the cleanup"]
pub struct CleanupOnDrop<F, Fut>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    cleanup: Option<F>,
    /// The cleanup `run_now` started, until it finishes.
    running: Option<Pin<Box<Fut>>>,
    runtime: Option<Handle>,
    what: &'static str,
}

impl<F, Fut> CleanupOnDrop<F, Fut>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    /// Arms `cleanup`, which removes `what` (named in the warning when it
    /// cannot run).
    pub fn arm(what: &'static str, cleanup: F) -> Self {
        CleanupOnDrop {
            cleanup: Some(cleanup),
            running: None,
            runtime: Handle::try_current().ok(),
            what,
        }
    }

    /// The attempt finished cleanly: nothing to clean up.
    pub fn disarm(mut self) {
        self.cleanup = None;
    }

    /// Runs the cleanup now, in this task. If this future is dropped
    /// before the cleanup finishes, the rest of it runs in the background.
    pub async fn run_now(mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        let running = self.running.insert(Box::pin(cleanup()));
        running.as_mut().await;
        self.running = None;
    }
}

impl<F, Fut> Drop for CleanupOnDrop<F, Fut>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn drop(&mut self) {
        let cleanup = match (self.running.take(), self.cleanup.take()) {
            (Some(running), _) => running,
            (None, Some(cleanup)) => Box::pin(cleanup()),
            (None, None) => return,
        };
        let Some(runtime) = Handle::try_current().ok().or_else(|| self.runtime.take()) else {
            tracing::warn!(what = self.what, "distlock: no runtime to clean up an abandoned attempt; it stays until its TTL or session ends");
            return;
        };
        let span = tracing::debug_span!("distlock.cleanup", what = self.what);
        runtime.spawn(cleanup.instrument(span));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn cleanup_runs_when_dropped_armed_and_not_when_disarmed() {
        let runs = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let counter = runs.clone();
        drop(CleanupOnDrop::arm("a test entry", move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = done_tx.send(());
        }));
        done_rx.await.expect("the cleanup ran");
        let counter = runs.clone();
        CleanupOnDrop::arm("a test entry", move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .disarm();
        tokio::task::yield_now().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_cleanup_run_now_whose_caller_is_dropped_finishes_in_the_background() {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let cleanup = CleanupOnDrop::arm("a test entry", move || async move {
            started_tx.send(()).unwrap();
            go_rx.await.unwrap();
            done_tx.send(()).unwrap();
        });
        let caller = tokio::spawn(cleanup.run_now());
        started_rx.await.expect("the cleanup started");
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        go_tx.send(()).unwrap();
        done_rx
            .await
            .expect("the cleanup finished after its caller was dropped");
    }

    #[test]
    fn cleanup_armed_in_a_runtime_runs_there_when_dropped_outside() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let cleanup = runtime.block_on(async {
            CleanupOnDrop::arm("a test entry", move || async move {
                done_tx.send(()).unwrap();
            })
        });
        drop(cleanup);
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the cleanup ran on the runtime that armed it");
    }
}
