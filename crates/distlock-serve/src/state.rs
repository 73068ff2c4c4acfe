//! What one service instance keeps: the backend, the leases it holds for
//! its clients (by handle), and who waits on which key.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use distlock::{LockGuard, Locker};
use serde::{Deserialize, Serialize};
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
    ///
    /// Where the backend can resume a lock elsewhere, the handle carries
    /// what it needs (key, fencing token, the backend's resume token, the
    /// TTL), so that any instance can serve its refresh and release;
    /// otherwise it names this instance and 128 random bits.
    pub fn insert(&self, guard: LockGuard, ttl: Duration) -> String {
        let handle = match guard.resume_token() {
            Some(resume_token) => ResumableHandle {
                key: guard.key().to_owned(),
                fencing_token: guard.fencing_token(),
                resume_token,
                ttl_ms: millis(ttl),
            }
            .encode(),
            None => format!("h1.{}.{}", self.instance, random_hex::<16>()),
        };
        self.insert_as(handle.clone(), guard, ttl);
        handle
    }

    /// Keeps `guard` under `handle` (a lease resumed from its handle),
    /// replacing what this instance had under it, and returns it.
    pub fn insert_as(&self, handle: String, guard: LockGuard, ttl: Duration) -> Arc<HeldLease> {
        let key = guard.key().to_owned();
        let lease = Arc::new(HeldLease {
            key: key.clone(),
            fencing_token: guard.fencing_token(),
            ttl_ms: AtomicU64::new(millis(ttl)),
            guard: tokio::sync::Mutex::new(Some(guard)),
        });
        let count = {
            let mut table = self.table();
            table.by_handle.insert(handle.clone(), lease.clone());
            table.by_key.insert(key, handle);
            table.by_handle.len()
        };
        crate::metrics::held_leases(count);
        lease
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
            let Some(lease) = self.remove(handle) else {
                continue;
            };
            let guard = lease.guard.try_lock().ok().and_then(|mut slot| slot.take());
            if let (Some(guard), true) = (guard, ResumableHandle::is_one(handle)) {
                // Another instance may have resumed and refreshed it: the
                // backend's TTL, not this instance, decides when it ends.
                guard.forget();
            }
            tracing::debug!(key = %lease.key, fencing_token = lease.fencing_token, "forgot an expired lease");
        }
        expired.len()
    }

    /// The number of leases held.
    pub fn held_count(&self) -> usize {
        self.table().by_handle.len()
    }
}

/// What a handle of a resumable backend carries: enough for any instance
/// to resume the lease. The backend's resume token in it is the secret
/// (at least 128 random bits) that proves ownership on the server.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumableHandle {
    /// The lock's key.
    #[serde(rename = "k")]
    pub key: String,
    /// The backend's fencing token.
    #[serde(rename = "t")]
    pub fencing_token: u64,
    /// The backend's resume token.
    #[serde(rename = "r")]
    pub resume_token: String,
    /// The acquire's TTL, which a refresh without one extends by.
    #[serde(rename = "l")]
    pub ttl_ms: u64,
}

const RESUMABLE_PREFIX: &str = "h2.";

impl ResumableHandle {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a handle serializes");
        format!("{RESUMABLE_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// The handle's content, if `handle` is a well-formed resumable one.
    pub fn decode(handle: &str) -> Option<Self> {
        let encoded = handle.strip_prefix(RESUMABLE_PREFIX)?;
        let json = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn is_one(handle: &str) -> bool {
        handle.starts_with(RESUMABLE_PREFIX)
    }

    /// The TTL a refresh without one extends by.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
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
    fn resumable_handles_round_trip_and_refuse_garbage() {
        let handle = ResumableHandle {
            key: "orders/ü 1".into(),
            fencing_token: 42,
            resume_token: "ab".repeat(24),
            ttl_ms: 30_000,
        };
        let encoded = handle.encode();
        assert!(!encoded.contains('/') && !encoded.contains(' '));
        assert_eq!(ResumableHandle::decode(&encoded), Some(handle));
        assert_eq!(ResumableHandle::decode("h2.not-base64!"), None);
        assert_eq!(ResumableHandle::decode("h1.abc.def"), None);
        let not_json = format!("h2.{}", URL_SAFE_NO_PAD.encode(b"{"));
        assert_eq!(ResumableHandle::decode(&not_json), None);
    }

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
