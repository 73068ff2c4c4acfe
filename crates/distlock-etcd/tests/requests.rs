//! Round trips counted by etcd itself (its `/metrics` gRPC counters) on a
//! private etcd: nothing else talks to it.

mod support;

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_etcd::EtcdLock;
use distlock_testkit::servers::PrivateEtcd;
use support::{grown, EtcdTestExt};

fn counts(pairs: &[(&str, f64)]) -> std::collections::HashMap<String, f64> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), *value))
        .collect()
}

/// A private etcd and a client of it that has taken and released one lock, so its connection is open.
async fn warmed_up_client() -> Option<(PrivateEtcd, EtcdLock)> {
    let etcd = PrivateEtcd::start().await?;
    let locks = EtcdLock::connect(&etcd.url("")).await.unwrap();
    // Warm up: the first request may open the connection.
    locks
        .try_lock("warm-up", &LockOptions::new())
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    Some((etcd, locks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_try_lock_and_release_are_two_round_trips() {
    let Some((etcd, locks)) = warmed_up_client().await else {
        return;
    };
    let options = LockOptions::new();

    let before = etcd.grpc_counters().await;
    let guard = locks
        .try_lock("uncontended", &options)
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
    let after = etcd.grpc_counters().await;
    assert_eq!(
        grown(&before, &after),
        counts(&[
            ("grpc_server_started_total/Txn", 1.0),
            ("grpc_server_handled_total/Txn", 1.0),
            ("grpc_server_msg_received_total/Txn", 1.0),
            ("grpc_server_started_total/DeleteRange", 1.0),
            ("grpc_server_handled_total/DeleteRange", 1.0),
            ("grpc_server_msg_received_total/DeleteRange", 1.0),
        ]),
        "one txn to acquire, one delete to release, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_makes_no_requests_while_its_predecessor_holds() {
    let Some(etcd) = PrivateEtcd::start().await else {
        return;
    };
    let holder = EtcdLock::connect(&etcd.url("")).await.unwrap();
    let waiter = EtcdLock::connect(&etcd.url("")).await.unwrap();
    let guard = holder
        .try_lock("contended", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();

    let before_queue = etcd.grpc_counters().await;
    let waiting = tokio::spawn(async move {
        let guard = waiter.lock("contended", &LockOptions::new()).await.unwrap();
        let token = guard.fencing_token();
        guard.release().await.unwrap();
        token
    });
    // The waiter queues with one txn, opens one watch stream (two create
    // requests: the second watcher covers etcd's registration race) and
    // reads its position once; wait (polling etcd's counters: the waiter has no
    // outside event) until that read is done.
    let queued = counts(&[
        ("grpc_server_started_total/Txn", 1.0),
        ("grpc_server_handled_total/Txn", 1.0),
        ("grpc_server_msg_received_total/Txn", 1.0),
        ("grpc_server_started_total/Watch", 1.0),
        ("grpc_server_msg_received_total/Watch", 2.0),
        ("grpc_server_started_total/Range", 1.0),
        ("grpc_server_handled_total/Range", 1.0),
        ("grpc_server_msg_received_total/Range", 1.0),
    ]);
    let mut seen = Default::default();
    for _ in 0..100 {
        seen = grown(&before_queue, &etcd.grpc_counters().await);
        if seen == queued {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen, queued,
        "queueing is one txn, one watch stream, one read"
    );

    // The passing of time with nothing sent is what is tested here.
    let before_idle = etcd.grpc_counters().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_idle = etcd.grpc_counters().await;
    assert_eq!(
        grown(&before_idle, &after_idle),
        counts(&[]),
        "the waiter polled"
    );

    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let waiter_token = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("handoff")
        .unwrap();
    assert!(waiter_token > token);
    let after_handoff = etcd.grpc_counters().await;
    // Handoff: the holder's delete, then the waiter's own release; the
    // waiter was behind the owner, so the delete event alone grants it the
    // lock (no read); its watch stream ended.
    let handoff = grown(&after_idle, &after_handoff);
    assert_eq!(
        handoff.get("grpc_server_handled_total/DeleteRange"),
        Some(&2.0),
        "{handoff:?}"
    );
    assert_eq!(
        handoff.get("grpc_server_handled_total/Range"),
        None,
        "{handoff:?}"
    );
    assert_eq!(
        handoff.get("grpc_server_handled_total/Txn"),
        None,
        "{handoff:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_with_its_own_ttl_costs_one_lease_grant_more() {
    let Some((etcd, locks)) = warmed_up_client().await else {
        return;
    };
    // 7 s is not the session's 30 s: the lock gets a lease of its own.
    let options = LockOptions::new().ttl(Duration::from_secs(7));

    let before = etcd.grpc_counters().await;
    let guard = locks.try_lock("own-ttl", &options).await.unwrap().unwrap();
    let acquired = etcd.grpc_counters().await;
    assert_eq!(
        grown(&before, &acquired),
        counts(&[
            ("grpc_server_started_total/LeaseGrant", 1.0),
            ("grpc_server_handled_total/LeaseGrant", 1.0),
            ("grpc_server_msg_received_total/LeaseGrant", 1.0),
            ("grpc_server_started_total/Txn", 1.0),
            ("grpc_server_handled_total/Txn", 1.0),
            ("grpc_server_msg_received_total/Txn", 1.0),
        ]),
        "a lease grant, then the one txn"
    );
    guard.release().await.unwrap();
    // The release is one delete; the unused lease is revoked in the
    // background (polled: nothing outside can await it). A scrape is not
    // atomic (one once showed the revoke handled but not yet started), so
    // poll until the whole picture is in, then check nothing else came.
    let expected = counts(&[
        ("grpc_server_started_total/DeleteRange", 1.0),
        ("grpc_server_handled_total/DeleteRange", 1.0),
        ("grpc_server_msg_received_total/DeleteRange", 1.0),
        ("grpc_server_started_total/LeaseRevoke", 1.0),
        ("grpc_server_handled_total/LeaseRevoke", 1.0),
        ("grpc_server_msg_received_total/LeaseRevoke", 1.0),
    ]);
    let mut released = Default::default();
    for _ in 0..100 {
        released = grown(&acquired, &etcd.grpc_counters().await);
        if expected
            .keys()
            .all(|counter| released.get(counter).is_some_and(|&value| value >= 1.0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(released, expected);
}
