//! The whole conformance suite against the shared ZooKeeper on
//! 127.0.0.1:2181. The fault hook ends the holder's session on the server
//! (the way an expiry does), which is the fault a ZooKeeper lock exists to
//! survive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dlock_testkit::Harness;
use dlock_zookeeper::ZooKeeperLock;
use zookeeper_client as zk;

const URL: &str = "zk://127.0.0.1:2181/dlock-conformance?session_timeout=10s";

async fn harness() -> Option<Harness> {
    if !dlock_testkit::service_ready("zookeeper", "127.0.0.1:2181").await {
        return None;
    }
    let clients: Arc<Mutex<Vec<ZooKeeperLock>>> = Arc::default();
    let registry = clients.clone();
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
            async move { expire_holder(&clients, &key).await }
        })
        .with_short_ttl(Duration::from_millis(600)),
    )
}

/// Finds the session that owns the first node in `key`'s directory and
/// ends it on the server.
async fn expire_holder(clients: &Mutex<Vec<ZooKeeperLock>>, key: &str) {
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
    let (_, stat) = admin
        .get_data(&format!("{dir}/{first}"))
        .await
        .expect("holder node");
    let holder = clients
        .lock()
        .unwrap()
        .iter()
        .find(|client| client.session_id() == stat.ephemeral_owner)
        .cloned()
        .expect("the holder is one of the harness's clients");
    holder
        .kill_session()
        .await
        .expect("kill the holder's session");
}

mod zookeeper {
    use super::harness;
    dlock_testkit::conformance_tests!(harness());
}
