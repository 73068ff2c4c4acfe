//! The recipe's own promises, checked on the shared ZooKeeper
//! (127.0.0.1:2181) by listing the lock directories: no orphan nodes after
//! failed or abandoned attempts, protected node names, czxid tokens, and
//! the loss of a lock whose session is killed or whose node is deleted.

mod support;

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{DistributedLock, Error, LockGuard, LockOptions, LostReason};
use distlock_zookeeper::ZooKeeperLock;
use support::{eventually, spawn_waiter};
use zookeeper_client as zk;

const URL: &str = "zk://127.0.0.1:2181/distlock-recipe-tests?session_ttl=10s";

async fn clients(n: usize) -> Option<(Vec<ZooKeeperLock>, zk::Client)> {
    if !distlock_testkit::service_ready("zookeeper", "127.0.0.1:2181").await {
        return None;
    }
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(ZooKeeperLock::connect(URL).await.expect("connect"));
    }
    let admin = zk::Client::connect("127.0.0.1:2181")
        .await
        .expect("admin client");
    Some((clients, admin))
}

/// `n` clients, the admin client, a fresh key named after `name` and its lock directory.
async fn clients_on_key(
    n: usize,
    name: &str,
) -> Option<(Vec<ZooKeeperLock>, zk::Client, String, String)> {
    let (clients, admin) = clients(n).await?;
    let key = distlock_testkit::unique_key(name);
    let dir = clients[0].lock_directory(&key);
    Some((clients, admin, key, dir))
}

/// `key` taken by `client` with `try_lock`, which must find it free.
async fn take_free(client: &ZooKeeperLock, key: &str, options: &LockOptions) -> LockGuard {
    client.try_lock(key, options).await.unwrap().expect("free")
}

