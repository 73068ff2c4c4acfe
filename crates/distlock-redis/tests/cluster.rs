//! `redis+cluster://` against the test Redis Cluster (`bash
//! scripts/services.sh cluster start`): the conformance suite, one slot
//! per lock, and `wait_replicas`. In the nextest group `clusters`.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{DistributedLock, Error, LockOptions};
use distlock_redis::RedisLock;
use distlock_testkit::{unique_key, Harness};

const SEEDS: [&str; 3] = ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"];

fn url(options: &str) -> String {
    format!(
        "redis+cluster://{}?prefix=distlock-test{options}",
        SEEDS.join(",")
    )
}

async fn cluster_ready() -> bool {
    for seed in SEEDS {
        if !distlock_testkit::service_ready("redis cluster", seed).await {
            return false;
        }
    }
    true
}

/// A plain cluster connection, for looking at what the locks wrote.
async fn inspect() -> redis::cluster_async::ClusterConnection {
    let seeds: Vec<String> = SEEDS.iter().map(|s| format!("redis://{s}")).collect();
    redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

async fn query<T: redis::FromRedisValue>(cmd: &mut redis::Cmd) -> T {
    cmd.query_async(&mut inspect().await).await.unwrap()
}

mod conformance {
    use super::*;

    async fn harness() -> Option<Harness> {
        if !cluster_ready().await {
            return None;
        }
        let (connect_url, fault_url, probe_url) = (url(""), url(""), url(""));
        Some(
            Harness::new("redis-cluster", move || {
                let url = connect_url.clone();
                async move { Ok(Arc::new(RedisLock::connect(&url).await?) as _) }
            })
            .with_fault(move |key| {
                let url = fault_url.clone();
                async move {
                    let client = RedisLock::connect(&url).await.unwrap();
                    let deleted: i64 = query(redis::cmd("DEL").arg(client.redis_key(&key))).await;
                    assert_eq!(deleted, 1, "no lock key to take away");
                }
            })
            .with_queue_probe(move |key| {
                let url = probe_url.clone();
                async move {
                    let client = RedisLock::connect(&url).await.unwrap();
                    let queue = client.redis_key(&key).replace(":lock", ":queue");
                    query(redis::cmd("LLEN").arg(queue)).await
                }
            })
            .with_short_ttl(Duration::from_millis(800)),
        )
    }
    distlock_testkit::conformance_tests!(harness());
}

/// Every name a lock writes (lock, fencing counter, fair queue, waiter
/// table) and its channels hash to one slot, and scripts run there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_of_a_lock_share_one_slot() {
    if !cluster_ready().await {
        return;
    }
    let locks = RedisLock::connect(&url("")).await.unwrap();
    let key = unique_key("cluster-slot");
    let holder = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    // A waiter, so that the queue and the waiter table exist.
    let waiter = {
        let (locks, key) = (locks.clone(), key.clone());
        tokio::spawn(async move { locks.lock(&key, &LockOptions::new()).await })
    };
    let lock_name = locks.redis_key(&key);
    let queue = lock_name.replace(":lock", ":queue");
    distlock_testkit::eventually("the waiter is queued", Duration::from_secs(5), || {
        let queue = queue.clone();
        async move { query::<i64>(redis::cmd("LLEN").arg(queue)).await == 1 }
    })
    .await;
    let base = lock_name.strip_suffix("lock").unwrap();
    let names: Vec<String> = ["lock", "fence", "queue", "waiters", "released"]
        .iter()
        .map(|suffix| format!("{base}{suffix}"))
        .collect();
    let slot: i64 = query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&names[0])).await;
    for name in &names {
        let this: i64 = query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(name)).await;
        assert_eq!(this, slot, "{name} is not in the lock's slot");
    }
    for name in &names[..4] {
        let exists: i64 = query(redis::cmd("EXISTS").arg(name)).await;
        assert_eq!(exists, 1, "{name} was not written");
    }
    // The waiter listens with sharded pub/sub on the slot's primary.
    let grant_channel_prefix = format!("{base}released:");
    let mut subscribers = 0;
    for node in SEEDS {
        let client = redis::Client::open(format!("redis://{node}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg(format!("{grant_channel_prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        subscribers += channels.len();
        let (_, released): (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(&names[4])
            .query_async(&mut conn)
            .await
            .unwrap();
        subscribers += released as usize;
    }
    assert_eq!(subscribers, 2, "release and grant channels, sharded");
    // The release hands over to the waiter (notified, sharded pub/sub).
    let token = holder.fencing_token();
    holder.release().await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the handoff reaches the waiter")
        .unwrap()
        .unwrap();
    assert!(guard.fencing_token() > token);
    guard.release().await.unwrap();
    for name in &names[..4] {
        if name.ends_with(":fence") {
            continue; // the counter outlives the lock by design
        }
        let exists: i64 = query(redis::cmd("EXISTS").arg(name)).await;
        assert_eq!(exists, 0, "{name} stayed behind");
    }
    let _: i64 = query(redis::cmd("DEL").arg(&names[1])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_on_the_slots_primary() {
    if !cluster_ready().await {
        return;
    }
    // One replica per primary here.
    let locks = RedisLock::connect(&url("&wait_replicas=1&wait_timeout=500ms"))
        .await
        .unwrap();
    let key = unique_key("cluster-wait");
    let guard = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    guard.release().await.unwrap();

    let locks = RedisLock::connect(&url("&wait_replicas=5&wait_timeout=50ms"))
        .await
        .unwrap();
    let err = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .expect_err("one replica per primary");
    assert!(
        matches!(&err, Error::Unavailable { backend: "redis-cluster", key: k, .. } if *k == key),
        "{err:?}"
    );
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("1 of the 5 replicas"), "{source}");
    let exists: i64 = query(redis::cmd("EXISTS").arg(locks.redis_key(&key))).await;
    assert_eq!(exists, 0, "the refused grant stayed behind");
    let fence = locks.redis_key(&key).replace(":lock", ":fence");
    let _: i64 = query(redis::cmd("DEL").arg(fence)).await;
}
