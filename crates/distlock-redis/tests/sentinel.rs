//! `redis+sentinel://` against the test Sentinels (`bash scripts/services.sh
//! cluster start`): the conformance suite, `wait_replicas`, and following a
//! failover. In the nextest group `clusters` (one test at a time): the
//! failover test moves the primary.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{DistributedLock, Error, LockOptions};
use distlock_redis::RedisLock;
use distlock_testkit::{eventually, unique_key, Harness};

const SENTINELS: [&str; 3] = ["127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"];
const MASTER: &str = "mymaster";

fn url(options: &str) -> String {
    format!(
        "redis+sentinel://{}/{MASTER}?prefix=distlock-test{options}",
        SENTINELS.join(",")
    )
}

async fn sentinels_ready() -> bool {
    for sentinel in SENTINELS {
        if !distlock_testkit::service_ready("redis sentinel", sentinel).await {
            return false;
        }
    }
    true
}

/// A connection to what a Sentinel names as the primary now.
async fn primary_conn() -> (String, redis::aio::MultiplexedConnection) {
    let sentinel = redis::Client::open(format!("redis://{}", SENTINELS[0])).unwrap();
    let mut conn = sentinel.get_multiplexed_async_connection().await.unwrap();
    let (host, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(MASTER)
        .query_async(&mut conn)
        .await
        .unwrap();
    let endpoint = format!("{host}:{port}");
    let primary = redis::Client::open(format!("redis://{endpoint}")).unwrap();
    (
        endpoint,
        primary.get_multiplexed_async_connection().await.unwrap(),
    )
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(name)
        .query_async::<i64>(conn)
        .await
        .unwrap()
        == 1
}

mod conformance {
    use super::*;

    async fn harness() -> Option<Harness> {
        if !sentinels_ready().await {
            return None;
        }
        let (connect_url, fault_url, probe_url) = (url(""), url(""), url(""));
        Some(
            Harness::new("redis-sentinel", move || {
                let url = connect_url.clone();
                async move { Ok(Arc::new(RedisLock::connect(&url).await?) as _) }
            })
            .with_fault(move |key| {
                let url = fault_url.clone();
                async move {
                    let client = RedisLock::connect(&url).await.unwrap();
                    let (_, mut conn) = primary_conn().await;
                    let deleted: i64 = redis::cmd("DEL")
                        .arg(client.redis_key(&key))
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert_eq!(deleted, 1, "no lock key to take away");
                }
            })
            .with_queue_probe(move |key| {
                let url = probe_url.clone();
                async move {
                    let client = RedisLock::connect(&url).await.unwrap();
                    let queue = client.redis_key(&key).replace(":lock", ":queue");
                    let (_, mut conn) = primary_conn().await;
                    redis::cmd("LLEN")
                        .arg(queue)
                        .query_async(&mut conn)
                        .await
                        .unwrap()
                }
            })
            .with_short_ttl(Duration::from_millis(800)),
        )
    }
    distlock_testkit::conformance_tests!(harness());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_two_succeeds_on_the_healthy_group() {
    if !sentinels_ready().await {
        return;
    }
    let locks = RedisLock::connect(&url("&wait_replicas=2&wait_timeout=500ms"))
        .await
        .unwrap();
    let key = unique_key("sentinel-wait");
    let guard = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    assert!(guard.fencing_token() > 0);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_more_than_exist_fails_and_leaves_no_key() {
    if !sentinels_ready().await {
        return;
    }
    let locks = RedisLock::connect(&url("&wait_replicas=5&wait_timeout=50ms"))
        .await
        .unwrap();
    let key = unique_key("sentinel-wait-too-many");
    let err = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .expect_err("only 2 replicas exist");
    let Error::Unavailable {
        backend,
        endpoint,
        key: err_key,
        ..
    } = &err
    else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert_eq!(
        (*backend, err_key.as_str()),
        ("redis-sentinel", key.as_str())
    );
    let primary = locks.primary().unwrap();
    assert!(endpoint.contains(&primary), "{endpoint}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.contains("2 of the 5 replicas") && source.contains("given back"),
        "{source}"
    );
    let (_, mut conn) = primary_conn().await;
    assert!(!exists(&mut conn, &locks.redis_key(&key)).await);
    // `lock` retries it within its wait, then says why it gave up.
    let options = LockOptions::new().wait(Duration::from_millis(300));
    let err = locks.lock(&key, &options).await.expect_err("never enough");
    assert!(err.is_timeout(), "{err:?}");
    // The dropped attempt's cleanup runs in the background.
    let name = locks.redis_key(&key);
    eventually(
        "the abandoned grant is deleted",
        Duration::from_secs(5),
        || {
            let (mut conn, name) = (conn.clone(), name.clone());
            async move { !exists(&mut conn, &name).await }
        },
    )
    .await;
    let _: i64 = redis::cmd("DEL")
        .arg(name.replace(":lock", ":fence"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A graceful `SENTINEL FAILOVER`: the client follows the announcement to
/// the new primary, where the next lock is written. The old primary is
/// then made a replica of the new one (what Sentinel does some seconds
/// later), so the group is whole again for the next test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_sentinel_failover() {
    if !sentinels_ready().await {
        return;
    }
    let locks = RedisLock::connect(&url("")).await.unwrap();
    let (old, _) = primary_conn().await;
    assert_eq!(locks.primary().as_deref(), Some(old.as_str()));
    let before = locks
        .try_lock(&unique_key("before-failover"), &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let token_before = before.fencing_token();
    before.release().await.unwrap();

    let sentinel = redis::Client::open(format!("redis://{}", SENTINELS[0])).unwrap();
    let mut sentinel = sentinel.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut sentinel)
        .await
        .unwrap();
    eventually(
        "the Sentinels name a new primary",
        Duration::from_secs(20),
        || async { primary_conn().await.0 != old },
    )
    .await;
    let (new, mut new_conn) = primary_conn().await;
    eventually("the client follows", Duration::from_secs(10), || async {
        locks.primary().as_deref() == Some(new.as_str())
    })
    .await;

    let key = unique_key("after-failover");
    let guard = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    assert!(guard.fencing_token() > token_before);
    assert!(
        exists(&mut new_conn, &locks.redis_key(&key)).await,
        "the lock is not on the new primary {new}"
    );
    guard.release().await.unwrap();
    assert!(!exists(&mut new_conn, &locks.redis_key(&key)).await);

    // Put the old primary under the new one now, rather than in ~10 s.
    let (host, port) = new.rsplit_once(':').unwrap();
    let old_client = redis::Client::open(format!("redis://{old}")).unwrap();
    let mut old_conn = old_client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("REPLICAOF")
        .arg(host)
        .arg(port)
        .query_async(&mut old_conn)
        .await
        .unwrap();
    eventually(
        "both replicas follow the new primary",
        Duration::from_secs(30),
        || {
            let mut conn = new_conn.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                info.lines()
                    .filter(|line| line.starts_with("slave") && line.contains("state=online"))
                    .count()
                    == 2
            }
        },
    )
    .await;
}
