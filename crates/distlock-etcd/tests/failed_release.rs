//! A release (or an abandoned attempt's cleanup) that fails during a fault
//! is retried in the background, on a private etcd: issue 12's fault run
//! saw a failed release leave its key on the holder's healthy session
//! lease, with nobody granted the lock for 14 s, and another until the end
//! of the run.

mod support;

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_etcd::EtcdLock;
use distlock_testkit::servers::PrivateEtcd;
use support::EtcdTestExt;

/// How long the waiter may take to be granted once the server is back:
/// the background retry backs off to 2 s at most; without it, the waiter
/// waits its whole minute.
const GRANTED_WITHIN: Duration = Duration::from_secs(10);

use distlock_testkit::eventually;

/// The number of keys under `prefix`.
async fn count(raw: &etcd_client::Client, prefix: &str) -> usize {
    let mut raw = raw.clone();
    let listing = raw
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    listing.kvs().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_cut_off_by_a_paused_server_is_retried_and_the_waiter_granted() {
    let Some(mut etcd) = PrivateEtcd::start().await else {
        return;
    };
    // Sessions that outlive a pause and a restart of a few seconds;
    // requests bounded by 1 s.
    let url = etcd.url("session_ttl=20s&timeout=1s");
    let a = EtcdLock::connect(&url).await.unwrap();
    let b = EtcdLock::connect(&url).await.unwrap();
    let key = "release-cut-off";
    let prefix = a.lock_key_prefix(key);
    let raw = etcd.raw_client().await;
    let options = LockOptions::new().ttl(Duration::from_secs(20));
    let held = a.try_lock(key, &options).await.unwrap().expect("free");
    let waiter = tokio::spawn({
        let (b, options) = (b.clone(), options.clone());
        async move { b.lock(key, &options.wait(Duration::from_secs(60))).await }
    });
    eventually("the waiter queued", Duration::from_secs(10), || async {
        count(&raw, &prefix).await == 2
    })
    .await;
    drop(raw);

    // The release's delete gets no answer within the timeout.
    etcd.pause();
    let err = held
        .release()
        .await
        .expect_err("a release with the server paused failed");
    eprintln!("the release failed: {err:?}");
    assert!(!err.is_not_held(), "{err}");
    // A paused server that resumes may still read and apply the delete
    // left in its socket; one that went down never does. The leases
    // survive the restart (etcd keeps them on disk and renews them).
    etcd.kill_paused();
    etcd.start_again().await;

    // The holder's session lease is kept alive; only the retry deletes
    // its key.
    let granted = tokio::time::timeout(GRANTED_WITHIN, waiter)
        .await
        .unwrap_or_else(|_| {
            panic!("the waiter was not granted within {GRANTED_WITHIN:?} of the server's return")
        })
        .unwrap()
        .expect("the waiter's lock");
    assert!(granted.is_held());
    granted.release().await.unwrap();
    let again = a
        .try_lock(key, &options)
        .await
        .unwrap()
        .expect("free after both releases");
    again.release().await.unwrap();
}

/// A waiter dropped while its user may not write the lock's keys (an
/// operator changed its role: a failure that lasts until someone fixes it,
/// with no timing to it): its cleanup is refused, and retried until it
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cleanup_of_an_abandoned_attempt_is_retried() {
    let Some(etcd) = PrivateEtcd::start().await else {
        return;
    };
    let mut setup = etcd.raw_client().await;
    setup.user_add("root", "root-pw", None).await.unwrap();
    setup.user_grant_role("root", "root").await.unwrap();
    setup.role_add("locker").await.unwrap();
    let locks_range = || etcd_client::Permission::read_write("distlock-test/").with_prefix();
    setup
        .role_grant_permission("locker", locks_range())
        .await
        .unwrap();
    setup.user_add("c", "c-pw", None).await.unwrap();
    setup.user_grant_role("c", "locker").await.unwrap();
    setup.auth_enable().await.unwrap();
    let mut root = etcd_client::Client::connect(
        [etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_user("root", "root-pw")),
    )
    .await
    .unwrap();

    let a = EtcdLock::connect(&format!(
        "etcd://root:root-pw@{}/distlock-test",
        etcd.endpoint()
    ))
    .await
    .unwrap();
    let c = EtcdLock::connect(&format!("etcd://c:c-pw@{}/distlock-test", etcd.endpoint()))
        .await
        .unwrap();
    let key = "cleanup-refused";
    let prefix = a.lock_key_prefix(key);
    let options = LockOptions::new();
    let held = a.try_lock(key, &options).await.unwrap().expect("free");
    let waiter = tokio::spawn({
        let (c, options) = (c.clone(), options.clone());
        async move { c.lock(key, &options.wait(Duration::from_secs(60))).await }
    });
    eventually("the waiter queued", Duration::from_secs(10), || async {
        count(&root, &prefix).await == 2
    })
    .await;

    // The waiter may read but no longer write; then it is dropped, and
    // its cleanup's delete is refused (etcd counts the request).
    let read_only = etcd_client::Permission::read("distlock-test/").with_prefix();
    root.role_grant_permission("locker", read_only)
        .await
        .unwrap();
    let deletes = |counters: &std::collections::HashMap<String, f64>| {
        counters
            .get("grpc_server_handled_total/DeleteRange")
            .copied()
            .unwrap_or(0.0)
    };
    let deletes_before = deletes(&etcd.grpc_counters().await);
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    eventually(
        "the cleanup's delete was refused",
        Duration::from_secs(10),
        || async { deletes(&etcd.grpc_counters().await) > deletes_before },
    )
    .await;
    assert_eq!(
        count(&root, &prefix).await,
        2,
        "a refused delete removed the key"
    );

    root.role_grant_permission("locker", locks_range())
        .await
        .unwrap();
    eventually(
        "the abandoned key is removed once etcd allows it",
        GRANTED_WITHIN,
        || async { count(&root, &prefix).await == 1 },
    )
    .await;
    held.release().await.unwrap();
    let next = c
        .try_lock(key, &options)
        .await
        .unwrap()
        .expect("free after the release");
    next.release().await.unwrap();
}
