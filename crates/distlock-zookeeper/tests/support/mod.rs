//! Helpers of the ZooKeeper tests: waiting for server-side state, and a
//! waiter in the background. The private servers come from
//! `distlock_testkit::servers`.

#![allow(dead_code)]

use distlock_core::{DistributedLock, LockGuard, LockOptions};
use distlock_zookeeper::ZooKeeperLock;
use tokio::task::JoinHandle;

pub use distlock_testkit::eventually;

/// Spawns `client` waiting in `lock` on `key` with `options`.
pub fn spawn_waiter(
    client: &ZooKeeperLock,
    key: &str,
    options: &LockOptions,
) -> JoinHandle<distlock_core::Result<LockGuard>> {
    let (client, key, options) = (client.clone(), key.to_owned(), options.clone());
    tokio::spawn(async move { client.lock(&key, &options).await })
}
