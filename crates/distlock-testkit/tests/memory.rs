//! The in-process backend passes the whole conformance suite.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::memory::MemoryLock;
use distlock_testkit::Harness;

async fn harness() -> Option<Harness> {
    // One store per test; each client is a clone sharing it.
    let store = MemoryLock::new();
    let revoker = store.clone();
    let prober = store.clone();
    Some(
        Harness::new("memory", move || {
            let client = store.clone();
            async move { Ok(Arc::new(client) as _) }
        })
        .with_fault(move |key| {
            let revoker = revoker.clone();
            async move {
                assert!(revoker.revoke(&key), "nothing to revoke on {key}");
            }
        })
        .with_queue_probe(move |key| {
            let prober = prober.clone();
            async move { prober.waiters(&key) }
        })
        .with_short_ttl(Duration::from_millis(300)),
    )
}

distlock_testkit::conformance_tests!(harness());
