//! The conformance suite against real servers: one Redis (fair and unfair
//! mode) on 127.0.0.1:6379 and Redlock over 127.0.0.1:6380-6382.

use std::sync::Arc;
use std::time::Duration;

use distlock_redis::RedisLock;
use distlock_testkit::Harness;

const SINGLE: &str = "127.0.0.1:6379";
const REDLOCK: [&str; 3] = ["127.0.0.1:6380", "127.0.0.1:6381", "127.0.0.1:6382"];

/// Deletes the lock's key on every server, as a failover or an operator would.
async fn delete_everywhere(client: &RedisLock, endpoints: &[&str], key: &str) {
    let name = client.redis_key(key);
    for endpoint in endpoints {
        let redis = redis::Client::open(format!("redis://{endpoint}")).unwrap();
        let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
        let deleted: i64 = redis::cmd("DEL")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        if endpoints.len() == 1 {
            assert_eq!(deleted, 1, "no lock key {name} to take away");
        }
    }
}

async fn harness(
    name: &'static str,
    url: String,
    endpoints: &'static [&'static str],
) -> Option<Harness> {
    for endpoint in endpoints {
        if !distlock_testkit::service_ready("redis", endpoint).await {
            return None;
        }
    }
    let fault_url = url.clone();
    Some(
        Harness::new(name, move || {
            let url = url.clone();
            async move { Ok(Arc::new(RedisLock::connect(&url).await?) as _) }
        })
        .with_fault(move |key| {
            let url = fault_url.clone();
            async move {
                let client = RedisLock::connect(&url).await.unwrap();
                delete_everywhere(&client, endpoints, &key).await;
            }
        })
        .with_short_ttl(Duration::from_millis(800)),
    )
}

/// The length of `key`'s fair queue (a list next to the lock).
async fn queue_length(url: &str, key: &str) -> usize {
    let client = RedisLock::connect(url).await.unwrap();
    let queue = client.redis_key(key).replace(":lock", ":queue");
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("LLEN")
        .arg(queue)
        .query_async(&mut conn)
        .await
        .unwrap()
}

mod redis_fair {
    use super::*;
    async fn fair() -> Option<Harness> {
        let url = format!("redis://{SINGLE}?prefix=distlock-test");
        let probe_url = url.clone();
        Some(
            harness("redis (fair)", url, &[SINGLE])
                .await?
                .with_queue_probe(move |key| {
                    let url = probe_url.clone();
                    async move { queue_length(&url, &key).await }
                }),
        )
    }
    distlock_testkit::conformance_tests!(fair());
}

mod redis_unfair {
    use super::*;
    async fn unfair() -> Option<Harness> {
        harness(
            "redis (unfair)",
            format!("redis://{SINGLE}?prefix=distlock-test&fair=false"),
            &[SINGLE],
        )
        .await
    }
    distlock_testkit::conformance_tests!(unfair());
}

mod redlock {
    use super::*;
    async fn quorum() -> Option<Harness> {
        harness(
            "redlock",
            format!("redlock://{}?prefix=distlock-test", REDLOCK.join(",")),
            &REDLOCK,
        )
        .await
    }
    distlock_testkit::conformance_tests!(quorum());
}
