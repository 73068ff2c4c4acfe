//! The whole conformance suite against the shared etcd on 127.0.0.1:2379.

use std::sync::Arc;
use std::time::Duration;

use distlock_etcd::EtcdLock;
use distlock_testkit::Harness;
use etcd_client::GetOptions;

const ENDPOINT: &str = "127.0.0.1:2379";
const URL: &str = "etcd://127.0.0.1:2379/distlock-test";

/// The prefix under which `key`'s lock queues, and a raw etcd client.
async fn queue_prefix_and_raw_client(key: &str) -> (String, etcd_client::Client) {
    let locks = EtcdLock::connect(URL).await.expect("connect");
    let client = etcd_client::Client::connect([ENDPOINT], None)
        .await
        .expect("raw client");
    (locks.lock_key_prefix(key), client)
}

/// Revokes the lease of every key queued on `key`'s lock: the fault a
/// server-side lease revocation (or expiry) is.
async fn revoke_leases_of(key: String) {
    let (prefix, mut client) = queue_prefix_and_raw_client(&key).await;
    let keys = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("list the lock's keys");
    assert!(!keys.kvs().is_empty(), "nothing queued on {key}");
    for kv in keys.kvs() {
        client.lease_revoke(kv.lease()).await.expect("revoke");
    }
}

/// The keys queued on `key`'s lock behind the holder's: its waiters.
async fn waiting_keys(key: String) -> usize {
    let (prefix, mut client) = queue_prefix_and_raw_client(&key).await;
    let keys = client
        .get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count the lock's keys");
    (keys.count() as usize).saturating_sub(1)
}

async fn harness() -> Option<Harness> {
    if !distlock_testkit::service_ready("etcd", ENDPOINT).await {
        return None;
    }
    Some(
        Harness::new("etcd", || async {
            Ok(Arc::new(EtcdLock::connect(URL).await?) as _)
        })
        .with_fault(revoke_leases_of)
        .with_queue_probe(waiting_keys)
        // etcd 3.4's minimum lease TTL (1.5 election timeouts, rounded up).
        .with_short_ttl(Duration::from_secs(2)),
    )
}

mod conformance {
    use super::harness;
    distlock_testkit::conformance_tests!(harness());
}
