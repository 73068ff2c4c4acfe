//! Helpers of the ZooKeeper tests: waiting for server-side state, and a
//! waiter in the background. The private servers come from
//! `distlock_testkit::servers`.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use distlock_core::{DistributedLock, LockGuard, LockOptions};
use distlock_zookeeper::ZooKeeperLock;
use tokio::task::JoinHandle;

/// Polls `condition` every 20 ms until it holds or `within` passes: for
/// server-side state that has no event to await (a node deleted in the
/// background, a watch registered).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns `client` waiting in `lock` on `key` with `options`.
pub fn spawn_waiter(
    client: &ZooKeeperLock,
    key: &str,
    options: &LockOptions,
) -> JoinHandle<distlock_core::Result<LockGuard>> {
    let (client, key, options) = (client.clone(), key.to_owned(), options.clone());
    tokio::spawn(async move { client.lock(&key, &options).await })
}
