//! Faults against real, private Redis servers: restart, refused
//! connections, a paused server, and Redlock with instances down.

use std::time::{Duration, Instant};

use distlock_core::{DistributedLock, Error, LockOptions, LostReason};
use distlock_redis::RedisLock;
use distlock_testkit::servers::{free_port, PrivateRedis};

/// Redis without persistence forgets the lock on restart. The guard
/// reports the loss (the next renewal finds the key gone) instead of
/// claiming a lock another client may take meanwhile; tokens keep growing
/// because the acquire script seeds the lost counter from the server clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_held_reports_loss_and_tokens_keep_growing() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let url = format!("{}?timeout=500ms", server.url());
    let holder = RedisLock::connect(&url).await.unwrap();
    let ttl = Duration::from_millis(1500);
    let guard = holder
        .try_lock("restarted", &LockOptions::new().ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let old_token = guard.fencing_token();
    server.restart().await;
    let reason = tokio::time::timeout(ttl * 3, guard.lost())
        .await
        .expect("lost() fired after the restart");
    // The restart takes milliseconds, far less than the lease: the next
    // renewal reaches the new process, which has no such key.
    assert_eq!(reason, LostReason::NotHeld, "{reason}");
    assert!(!guard.is_held());
    let other = RedisLock::connect(&url).await.unwrap();
    let next = other
        .lock(
            "restarted",
            &LockOptions::new().wait(Duration::from_secs(5)),
        )
        .await
        .expect("free after the restart");
    assert!(
        next.fencing_token() > old_token,
        "{} after {old_token}",
        next.fencing_token()
    );
    let err = guard
        .release()
        .await
        .expect_err("the old guard no longer holds");
    assert!(err.is_not_held(), "{err}");
    assert!(next.is_held());
    next.release()
        .await
        .expect("the new holder was not disturbed");
}

/// Connecting to a port where nothing listens fails fast with a
/// connection error naming the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_clear_error_without_hanging() {
    let port = free_port();
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!(
            "redlock://127.0.0.1:{port},127.0.0.1:{},127.0.0.1:{}",
            free_port(),
            free_port()
        ),
    ] {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), RedisLock::connect(&url))
            .await
            .expect("connect must not hang");
        let err = result.expect_err("nothing listens there");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        match &err {
            Error::Connection { endpoint, .. } => {
                assert!(endpoint.contains(&format!("127.0.0.1:{port}")), "{err}")
            }
            other => panic!("expected a connection error, got {other}"),
        }
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}

/// A holder cut off from the server (here: the server paused with SIGSTOP)
/// past its TTL learns it from `lost()` by its local deadline; afterwards
/// the next holder gets a larger token and the old guard's release is
/// `NotHeld`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_past_the_ttl_loses_the_lock_and_fences_the_old_holder() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let url = format!("{}?timeout=300ms", server.url());
    let holder = RedisLock::connect(&url).await.unwrap();
    let ttl = Duration::from_millis(600);
    let guard = holder
        .try_lock("paused", &LockOptions::new().ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let old_token = guard.fencing_token();
    let paused_at = Instant::now();
    server.pause();
    let reason = tokio::time::timeout(ttl * 3, guard.lost())
        .await
        .expect("lost() fired while paused");
    assert!(
        paused_at.elapsed() <= ttl + Duration::from_millis(300),
        "lost after {:?}",
        paused_at.elapsed()
    );
    assert!(
        matches!(reason, LostReason::Expired | LostReason::RenewalFailed(_)),
        "{reason}"
    );
    // Stay paused past the TTL, then come back: the key has expired.
    tokio::time::sleep(ttl).await;
    server.resume();
    let other = RedisLock::connect(&url).await.unwrap();
    let next = other
        .lock("paused", &LockOptions::new().wait(Duration::from_secs(5)))
        .await
        .expect("expired while paused");
    assert!(next.fencing_token() > old_token);
    let err = guard.release().await.expect_err("stale release");
    assert!(err.is_not_held(), "{err}");
    next.release().await.expect("new holder undisturbed");
}

/// A lock taken with renewal off by a holder that then stalls: after the
/// TTL the next holder gets it with a larger token; the stale release is
/// `NotHeld`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_holder_without_renewal_is_fenced() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let (a, b) = (
        RedisLock::connect(&server.url()).await.unwrap(),
        RedisLock::connect(&server.url()).await.unwrap(),
    );
    let ttl = Duration::from_millis(300);
    let stale = a
        .try_lock("stalled", &LockOptions::new().ttl(ttl).auto_renew(false))
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    let fresh = b
        .lock("stalled", &LockOptions::new().wait(Duration::from_secs(3)))
        .await
        .unwrap();
    // Woken by the holder's TTL (expiry publishes nothing), not polling.
    assert!(started.elapsed() >= ttl / 2);
    assert!(fresh.fencing_token() > stale.fencing_token());
    assert!(stale.release().await.unwrap_err().is_not_held());
    fresh.release().await.unwrap();
}