async fn children(admin: &zk::Client, dir: &str) -> Vec<String> {
    match admin.list_children(dir).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(err) => panic!("list {dir}: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_try_lock_and_timed_out_lock_leave_no_node() {
    let Some((c, admin, key, dir)) = clients_on_key(2, "orphans").await else {
        return;
    };
    let guard = take_free(&c[0], &key, &LockOptions::new()).await;
    assert_eq!(children(&admin, &dir).await.len(), 1);

    // A failed try_lock deletes its node before it returns.
    assert!(c[1]
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        children(&admin, &dir).await.len(),
        1,
        "try_lock left a node"
    );

    // A lock that times out is dropped by the core; its node goes in the
    // background.
    let err = c[1]
        .lock(&key, &LockOptions::new().wait(Duration::from_millis(200)))
        .await
        .expect_err("held");
    assert!(err.is_timeout(), "{err}");
    eventually(
        "the timed-out waiter's node is deleted",
        Duration::from_secs(5),
        || async { children(&admin, &dir).await.len() == 1 },
    )
    .await;
    guard.release().await.unwrap();
    assert!(children(&admin, &dir).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_waiters_leave_no_node_even_mid_create() {
    let Some((c, admin, key, dir)) = clients_on_key(3, "aborted").await else {
        return;
    };
    let guard = take_free(&c[0], &key, &LockOptions::new()).await;

    // A waiter that queued and then was aborted.
    let task = tokio::spawn({
        let (client, key) = (c[1].clone(), key.clone());
        async move { client.lock(&key, &LockOptions::new()).await.map(drop) }
    });
    eventually("the waiter queued", Duration::from_secs(5), || async {
        children(&admin, &dir).await.len() == 2
    })
    .await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    eventually(
        "the aborted waiter's node is deleted",
        Duration::from_secs(5),
        || async { children(&admin, &dir).await.len() == 1 },
    )
    .await;

    // A lock future dropped after one poll: its create was sent but not
    // answered, so the cleanup has to find the node by its protected name.
    {
        let options = LockOptions::new();
        let mut pending = std::pin::pin!(c[2].lock(&key, &options));
        assert!(futures::poll!(pending.as_mut()).is_pending());
    }
    // Give the create time to land; the cleanup must still remove it.
    let other = c[2].try_lock(&key, &LockOptions::new()).await.unwrap();
    assert!(other.is_none());
    eventually(
        "the node of a future dropped mid-create is deleted",
        Duration::from_secs(5),
        || async { children(&admin, &dir).await.len() == 1 },
    )
    .await;
    guard.release().await.unwrap();
    let next = c[1]
        .lock(&key, &LockOptions::new().wait(Duration::from_secs(3)))
        .await
        .expect("no ghost waiter blocks the next owner");
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_protected_and_tokens_are_czxids() {
    let Some((c, admin, key, dir)) = clients_on_key(1, "layout/with slash").await else {
        return;
    };
    assert!(
        dir.starts_with("/distlock-recipe-tests/distlock-test%2F"),
        "{dir}"
    );
    let guard = take_free(&c[0], &key, &LockOptions::new()).await;
    let names = children(&admin, &dir).await;
    assert_eq!(names.len(), 1);
    let name = &names[0];
    // _c_<36-char uuid>-lock-<10 digits>
    assert!(
        name.starts_with("_c_") && name.len() == 3 + 36 + 1 + 5 + 10,
        "{name}"
    );
    assert_eq!(&name[40..45], "lock-", "{name}");
    let (_, stat) = admin.get_data(&format!("{dir}/{name}")).await.unwrap();
    assert_eq!(stat.czxid as u64, guard.fencing_token());
    assert_eq!(stat.ephemeral_owner, c[0].session_id());
    // (That the directory is a container node, which the server removes
    // when empty, is shown in tests/faults.rs: clients cannot see a node's
    // type in its stat.)
    // Vouched for until a session TTL after the server last answered.
    let deadline = guard.valid_until().expect("a deadline");
    let now = tokio::time::Instant::now();
    assert!(
        deadline > now && deadline <= now + c[0].session_ttl(),
        "{guard:?}"
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_session_fires_lost_and_the_waiter_takes_over() {
    let Some((c, _admin)) = clients(2).await else {
        return;
    };
    let key = distlock_testkit::unique_key("killed");
    let held = take_free(&c[0], &key, &LockOptions::new()).await;
    let other = take_free(
        &c[0],
        &distlock_testkit::unique_key("killed-other"),
        &LockOptions::new(),
    )
    .await;
    let waiter = tokio::spawn({
        let (client, key) = (c[1].clone(), key.clone());
        async move {
            client
                .lock(&key, &LockOptions::new().wait(Duration::from_secs(20)))
                .await
        }
    });
    let old_session = c[0].session_id();
    c[0].kill_session().await.expect("kill the session");
    // Every lock of the session is lost at once.
    for guard in [&held, &other] {
        let reason = tokio::time::timeout(Duration::from_secs(1), guard.lost())
            .await
            .expect("lost() fired");
        assert!(matches!(reason, LostReason::SessionLost(_)), "{reason}");
        assert!(!guard.is_held());
    }
    let next = waiter.await.unwrap().expect("the waiter takes over");
    assert!(next.fencing_token() > held.fencing_token());
    assert!(held
        .extend(Duration::from_secs(1))
        .await
        .unwrap_err()
        .is_not_held());
    assert!(matches!(held.release().await, Err(Error::NotHeld { .. })));
    assert!(other.release().await.unwrap_err().is_not_held());

    // The client opens a new session for its next lock.
    assert!(c[0]
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert_ne!(c[0].session_id(), old_session);
    next.release().await.unwrap();
    let again = c[0]
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .expect("free again");
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_is_noticed_by_the_ownership_check() {
    let Some((c, admin, key, dir)) = clients_on_key(1, "deleted").await else {
        return;
    };
    let ttl = Duration::from_millis(300);
    let guard = take_free(&c[0], &key, &LockOptions::new().ttl(ttl)).await;
    let name = children(&admin, &dir).await.pop().unwrap();
    // An operator deletes the lock node.
    admin.delete(&format!("{dir}/{name}"), None).await.unwrap();
    let reason = tokio::time::timeout(ttl * 3, guard.lost())
        .await
        .expect("the renewal's ownership check noticed the deletion");
    assert_eq!(reason, LostReason::NotHeld);
    assert!(guard.release().await.unwrap_err().is_not_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_entry_point_connects_and_refuses_bad_urls() {
    if !distlock_testkit::service_ready("zookeeper", "127.0.0.1:2181").await {
        return;
    }
    let locks: Arc<dyn DistributedLock> =
        distlock_zookeeper::connect("zookeeper://127.0.0.1:2181/distlock-recipe-tests")
            .await
            .expect("connect");
    assert_eq!(locks.backend(), "zookeeper");
    let caps = locks.capabilities();
    assert!(caps.fair && caps.session_based && caps.strict_fencing && !caps.ttl_expiry);
    assert!(matches!(
        distlock_zookeeper::connect("zk://127.0.0.1:2181?session_ttl=forever").await,
        Err(Error::InvalidUrl { .. })
    ));
}

/// Waits until `dir` holds `n` nodes.
async fn queued(admin: &zk::Client, dir: &str, n: usize) {
    eventually(
        &format!("{n} nodes in {dir}"),
        Duration::from_secs(5),
        || async { children(admin, dir).await.len() == n },
    )
    .await;
}

/// True if `task` finishes within `within` (a bounded check that nothing
/// happens, as a grant would come right after the event that allowed it).
async fn finishes_within<T>(task: &mut tokio::task::JoinHandle<T>, within: Duration) -> bool {
    tokio::time::timeout(within, task).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_ahead_that_abandons_does_not_let_the_next_one_in() {
    let Some((c, admin, key, dir)) = clients_on_key(3, "abandoned-ahead").await else {
        return;
    };
    let options = LockOptions::new();
    let held = c[0].lock(&key, &options).await.unwrap();
    let middle = spawn_waiter(&c[1], &key, &options);
    queued(&admin, &dir, 2).await;
    let mut last = spawn_waiter(&c[2], &key, &options);
    queued(&admin, &dir, 3).await;

    // The middle waiter gives up: the last one's predecessor is deleted,
    // but it was waiting, not holding; the holder still holds.
    middle.abort();
    assert!(middle.await.unwrap_err().is_cancelled());
    queued(&admin, &dir, 2).await;
    assert!(
        !finishes_within(&mut last, Duration::from_millis(500)).await,
        "granted while the holder held"
    );
    assert!(held.is_held());

    let token = held.fencing_token();
    held.release().await.unwrap();
    let next = last.await.unwrap().expect("the last waiter takes over");
    assert!(next.fencing_token() > token);
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_node_is_deleted_is_never_granted() {
    let Some((c, admin, key, dir)) = clients_on_key(3, "deleted-waiter").await else {
        return;
    };
    let options = LockOptions::new();
    let held = c[0].lock(&key, &options).await.unwrap();
    let mut names = children(&admin, &dir).await;
    // The first waiter's predecessor is the holder: the holder's deletion
    // alone would grant it, so it must notice its own node going.
    let first_waiter = spawn_waiter(&c[1], &key, &options);
    queued(&admin, &dir, 2).await;
    let waiter_node = children(&admin, &dir)
        .await
        .into_iter()
        .find(|name| !names.contains(name))
        .unwrap();
    names.push(waiter_node.clone());
    let mut second_waiter = spawn_waiter(&c[2], &key, &options);
    queued(&admin, &dir, 3).await;

    // An operator deletes the first waiter's node.
    admin
        .delete(&format!("{dir}/{waiter_node}"), None)
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), first_waiter)
        .await
        .expect("the waiter noticed its node going")
        .unwrap()
        .expect_err("a waiter without a node must not be granted");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        chain = format!("{chain}: {cause}");
        source = cause.source();
    }
    assert!(chain.contains("disappeared"), "{chain}");
    // The second waiter now waits for the holder itself.
    assert!(
        !finishes_within(&mut second_waiter, Duration::from_millis(300)).await,
        "granted while the holder held"
    );
    held.release().await.unwrap();
    let next = second_waiter
        .await
        .unwrap()
        .expect("the second waiter takes over");
    assert_eq!(children(&admin, &dir).await.len(), 1);
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_dropped_at_the_handoff_leaves_one_owner_at_a_time() {
    let Some((c, admin)) = clients(3).await else {
        return;
    };
    let options = LockOptions::new();
    // The drop lands before, during or after the grant, depending on timing.
    for round in 0..10 {
        let key = distlock_testkit::unique_key(&format!("dropped-at-handoff-{round}"));
        let dir = c[0].lock_directory(&key);
        let held = c[0].lock(&key, &options).await.unwrap();
        let dropped = spawn_waiter(&c[1], &key, &options);
        queued(&admin, &dir, 2).await;
        let mut last = spawn_waiter(&c[2], &key, &options);
        queued(&admin, &dir, 3).await;

        let token = held.fencing_token();
        held.release().await.unwrap();
        dropped.abort();
        match dropped.await {
            // Granted before the abort: it owns the lock until it lets go.
            Ok(granted) => {
                let granted = granted.expect("granted");
                assert!(granted.fencing_token() > token);
                assert!(
                    !finishes_within(&mut last, Duration::from_millis(100)).await,
                    "two owners at once"
                );
                granted.release().await.unwrap();
            }
            Err(err) => assert!(err.is_cancelled()),
        }
        let next = tokio::time::timeout(Duration::from_secs(5), last)
            .await
            .expect("the last waiter is not stuck behind a dropped one")
            .unwrap()
            .expect("granted");
        assert!(next.fencing_token() > token);
        queued(&admin, &dir, 1).await;
        next.release().await.unwrap();
    }
}
