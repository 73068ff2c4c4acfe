//! The conformance cases. Each takes a [`Harness`] and panics with the
//! backend's name and what broke.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock_core::{Error, LockGuard, LockOptions};
use futures::stream::{self, StreamExt, TryStreamExt};

pub use crate::resume::resume_from_token;
use crate::{unique_key, Harness};

fn skip(harness: &Harness, case: &str, why: &str) {
    eprintln!("{}: {case} skipped: {why}", harness.name());
}

pub(crate) async fn must_try_lock(
    harness: &Harness,
    client: &dyn distlock_core::DistributedLock,
    key: &str,
    options: &LockOptions,
) -> LockGuard {
    match client.try_lock(key, options).await {
        Ok(Some(guard)) => guard,
        Ok(None) => panic!("{}: try_lock({key:?}) found the lock held", harness.name()),
        Err(err) => panic!(
            "{}: try_lock({key:?}) failed: {err} ({err:?})",
            harness.name()
        ),
    }
}

pub(crate) async fn must_be_busy(
    harness: &Harness,
    client: &dyn distlock_core::DistributedLock,
    key: &str,
) {
    match client.try_lock(key, &LockOptions::new()).await {
        Ok(None) => {}
        Ok(Some(guard)) => {
            let token = guard.fencing_token();
            std::mem::forget(guard);
            panic!(
                "{}: a second owner got {key:?} (token {token}) while it was held",
                harness.name()
            )
        }
        Err(err) => panic!("{}: try_lock({key:?}) failed: {err}", harness.name()),
    }
}

/// `try_lock` on a held key returns `Ok(None)` for every other owner,
/// including another attempt by the same client.
pub async fn try_lock_while_held(harness: &Harness) {
    let (a, b) = (harness.client().await, harness.client().await);
    let key = unique_key("try-lock-while-held");
    let guard = must_try_lock(harness, &*a, &key, &LockOptions::new()).await;
    must_be_busy(harness, &*b, &key).await;
    must_be_busy(harness, &*a, &key).await;
    assert!(guard.is_held(), "{}: guard not held", harness.name());
    assert_eq!(guard.key(), key);
    guard.release().await.expect("release");
    let again = must_try_lock(harness, &*b, &key, &LockOptions::new()).await;
    again.release().await.expect("release");
}

/// After `release`, the same and other clients can take the lock again,
/// with a larger fencing token.
pub async fn release_then_reacquire(harness: &Harness) {
    let (a, b) = (harness.client().await, harness.client().await);
    let key = unique_key("release-then-reacquire");
    let first = must_try_lock(harness, &*a, &key, &LockOptions::new()).await;
    let first_token = first.fencing_token();
    first.release().await.expect("release");
    let second = must_try_lock(harness, &*a, &key, &LockOptions::new()).await;
    assert!(
        second.fencing_token() > first_token,
        "{}: token did not grow",
        harness.name()
    );
    let second_token = second.fencing_token();
    second.release().await.expect("release");
    let third = b
        .lock(&key, &LockOptions::new().wait(Duration::from_secs(5)))
        .await
        .expect("lock after release");
    assert!(
        third.fencing_token() > second_token,
        "{}: token did not grow",
        harness.name()
    );
    third.release().await.expect("release");
}

/// An empty key is `InvalidKey` for both calls.
pub async fn empty_key_is_invalid(harness: &Harness) {
    let client = harness.client().await;
    let options = LockOptions::new().wait(Duration::from_secs(1));
    assert!(matches!(
        client.try_lock("", &options).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        client.lock("", &options).await,
        Err(Error::InvalidKey { .. })
    ));
}

