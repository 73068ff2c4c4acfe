//! Request counts read from the server's own counters (`mntr`'s
//! `zk_packets_received`) on a private ZooKeeper: nobody else talks to it.
//! Each `mntr` is itself one packet, which the counts below subtract.
//!
//! The clients use a 60 s session timeout, so their idle pings (every 15%
//! of it) cannot fall inside the few seconds measured here.

mod support;

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_testkit::servers::PrivateZooKeeper;
use distlock_zookeeper::ZooKeeperLock;
use support::spawn_waiter;

/// Requests the server received from clients since `before`, not counting
/// the `mntr` that reads the counter.
async fn requests_since(server: &PrivateZooKeeper, before: u64) -> u64 {
    server.mntr("zk_packets_received").await - before - 1
}

/// A private server and `N` clients of it with 60 s sessions; `None` when none can be started.
async fn server_with_clients<const N: usize>() -> Option<(PrivateZooKeeper, [ZooKeeperLock; N])> {
    let server = PrivateZooKeeper::start().await?;
    let url = server.url("session_ttl=60s");
    let mut clients = Vec::with_capacity(N);
    for name in ('a'..='z').take(N) {
        clients.push(
            ZooKeeperLock::connect(&url)
                .await
                .unwrap_or_else(|err| panic!("client {name}: {err:?}")),
        );
    }
    let Ok(clients) = clients.try_into() else {
        unreachable!("{N} clients");
    };
    Some((server, clients))
}

