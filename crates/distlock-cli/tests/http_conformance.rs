//! The conformance suite through a live `distlock serve` (a real process
//! on loopback) with the `http://` client backend, over `memory://` and
//! over `redis://127.0.0.1:6379`.

mod support;

use std::sync::Arc;

use distlock_http::HttpLock;
use distlock_testkit::Harness;
use support::serve::ServeProcess;

/// A harness whose clients connect with `distlock::connect(http://...)`
/// to a service over `backend_url`; the service lives as long as the
/// harness. Also returns the service's URL.
async fn harness(name: &str, backend_url: &str) -> (Harness, String) {
    let server = Arc::new(ServeProcess::start(backend_url, &[]));
    let url = server.url.clone();
    let service_url = url.clone();
    let harness = Harness::new(name, move || {
        let (url, server) = (url.clone(), server.clone());
        async move {
            let locker = distlock::connect(&url).await?;
            assert_eq!(locker.backend(), "http");
            drop(server);
            Ok(locker.as_arc())
        }
    });
    (harness, service_url)
}

mod over_memory {
    use super::*;

    async fn memory() -> Option<Harness> {
        let (harness, url) = harness("http+memory", "memory://").await;
        let probe = Arc::new(
            HttpLock::connect(&url)
                .await
                .expect("a client of the service"),
        );
        // The memory backend queues a waiter in its first attempt, which
        // the service counts as a waiter once it returns pending.
        Some(harness.with_queue_probe(move |key| {
            let probe = probe.clone();
            async move { probe.status(&key).await.expect("status").waiters }
        }))
    }

    distlock_testkit::conformance_tests!(memory());
}

mod over_redis {
    use super::*;

    async fn redis() -> Option<Harness> {
        if !distlock_testkit::service_ready("redis", "127.0.0.1:6379").await {
            return None;
        }
        let direct = Arc::new(
            distlock_redis::RedisLock::connect("redis://127.0.0.1:6379")
                .await
                .expect("redis"),
        );
        let queue_of = direct.clone();
        Some(
            harness("http+redis", "redis://127.0.0.1:6379")
                .await
                .0
                // Redis's own queue is the truth of who waits.
                .with_queue_probe(move |key| {
                    let queue = queue_of.redis_key(&key).replace(":lock", ":queue");
                    async move { redis_cli(&["LLEN", &queue]).trim().parse().unwrap_or(0) }
                })
                // Deleting the lock in Redis: the service's next refresh
                // is refused, and the client's lost() fires.
                .with_fault(move |key| {
                    let lock = direct.redis_key(&key);
                    async move {
                        assert_eq!(
                            redis_cli(&["DEL", &lock]).trim(),
                            "1",
                            "no lock {lock} to take away"
                        );
                    }
                }),
        )
    }

    fn redis_cli(args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", "6379"])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(output.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    distlock_testkit::conformance_tests!(redis());
}
