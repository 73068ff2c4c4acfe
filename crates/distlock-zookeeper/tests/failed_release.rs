//! A release (or an abandoned attempt's cleanup) that fails during a fault
//! is retried in the background, on a private ZooKeeper server: issue 12's
//! fault run saw a failed release leave its node behind the holder's live
//! session for up to 43 s, with every waiter stuck behind it.

mod support;

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_testkit::servers::PrivateZooKeeper;
use distlock_zookeeper::ZooKeeperLock;
use support::{eventually, spawn_waiter};
use zookeeper_client as zk;

/// How long the waiter may take to be granted once the server is back:
/// the background retry backs off to 2 s at most, and the clients need a
/// reconnection; without the retry the waiter waits its whole minute (the
/// holder's session lives on).
const GRANTED_WITHIN: Duration = Duration::from_secs(10);

/// The nodes in `dir`, or none if it does not exist.
async fn nodes(admin: &zk::Client, dir: &str) -> Vec<String> {
    match admin.list_children(dir).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(err) => panic!("listing {dir}: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_cut_off_by_a_paused_server_is_retried_and_the_waiter_granted() {
    let Some(mut server) = PrivateZooKeeper::start().await else {
        return;
    };
    // A connection is given up after a sixth of the session TTL (2 s);
    // the sessions outlive the pause and a restart of the server (the
    // client gives a session up 7/5 of its TTL after the last answer).
    let url = server.url("session_ttl=12s");
    let a = ZooKeeperLock::connect(&url).await.unwrap();
    let b = ZooKeeperLock::connect(&url).await.unwrap();
    let key = "release-cut-off";
    let held = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");

    // The release's delete gets no answer: the client gives the connection
    // up and fails the request with a plain message, not a connection loss.
    server.pause();
    let err = held
        .release()
        .await
        .expect_err("a release with the server paused failed");
    eprintln!("the release failed: {err:?}");
    assert!(!err.is_not_held(), "{err}");
    // A paused server that resumes reads the delete still in its socket
    // and applies it after all; one that went down never does. Both
    // sessions survive the restart (the server keeps them in its log).
    server.kill_paused();
    server.start_again().await;

    // The holder's session lives on; only the retry deletes its node. (The
    // waiter starts once the server is back: a waiter whose own request
    // the fault cuts off fails its `lock` with the same plain-message
    // error, which is another matter.)
    let waiter = spawn_waiter(&b, key, &LockOptions::new().wait(Duration::from_secs(60)));
    let granted = tokio::time::timeout(GRANTED_WITHIN, waiter)
        .await
        .unwrap_or_else(|_| {
            panic!("the waiter was not granted within {GRANTED_WITHIN:?} of the server's return")
        })
        .unwrap()
        .expect("the waiter's lock");
    assert!(granted.is_held());
    granted.release().await.unwrap();
    // And the same client takes the lock again.
    let again = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free after both releases");
    again.release().await.unwrap();
}

/// The cleanup of a `try_lock` that finds the lock held is refused (the
/// lock directory's ACL lost DELETE: a failure that lasts until someone
/// fixes it, with no timing to it), and is retried until it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cleanup_of_an_abandoned_attempt_is_retried() {
    let Some(server) = PrivateZooKeeper::start().await else {
        return;
    };
    let url = server.url("");
    let (a, c) = (
        ZooKeeperLock::connect(&url).await.unwrap(),
        ZooKeeperLock::connect(&url).await.unwrap(),
    );
    let key = "cleanup-refused";
    let dir = a.lock_directory(key);
    let admin = zk::Client::connect(&server.address()).await.unwrap();
    let held = a
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let no_delete = [zk::Acl::new(
        zk::Permission::READ
            | zk::Permission::WRITE
            | zk::Permission::CREATE
            | zk::Permission::ADMIN,
        zk::AuthId::anyone(),
    )];
    admin.set_acl(&dir, &no_delete, None).await.unwrap();

    // Busy: the attempt's node is deleted before try_lock returns, which
    // the server refuses.
    assert!(c
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        nodes(&admin, &dir).await.len(),
        2,
        "the refused cleanup left its node"
    );

    admin
        .set_acl(
            &dir,
            &[zk::Acl::new(zk::Permission::ALL, zk::AuthId::anyone())],
            None,
        )
        .await
        .unwrap();
    eventually(
        "the abandoned node is deleted once the server allows it",
        GRANTED_WITHIN,
        || async { nodes(&admin, &dir).await.len() == 1 },
    )
    .await;
    held.release().await.unwrap();
    let next = c
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free after the release");
    next.release().await.unwrap();
}
