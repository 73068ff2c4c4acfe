//! The contract of distlock: one async lock API over many coordination
//! services.
//!
//! - [`DistributedLock`] is what users call: [`try_lock`](DistributedLock::try_lock)
//!   and [`lock`](DistributedLock::lock), object safe, so a program can hold
//!   an `Arc<dyn DistributedLock>` chosen by configuration.
//! - [`LockGuard`] is a held lock: a lease with a fencing token, renewal,
//!   a lost-lock signal and release on drop.
//! - [`LockBackend`] is what a backend implements: one attempt, a waiting
//!   acquisition, and a [`HeldLock`] per granted lock. The core adds key and
//!   option checks, the `wait` bound, tracing spans, renewal and the
//!   lost-lock machinery, so every backend behaves the same.
//! - [`memory::MemoryLock`] is the in-process backend.
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

pub mod error;
pub mod guard;
pub mod key;
pub mod lease;
pub mod memory;
pub mod options;
pub mod renewal;
pub mod url;

use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

pub use error::{BoxError, Error, Result};
pub use guard::{HeldLock, LockGuard};
pub use lease::{Lease, LostReason, WeakLease};
pub use options::{Backoff, LockOptions};
pub use renewal::RenewalScheduler;

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
    /// leaves no lock and no waiter record behind.
    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard>;
}

/// The part of a lock service a backend implements; every `LockBackend` is
/// a [`DistributedLock`]. Keys and options arrive already validated.
#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    /// The backend's name, e.g. `redis`.
    fn name(&self) -> &'static str;

    /// What the backend promises.
    fn capabilities(&self) -> Capabilities;

    /// One attempt: `Ok(None)` when held elsewhere. Must leave nothing
    /// behind when it fails or is dropped.
    async fn try_acquire(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>>;

    /// Waits until acquired. The core bounds it by `options.wait` by
    /// dropping it, so it must be cancellation safe: a dropped future
    /// leaves no lock and no waiter record behind.
    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard>;
}

#[async_trait]
impl<B: LockBackend> DistributedLock for B {
    fn backend(&self) -> &'static str {
        self.name()
    }

    fn capabilities(&self) -> Capabilities {
        LockBackend::capabilities(self)
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.try_lock", backend = self.name(), key = %key);
        self.try_acquire(key, options).instrument(span).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.acquire", backend = self.name(), key = %key, wait = ?options.wait);
        let acquire = self.acquire(key, options).instrument(span);
        match options.wait {
            None => acquire.await,
            Some(wait) => match tokio::time::timeout(wait, acquire).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    key: key.to_owned(),
                    waited: wait,
                }),
            },
        }
    }
}

/// Retries `attempt` with `options.backoff` until it grants the lock: the
/// waiting strategy of backends that have no notification to wait on.
pub async fn poll_until_acquired<F, Fut>(options: &LockOptions, mut attempt: F) -> Result<LockGuard>
where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = Result<Option<LockGuard>>> + Send,
{
    let mut delays = options.backoff.delays();
    loop {
        if let Some(guard) = attempt().await? {
            return Ok(guard);
        }
        let delay = delays.next().unwrap_or(Duration::from_millis(100));
        tokio::time::sleep(delay).await;
    }
}
