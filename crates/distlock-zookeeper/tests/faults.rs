//! Faults against real ZooKeeper servers this test binary starts itself
//! (each test its own, on a free port): a server paused past the session
//! timeout, a server restarted, no server at all, and the server removing
//! an empty lock directory.

mod support;

use std::time::{Duration, Instant};

use distlock_core::{DistributedLock, Error, LockOptions, LostReason};
use distlock_testkit::servers::{free_port, PrivateZooKeeper};
use distlock_zookeeper::ZooKeeperLock;
use support::eventually;
use zookeeper_client as zk;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expired_under_a_held_lock_fires_lost_in_time_and_fences_the_next_holder() {
    let Some(server) = PrivateZooKeeper::start().await else {
        return;
    };
    let session_timeout = Duration::from_secs(3);
    let a = ZooKeeperLock::connect(&server.url("session_ttl=3s"))
        .await
        .unwrap();
    assert_eq!(a.session_ttl(), session_timeout);
    let key = "paused-past-the-session-timeout";
    let stale = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");

    // Nothing answers: the client suspends the session, then gives up on it.
    server.pause();
    let paused_at = Instant::now();
    let reason = tokio::time::timeout(session_timeout * 2, stale.lost())
        .await
        .expect("lost() fired while the server was paused");
    let lost_after = paused_at.elapsed();
    eprintln!("lost() fired {lost_after:?} after the pause ({reason})");
    assert!(
        matches!(reason, LostReason::Expired | LostReason::SessionLost(_)),
        "{reason}"
    );
    // The server could expire the session one session timeout after it last
    // heard from us (at the latest when the pause began): the guard must
    // have stopped claiming the lock before that.
    assert!(
        lost_after < session_timeout,
        "lost() fired {lost_after:?} after the server stopped answering, not within the session timeout {session_timeout:?}"
    );
    assert!(!stale.is_held());
    // Stay paused until the client has declared the session expired (7/5 of
    // the timeout after its last answer, plus a connection attempt).
    tokio::time::sleep(
        (session_timeout * 9 / 5 + Duration::from_millis(500)).saturating_sub(paused_at.elapsed()),
    )
    .await;
    server.resume();

    let b = ZooKeeperLock::connect(&server.url("session_ttl=3s"))
        .await
        .unwrap();
    let fresh = b
        .lock(key, &LockOptions::new().wait(session_timeout * 3))
        .await
        .expect("the expired session's lock was freed");
    assert!(fresh.fencing_token() > stale.fencing_token());
    assert!(stale.release().await.unwrap_err().is_not_held());
    assert!(fresh.is_held());
    let fresh_token = fresh.fencing_token();
    fresh.release().await.unwrap();
    // And the first client recovers with a new session.
    let again = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free after the release");
    assert!(again.fencing_token() > fresh_token);
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_within_the_grace_keeps_the_lock() {
    let Some(mut server) = PrivateZooKeeper::start().await else {
        return;
    };
    // A grace (a third of the timeout, 20 s) that a JVM restart on a loaded
    // machine stays within, even when a connection attempt hangs on the
    // starting server (given up after a sixth, 10 s).
    let url = server.url("session_ttl=60s");
    let a = ZooKeeperLock::connect(&url).await.unwrap();
    let key = "restarted";
    let guard = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let ttl = a.session_ttl();
    // Connected: vouched for up to a session TTL after the last answer.
    let connected = guard.valid_until().expect("a deadline");
    assert!(
        connected > tokio::time::Instant::now() + ttl / 2,
        "{guard:?}"
    );

    server.kill();
    eventually(
        "the guard notices the suspended session",
        Duration::from_secs(10),
        || async { guard.valid_until().unwrap() <= tokio::time::Instant::now() + ttl / 2 },
    )
    .await;
    let deadline = guard.valid_until().unwrap();
    assert!(
        deadline <= tokio::time::Instant::now() + a.session_ttl() / 2,
        "a suspended session vouches for less than half its timeout"
    );
    assert!(guard.is_held(), "still within the grace");

    server.start_again().await;
    eventually(
        "the same session reconnects and vouches again",
        Duration::from_secs(18),
        || async { guard.valid_until().unwrap() > tokio::time::Instant::now() + ttl / 2 },
    )
    .await;
    assert!(guard.is_held(), "{guard:?}");

    // The lock survived the restart: still exclusive, then handed on.
    let b = ZooKeeperLock::connect(&url).await.unwrap();
    assert!(b
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let token = guard.fencing_token();
    guard.release().await.expect("release after the restart");
    let next = b
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free after the release");
    assert!(next.fencing_token() > token);
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_clear_error_without_a_hang() {
    let (p1, p2) = (free_port(), free_port());
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        ZooKeeperLock::connect(&format!(
            "zk://127.0.0.1:{p1},127.0.0.1:{p2}/x?session_ttl=30s"
        )),
    )
    .await
    .expect("connect hung");
    let took = started.elapsed();
    match result {
        Err(Error::Connection {
            backend, endpoint, ..
        }) => {
            assert_eq!(backend, "zookeeper");
            assert_eq!(endpoint, format!("127.0.0.1:{p1},127.0.0.1:{p2}"));
        }
        other => panic!("expected Error::Connection, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(3),
        "refused connections took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_directories_are_removed_and_tokens_keep_growing() {
    let Some(server) =
        PrivateZooKeeper::start_with_container_check(Duration::from_millis(100)).await
    else {
        return;
    };
    let a = ZooKeeperLock::connect(&server.url("")).await.unwrap();
    let admin = zk::Client::connect(&server.address()).await.unwrap();
    let key = "recreated";
    let dir = a.lock_directory(key);
    let node_name = |admin: zk::Client, dir: String| async move {
        admin.list_children(&dir).await.unwrap().pop().unwrap()
    };

    let first = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let first_node = node_name(admin.clone(), dir.clone()).await;
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    eventually(
        "the server removes the empty container directory",
        Duration::from_secs(10),
        || async { admin.check_stat(&dir).await.unwrap().is_none() },
    )
    .await;

    let second = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let second_node = node_name(admin.clone(), dir.clone()).await;
    // The new directory restarted the sequence, so it cannot fence...
    assert!(first_node.ends_with("lock-0000000000"), "{first_node}");
    assert!(second_node.ends_with("lock-0000000000"), "{second_node}");
    // ...but the czxid still grows.
    assert!(second.fencing_token() > first_token);
    second.release().await.unwrap();
    // The prefix is a plain persistent node and stays.
    assert!(admin.check_stat("/distlock-test").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_grace_ran_out_stays_lost_when_the_session_returns() {
    let Some(mut server) = PrivateZooKeeper::start().await else {
        return;
    };
    let a = ZooKeeperLock::connect(&server.url("session_ttl=5s"))
        .await
        .unwrap();
    let session = a.session_id();
    let guard = a
        .try_lock("grace-ran-out", &LockOptions::new().auto_renew(false))
        .await
        .unwrap()
        .expect("free");
    server.kill();
    let ttl = a.session_ttl();
    eventually(
        "the guard notices the suspended session",
        Duration::from_secs(5),
        || async { guard.valid_until().unwrap() <= tokio::time::Instant::now() + ttl / 2 },
    )
    .await;
    // Nobody awaits lost(): the passed deadline alone must make it final.
    let deadline = guard.valid_until().unwrap();
    tokio::time::sleep_until(deadline + Duration::from_millis(100)).await;
    server.start_again().await;
    // The same session is back and serves requests...
    let other = a
        .lock(
            "another-key",
            &LockOptions::new().wait(Duration::from_secs(10)),
        )
        .await
        .expect("the session reconnects");
    assert_eq!(a.session_id(), session, "the same session came back");
    // ...but the guard does not claim the lock again.
    assert!(!guard.is_held(), "{guard:?}");
    assert_eq!(guard.lost_reason(), Some(LostReason::Expired));
    other.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_session_reconnected_lists_again_before_taking_the_lock() {
    let Some(mut server) = PrivateZooKeeper::start().await else {
        return;
    };
    // A long session timeout: no idle pings inside the counted window, and
    // a grace (a third of it, 20 s) that a server restart on a loaded
    // machine stays within, even when a connection attempt hangs on the
    // starting server (given up after a sixth, 10 s).
    let url = server.url("session_ttl=60s");
    let a = ZooKeeperLock::connect(&url).await.unwrap();
    let b = ZooKeeperLock::connect(&url).await.unwrap();
    let key = "reconnected-waiter";
    let options = LockOptions::new().ttl(Duration::from_secs(60));
    let held = a.lock(key, &options).await.unwrap();
    let waiter = tokio::spawn({
        let (b, options) = (b.clone(), options.clone());
        async move { b.lock(key, &options).await }
    });
    eventually("the waiter watches", Duration::from_secs(5), || async {
        server.watch_count().await == 2
    })
    .await;

    // Both sessions lose their connection and come back: the server
    // re-sends watch events after a reconnection in no guaranteed order,
    // so the waiter must not take the holder's deletion alone as its turn.
    server.kill();
    server.start_again().await;
    eventually(
        "both sessions are back and the waiter's watches are set again",
        Duration::from_secs(19),
        || async {
            let vouched =
                held.valid_until().unwrap() > tokio::time::Instant::now() + a.session_ttl() / 2;
            vouched && server.watch_count().await == 2
        },
    )
    .await;
    assert!(held.is_held());

    let before = server.mntr("zk_packets_received").await;
    let token = held.fencing_token();
    held.release().await.unwrap();
    let next = waiter.await.unwrap().expect("the waiter takes over");
    assert!(next.fencing_token() > token);
    assert_eq!(
        server.mntr("zk_packets_received").await - before - 1,
        2,
        "the holder's delete and the waiter's listing"
    );
    next.release().await.unwrap();
}

/// After a server restart, a reconnection attempt can land on a server
/// that accepts but does not answer yet. The attempt is given up after a
/// sixth of the session timeout (5 s here), so the session is back within
/// the third of it (10 s) that a suspended lock is vouched for. The
/// client's default, 2/5 of the session timeout (12 s), lost the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_reconnection_attempt_is_given_up_within_the_grace() {
    let Some(mut server) = PrivateZooKeeper::start().await else {
        return;
    };
    let url = server.url("session_ttl=30s");
    let a = ZooKeeperLock::connect(&url).await.unwrap();
    let guard = a
        .try_lock("hung-attempt", &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let port = server.port();
    server.kill();
    // Stands in for the restarting server: accepts the client's next
    // attempt and stays silent. The listening socket closes once it has
    // it (the accepted connection stays open), so the real server can
    // bind the port again.
    let silent = tokio::task::spawn_blocking(move || {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        listener.accept().map(|(stream, _)| stream)
    });
    let silent = tokio::time::timeout(Duration::from_secs(10), silent)
        .await
        .expect("the client tries to reconnect")
        .unwrap()
        .unwrap();
    let attempt_started = tokio::time::Instant::now();
    assert!(guard.is_held(), "{guard:?}");
    server.start_again().await;
    eventually("the session is back", Duration::from_secs(30), || async {
        let vouched =
            guard.valid_until().unwrap() > tokio::time::Instant::now() + a.session_ttl() / 2;
        vouched || !guard.is_held()
    })
    .await;
    assert!(
        guard.is_held(),
        "lost after {:?}: {:?}",
        attempt_started.elapsed(),
        guard
    );
    drop(silent);
    guard.release().await.unwrap();
}
