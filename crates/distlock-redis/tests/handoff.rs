//! Fair mode's direct handoff at its edges, on a private server: the
//! waiter a release hands the lock to is gone (its `lock` future dropped),
//! or never hears of the grant (its pub/sub connection died).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use distlock_core::{DistributedLock, LockGuard, LockOptions, Result};
use distlock_redis::RedisLock;
use distlock_testkit::servers::PrivateRedis;

type LockFuture<'a> = Pin<Box<dyn Future<Output = Result<LockGuard>> + Send + 'a>>;

struct Names {
    lock: String,
    queue: String,
    fence: String,
    channel: String,
}

fn names(client: &RedisLock, key: &str) -> Names {
    let lock = client.redis_key(key);
    Names {
        queue: lock.replace(":lock", ":queue"),
        fence: lock.replace(":lock", ":fence"),
        channel: lock.replace(":lock", ":released"),
        lock,
    }
}

async fn conn(server: &PrivateRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Polls `future` (which must not finish) until the server shows `check`
/// true; the queue and subscriptions are server state, no event reaches
/// the test when they change.
async fn drive_until<F, C>(
    future: &mut LockFuture<'_>,
    conn: &mut redis::aio::MultiplexedConnection,
    mut check: C,
) where
    C: FnMut(redis::aio::MultiplexedConnection) -> F,
    F: Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if let Ok(result) = tokio::time::timeout(Duration::from_millis(10), future.as_mut()).await {
            panic!(
                "the lock is held; the waiter returned {:?}",
                result.map(|g| g.fencing_token())
            );
        }
        if check(conn.clone()).await {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the waiter never got there"
        );
    }
}

async fn queue_len(mut conn: redis::aio::MultiplexedConnection, queue: String) -> i64 {
    redis::cmd("LLEN")
        .arg(queue)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn subscribers(mut conn: redis::aio::MultiplexedConnection, channel: String) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    n
}

async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

/// The release hands the lock to a waiter whose future is dropped before it
/// read the grant: its cleanup deletes the lock it was given and wakes the
/// next waiter, which gets the lock at once (not after the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_dropped_at_the_handoff_passes_the_lock_on() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let (holder, first, second) = (
        RedisLock::connect(&server.url()).await.unwrap(),
        RedisLock::connect(&server.url()).await.unwrap(),
        RedisLock::connect(&server.url()).await.unwrap(),
    );
    let key = "dropped-at-handoff";
    let n = names(&holder, key);
    let mut conn = conn(&server).await;
    let options = LockOptions::new()
        .ttl(Duration::from_secs(30))
        .wait(Duration::from_secs(20));
    let guard = holder.try_lock(key, &options).await.unwrap().unwrap();
    let mut first_waiting: LockFuture = Box::pin(first.lock(key, &options));
    let queue = n.queue.clone();
    drive_until(&mut first_waiting, &mut conn, |c| {
        let queue = queue.clone();
        async move { queue_len(c, queue).await == 1 }
    })
    .await;
    let second_waiting = tokio::spawn({
        let options = options.clone();
        async move { second.lock(key, &options).await.map(|g| g.fencing_token()) }
    });
    let queue = n.queue.clone();
    drive_until(&mut first_waiting, &mut conn, |c| {
        let queue = queue.clone();
        async move { queue_len(c, queue).await == 2 }
    })
    .await;
    let head: String = redis::cmd("LINDEX")
        .arg(&n.queue)
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    // `first_waiting` is not polled from here on: it cannot read the grant.
    let holder_token = guard.fencing_token();
    guard.release().await.unwrap();
    assert_eq!(
        get(&mut conn, &n.lock).await.as_deref(),
        Some(head.as_str()),
        "handed to the head"
    );
    let handed_token: u64 = get(&mut conn, &n.fence).await.unwrap().parse().unwrap();
    assert!(handed_token > holder_token);
    let started = std::time::Instant::now();
    drop(first_waiting);
    let second_token = tokio::time::timeout(Duration::from_secs(5), second_waiting)
        .await
        .expect("the next waiter got the lock long before the dropped one's 30 s TTL")
        .unwrap()
        .unwrap();
    assert!(second_token > handed_token);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(queue_len(conn.clone(), n.queue.clone()).await, 0);
}

/// The release hands the lock to a waiter whose pub/sub connection is
/// gone, so the grant message never reaches it: it notices the lock is its
/// own at its next wake-up (the dead connection) from its attempt's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_noticed_without_its_message() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let (holder, waiter) = (
        RedisLock::connect(&server.url()).await.unwrap(),
        RedisLock::connect(&server.url()).await.unwrap(),
    );
    let key = "grant-without-message";
    let n = names(&holder, key);
    let mut conn = conn(&server).await;
    let options = LockOptions::new()
        .ttl(Duration::from_secs(30))
        .wait(Duration::from_secs(5));
    let guard = holder.try_lock(key, &options).await.unwrap().unwrap();
    let mut waiting: LockFuture = Box::pin(waiter.lock(key, &options));
    let (queue, channel) = (n.queue.clone(), n.channel.clone());
    drive_until(&mut waiting, &mut conn, |c| {
        let (queue, channel) = (queue.clone(), channel.clone());
        async move { queue_len(c.clone(), queue).await == 1 && subscribers(c, channel).await == 1 }
    })
    .await;
    // Cut the waiter's pub/sub connection while it is not polled, and wait
    // until the server has dropped it: the grant is published to nobody.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let started = std::time::Instant::now();
    while subscribers(conn.clone(), n.channel.clone()).await != 0 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holder_token = guard.fencing_token();
    guard.release().await.unwrap();
    let owner = get(&mut conn, &n.lock).await.expect("handed over");
    let handed_token: u64 = get(&mut conn, &n.fence).await.unwrap().parse().unwrap();
    assert!(handed_token > holder_token);
    // Without the attempt's "already yours" the waiter would see the lock
    // held (by itself) for 30 s and time out after 5 s.
    let handed = waiting.await.expect("the waiter found its grant");
    assert_eq!(handed.fencing_token(), handed_token);
    assert!(handed.is_held());
    assert_eq!(
        get(&mut conn, &n.lock).await.as_deref(),
        Some(owner.as_str())
    );
    handed.release().await.unwrap();
    assert_eq!(get(&mut conn, &n.lock).await, None);
}
