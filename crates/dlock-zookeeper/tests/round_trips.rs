//! Request counts read from the server's own counters (`mntr`'s
//! `zk_packets_received`) on a private ZooKeeper: nobody else talks to it.
//! Each `mntr` is itself one packet, which the counts below subtract.
//!
//! The clients use a 60 s session timeout, so their idle pings (every 15%
//! of it) cannot fall inside the few seconds measured here.

mod support;

use std::time::Duration;

use dlock_core::{DistributedLock, LockOptions};
use dlock_zookeeper::ZooKeeperLock;
use support::PrivateZooKeeper;

/// Requests the server received from clients since `before`, not counting
/// the `mntr` that reads the counter.
async fn requests_since(server: &PrivateZooKeeper, before: u64) -> u64 {
    server.mntr("zk_packets_received").await - before - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_and_handoff_cost_what_the_recipe_promises() {
    if !support::can_start() {
        return;
    }
    let server = PrivateZooKeeper::start().await;
    let url = server.url("session_timeout=60s");
    let a = ZooKeeperLock::connect(&url).await.expect("client a");
    let b = ZooKeeperLock::connect(&url).await.expect("client b");
    let key = "round-trips";
    // The guards renew (check ownership) every ttl/3: keep that out of the
    // measured window.
    let options = LockOptions::new().ttl(Duration::from_secs(60));

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

    // A waiter: create + getChildren + getData with a watch on its
    // predecessor, then nothing while the holder holds.
    let before = server.mntr("zk_packets_received").await;
    let watches = server.watch_count().await;
    let waiter = tokio::spawn({
        let (b, options) = (b.clone(), options.clone());
        async move { b.lock(key, &options).await }
    });
    // Each four-letter command is one packet too: count them.
    let mut four_letter = 1; // the `wchs` above
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        four_letter += 1;
        if server.watch_count().await > watches {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter set no watch"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = server.mntr("zk_packets_received").await;
    assert_eq!(
        queued - before - 1 - four_letter,
        3,
        "a waiter sends create, getChildren and one getData with a watch"
    );
    // The claim under test is about time passing with nothing sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        requests_since(&server, queued).await,
        0,
        "the waiter (or anyone) sent requests while the holder held"
    );

    // Handoff: the holder's delete, then the waiter's getChildren.
    let before = server.mntr("zk_packets_received").await;
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let next = waiter.await.unwrap().expect("waiter granted");
    assert!(next.fencing_token() > token);
    assert_eq!(requests_since(&server, before).await, 2, "handoff");
    next.release().await.unwrap();
}
