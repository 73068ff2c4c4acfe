//! Fencing tokens are `max(last token + 1, server time in µs)`: they keep
//! growing when the stored counter is ahead of the server's clock (a clock
//! stepped back, a failover to a server whose clock is behind), in every
//! mode and on the direct hand-off path.

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_redis::RedisLock;
use redis::AsyncCommands;

async fn ready() -> bool {
    distlock_testkit::service_ready("redis", "127.0.0.1:6379").await
}

/// A counter one day ahead of the server's clock, in µs.
const AHEAD: u64 = 86_400_000_000;

async fn put_counter_ahead(client: &RedisLock, key: &str) -> u64 {
    let fence = client.redis_key(key).replace(":lock", ":fence");
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let ahead = secs * 1_000_000 + micros + AHEAD;
    let _: () = conn.set_ex(&fence, ahead, 60).await.unwrap();
    ahead
}

#[tokio::test]
async fn tokens_pass_a_counter_that_is_ahead_of_the_clock() {
    if !ready().await {
        return;
    }
    for url in [
        "redis://127.0.0.1:6379?prefix=distlock-test",
        "redis://127.0.0.1:6379?prefix=distlock-test&fair=false",
    ] {
        let client = RedisLock::connect(url).await.unwrap();
        let key = distlock_testkit::unique_key("fence-ahead");
        let ahead = put_counter_ahead(&client, &key).await;
        let first = client
            .try_lock(&key, &LockOptions::new())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.fencing_token(), ahead + 1, "{url}");
        first.release().await.unwrap();
        let second = client
            .try_lock(&key, &LockOptions::new())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.fencing_token(), ahead + 2, "{url}");
        second.release().await.unwrap();
    }
}

#[tokio::test]
async fn a_handed_off_lock_passes_a_counter_that_is_ahead_of_the_clock() {
    if !ready().await {
        return;
    }
    let url = "redis://127.0.0.1:6379?prefix=distlock-test";
    let (holder, waiter) = (
        RedisLock::connect(url).await.unwrap(),
        RedisLock::connect(url).await.unwrap(),
    );
    let key = distlock_testkit::unique_key("fence-ahead-handoff");
    let ahead = put_counter_ahead(&holder, &key).await;
    let held = holder
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.fencing_token(), ahead + 1);
    let waiting = tokio::spawn({
        let key = key.clone();
        async move {
            waiter
                .lock(&key, &LockOptions::new().wait(Duration::from_secs(10)))
                .await
                .map(|guard| guard.fencing_token())
        }
    });
    // The waiter must be queued for the release to hand the lock over; no
    // event says it is.
    let queue = holder.redis_key(&key).replace(":lock", ":queue");
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while conn.llen::<_, usize>(&queue).await.unwrap() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the waiter never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    held.release().await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), ahead + 2);
}