/// 8 tasks, each with its own client, increment a non-atomic counter
/// (read, yield, write) under the lock: no update is lost and no two are
/// ever inside at once.
pub async fn mutual_exclusion(harness: &Harness) {
    const WORKERS: usize = 8;
    const ROUNDS: usize = 25;
    let key = unique_key("mutual-exclusion");
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let client = harness.client().await;
        let (key, counter, inside, max_inside) = (
            key.clone(),
            counter.clone(),
            inside.clone(),
            max_inside.clone(),
        );
        let name = harness.name().to_owned();
        tasks.push(tokio::spawn(async move {
            let options = LockOptions::new().wait(Duration::from_secs(60));
            for _ in 0..ROUNDS {
                let guard = client
                    .lock(&key, &options)
                    .await
                    .unwrap_or_else(|err| panic!("{name}: lock failed: {err}"));
                let now_inside = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now_inside, Ordering::SeqCst);
                // A read-modify-write that loses updates unless excluded.
                let value = counter.load(Ordering::SeqCst);
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                counter.store(value + 1, Ordering::SeqCst);
                inside.fetch_sub(1, Ordering::SeqCst);
                guard
                    .release()
                    .await
                    .unwrap_or_else(|err| panic!("{name}: release failed: {err}"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker panicked");
    }
    let expected = (WORKERS * ROUNDS) as u64;
    assert_eq!(
        max_inside.load(Ordering::SeqCst),
        1,
        "{}: two holders were inside at once",
        harness.name()
    );
    assert_eq!(
        counter.load(Ordering::SeqCst),
        expected,
        "{}: lost updates under the lock",
        harness.name()
    );
}

/// Tokens grow strictly across holders on different clients.
pub async fn fencing_tokens_increase(harness: &Harness) {
    let clients = [harness.client().await, harness.client().await];
    let key = unique_key("fencing");
    let options = LockOptions::new().wait(Duration::from_secs(10));
    let mut last = 0u64;
    for round in 0..6 {
        let guard = clients[round % 2].lock(&key, &options).await.expect("lock");
        assert!(
            guard.fencing_token() > last,
            "{}: token {} after {last}",
            harness.name(),
            guard.fencing_token()
        );
        last = guard.fencing_token();
        guard.release().await.expect("release");
    }
}

/// With renewal off the lock expires after its TTL: another owner gets it
/// with a larger token, and the stale guard's `release` and `extend` are
/// `NotHeld` and leave the new holder alone.
pub async fn ttl_expiry_frees_lock(harness: &Harness) {
    let (a, b, c) = (
        harness.client().await,
        harness.client().await,
        harness.client().await,
    );
    if !a.capabilities().ttl_expiry {
        return skip(
            harness,
            "ttl_expiry_frees_lock",
            "the backend's locks do not expire by TTL",
        );
    }
    let key = unique_key("ttl-expiry");
    let ttl = harness.short_ttl();
    let stale = must_try_lock(
        harness,
        &*a,
        &key,
        &LockOptions::new().ttl(ttl).auto_renew(false),
    )
    .await;
    let started = Instant::now();
    let fresh = b
        .lock(&key, &LockOptions::new().wait(ttl * 10))
        .await
        .expect("the lock did not expire");
    assert!(
        started.elapsed() >= ttl / 2,
        "{}: granted after {:?}, before the TTL {ttl:?} ran out",
        harness.name(),
        started.elapsed()
    );
    assert!(
        fresh.fencing_token() > stale.fencing_token(),
        "{}: token not larger after expiry",
        harness.name()
    );
    assert!(
        !stale.is_held(),
        "{}: stale guard claims to hold",
        harness.name()
    );
    let lost = tokio::time::timeout(Duration::from_secs(1), stale.lost()).await;
    assert!(
        lost.is_ok(),
        "{}: lost() did not fire on the stale guard",
        harness.name()
    );
    let err = stale.extend(ttl).await.expect_err("stale extend must fail");
    assert!(err.is_not_held(), "{}: stale extend: {err}", harness.name());
    let err = stale.release().await.expect_err("stale release must fail");
    assert!(
        err.is_not_held(),
        "{}: stale release: {err}",
        harness.name()
    );
    must_be_busy(harness, &*c, &key).await;
    assert!(fresh.is_held());
    fresh
        .release()
        .await
        .expect("the new holder's lock was disturbed");
}

/// Automatic renewal keeps a lock through several TTLs.
pub async fn renewal_keeps_lock(harness: &Harness) {
    let (a, b) = (harness.client().await, harness.client().await);
    let key = unique_key("renewal");
    let ttl = harness.short_ttl();
    let guard = must_try_lock(harness, &*a, &key, &LockOptions::new().ttl(ttl)).await;
    // The passing of time is what is tested here.
    for _ in 0..7 {
        tokio::time::sleep(ttl / 2).await;
        assert!(
            guard.is_held(),
            "{}: renewal did not keep the lease",
            harness.name()
        );
        must_be_busy(harness, &*b, &key).await;
    }
    guard.release().await.expect("release after renewals");
}

/// `lock` with a `wait` on a held key returns `Timeout` after about that
/// long, and leaves the holder alone.
pub async fn lock_wait_times_out(harness: &Harness) {
    let (a, b) = (harness.client().await, harness.client().await);
    let key = unique_key("wait-timeout");
    let guard = must_try_lock(harness, &*a, &key, &LockOptions::new()).await;
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let err = b
        .lock(&key, &LockOptions::new().wait(wait))
        .await
        .expect_err("lock on a held key must time out");
    let waited = started.elapsed();
    assert!(
        err.is_timeout(),
        "{}: expected Timeout, got {err}",
        harness.name()
    );
    assert!(
        waited >= wait && waited < wait + Duration::from_secs(2),
        "{}: waited {waited:?} for a {wait:?} bound",
        harness.name()
    );
    must_be_busy(harness, &*b, &key).await;
    guard.release().await.expect("release");
}

/// Pending `lock` futures that are dropped (by a timeout or an aborted
/// task) leave no waiter behind: after the holder releases, a later
/// client gets the lock at once instead of queueing behind ghosts.
pub async fn dropped_lock_future_leaves_nothing(harness: &Harness) {
    let (a, b, c, d) = (
        harness.client().await,
        harness.client().await,
        harness.client().await,
        harness.client().await,
    );
    let key = unique_key("dropped-future");
    let guard = must_try_lock(harness, &*a, &key, &LockOptions::new()).await;
    let pending = tokio::time::timeout(
        Duration::from_millis(300),
        b.lock(&key, &LockOptions::new()),
    )
    .await;
    assert!(
        pending.is_err(),
        "{}: lock on a held key returned",
        harness.name()
    );
    let task = tokio::spawn({
        let (c, key) = (c.clone(), key.clone());
        async move {
            c.lock(&key, &LockOptions::new())
                .await
                .map(|guard| guard.fencing_token())
        }
    });
    // The waiter must reach the server before it is aborted: the queue
    // probe tells where the harness has one; otherwise only time does.
    if harness.has_queue_probe() {
        wait_until_queued(harness, &key, 1).await;
    } else {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    guard.release().await.expect("release");
    let next = d
        .lock(&key, &LockOptions::new().wait(Duration::from_secs(3)))
        .await
        .unwrap_or_else(|err| {
            panic!(
                "{}: a dropped waiter blocked the next owner: {err}",
                harness.name()
            )
        });
    next.release().await.expect("release");
}

/// A dropped guard is released in the background long before its TTL.
pub async fn dropped_guard_is_released_promptly(harness: &Harness) {
    let (a, b) = (harness.client().await, harness.client().await);
    let key = unique_key("dropped-guard");
    let guard = must_try_lock(
        harness,
        &*a,
        &key,
        &LockOptions::new().ttl(Duration::from_secs(60)),
    )
    .await;
    drop(guard);
    let next = b
        .lock(&key, &LockOptions::new().wait(Duration::from_secs(3)))
        .await
        .unwrap_or_else(|err| {
            panic!(
                "{}: dropped guard not released within 3s (TTL 60s): {err}",
                harness.name()
            )
        });
    next.release().await.expect("release");
}

/// `lost()` fires when the backend's fault hook takes the lock away, and
/// the guard then reports `NotHeld`.
pub async fn lost_fires_on_fault(harness: &Harness) {
    if !harness.has_fault_hook() {
        return skip(harness, "lost_fires_on_fault", "no fault hook");
    }
    let a = harness.client().await;
    let key = unique_key("lost-on-fault");
    let ttl = harness.short_ttl();
    let guard = must_try_lock(harness, &*a, &key, &LockOptions::new().ttl(ttl)).await;
    assert!(guard.is_held());
    harness.take_away(&key).await;
    let reason = tokio::time::timeout(ttl * 5 + Duration::from_secs(5), guard.lost())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: lost() did not fire after the lock was taken away",
                harness.name()
            )
        });
    assert!(
        !guard.is_held(),
        "{}: is_held after lost ({reason})",
        harness.name()
    );
    let err = guard.release().await.expect_err("release of a lost lock");
    assert!(err.is_not_held(), "{}: {err}", harness.name());
}

/// Any non-empty UTF-8 key works, and distinct keys never collide.
pub async fn awkward_keys(harness: &Harness) {
    let (a, b) = (harness.client().await, harness.client().await);
    let base = unique_key("awkward");
    let suffixes = [
        "a/b".to_owned(),
        "a_b".to_owned(),
        "a%2Fb".to_owned(),
        "a b".to_owned(),
        "a:b".to_owned(),
        "a\\b".to_owned(),
        ".".to_owned(),
        "..".to_owned(),
        "/".to_owned(),
        "//".to_owned(),
        "{tag}".to_owned(),
        "*?[]".to_owned(),
        "ключ 鍵 🔒".to_owned(),
        "\t\n".to_owned(),
        "x".repeat(1024),
        format!("{}y", "x".repeat(1023)),
    ];
    let mut keys: Vec<String> = suffixes
        .iter()
        .map(|suffix| format!("{base}{suffix}"))
        .collect();
    keys.push("🔒".to_owned() + &base);
    keys.push(format!("/{base}"));
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(must_try_lock(harness, &*a, key, &LockOptions::new()).await);
    }
    for key in &keys {
        must_be_busy(harness, &*b, key).await;
    }
    for (guard, key) in guards.into_iter().zip(&keys) {
        assert_eq!(guard.key(), key);
        guard
            .release()
            .await
            .unwrap_or_else(|err| panic!("{}: release {key:?}: {err}", harness.name()));
    }
}

/// One client holds 1,000 distinct locks at once.
pub async fn thousand_locks_one_client(harness: &Harness) {
    const LOCKS: usize = 1000;
    let (a, b) = (harness.client().await, harness.client().await);
    let base = unique_key("thousand");
    let options = LockOptions::new();
    let guards: Vec<LockGuard> = stream::iter(0..LOCKS)
        .map(|i| {
            let (a, key, options) = (a.clone(), format!("{base}/{i}"), options.clone());
            async move {
                a.try_lock(&key, &options)
                    .await?
                    .ok_or_else(|| Error::InvalidConfig(format!("{key} was busy")))
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await
        .unwrap_or_else(|err| panic!("{}: holding 1000 locks: {err}", harness.name()));
    assert_eq!(guards.len(), LOCKS);
    for i in (0..LOCKS).step_by(97) {
        must_be_busy(harness, &*b, &format!("{base}/{i}")).await;
    }
    assert!(guards.iter().all(LockGuard::is_held));
    stream::iter(guards)
        .map(|guard| guard.release())
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap_or_else(|err| panic!("{}: releasing 1000 locks: {err}", harness.name()));
}

/// Polls the harness's queue probe until `count` waiters are queued on
/// `key` (no event tells; the server's queue is the truth).
async fn wait_until_queued(harness: &Harness, key: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let queued = harness.queued(key).await.unwrap_or_else(|| {
            panic!(
                "{}: a fair backend's harness needs with_queue_probe",
                harness.name()
            )
        });
        if queued >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: {queued} of {count} waiters queued after 10 s",
            harness.name()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waiters are granted in arrival order where the backend declares
/// fairness.
pub async fn fifo_fairness(harness: &Harness) {
    const WAITERS: usize = 4;
    let holder = harness.client().await;
    if !holder.capabilities().fair {
        return skip(
            harness,
            "fifo_fairness",
            "the backend does not declare fairness",
        );
    }
    let key = unique_key("fifo");
    let guard = must_try_lock(harness, &*holder, &key, &LockOptions::new()).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for index in 0..WAITERS {
        let client = harness.client().await;
        let (waiter_key, order) = (key.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let guard = client
                .lock(
                    &waiter_key,
                    &LockOptions::new().wait(Duration::from_secs(30)),
                )
                .await
                .expect("waiter's lock");
            order.lock().unwrap().push(index);
            guard.release().await.expect("waiter's release");
        }));
        // Arrival order is what is tested: the next waiter starts once this
        // one is queued on the server.
        wait_until_queued(harness, &key, index + 1).await;
    }
    guard.release().await.expect("release");
    for task in tasks {
        task.await.expect("waiter panicked");
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        (0..WAITERS).collect::<Vec<_>>(),
        "{}: waiters granted out of order",
        harness.name()
    );
}
