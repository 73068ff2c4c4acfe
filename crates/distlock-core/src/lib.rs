//! The contract of distlock: one async lock API over many coordination
//! services.
//!
//! - [`DistributedLock`] is what users call: [`try_lock`](DistributedLock::try_lock)
//!   and [`lock`](DistributedLock::lock), object safe, so a program can hold
//!   an `Arc<dyn DistributedLock>` chosen by configuration.
//! - [`LockGuard`] is a held lock: a lease with a fencing token, renewal,
//!   a lost-lock signal and release on drop.
//! - [`memory::MemoryLock`] is the in-process backend.
//! - [`backend`] is for implementers only: the [`LockBackend`](backend::LockBackend)
//!   trait a backend implements, and the lease, renewal, key and URL parts it
//!   builds on. The core adds key and option checks, the `wait` bound,
//!   tracing spans, renewal and the lost-lock machinery, so every backend
//!   behaves the same.
//!
//! ```
//! use std::time::Duration;
//! use distlock_core::{DistributedLock, LockOptions, memory::MemoryLock};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> distlock_core::Result<()> {
//! let locks = MemoryLock::new();
//! let options = LockOptions::new().ttl(Duration::from_secs(10)).wait(Duration::from_secs(1));
//! let guard = locks.lock("reports/nightly", &options).await?;
//! assert!(locks.try_lock("reports/nightly", &options).await?.is_none());
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod backend;
pub mod error;
mod guard;
mod lease;
pub mod memory;
mod options;
mod renewal;

use async_trait::async_trait;
use tracing::Instrument;

use backend::key;
pub use error::{BoxError, Error, Result};
pub use guard::LockGuard;
pub use lease::LostReason;
pub use options::{Backoff, LockOptions, DEFAULT_TTL};

/// What a backend can promise. Tests and callers use these flags instead
/// of guessing from the backend's name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Waiters are granted the lock in arrival order.
    pub fair: bool,
    /// Ownership lives as long as the client's session (ZooKeeper, etcd
    /// lease, OS file lock) rather than a per-lock TTL.
    pub session_based: bool,
    /// A lock whose renewal stops expires on the server after its TTL.
    pub ttl_expiry: bool,
    /// Fencing tokens are strictly increasing per key across all holders,
    /// including across expiry and server restarts the backend survives.
    pub strict_fencing: bool,
    /// Locks are shared by separate processes (false for `memory`).
    pub cross_process: bool,
    /// A lock can be resumed by another client from its guard's
    /// [`resume_token`](LockGuard::resume_token) (see
    /// [`DistributedLock::resume`]).
    pub resumable: bool,
}

/// A distributed lock service: the API every distlock backend offers.
///
/// Object safe: hold an `Arc<dyn DistributedLock>` and choose the backend
/// by URL (see the `distlock` crate's `connect`).
#[async_trait]
pub trait DistributedLock: Send + Sync {
    /// The backend's name, e.g. `redis`.
    fn backend(&self) -> &'static str;

    /// What the backend promises.
    fn capabilities(&self) -> Capabilities;

    /// One attempt that never waits: `Ok(None)` if another owner holds
    /// the lock.
    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>>;

    /// Waits until the lock is acquired, until `options.wait` elapses
    /// ([`Error::Timeout`]), or until the future is dropped; dropping it
    /// leaves no lock and no waiter record behind. While the service is
    /// unreachable, attempts are retried with `options.backoff`; the
    /// timeout then names the failures.
    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard>;

    /// Takes over a lock another client (or an earlier process) holds,
    /// from that holder's [`LockGuard::resume_token`] and fencing token:
    /// the new guard controls the same lease on the server, so either
    /// client's extend or release acts on it. Checks on the server that
    /// the lease is still that holder's: `Err(NotHeld)` if it ended.
    /// `Err(Unsupported)` where the lock lives in its holder's session
    /// (see [`Capabilities::resumable`]). `options.ttl` is the TTL later
    /// extends use; the lease keeps its current expiry until then.
    async fn resume(
        &self,
        key: &str,
        fencing_token: u64,
        resume_token: &str,
        options: &LockOptions,
    ) -> Result<LockGuard>;
}

