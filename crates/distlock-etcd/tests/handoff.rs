//! Handoff paths, on a private etcd whose request counters only these
//! clients move: a waiter behind the owner takes the lock on the owner's
//! delete event without another read; so does a waiter behind a waiter,
//! which reads while its predecessor holds; a waiter behind a waiter that
//! gave up reads again and keeps waiting for the owner.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use distlock_core::{DistributedLock, LockGuard, LockOptions};
use distlock_etcd::EtcdLock;
use distlock_testkit::servers::PrivateEtcd;
use etcd_client::GetOptions;
use support::{grown, EtcdTestExt};
use tokio::task::JoinHandle;

fn handled(counts: &HashMap<String, f64>, method: &str) -> f64 {
    counts
        .get(&format!("grpc_server_handled_total/{method}"))
        .copied()
        .unwrap_or(0.0)
}

/// Keys queued on the lock `key`, oldest first.
async fn queue(raw: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    let options = GetOptions::new().with_prefix().with_keys_only().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    raw.get(prefix, Some(options))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

/// Polls (a waiter has no outside event) until `len` keys are queued.
async fn queued(raw: &mut etcd_client::Client, prefix: &str, len: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for _ in 0..200 {
        keys = queue(raw, prefix).await;
        if keys.len() == len {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {len} queued keys, found {keys:?}");
}

/// Polls etcd's counters (a waiter has no outside event) until the
/// requests handled since `before` reach `want` for each method.
async fn handled_at_least(
    etcd: &PrivateEtcd,
    before: &HashMap<String, f64>,
    want: &[(&str, f64)],
) -> HashMap<String, f64> {
    let mut seen = HashMap::new();
    for _ in 0..300 {
        seen = grown(before, &etcd.grpc_counters().await);
        if want
            .iter()
            .all(|(method, count)| handled(&seen, method) >= *count)
        {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected at least {want:?} since, saw {seen:?}");
}

fn wait_in_queue(locks: &EtcdLock, key: &str) -> JoinHandle<distlock_core::Result<LockGuard>> {
    let (locks, key) = (locks.clone(), key.to_owned());
    tokio::spawn(async move {
        locks
            .lock(&key, &LockOptions::new().wait(Duration::from_secs(20)))
            .await
    })
}

/// A waiter on `key` spawned on `locks`, returned once etcd has handled its txn and its read.
async fn queued_waiter(
    etcd: &PrivateEtcd,
    locks: &EtcdLock,
    key: &str,
) -> JoinHandle<distlock_core::Result<LockGuard>> {
    let before = etcd.grpc_counters().await;
    let waiting = wait_in_queue(locks, key);
    handled_at_least(etcd, &before, &[("Txn", 1.0), ("Range", 1.0)]).await;
    waiting
}

/// The private etcd, a raw client of it, the key's queue prefix, the holder's guard and three clients.
type Setup = (
    PrivateEtcd,
    etcd_client::Client,
    String,
    LockGuard,
    Vec<EtcdLock>,
);

/// A private etcd with three clients, the first holding `key`.
async fn setup(key: &str) -> Option<Setup> {
    let etcd = PrivateEtcd::start().await?;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(EtcdLock::connect(&etcd.url("")).await.unwrap());
    }
    let raw = etcd.raw_client().await;
    let prefix = clients[0].lock_key_prefix(key);
    let holder = clients[0]
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    Some((etcd, raw, prefix, holder, clients))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiter_behind_the_owner_takes_the_lock_without_a_read() {
    let Some((etcd, mut raw, prefix, holder, clients)) = setup("behind-owner").await else {
        return;
    };
    // Queueing: its txn, its watch and one read.
    let waiting = queued_waiter(&etcd, &clients[1], "behind-owner").await;
    let token = holder.fencing_token();
    let before_handoff = etcd.grpc_counters().await;
    holder.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("handoff")
        .unwrap()
        .unwrap();
    let handoff = grown(&before_handoff, &etcd.grpc_counters().await);
    assert!(next.fencing_token() > token);
    assert!(next.is_held());
    // The holder's delete and nothing from the waiter.
    assert_eq!(handled(&handoff, "DeleteRange"), 1.0, "{handoff:?}");
    assert_eq!(handled(&handoff, "Range"), 0.0, "{handoff:?}");
    assert_eq!(handled(&handoff, "Txn"), 0.0, "{handoff:?}");
    // Its fencing token is the revision at which the lock became its: the
    // holder's delete, the last write on this private etcd.
    let mine = raw
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(mine.kvs().len(), 1);
    assert!((mine.kvs()[0].create_revision() as u64) < next.fencing_token());
    assert_eq!(
        mine.header().unwrap().revision() as u64,
        next.fencing_token()
    );
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_a_waiter_that_gave_up_keeps_waiting_for_the_owner() {
    let Some((etcd, mut raw, prefix, holder, clients)) = setup("behind-waiter").await else {
        return;
    };
    let first = queued_waiter(&etcd, &clients[1], "behind-waiter").await;
    // The second waiter queues: its txn, its watch and one read.
    let second = queued_waiter(&etcd, &clients[2], "behind-waiter").await;
    let keys = queue(&mut raw, &prefix).await;
    assert_eq!(keys.len(), 3, "{keys:?}");

    // The first waiter gives up: its key is deleted in the background.
    let gave_up = etcd.grpc_counters().await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // The first waiter's key is deleted; the second waiter sees that
    // delete, and as its predecessor was a waiter it reads again (finding
    // the holder), watches the holder and reads once more.
    let seen = handled_at_least(&etcd, &gave_up, &[("DeleteRange", 1.0), ("Range", 2.0)]).await;
    assert_eq!(handled(&seen, "DeleteRange"), 1.0, "{seen:?}");
    assert_eq!(handled(&seen, "Range"), 2.0, "{seen:?}");
    assert_eq!(
        seen.get("grpc_server_started_total/Watch"),
        Some(&1.0),
        "{seen:?}"
    );
    assert!(!second.is_finished(), "granted while the owner holds");
    assert!(holder.is_held());
    let left = queue(&mut raw, &prefix).await;
    assert_eq!(left, vec![keys[0].clone(), keys[2].clone()]);

    let token = holder.fencing_token();
    let before_handoff = etcd.grpc_counters().await;
    holder.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("handoff")
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > token);
    // Now behind the owner (as its last read showed): no read at handoff.
    let handoff = grown(&before_handoff, &etcd.grpc_counters().await);
    assert_eq!(handled(&handoff, "Range"), 0.0, "{handoff:?}");
    next.release().await.unwrap();
    assert!(queue(&mut raw, &prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_dropped_at_the_moment_of_handoff_passes_the_lock_on() {
    let Some((_etcd, mut raw, prefix, holder, clients)) = setup("dropped-at-handoff").await else {
        return;
    };
    let mut holder = holder;
    // Vary where the drop lands: before, during and after the grant.
    for round in 0..6 {
        let first = wait_in_queue(&clients[1], "dropped-at-handoff");
        queued(&mut raw, &prefix, 2).await;
        let second = wait_in_queue(&clients[2], "dropped-at-handoff");
        queued(&mut raw, &prefix, 3).await;
        let token = holder.fencing_token();
        let release = tokio::spawn(holder.release());
        for _ in 0..round * 20 {
            tokio::task::yield_now().await;
        }
        first.abort();
        release.await.unwrap().unwrap();
        // Granted or not, the first waiter's key goes away and the second
        // gets the lock.
        let next = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap_or_else(|_| panic!("round {round}: no handoff"))
            .unwrap()
            .unwrap();
        assert!(next.fencing_token() > token);
        assert!(next.is_held());
        let keys = queued(&mut raw, &prefix, 1).await;
        // Granted after its key was created, at a revision etcd has seen.
        let mine = raw.get(keys[0].as_str(), None).await.unwrap();
        assert!((mine.kvs()[0].create_revision() as u64) < next.fencing_token());
        assert!(next.fencing_token() <= mine.header().unwrap().revision() as u64);
        holder = next;
    }
    holder.release().await.unwrap();
    assert!(queue(&mut raw, &prefix).await.is_empty());
}

/// Two waiters queue behind the owner. The first takes the lock on the
/// owner's delete event; the second, which also watched the owner, reads
/// once while the first holds and then, on the first's release, takes the
/// lock on the event alone: no read after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_a_waiter_takes_the_lock_without_a_read_after_the_release() {
    let Some((etcd, mut raw, prefix, holder, clients)) = setup("behind-waiter").await else {
        return;
    };
    let first = queued_waiter(&etcd, &clients[1], "behind-waiter").await;
    // Queueing behind a waiter: its txn, two watches, one read.
    let second = queued_waiter(&etcd, &clients[2], "behind-waiter").await;
    assert_eq!(queue(&mut raw, &prefix).await.len(), 3);

    let before_first = etcd.grpc_counters().await;
    holder.release().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("first handoff")
        .unwrap()
        .unwrap();
    // The second waiter's one read, made while the first holds.
    handled_at_least(
        &etcd,
        &before_first,
        &[("DeleteRange", 1.0), ("Range", 1.0)],
    )
    .await;
    let before_second = etcd.grpc_counters().await;
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("second handoff")
        .unwrap()
        .unwrap();
    let handoff = grown(&before_second, &etcd.grpc_counters().await);
    assert!(second.is_held());
    assert!(second.fencing_token() > first_token);
    assert_eq!(handled(&handoff, "DeleteRange"), 1.0, "{handoff:?}");
    assert_eq!(handled(&handoff, "Range"), 0.0, "{handoff:?}");
    assert_eq!(handled(&handoff, "Txn"), 0.0, "{handoff:?}");
    second.release().await.unwrap();
}
