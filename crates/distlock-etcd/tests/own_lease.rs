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