/// A 60 s ttl, so the guards' ownership checks (every ttl/3) fall outside the measured window.
fn options_renewing_after_the_window() -> LockOptions {
    LockOptions::new().ttl(Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_and_handoff_cost_what_the_recipe_promises() {
    let Some((server, [a, b])) = server_with_clients().await else {
        return;
    };
    let key = "round-trips";
    let options = options_renewing_after_the_window();

    // First use makes the prefix and the key's directory.
    a.try_lock(key, &options)
        .await
        .unwrap()
        .expect("free")
        .release()
        .await
        .unwrap();

    // Uncontended try_lock: create + getChildren.
    let before = server.mntr("zk_packets_received").await;
    let guard = a.try_lock(key, &options).await.unwrap().expect("free");
    assert_eq!(requests_since(&server, before).await, 2, "try_lock");

    // try_lock on a held key: create + getChildren + delete of its node.
    let before = server.mntr("zk_packets_received").await;
    assert!(b.try_lock(key, &options).await.unwrap().is_none());
    assert_eq!(requests_since(&server, before).await, 3, "busy try_lock");

    // Release: one delete.
    let before = server.mntr("zk_packets_received").await;
    guard.release().await.unwrap();
    assert_eq!(requests_since(&server, before).await, 1, "release");

    // Uncontended lock: create + getChildren.
    let before = server.mntr("zk_packets_received").await;
    let guard = a.lock(key, &options).await.unwrap();
    assert_eq!(requests_since(&server, before).await, 2, "lock");

    // A waiter: create + getChildren, then one round trip that sets two
    // watches: `exists` on its own node and getData on its predecessor.
    // Then nothing while the holder holds.
    let before = server.mntr("zk_packets_received").await;
    let watches = server.watch_count().await;
    let waiter = spawn_waiter(&b, key, &options);
    let (four_letter, watching) = watches_set(&server, watches + 2).await;
    assert_eq!(watching, watches + 2, "the waiter's two watches");
    let queued = server.mntr("zk_packets_received").await;
    // The `wchs` above is a packet too.
    assert_eq!(
        queued - before - 1 - 1 - four_letter,
        4,
        "a waiter sends create, getChildren, exists with a watch on its own node and getData with a watch on its predecessor"
    );
    // The claim under test is about time passing with nothing sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        requests_since(&server, queued).await,
        0,
        "the waiter (or anyone) sent requests while the holder held"
    );

    // Handoff: the holder's delete, and nothing else: the waiter's
    // predecessor was the holder, so its deletion is the grant.
    let before = server.mntr("zk_packets_received").await;
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let next = waiter.await.unwrap().expect("waiter granted");
    assert!(next.fencing_token() > token);
    assert_eq!(requests_since(&server, before).await, 1, "handoff");
    // Its release: one delete; the watch on its own node fires with it
    // (no request to remove it).
    let before = server.mntr("zk_packets_received").await;
    next.release().await.unwrap();
    assert_eq!(
        requests_since(&server, before).await,
        1,
        "release after a wait"
    );
    assert_eq!(server.watch_count().await, watches, "no watch left behind");
}

/// Polls `wchs` until the server holds `at_least` watches; returns the
/// `wchs` packets it sent and the count reached.
async fn watches_set(server: &PrivateZooKeeper, at_least: u64) -> (u64, u64) {
    let mut four_letter = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        four_letter += 1;
        let watching = server.watch_count().await;
        if watching >= at_least {
            return (four_letter, watching);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiters set {watching} watches, not {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_deeper_queue_each_waiter_lists_again_while_its_predecessor_holds() {
    let Some((server, [a, b, c])) = server_with_clients().await else {
        return;
    };
    let key = "deeper-queue";
    let options = options_renewing_after_the_window();
    let first = a.lock(key, &options).await.unwrap();

    let watches = server.watch_count().await;
    let second = spawn_waiter(&b, key, &options);
    watches_set(&server, watches + 2).await;
    // The third waiter watches its own node, its predecessor (b) and the
    // node ahead of that (a, the holder).
    let before = server.mntr("zk_packets_received").await;
    let third = spawn_waiter(&c, key, &options);
    let (four_letter, _) = watches_set(&server, watches + 5).await;
    let queued = server.mntr("zk_packets_received").await;
    assert_eq!(
        queued - before - 1 - four_letter,
        5,
        "create, getChildren and three watches"
    );

    // a -> b: a's delete grants b; c, told that a went, lists again (b is
    // now the only node ahead of it, and already watched).
    let before = server.mntr("zk_packets_received").await;
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    let second = second.await.unwrap().expect("b granted");
    assert!(second.fencing_token() > first_token);
    let mut polls = 0;
    support::eventually("c lists again", Duration::from_secs(5), || {
        polls += 1;
        let server = &server;
        let polls = polls;
        async move { server.mntr("zk_packets_received").await - before - polls == 2 }
    })
    .await;
    // b -> c: b's delete alone grants c.
    let before = server.mntr("zk_packets_received").await;
    let second_token = second.fencing_token();
    second.release().await.unwrap();
    let third = third.await.unwrap().expect("c granted");
    assert!(third.fencing_token() > second_token);
    assert_eq!(requests_since(&server, before).await, 1, "handoff b -> c");
    third.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_change_on_the_holders_node_is_not_taken_for_its_deletion() {
    let Some((server, [a, b])) = server_with_clients().await else {
        return;
    };
    let admin = zookeeper_client::Client::connect(&server.address())
        .await
        .expect("admin client");
    let key = "data-change";
    let options = options_renewing_after_the_window();
    let held = a.lock(key, &options).await.unwrap();
    let dir = a.lock_directory(key);
    let holder_node = format!(
        "{dir}/{}",
        admin.list_children(&dir).await.unwrap().pop().unwrap()
    );

    let watches = server.watch_count().await;
    let mut waiter = spawn_waiter(&b, key, &options);
    watches_set(&server, watches + 2).await;

    // Someone writes to the holder's node: the waiter's watch fires, but
    // not for a deletion; it lists again (the holder is still there) and
    // watches the holder again: getChildren + getData.
    let before = server.mntr("zk_packets_received").await;
    admin
        .set_data(&holder_node, b"touched", None)
        .await
        .unwrap();
    let mut polls = 0;
    support::eventually(
        "the waiter lists again and re-arms its watch",
        Duration::from_secs(5),
        || {
            polls += 1;
            let (server, polls) = (&server, polls);
            // setData + getChildren + getData, and the mntr calls.
            async move { server.mntr("zk_packets_received").await - before - polls >= 3 }
        },
    )
    .await;
    assert_eq!(server.watch_count().await, watches + 2, "watching again");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiter)
            .await
            .is_err(),
        "the waiter was granted while the holder held"
    );
    assert!(held.is_held());

    // Now the real deletion hands over.
    let token = held.fencing_token();
    held.release().await.unwrap();
    let next = waiter.await.unwrap().expect("waiter granted");
    assert!(next.fencing_token() > token);
    next.release().await.unwrap();
}

/// Held locks cost no request while the session is healthy: once a lock
/// has been held for a third of its TTL, the session sets one persistent
/// recursive watch on the prefix and verifies its nodes with one listing;
/// after that, holding is free however many locks there are, and a node
/// deleted behind our back still fires `lost()`, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_locks_cost_no_request_and_a_deleted_node_fires_lost_at_once() {
    const LOCKS: usize = 40;
    let Some((server, [a])) = server_with_clients().await else {
        return;
    };
    // Checks used to fall due every 200 ms per lock.
    let options = LockOptions::new().ttl(Duration::from_millis(600));
    let mut guards = Vec::new();
    for i in 0..LOCKS {
        guards.push(
            a.try_lock(&format!("held/{i}"), &options)
                .await
                .unwrap()
                .expect("free"),
        );
    }
    distlock_testkit::eventually("the held-node watch is set", Duration::from_secs(5), || {
        let server = &server;
        async move { server.watch_count().await == 1 }
    })
    .await;
    // Then the listing that verifies the locks taken before the watch.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = server.mntr("zk_packets_received").await;
    // Five of the old check periods: 40 locks would have sent 200 requests.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(requests_since(&server, before).await, 0);
    assert!(guards.iter().all(|guard| guard.is_held()));

    // A lock taken now is covered by the watch from its grant.
    let late = a
        .try_lock("held/late", &options)
        .await
        .unwrap()
        .expect("free");
    // An operator deletes two nodes; each lock is lost, the others not.
    let admin = zookeeper_client::Client::connect(&server.address())
        .await
        .unwrap();
    for key in ["held/7", "held/late"] {
        let dir = a.lock_directory(key);
        let children = admin.list_children(&dir).await.unwrap();
        assert_eq!(children.len(), 1, "{children:?}");
        admin
            .delete(&format!("{dir}/{}", children[0]), None)
            .await
            .unwrap();
    }
    for guard in [&guards[7], &late] {
        let reason = tokio::time::timeout(Duration::from_secs(2), guard.lost())
            .await
            .expect("lost() fired");
        assert_eq!(reason, distlock_core::LostReason::NotHeld);
    }
    assert_eq!(
        guards.iter().filter(|guard| guard.is_held()).count(),
        LOCKS - 1
    );
    for guard in guards.into_iter().filter(|guard| guard.is_held()) {
        guard.release().await.unwrap();
    }
}

/// A node deleted before the watch is set is found by the listing that
/// follows it, a third of the TTL after the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_before_the_watch_is_found_by_the_listing() {
    let Some((server, [a])) = server_with_clients().await else {
        return;
    };
    let options = LockOptions::new().ttl(Duration::from_millis(900));
    let guard = a
        .try_lock("early-delete", &options)
        .await
        .unwrap()
        .expect("free");
    let admin = zookeeper_client::Client::connect(&server.address())
        .await
        .unwrap();
    let dir = a.lock_directory("early-delete");
    let children = admin.list_children(&dir).await.unwrap();
    admin
        .delete(&format!("{dir}/{}", children[0]), None)
        .await
        .unwrap();
    assert_eq!(server.watch_count().await, 0, "the watch is not set yet");
    let reason = tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() fired");
    assert_eq!(reason, distlock_core::LostReason::NotHeld);
}