/// Three private servers for a Redlock; `None` (skip) without redis-server.
async fn three_servers() -> Option<[PrivateRedis; 3]> {
    Some([
        PrivateRedis::start().await?,
        PrivateRedis::start().await?,
        PrivateRedis::start().await?,
    ])
}

fn redlock_url(servers: &[PrivateRedis]) -> String {
    let hosts: Vec<String> = servers.iter().map(|server| server.endpoint()).collect();
    format!("redlock://{}?timeout=300ms", hosts.join(","))
}

/// Redlock keeps granting with one of three instances down, and fails
/// clearly (not a hang, not a silent timeout) with two down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_survives_one_instance_down_and_fails_clearly_with_two() {
    let Some(mut servers) = three_servers().await else {
        return;
    };
    let url = redlock_url(&servers);
    let client = RedisLock::connect(&url).await.unwrap();
    let options = LockOptions::new()
        .ttl(Duration::from_secs(5))
        .wait(Duration::from_secs(3));

    servers[0].kill();
    let guard = client
        .lock("quorum", &options)
        .await
        .expect("granted by 2 of 3");
    let first = guard.fencing_token();
    let other = RedisLock::connect(&url)
        .await
        .expect("a majority is reachable");
    assert!(
        other.try_lock("quorum", &options).await.unwrap().is_none(),
        "excluded by the 2 live instances"
    );
    guard
        .extend(Duration::from_secs(5))
        .await
        .expect("extend on 2 of 3");
    guard.release().await.expect("release on 2 of 3");
    let again = other.lock("quorum", &options).await.expect("granted again");
    assert!(again.fencing_token() > first);
    again.release().await.unwrap();

    servers[1].kill();
    // One attempt reports at once that too few instances answered.
    let started = Instant::now();
    let err = client
        .try_lock("quorum", &options)
        .await
        .expect_err("no majority");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    let source = std::error::Error::source(&err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert!(
        source.contains(
            "2 of 3 Redis instances gave no answer to acquire; a majority of 2 must answer"
        ),
        "{err}: {source}"
    );
    // A waiting lock retries until its wait runs out, then names the outage.
    let err = client
        .lock("quorum", &options.clone().wait(Duration::from_secs(1)))
        .await
        .expect_err("no majority within the wait");
    let Error::Timeout {
        unreachable: failures,
        last_error: Some(last_error),
        ..
    } = &err
    else {
        panic!("expected a timeout naming the outage, got {err}");
    };
    assert!(*failures >= 1, "{err}");
    assert!(matches!(**last_error, Error::Unavailable { .. }), "{err}");
    let err = RedisLock::connect(&url)
        .await
        .expect_err("no majority to connect to");
    assert!(matches!(err, Error::Connection { .. }), "{err}");
}

/// A server restart shorter than the wait costs `lock` nothing: attempts
/// that find the server down are retried with the backoff, and the lock is
/// granted once it is back. (Before, `lock` failed at the first attempt
/// that found the server down, whatever its wait.)
#[tokio::test(flavor = "current_thread")]
async fn a_restart_shorter_than_the_wait_is_retried_through() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let client = RedisLock::connect(&format!("{}?timeout=300ms", server.url()))
        .await
        .unwrap();
    let options = LockOptions::new().wait(Duration::from_secs(20));
    server.kill();
    let err = client
        .try_lock("restarting", &options)
        .await
        .expect_err("the server is down");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");

    // The server comes back only after an attempt of the lock failed.
    let (_logging, failed_once) = distlock_testkit::events::on_warning("unreachable");
    let lock = client.lock("restarting", &options);
    tokio::pin!(lock);
    tokio::select! {
        result = &mut lock => panic!("lock ended during the outage: {result:?}"),
        _ = failed_once => {}
    }
    tokio::select! {
        result = &mut lock => panic!("lock ended during the outage: {result:?}"),
        () = server.start_again() => {}
    }
    let guard = lock.await.expect("granted once the server is back");
    guard.release().await.unwrap();
}

/// A paused (SIGSTOP) Redlock instance costs each request only the
/// per-instance timeout: the two live instances still grant, exclude and
/// release promptly, and hand the lock to a waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_with_a_paused_instance_still_grants_promptly() {
    let Some(servers) = three_servers().await else {
        return;
    };
    let url = redlock_url(&servers);
    let (a, b) = (
        RedisLock::connect(&url).await.unwrap(),
        RedisLock::connect(&url).await.unwrap(),
    );
    servers[1].pause();
    let options = LockOptions::new()
        .ttl(Duration::from_secs(5))
        .wait(Duration::from_secs(3));
    let started = Instant::now();
    let guard = a
        .lock("paused-one", &options)
        .await
        .expect("granted by 2 of 3");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert!(b.try_lock("paused-one", &options).await.unwrap().is_none());
    let waiter = tokio::spawn(async move {
        b.lock("paused-one", &options)
            .await
            .map(|g| g.fencing_token())
    });
    let started = Instant::now();
    guard.release().await.expect("released on 2 of 3");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "release took {:?}",
        started.elapsed()
    );
    let token = waiter
        .await
        .unwrap()
        .expect("the waiter got it after the release");
    assert!(token > 0);
    servers[1].resume();
}
