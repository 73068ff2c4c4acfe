//! Locks whose TTL differs from the session's live on a lease of their own
//! (shared etcd on 127.0.0.1:2379).

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_etcd::EtcdLock;

const ENDPOINT: &str = "127.0.0.1:2379";
const URL: &str = "etcd://127.0.0.1:2379/distlock-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_keeps_its_own_lease_alive_and_starts_its_ttl_when_granted() {
    if !distlock_testkit::service_ready("etcd", ENDPOINT).await {
        return;
    }
    let (a, b) = (
        EtcdLock::connect(URL).await.unwrap(),
        EtcdLock::connect(URL).await.unwrap(),
    );
    let key = distlock_testkit::unique_key("etcd-own-lease-wait");
    let guard = a
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    // 2 s TTL, no renewal: a lease of its own that must outlive the wait.
    let options = LockOptions::new()
        .ttl(Duration::from_secs(2))
        .auto_renew(false);
    let waiting = tokio::spawn({
        let (b, key, options) = (b.clone(), key.clone(), options.clone());
        async move { b.lock(&key, &options.wait(Duration::from_secs(20))).await }
    });
    // Twice the waiter's TTL: the passing of time is what is tested.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!waiting.is_finished());
    guard.release().await.unwrap();
    let next = waiting.await.unwrap().expect("waiter");
    let left = next.remaining().expect("a TTL lock has a deadline");
    assert!(
        left > Duration::from_millis(1500),
        "TTL not restarted at the grant: {left:?}"
    );
    // Without renewal it then expires on the server.
    let lost = tokio::time::timeout(Duration::from_secs(4), next.lost()).await;
    assert!(lost.is_ok(), "not lost after its TTL");
    let again = a
        .lock(&key, &LockOptions::new().wait(Duration::from_secs(5)))
        .await
        .expect("the expired lock was not freed");
    assert!(again.fencing_token() > next.fencing_token());
    again.release().await.unwrap();
}

/// In the mutex layout a lease has one key per lock: a second attempt of
/// one client on a lock that client holds queues on a lease of its own
/// (with the session's TTL), waits for the first, and goes back to the
/// session lease once the name is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_attempt_of_one_client_on_one_lock_queues_on_a_lease_of_its_own() {
    if !distlock_testkit::service_ready("etcd", ENDPOINT).await {
        return;
    }
    let locks = EtcdLock::connect(URL).await.unwrap();
    let mut raw = etcd_client::Client::connect([ENDPOINT], None)
        .await
        .unwrap();
    let key = distlock_testkit::unique_key("etcd-second-attempt");
    let prefix = locks.lock_key_prefix(&key);
    let session_key = format!("{prefix}{:x}", locks.session_lease_id());
    let leases = |raw: &mut etcd_client::Client| {
        let (mut raw, prefix) = (raw.clone(), prefix.clone());
        async move {
            let found = raw
                .get(
                    prefix,
                    Some(etcd_client::GetOptions::new().with_prefix().with_sort(
                        etcd_client::SortTarget::Create,
                        etcd_client::SortOrder::Ascend,
                    )),
                )
                .await
                .unwrap();
            found
                .kvs()
                .iter()
                .map(|kv| (kv.key_str().unwrap().to_owned(), kv.lease()))
                .collect::<Vec<_>>()
        }
    };
    let first = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert!(
        locks
            .try_lock(&key, &LockOptions::new())
            .await
            .unwrap()
            .is_none(),
        "the same client got the lock twice"
    );
    let waiting = tokio::spawn({
        let (locks, key) = (locks.clone(), key.clone());
        async move {
            locks
                .lock(&key, &LockOptions::new().wait(Duration::from_secs(20)))
                .await
        }
    });
    distlock_testkit::eventually("the second attempt queues", Duration::from_secs(5), || {
        let mut raw = raw.clone();
        let leases = &leases;
        async move { leases(&mut raw).await.len() == 2 }
    })
    .await;
    let queued = leases(&mut raw).await;
    assert_eq!(queued[0], (session_key.clone(), locks.session_lease_id()));
    let (second_key, second_lease) = queued[1].clone();
    assert_ne!(second_lease, locks.session_lease_id());
    assert_eq!(second_key, format!("{prefix}{second_lease:x}"));
    assert!(!waiting.is_finished());

    let token = first.fencing_token();
    first.release().await.unwrap();
    let second = waiting.await.unwrap().expect("the second attempt");
    assert!(second.fencing_token() > token);
    assert!(second.is_held());
    second.release().await.unwrap();
    assert!(leases(&mut raw).await.is_empty());
    // The session lease's name is free again.
    let again = locks
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        leases(&mut raw).await,
        [(session_key, locks.session_lease_id())]
    );
    again.release().await.unwrap();
}
