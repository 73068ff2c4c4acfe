//! Abandoned attempts leave no key: the queue of a lock is listed on the
//! shared etcd after timed-out, aborted and busy attempts.

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_etcd::EtcdLock;
use etcd_client::{EventType, GetOptions, WatchOptions};

const ENDPOINT: &str = "127.0.0.1:2379";
const URL: &str = "etcd://127.0.0.1:2379/distlock-test";

async fn list(client: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    let keys = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("list");
    keys.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_attempts_leave_no_key() {
    if !distlock_testkit::service_ready("etcd", ENDPOINT).await {
        return;
    }
    let (a, b, c, d) = (
        EtcdLock::connect(URL).await.unwrap(),
        EtcdLock::connect(URL).await.unwrap(),
        EtcdLock::connect(URL).await.unwrap(),
        EtcdLock::connect(URL).await.unwrap(),
    );
    let key = distlock_testkit::unique_key("etcd-cleanup");
    let prefix = a.lock_key_prefix(&key);
    let mut raw = etcd_client::Client::connect([ENDPOINT], None)
        .await
        .unwrap();
    let holder = a
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let held = list(&mut raw, &prefix).await;
    assert_eq!(held.len(), 1, "{held:?}");

    // Every key that gets queued and then deleted shows on this watch.
    let mut watch = raw
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let created = watch.message().await.unwrap().expect("watch created");
    assert!(created.created());

    // A `lock` that times out.
    let err = b
        .lock(&key, &LockOptions::new().wait(Duration::from_millis(300)))
        .await
        .expect_err("held");
    assert!(err.is_timeout(), "{err}");
    // A `lock` whose task is aborted once it is queued.
    let task = tokio::spawn({
        let (c, key) = (c.clone(), key.clone());
        async move {
            c.lock(&key, &LockOptions::new())
                .await
                .map(|g| g.fencing_token())
        }
    });
    // `try_lock`s that find the lock busy, on the session lease and on a
    // lease of their own (another TTL).
    assert!(d
        .try_lock(&key, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let own_ttl = LockOptions::new().ttl(Duration::from_secs(7));
    assert!(d.try_lock(&key, &own_ttl).await.unwrap().is_none());

    // Four keys were queued and must all be deleted; the aborted task's
    // key is the one we wait for before aborting.
    let (mut puts, mut deletes) = (0, 0);
    let mut aborted = false;
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        while deletes < 4 {
            let response = watch.message().await.unwrap().expect("watch ended");
            for event in response.events() {
                match event.event_type() {
                    EventType::Put => puts += 1,
                    EventType::Delete => deletes += 1,
                }
            }
            if puts == 4 && !aborted {
                task.abort();
                aborted = true;
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "abandoned keys not deleted: {} puts, {} deletes, listing {:?}",
        puts,
        deletes,
        list(&mut raw, &prefix).await
    );
    assert_eq!(puts, 4);
    assert_eq!(
        list(&mut raw, &prefix).await,
        held,
        "only the holder's key is left"
    );
    holder.release().await.unwrap();
    assert!(
        list(&mut raw, &prefix).await.is_empty(),
        "release left a key"
    );
}

/// Every distinct key name stays in etcd's index until a compaction and
/// each acquire's range walks them: a client reuses the name of a key
/// whose deletion etcd confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reuses_the_names_of_its_deleted_keys() {
    if !distlock_testkit::service_ready("etcd", ENDPOINT).await {
        return;
    }
    let (a, b) = (
        EtcdLock::connect(URL).await.unwrap(),
        EtcdLock::connect(URL).await.unwrap(),
    );
    let key = distlock_testkit::unique_key("etcd-reuse");
    let prefix = a.lock_key_prefix(&key);
    let mut raw = etcd_client::Client::connect([ENDPOINT], None)
        .await
        .unwrap();
    let options = LockOptions::new();
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let guard = a.try_lock(&key, &options).await.unwrap().unwrap();
        names.extend(list(&mut raw, &prefix).await);
        guard.release().await.unwrap();
    }
    assert_eq!(names.len(), 1, "{names:?}");
    // A busy try_lock removes its key and gives its name back too.
    let held = b.try_lock(&key, &options).await.unwrap().unwrap();
    assert!(a.try_lock(&key, &options).await.unwrap().is_none());
    held.release().await.unwrap();
    let guard = a.try_lock(&key, &options).await.unwrap().unwrap();
    assert_eq!(list(&mut raw, &prefix).await, Vec::from_iter(names));
    guard.release().await.unwrap();
    assert!(list(&mut raw, &prefix).await.is_empty());
}
