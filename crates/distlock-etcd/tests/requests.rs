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

/// Renewed locks whose TTL is not the session's share one lease per TTL:
/// the first costs a lease grant more, the next ones nothing more, and a
/// release is one delete (no revoke).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_with_their_own_ttl_share_one_lease_per_ttl() {
    let Some((etcd, locks)) = warmed_up_client().await else {
        return;
    };
    // 60 s is not the session's 30 s; its keep-alive (every 20 s) falls
    // outside this test.
    let options = LockOptions::new().ttl(Duration::from_secs(60));
    let txn = [
        ("grpc_server_started_total/Txn", 1.0),
        ("grpc_server_handled_total/Txn", 1.0),
        ("grpc_server_msg_received_total/Txn", 1.0),
    ];
    let delete = counts(&[
        ("grpc_server_started_total/DeleteRange", 1.0),
        ("grpc_server_handled_total/DeleteRange", 1.0),
        ("grpc_server_msg_received_total/DeleteRange", 1.0),
    ]);

    let before = etcd.grpc_counters().await;
    let guard = locks.try_lock("own-ttl", &options).await.unwrap().unwrap();
    let acquired = etcd.grpc_counters().await;
    let mut first = vec![
        ("grpc_server_started_total/LeaseGrant", 1.0),
        ("grpc_server_handled_total/LeaseGrant", 1.0),
        ("grpc_server_msg_received_total/LeaseGrant", 1.0),
    ];
    first.extend(txn);
    assert_eq!(
        grown(&before, &acquired),
        counts(&first),
        "a lease grant for the TTL, then the one txn"
    );
    guard.release().await.unwrap();
    // A scrape is not atomic: poll until the whole delete is in, then
    // check nothing else came.
    let released = poll_until(&etcd, &acquired, &delete).await;
    assert_eq!(grown(&acquired, &released), delete, "one delete, no revoke");

    let second = locks.try_lock("own-ttl", &options).await.unwrap().unwrap();
    let acquired = etcd.grpc_counters().await;
    assert_eq!(
        grown(&released, &acquired),
        counts(&txn),
        "the TTL's lease is there: the one txn"
    );
    second.release().await.unwrap();
}

type Counters = std::collections::HashMap<String, f64>;

/// The counters once every one of `expected` grew since `since`.
async fn poll_until(etcd: &PrivateEtcd, since: &Counters, expected: &Counters) -> Counters {
    let mut now = etcd.grpc_counters().await;
    for _ in 0..100 {
        let grown = grown(since, &now);
        if expected
            .keys()
            .all(|counter| grown.get(counter).is_some_and(|&value| value >= 1.0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = etcd.grpc_counters().await;
    }
    now
}

/// Held locks cost no request: once held for a third of the session TTL,
/// each session-bound key is watched on the client's one watch stream
/// (no read per lock every `ttl / 3`), and a key deleted behind the
/// holder's back fires `lost()` at once; one deleted before its watch was
/// created is found by the watch's replay from the key's creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_locks_cost_no_request_and_a_deleted_key_fires_lost() {
    const LOCKS: usize = 20;
    let Some(etcd) = PrivateEtcd::start().await else {
        return;
    };
    // Watches are set 1 s after each grant; keep-alives go every second.
    let locks = EtcdLock::connect(&etcd.url("session_ttl=3s"))
        .await
        .unwrap();
    let options = LockOptions::new().ttl(Duration::from_secs(3));
    let mut guards = Vec::new();
    for i in 0..LOCKS {
        guards.push(
            locks
                .try_lock(&format!("held/{i}"), &options)
                .await
                .unwrap()
                .expect("free"),
        );
    }
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    // Deleted before its watch exists.
    let early = locks
        .try_lock("held/early", &options)
        .await
        .unwrap()
        .unwrap();
    admin
        .delete(
            locks.lock_key_prefix("held/early"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(4), early.lost())
        .await
        .expect("lost() fired through the watch's replay");
    assert_eq!(reason, distlock_core::LostReason::NotHeld);

    // Every watch is created by now (1 s after the last grant).
    let before = etcd.grpc_counters().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = etcd.grpc_counters().await;
    let grown = grown(&before, &after);
    let received = |method: &str| {
        grown
            .get(&format!("grpc_server_msg_received_total/{method}"))
            .copied()
            .unwrap_or(0.0)
    };
    // Only the session's keep-alives (about one a second); 20 locks read
    // back every second would be 50 ranges.
    assert_eq!(received("Range"), 0.0, "{grown:?}");
    assert_eq!(received("Watch"), 0.0, "{grown:?}");
    assert!(received("LeaseKeepAlive") <= 4.0, "{grown:?}");
    assert!(guards.iter().all(|guard| guard.is_held()));

    admin
        .delete(
            locks.lock_key_prefix("held/3"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(2), guards[3].lost())
        .await
        .expect("lost() fired at once");
    assert_eq!(reason, distlock_core::LostReason::NotHeld);
    assert_eq!(
        guards.iter().filter(|guard| guard.is_held()).count(),
        LOCKS - 1
    );
    for guard in guards.into_iter().filter(|guard| guard.is_held()) {
        guard.release().await.unwrap();
    }
}
