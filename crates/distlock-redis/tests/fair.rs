//! Fair mode on the shared Redis (127.0.0.1:6379): contenders take turns,
//! and a dropped waiter leaves no queue entry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_redis::RedisLock;

const URL: &str = "redis://127.0.0.1:6379?prefix=distlock-test";

async fn ready() -> bool {
    distlock_testkit::service_ready("redis", "127.0.0.1:6379").await
}

/// 8 contenders loop lock/release on one key: once all are queued, the
/// lock goes round the queue, so nobody gets it twice in a row (in unfair
/// mode the releasing worker usually takes it straight back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_contenders_take_turns() {
    if !ready().await {
        return;
    }
    const WORKERS: usize = 8;
    const ROUNDS: usize = 10;
    let key = distlock_testkit::unique_key("fair-turns");
    let grants = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..WORKERS {
        clients.push(RedisLock::connect(URL).await.unwrap());
    }
    // Everyone queues behind a first holder before the loop starts.
    let first = clients[0]
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut server = ServerView::of(&clients[0], &key).await;
    let mut tasks = Vec::new();
    for (worker, client) in clients.into_iter().enumerate() {
        let (key, grants) = (key.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            let options = LockOptions::new().wait(Duration::from_secs(30));
            for _ in 0..ROUNDS {
                let guard = client.lock(&key, &options).await.expect("lock");
                grants.lock().unwrap().push(worker);
                // The work done under the lock. It also gives the previous
                // holder time to queue again before this release, so that
                // arrival order (what fairness promises) is one turn each
                // even when the machine is loaded.
                tokio::time::sleep(Duration::from_millis(25)).await;
                guard.release().await.expect("release");
            }
        }));
    }
    server
        .wait_queued(WORKERS, Duration::from_secs(5), "workers never all queued")
        .await;
    first.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let grants = grants.lock().unwrap().clone();
    assert_eq!(grants.len(), WORKERS * ROUNDS);
    // Until workers finish their rounds, each window of 8 grants is one
    // turn: every worker exactly once.
    for (i, turn) in grants.chunks(WORKERS).enumerate() {
        let mut sorted = turn.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            WORKERS,
            "turn {i} is not one grant each: {turn:?} (all: {grants:?})"
        );
    }
}

