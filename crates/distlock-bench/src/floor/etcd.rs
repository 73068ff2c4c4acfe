//! The etcd floor: txn(create_revision == 0 -> put with a lease granted
//! once per client) + delete; rtt = a one-key range, write rtt = a one-key
//! put.

use async_trait::async_trait;
use distlock::BoxError;
use etcd_client as etcd;

use super::{FloorInfo, RawClient};

pub(super) const INFO: FloorInfo = FloorInfo {
    cycle: "txn(create_revision == 0 -> put with lease) + delete",
    round_trip: Some("range (get one key)"),
    write_round_trip: Some("put (one key, no lease)"),
};

pub(super) struct EtcdRaw {
    client: etcd::Client,
    key: String,
    /// The raw write's key (apart from `key`, which the cycle creates).
    write_key: String,
    lease: i64,
}

fn write_key_of(key: &str) -> String {
    format!("distlock-bench-floor-write/{key}")
}

/// Deletes the raw writes' keys.
pub(super) async fn cleanup(endpoints: &[String], keys: &[String]) {
    if keys.is_empty() {
        return;
    }
    let Ok(mut client) = etcd::Client::connect(endpoints, None).await else {
        return;
    };
    for key in keys {
        let _ = client.delete(write_key_of(key), None).await;
    }
}

impl EtcdRaw {
    pub(super) async fn connect(endpoints: &[String], key: &str) -> Result<Self, BoxError> {
        let mut client = etcd::Client::connect(endpoints, None).await?;
        // One lease per client, granted once and reused by every
        // cycle, as a lock client's session lease is.
        let lease = client.lease_grant(30, None).await?.id();
        Ok(EtcdRaw {
            client,
            key: format!("distlock-bench-floor/{key}"),
            write_key: write_key_of(key),
            lease,
        })
    }
}

#[async_trait]
impl RawClient for EtcdRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let put_if_absent = etcd::Txn::new()
            .when([etcd::Compare::create_revision(
                self.key.as_str(),
                etcd::CompareOp::Equal,
                0,
            )])
            .and_then([etcd::TxnOp::put(
                self.key.as_str(),
                "held",
                Some(etcd::PutOptions::new().with_lease(self.lease)),
            )]);
        let response = self.client.txn(put_if_absent).await?;
        if !response.succeeded() {
            return Err(format!("raw txn found {} already present", self.key).into());
        }
        self.client.delete(self.key.as_str(), None).await?;
        Ok(())
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        self.client.get(self.key.as_str(), None).await?;
        Ok(true)
    }

    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        self.client.put(self.write_key.as_str(), "1", None).await?;
        Ok(true)
    }
}
