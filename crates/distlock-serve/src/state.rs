//! What one service instance keeps: the backend, the leases it holds for
//! its clients (by handle), and who waits on which key.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distlock::{LockGuard, Locker};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use axum::http::StatusCode;

use crate::{ApiError, Limits};

/// The shared state of the handlers.
pub struct AppState {
    /// The backend behind the service.
    pub locker: Locker,
    /// The request limits.
    pub limits: Limits,
    /// SHA-256 of the bearer token, when one is required. Hashed so the
    /// constant-time comparison does not depend on the token's length.
    token_digest: Option<[u8; 32]>,
    /// This instance's id, in every handle it gives, so that another
    /// instance can tell a client it came to the wrong one.
    instance: String,
    table: Mutex<Table>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("backend", &self.locker.url())
            .field("limits", &self.limits)
            .field("token", &self.token_digest.map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Default)]
struct Table {
    by_handle: HashMap<String, Arc<HeldLease>>,
    /// The handle of the lease this instance holds on each key.
    by_key: HashMap<String, String>,
    /// How many acquire requests wait on each key here.
    waiters: HashMap<String, usize>,
}

/// A lease this instance holds for a client. The guard does not renew
/// itself: the client's refreshes extend it, and it ends when they stop.
pub struct HeldLease {
    /// The lock's key.
    pub key: String,
    /// The fencing token the backend gave.
    pub fencing_token: u64,
    /// The TTL a refresh without one extends by, in milliseconds.
    ttl_ms: AtomicU64,
    /// `None` once released.
    pub guard: tokio::sync::Mutex<Option<LockGuard>>,
}

impl HeldLease {
    /// The TTL a refresh without one extends by.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Sets the TTL later refreshes without one use.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(millis(ttl), Ordering::Relaxed);
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u128::from(u64::MAX)) as u64
}

impl AppState {
    /// State over `locker`, with a bearer `token` if requests need one.
    pub fn new(locker: Locker, limits: Limits, token: Option<&str>) -> Self {
        AppState {
            locker,
            limits,
            token_digest: token.map(|token| Sha256::digest(token.as_bytes()).into()),
            instance: random_hex::<8>(),
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Every critical section is a few map operations: a panic cannot
        // leave the table half changed.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether requests need a bearer token.
    pub fn requires_token(&self) -> bool {
        self.token_digest.is_some()
    }

    /// Whether `given` is the bearer token, compared in constant time.
    pub fn token_matches(&self, given: &str) -> bool {
        match &self.token_digest {
            None => true,
            Some(expected) => {
                let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
                bool::from(given.ct_eq(expected))
            }
        }
    }

    /// Why `handle` is not in the table: it names another instance (this
    /// backend's leases cannot move between instances, so the client must
    /// come back to the one that granted it), or none at all.
    pub fn missing(&self, handle: &str) -> ApiError {
        match handle.strip_prefix("h1.").and_then(|rest| rest.split_once('.')) {
            Some((instance, _)) if instance != self.instance => ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "other_instance",
                format!(
                    "this lease was granted by another instance of the service; the {} backend cannot resume it here, so refresh and release must reach the instance that acquired it (sticky routing)",
                    self.locker.backend()
                ),
            ),
            _ => ApiError::unknown_handle(),
        }
    }

    /// Keeps `guard`, granted with `ttl`, under a new handle and returns
    /// the handle.
    pub fn insert(&self, guard: LockGuard, ttl: Duration) -> String {
        let handle = format!("h1.{}.{}", self.instance, random_hex::<16>());
        let key = guard.key().to_owned();
        let lease = Arc::new(HeldLease {
            key: key.clone(),
            fencing_token: guard.fencing_token(),
            ttl_ms: AtomicU64::new(millis(ttl)),
            guard: tokio::sync::Mutex::new(Some(guard)),
        });
        let count = {
            let mut table = self.table();
            table.by_handle.insert(handle.clone(), lease);
            table.by_key.insert(key, handle.clone());
            table.by_handle.len()
        };
        crate::metrics::held_leases(count);
        handle
    }

    /// The lease with `handle`, if this instance holds it.
    pub fn get(&self, handle: &str) -> Option<Arc<HeldLease>> {
        self.table().by_handle.get(handle).cloned()
    }

    /// Forgets the lease with `handle` and returns it.
    pub fn remove(&self, handle: &str) -> Option<Arc<HeldLease>> {
        let (lease, count) = {
            let mut table = self.table();
            let lease = table.by_handle.remove(handle)?;
            if table.by_key.get(&lease.key).map(String::as_str) == Some(handle) {
                table.by_key.remove(&lease.key);
            }
            (lease, table.by_handle.len())
        };
        crate::metrics::held_leases(count);
        Some(lease)
    }

    /// The lease this instance holds on `key`, and the number of acquire
    /// requests waiting on it here.
    pub fn on_key(&self, key: &str) -> (Option<Arc<HeldLease>>, usize) {
        let table = self.table();
        let lease = table
            .by_key
            .get(key)
            .and_then(|handle| table.by_handle.get(handle))
            .cloned();
        (lease, table.waiters.get(key).copied().unwrap_or(0))
    }

    /// Counts an acquire request waiting on `key` until the ticket drops.
    pub fn wait_on(self: &Arc<Self>, key: &str) -> WaitTicket {
        *self.table().waiters.entry(key.to_owned()).or_default() += 1;
        WaitTicket {
            state: self.clone(),
            key: key.to_owned(),
            _metric: crate::metrics::Waiting::start(),
        }
    }

    /// Forgets the leases whose TTL passed without a refresh. Dropping
    /// their guards releases them on the backend (owner-checked), so a
    /// lock whose client went silent is freed as its TTL says.
    pub fn sweep_expired(&self) -> usize {
        let expired: Vec<String> = {
            let table = self.table();
            table
                .by_handle
                .iter()
                .filter(|(_, lease)| {
                    // A lease in use by a request is left to that request.
                    lease
                        .guard
                        .try_lock()
                        .is_ok_and(|guard| guard.as_ref().is_none_or(|guard| !guard.is_held()))
                })
                .map(|(handle, _)| handle.clone())
                .collect()
        };
        for handle in &expired {
            if let Some(lease) = self.remove(handle) {
                tracing::debug!(key = %lease.key, fencing_token = lease.fencing_token, "forgot an expired lease");
            }
        }
        expired.len()
    }

    /// The number of leases held.
    pub fn held_count(&self) -> usize {
        self.table().by_handle.len()
    }
}

/// One waiting acquire request, counted per key while it lives.
pub struct WaitTicket {
    state: Arc<AppState>,
    key: String,
    _metric: crate::metrics::Waiting,
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        let mut table = self.state.table();
        if let Some(count) = table.waiters.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                table.waiters.remove(&self.key);
            }
        }
    }
}

/// `N` bytes from the OS's CSPRNG, in hex. A handle's 128 random bits
/// make it unguessable, so holding it is what proves a client owns the
/// lease.
fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).expect("the OS random source failed");
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// How often expired leases are forgotten.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_parts_are_long_and_distinct() {
        let (a, b) = (random_hex::<16>(), random_hex::<16>());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn tokens_are_compared_whole() {
        let locker = distlock::connect("memory://serve-state-test")
            .await
            .unwrap();
        let state = AppState::new(locker, Limits::default(), Some("s3cret"));
        assert!(state.token_matches("s3cret"));
        assert!(!state.token_matches("s3cre"));
        assert!(!state.token_matches("s3cret "));
        assert!(!format!("{state:?}").contains("s3cret"));
    }
}