/// A `lock` future dropped while queued leaves the queue in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_waiter_leaves_the_queue() {
    if !ready().await {
        return;
    }
    let (holder, waiter) = (
        RedisLock::connect(URL).await.unwrap(),
        RedisLock::connect(URL).await.unwrap(),
    );
    let key = distlock_testkit::unique_key("fair-dropped");
    let guard = holder
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut server = ServerView::of(&holder, &key).await;
    let pending = tokio::time::timeout(
        Duration::from_millis(300),
        waiter.lock(&key, &LockOptions::new()),
    )
    .await;
    assert!(pending.is_err(), "the lock is held");
    // The cleanup runs in a background task; no event reaches the test.
    let started = std::time::Instant::now();
    loop {
        match server.queued().await {
            (0, 0) => break,
            state => assert!(
                started.elapsed() < Duration::from_secs(3),
                "queue left behind: {state:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And the queue was really used while waiting (the test can fail).
    let task = tokio::spawn({
        let key = key.clone();
        async move {
            waiter
                .lock(&key, &LockOptions::new())
                .await
                .map(|g| g.fencing_token())
        }
    });
    server
        .wait_queued(1, Duration::from_secs(3), "waiter never queued")
        .await;
    task.abort();
    let _ = task.await;
    guard.release().await.unwrap();
}

/// The server's side of one lock: its Redis names and a connection of
/// the test's own to read them.
struct ServerView {
    lock_key: String,
    queue: String,
    waiters: String,
    conn: redis::aio::MultiplexedConnection,
}

impl ServerView {
    async fn of(client: &RedisLock, key: &str) -> Self {
        let lock_key = client.redis_key(key);
        ServerView {
            queue: lock_key.replace(":lock", ":queue"),
            waiters: lock_key.replace(":lock", ":waiters"),
            lock_key,
            conn: redis::Client::open("redis://127.0.0.1:6379")
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        }
    }

    /// The queue's length and the number of waiter entries.
    async fn queued(&mut self) -> (i64, i64) {
        let len: i64 = redis::cmd("LLEN")
            .arg(&self.queue)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        let hash: i64 = redis::cmd("HLEN")
            .arg(&self.waiters)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        (len, hash)
    }

    /// Waits until `waiters` waiters are queued (no event says so; the
    /// server's queue does), failing with `what` after `within`.
    async fn wait_queued(&mut self, waiters: usize, within: Duration, what: &str) {
        let expected = (waiters as i64, waiters as i64);
        let started = std::time::Instant::now();
        while self.queued().await != expected {
            assert!(started.elapsed() < within, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A release hands the lock to the queue's head with one message, on the
/// channel of the head's client: the other waiting clients are sent
/// nothing (each used to read, and drop, every grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_is_one_message_to_the_head_only() {
    if !ready().await {
        return;
    }
    const WAITERS: usize = 3;
    let holder = RedisLock::connect(URL).await.unwrap();
    let key = distlock_testkit::unique_key("fair-one-message");
    let guard = holder
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut server = ServerView::of(&holder, &key).await;
    let shared = server.lock_key.replace(":lock", ":released");
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    // Every channel of this lock: the shared one and the waiters' own.
    let mut listener = client.get_async_pubsub().await.unwrap();
    listener.psubscribe(format!("{shared}*")).await.unwrap();
    let mut messages = listener.into_on_message();

    let (granted_tx, mut granted_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..WAITERS {
        let client = RedisLock::connect(URL).await.unwrap();
        let (key, granted_tx) = (key.clone(), granted_tx.clone());
        tasks.push(tokio::spawn(async move {
            let guard = client.lock(&key, &LockOptions::new()).await.unwrap();
            let _ = granted_tx.send(guard);
            std::future::pending::<()>().await;
        }));
    }
    server
        .wait_queued(WAITERS, Duration::from_secs(5), "waiters never queued")
        .await;
    guard.release().await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), granted_rx.recv())
        .await
        .expect("handed over")
        .unwrap();
    // One connection delivers in order: whatever the release published
    // arrives before this marker.
    let () = redis::cmd("PUBLISH")
        .arg(&shared)
        .arg("marker")
        .query_async::<i64>(&mut server.conn)
        .await
        .map(|_| ())
        .unwrap();
    let mut before_marker = Vec::new();
    loop {
        let message = tokio::time::timeout(
            Duration::from_secs(5),
            futures::StreamExt::next(&mut messages),
        )
        .await
        .expect("the marker arrives")
        .unwrap();
        let payload: String = message.get_payload().unwrap();
        if payload == "marker" {
            break;
        }
        before_marker.push((message.get_channel_name().to_owned(), payload));
    }
    assert_eq!(before_marker.len(), 1, "{before_marker:?}");
    let (channel, payload) = &before_marker[0];
    assert!(payload.starts_with("grant "), "{payload}");
    // The head's client's channel (a waiter id is `<client id>:<attempt>`).
    let head_owner = payload.rsplit(' ').next().unwrap();
    let (head_client, _) = head_owner.rsplit_once(':').unwrap();
    assert_eq!(channel, &format!("{shared}:{head_client}"));
    for task in tasks {
        task.abort();
    }
    head.release().await.unwrap();
}

/// A queue head that died after its last refresh is still handed the lock
/// (the release cannot tell), but only for the claim window: the next
/// waiter gets the lock seconds later, not after the dead head's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_head_holds_a_handed_over_lock_for_the_claim_window_only() {
    if !ready().await {
        return;
    }
    let holder = RedisLock::connect(URL).await.unwrap();
    let key = distlock_testkit::unique_key("fair-dead-head");
    let guard = holder
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let ServerView {
        lock_key,
        queue,
        waiters,
        mut conn,
    } = ServerView::of(&holder, &key).await;
    // The queue entry a waiter leaves when its process dies right after a
    // refresh: fresh for 3 s, asking for a 60 s TTL.
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = seconds * 1000 + micros / 1000;
    let dead = "dead-client:1";
    let () = redis::pipe()
        .cmd("HSET")
        .arg(&waiters)
        .arg(dead)
        .arg(format!("{}:60000", now_ms + 3000))
        .ignore()
        .cmd("RPUSH")
        .arg(&queue)
        .arg(dead)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let holder_token = guard.fencing_token();
    guard.release().await.unwrap();
    let (owner, pttl): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg(&lock_key)
        .cmd("PTTL")
        .arg(&lock_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        owner, dead,
        "the release handed the lock to the queue's head"
    );
    assert!(
        (1..=3000).contains(&pttl),
        "handed over for the claim window, not the head's 60 s: {pttl} ms"
    );
    // A live waiter gets it once the window ends; before the claim window
    // it would have waited for the dead head's whole TTL.
    let waiter = RedisLock::connect(URL).await.unwrap();
    let options = LockOptions::new().wait(Duration::from_secs(10));
    let next = waiter.lock(&key, &options).await.unwrap();
    assert!(next.fencing_token() > holder_token);
    next.release().await.unwrap();
}

/// A live waiter handed the lock for the claim window extends it to the
/// TTL it asked for straight away, with or without auto-renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_lock_is_extended_to_its_ttl() {
    if !ready().await {
        return;
    }
    for auto_renew in [true, false] {
        let holder = RedisLock::connect(URL).await.unwrap();
        let key = distlock_testkit::unique_key("fair-claimed");
        let guard = holder
            .try_lock(&key, &LockOptions::new())
            .await
            .unwrap()
            .unwrap();
        let mut server = ServerView::of(&holder, &key).await;
        let ttl = Duration::from_secs(20);
        let waiting = tokio::spawn({
            let key = key.clone();
            async move {
                let waiter = RedisLock::connect(URL).await.unwrap();
                let options = LockOptions::new().ttl(ttl).auto_renew(auto_renew);
                waiter.lock(&key, &options).await.unwrap()
            }
        });
        server
            .wait_queued(1, Duration::from_secs(5), "waiter never queued")
            .await;
        guard.release().await.unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("handed over")
            .unwrap();
        // The extension runs in the background: watch the server's TTL
        // pass the claim window.
        let started = std::time::Instant::now();
        loop {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&server.lock_key)
                .query_async(&mut server.conn)
                .await
                .unwrap();
            if pttl > 3000 {
                assert!(pttl <= 20_000, "{pttl}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "auto_renew {auto_renew}: still {pttl} ms left, never extended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And the lease vouches for the longer time too.
        let started = std::time::Instant::now();
        while handed.remaining().unwrap() <= Duration::from_secs(3) {
            assert!(started.elapsed() < Duration::from_secs(2));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(handed.is_held());
        handed.release().await.unwrap();
    }
}
