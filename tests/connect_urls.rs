//! The facade reaches every backend by URL: connect, lock, see it held
//! from a second client, release. The backends' own suites test the
//! contract in depth; this proves the configuration path users take.
//! Each backend's test needs its cargo feature (CI runs `--all-features`).

use std::time::Duration;

use distlock::LockOptions;

async fn lock_round_trip(url: &str) {
    let first = distlock::connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect {url}: {err}"));
    let second = distlock::connect(url).await.expect("second client");
    let key = distlock_testkit::unique_key("connect-url");
    let options = LockOptions::new().wait(Duration::from_secs(5));
    let guard = first.lock(&key, &options).await.expect("lock");
    assert!(
        second
            .try_lock(&key, &options)
            .await
            .expect("try_lock")
            .is_none(),
        "{url}: not exclusive"
    );
    let token = guard.fencing_token();
    guard.release().await.expect("release");
    let again = second
        .lock(&key, &options)
        .await
        .expect("lock after release");
    assert!(
        again.fencing_token() > token,
        "{url}: fencing token did not grow"
    );
    again.release().await.expect("release");
}

#[tokio::test]
async fn memory_url() {
    lock_round_trip("memory://connect-urls").await;
}

#[cfg(feature = "file")]
#[tokio::test]
async fn file_url() {
    let dir = std::env::temp_dir().join(format!("distlock-connect-urls-{}", std::process::id()));
    lock_round_trip(&format!("file://{}", dir.display())).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_url() {
    if distlock_testkit::service_ready("redis", "127.0.0.1:6379").await {
        lock_round_trip("redis://127.0.0.1:6379").await;
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redlock_url() {
    if distlock_testkit::service_ready("redis", "127.0.0.1:6380").await {
        lock_round_trip("redlock://127.0.0.1:6380,127.0.0.1:6381,127.0.0.1:6382").await;
    }
}

#[cfg(feature = "zookeeper")]
#[tokio::test]
async fn zookeeper_url() {
    if distlock_testkit::service_ready("zookeeper", "127.0.0.1:2181").await {
        lock_round_trip("zk://127.0.0.1:2181/distlock-connect-urls").await;
    }
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_url() {
    if distlock_testkit::service_ready("etcd", "127.0.0.1:2379").await {
        lock_round_trip("etcd://127.0.0.1:2379/distlock-connect-urls").await;
    }
}
