//! What the etcd tests need of their private etcd
//! (`distlock_testkit::servers::PrivateEtcd`) beyond starting it: a raw
//! client, to read or change keys behind the locks' backs, and etcd's own
//! request counters.

#![allow(dead_code)]

use std::collections::HashMap;

use distlock_testkit::servers::PrivateEtcd;

/// A raw client of the private etcd, and its request counters.
pub trait EtcdTestExt {
    /// A plain etcd client of this server, to read or change keys behind
    /// the locks' backs.
    async fn raw_client(&self) -> etcd_client::Client;

    /// etcd's own gRPC counters: `<counter>/<method>` summed over codes,
    /// e.g. `grpc_server_handled_total/Txn`.
    async fn grpc_counters(&self) -> HashMap<String, f64>;
}

impl EtcdTestExt for PrivateEtcd {
    async fn raw_client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .unwrap()
    }

    async fn grpc_counters(&self) -> HashMap<String, f64> {
        let body = self.get("/metrics").await;
        let mut counters = HashMap::new();
        for line in body.lines() {
            let Some(rest) = [
                "grpc_server_handled_total",
                "grpc_server_started_total",
                "grpc_server_msg_received_total",
            ]
            .iter()
            .find_map(|name| line.strip_prefix(name).map(|rest| (*name, rest))) else {
                continue;
            };
            let (name, rest) = rest;
            let Some(method) = rest
                .split("grpc_method=\"")
                .nth(1)
                .and_then(|tail| tail.split('"').next())
            else {
                continue;
            };
            let value: f64 = rest
                .rsplit(' ')
                .next()
                .and_then(|value| value.parse().ok())
                .unwrap_or(0.0);
            *counters.entry(format!("{name}/{method}")).or_insert(0.0) += value;
        }
        counters
    }
}

/// What grew between two snapshots of [`EtcdTestExt::grpc_counters`].
pub fn grown(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> HashMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, value)| {
            let delta = value - before.get(name).copied().unwrap_or(0.0);
            (delta != 0.0).then(|| (name.clone(), delta))
        })
        .collect()
}
