//! The suite must fail loudly against a backend that does not exclude.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{self, self_renewed_guard, HeldLock, Lease};
use distlock_core::{Capabilities, LockGuard, LockOptions, Result};
use distlock_testkit::{cases, Harness};
use futures::FutureExt;

/// Grants every request at once, with increasing tokens: fencing looks
/// right, exclusion is absent.
#[derive(Default)]
struct NeverExcludes {
    tokens: AtomicU64,
}

struct Nothing;

#[async_trait]
impl HeldLock for Nothing {
    async fn release(&self) -> Result<()> {
        Ok(())
    }
    async fn extend(&self, _ttl: Duration) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl backend::LockBackend for NeverExcludes {
    fn backend(&self) -> &'static str {
        "never-excludes"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        Ok(Some(backend::LockBackend::lock(self, key, options).await?))
    }
    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
        let lease = Lease::new(key, token, options.ttl, None);
        Ok(self_renewed_guard(
            "never-excludes",
            lease,
            Arc::new(Nothing),
        ))
    }
}

fn broken() -> Harness {
    let backend = Arc::new(NeverExcludes::default());
    Harness::new("never-excludes", move || {
        let backend = backend.clone();
        async move { Ok(backend as _) }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_fails_on_a_backend_that_never_excludes() {
    let outcome = AssertUnwindSafe(cases::mutual_exclusion(&broken()))
        .catch_unwind()
        .await;
    let panic = outcome.expect_err("the suite passed a backend without exclusion");
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        message.contains("two holders were inside at once") || message.contains("lost updates"),
        "unexpected failure: {message}"
    );
}

#[tokio::test]
async fn try_lock_while_held_fails_on_a_backend_that_never_excludes() {
    let outcome = AssertUnwindSafe(cases::try_lock_while_held(&broken()))
        .catch_unwind()
        .await;
    assert!(
        outcome.is_err(),
        "the suite passed a backend without exclusion"
    );
}
