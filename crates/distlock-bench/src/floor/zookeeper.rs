//! The ZooKeeper floor: create ephemeral-sequential + getChildren +
//! delete; rtt = exists, write rtt = setData of a persistent node.

use async_trait::async_trait;
use distlock::BoxError;
use zookeeper_client as zk;

use super::{FloorInfo, RawClient};

pub(super) const INFO: FloorInfo = FloorInfo {
    cycle: "create ephemeral-sequential + getChildren + delete",
    round_trip: Some("exists (check_stat)"),
    write_round_trip: Some("setData (persistent node)"),
};

const ROOT: &str = "/distlock-bench-floor";

pub(super) struct ZkRaw {
    client: zk::Client,
    parent: String,
    prefix: String,
}

fn parent_of(key: &str) -> String {
    let name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{ROOT}/{name}")
}

async fn create_persistent(client: &zk::Client, path: &str) -> Result<(), BoxError> {
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    match client.create(path, b"", &options).await {
        Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
        Err(err) => Err(format!("create {path}: {err}").into()),
    }
}

impl ZkRaw {
    pub(super) async fn connect(hosts: &str, key: &str) -> Result<Self, BoxError> {
        let client = zk::Client::connect(hosts).await?;
        let parent = parent_of(key);
        create_persistent(&client, ROOT).await?;
        create_persistent(&client, &parent).await?;
        let prefix = format!("{parent}/n-");
        Ok(ZkRaw {
            client,
            parent,
            prefix,
        })
    }
}

#[async_trait]
impl RawClient for ZkRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let (_, sequence) = self.client.create(&self.prefix, b"", &options).await?;
        let path = format!("{}{sequence}", self.prefix);
        // A lock recipe reads the children to see whether its node is
        // the first; the floor does the same read.
        let (children, _) = self.client.get_children(&self.parent).await?;
        if children.len() != 1 {
            return Err(format!(
                "raw floor found {} nodes under {}",
                children.len(),
                self.parent
            )
            .into());
        }
        self.client.delete(&path, None).await?;
        Ok(())
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        self.client.check_stat(&self.parent).await?;
        Ok(true)
    }

    /// The per-key parent is a persistent node unique to the run,
    /// created by `connect` and deleted by `cleanup`: its data is the
    /// write's target (the cycle only touches its children).
    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        self.client.set_data(&self.parent, b"1", None).await?;
        Ok(true)
    }
}

/// Deletes the per-key parents (they are empty once their sessions'
/// ephemeral nodes are gone); the raw writes' target goes with them.
pub(super) async fn cleanup(hosts: &str, keys: &[String]) {
    let Ok(client) = zk::Client::connect(hosts).await else {
        return;
    };
    for key in keys {
        let _ = client.delete(&parent_of(key), None).await;
    }
}
