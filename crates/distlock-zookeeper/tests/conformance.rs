//! The whole conformance suite against the shared ZooKeeper on
//! 127.0.0.1:2181. The fault hook deletes the holder's node from another
//! session; session expiry is tested in `recipe.rs` and `faults.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock_testkit::Harness;
use distlock_zookeeper::ZooKeeperLock;
use zookeeper_client as zk;

const URL: &str = "zk://127.0.0.1:2181/distlock-conformance?session_ttl=10s";

async fn harness() -> Option<Harness> {
    if !distlock_testkit::service_ready("zookeeper", "127.0.0.1:2181").await {
        return None;
    }
    let clients: Arc<Mutex<Vec<ZooKeeperLock>>> = Arc::default();
    let registry = clients.clone();
    let probed = clients.clone();
    Some(
        Harness::new("zookeeper", move || {
            let registry = registry.clone();
            async move {
                let client = ZooKeeperLock::connect(URL).await?;
                registry.lock().unwrap().push(client.clone());
                Ok(Arc::new(client) as _)
            }
        })
        .with_fault(move |key| {
            let clients = clients.clone();
            async move { delete_holder_node(&clients, &key).await }
        })
        .with_queue_probe(move |key| {
            let clients = probed.clone();
            async move { waiting_nodes(&clients, &key).await }
        })
        .with_short_ttl(Duration::from_millis(600)),
    )
}

/// Deletes the holder's node (the first in `key`'s directory) from an
/// admin session, as an operator or a stray cleanup job would. The holder
/// notices at its next ownership check (ttl / 3). Session expiry, the
/// other way to lose a ZooKeeper lock, has its own tests in `recipe.rs`
/// and `faults.rs`; it is not used here because ending another client's
/// session from outside takes a variable number of reconnections.
async fn delete_holder_node(clients: &Mutex<Vec<ZooKeeperLock>>, key: &str) {
    let any = clients.lock().unwrap()[0].clone();
    let dir = any.lock_directory(key);
    let admin = zk::Client::connect("127.0.0.1:2181")
        .await
        .expect("admin session");
    let mut children = admin
        .list_children(&dir)
        .await
        .expect("list lock directory");
    children.sort_by_key(|name| name.rsplit_once("lock-").map(|(_, seq)| seq.to_owned()));
    let first = children.first().expect("no lock node to take away");
    admin
        .delete(&format!("{dir}/{first}"), None)
        .await
        .expect("delete the holder's node");
}

/// The nodes in `key`'s directory behind the holder's: its waiters.
async fn waiting_nodes(clients: &Mutex<Vec<ZooKeeperLock>>, key: &str) -> usize {
    let dir = clients.lock().unwrap()[0].lock_directory(key);
    let admin = zk::Client::connect("127.0.0.1:2181")
        .await
        .expect("admin session");
    let children = admin
        .list_children(&dir)
        .await
        .expect("list lock directory");
    children.len().saturating_sub(1)
}

mod zookeeper {
    use super::harness;
    distlock_testkit::conformance_tests!(harness());
}