#[async_trait]
impl<B: backend::LockBackend> DistributedLock for B {
    fn backend(&self) -> &'static str {
        backend::LockBackend::backend(self)
    }

    fn capabilities(&self) -> Capabilities {
        backend::LockBackend::capabilities(self)
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.try_lock", backend = backend::LockBackend::backend(self), key = %key);
        backend::LockBackend::try_lock(self, key, options)
            .instrument(span)
            .await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.acquire", backend = backend::LockBackend::backend(self), key = %key, wait = ?options.wait);
        let mut outage = Outage::default();
        let outage_seen = &mut outage;
        let acquire = async move {
            match backend::LockBackend::lock(self, key, options).await {
                // Boxed: the retry loop (with its timer) stays out of the
                // common path's future, which is allocated on every call.
                Err(err) if err.is_unreachable() => {
                    Box::pin(lock_through_outages(self, key, options, outage_seen, err)).await
                }
                result => result,
            }
        }
        .instrument(span);
        match options.wait {
            None => acquire.await,
            Some(wait) => match tokio::time::timeout(wait, acquire).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    key: key.to_owned(),
                    waited: wait,
                    unreachable: outage.failures,
                    last_error: outage.last_error,
                }),
            },
        }
    }

    async fn resume(
        &self,
        key: &str,
        fencing_token: u64,
        resume_token: &str,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.resume", backend = backend::LockBackend::backend(self), key = %key, fencing_token);
        backend::LockBackend::resume(self, key, fencing_token, resume_token, options)
            .instrument(span)
            .await
    }
}

/// The attempts of one `lock` call that found the service unreachable.
/// The error is boxed: this lives in every `lock` future, which stays
/// smaller (and cheaper to allocate) for it.
#[derive(Default)]
struct Outage {
    failures: u32,
    last_error: Option<Box<Error>>,
}

/// The backend's `lock` after its attempt failed with `first_error` (the
/// service could not be reached), retried with the options' backoff while
/// the service stays unreachable (a restart, a failover), so that an outage
/// shorter than the wait costs the caller nothing. The wait bound, applied
/// around this, reports the outage if it outlasts the wait.
async fn lock_through_outages<B: backend::LockBackend + ?Sized>(
    backend: &B,
    key: &str,
    options: &LockOptions,
    outage: &mut Outage,
    first_error: Error,
) -> Result<LockGuard> {
    let mut err = first_error;
    loop {
        let delay = options.backoff.delay(outage.failures);
        // Warned at the 1st, 2nd, 4th, 8th... failure: visible without
        // flooding the log during a long outage.
        if (outage.failures + 1).is_power_of_two() {
            tracing::warn!(error = %err, failures = outage.failures + 1, "distlock: the lock service is unreachable; retrying within the wait");
        } else {
            tracing::debug!(error = %err, failures = outage.failures + 1, ?delay, "still unreachable");
        }
        outage.failures += 1;
        outage.last_error = Some(Box::new(err));
        tokio::time::sleep(delay).await;
        match backend::LockBackend::lock(backend, key, options).await {
            Err(next) if next.is_unreachable() => err = next,
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::memory::MemoryLock;

    /// The memory backend behind a service that fails its first attempts
    /// with `failure`.
    struct Flaky {
        inner: MemoryLock,
        failures_left: AtomicU32,
        attempts: AtomicU32,
        failure: fn() -> Error,
    }

    impl Flaky {
        fn new(failures: u32, failure: fn() -> Error) -> Self {
            Flaky {
                inner: MemoryLock::new(),
                failures_left: AtomicU32::new(failures),
                attempts: AtomicU32::new(0),
                failure,
            }
        }
    }

    fn refused_connection() -> Error {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        Error::unavailable("flaky", "127.0.0.1:1", "acquire", "k", refused)
    }

    fn refused_by_the_server() -> Error {
        Error::backend("flaky", "127.0.0.1:1", "acquire", "k", "NOPERM")
    }

    #[async_trait]
    impl backend::LockBackend for Flaky {
        fn backend(&self) -> &'static str {
            "flaky"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
            backend::LockBackend::try_lock(&self.inner, key, options).await
        }
        async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let left = self.failures_left.load(Ordering::SeqCst);
            if left > 0 {
                self.failures_left.store(left - 1, Ordering::SeqCst);
                return Err((self.failure)());
            }
            backend::LockBackend::lock(&self.inner, key, options).await
        }
    }

    fn options(wait: Duration) -> LockOptions {
        LockOptions::new().wait(wait).backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_shorter_than_the_wait_is_retried_through() {
        let flaky = Flaky::new(5, refused_connection);
        let guard = flaky
            .lock("k", &options(Duration::from_secs(10)))
            .await
            .expect("granted after the outage");
        assert_eq!(flaky.attempts.load(Ordering::SeqCst), 6);
        guard.release().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_longer_than_the_wait_is_a_timeout_that_names_it() {
        let flaky = Flaky::new(u32::MAX, refused_connection);
        let err = flaky
            .lock("k", &options(Duration::from_secs(1)))
            .await
            .unwrap_err();
        let Error::Timeout {
            unreachable: failures,
            last_error,
            ..
        } = &err
        else {
            panic!("expected a timeout, got {err}");
        };
        assert!(*failures >= 5, "{err}");
        assert!(
            matches!(last_error.as_deref(), Some(Error::Unavailable { .. })),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("found the service unreachable") && message.contains("127.0.0.1:1"),
            "{message}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_answer_is_not_retried() {
        let flaky = Flaky::new(1, refused_by_the_server);
        let err = flaky
            .lock("k", &options(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert_eq!(flaky.attempts.load(Ordering::SeqCst), 1);
    }
}
