//! The contract of distlock: one async lock API over many coordination
//! services.
//!
//! - [`DistributedLock`] is what users call: [`try_lock`](DistributedLock::try_lock)
//!   and [`lock`](DistributedLock::lock), object safe, so a program can hold
//!   an `Arc<dyn DistributedLock>` chosen by configuration.
//! - [`LockGuard`] is a held lock: a lease with a fencing token, renewal,
//!   a lost-lock signal and release on drop.
//! - [`memory::MemoryLock`] is the in-process backend.
//! - [`backend`] is for implementers only: the [`LockBackend`]
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

use backend::{key, LockBackend};
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

#[async_trait]
impl<B: LockBackend> DistributedLock for B {
    fn backend(&self) -> &'static str {
        LockBackend::backend(self)
    }

    fn capabilities(&self) -> Capabilities {
        LockBackend::capabilities(self)
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.try_lock", backend = LockBackend::backend(self), key = %key);
        LockBackend::try_lock(self, key, options)
            .instrument(span)
            .await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        key::validate_key(key)?;
        options.validate()?;
        let span = tracing::debug_span!("distlock.acquire", backend = LockBackend::backend(self), key = %key, wait = ?options.wait);
        let acquire = LockBackend::lock(self, key, options).instrument(span);
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
