//! How many requests a server has received so far, from its own
//! counters: Redis `INFO stats` (`total_commands_processed`, summed over
//! Redlock's instances), ZooKeeper `mntr` (`zk_packets_received`) and
//! etcd's `/metrics` (`grpc_server_msg_received_total`, every gRPC
//! message, keep-alives and watch requests on streams included).
//!
//! These counters are the whole server's: the `hold` scenario reads them
//! over an idle stretch first and reports the difference.

use distlock::BoxError;

use crate::floor::RawServer;

impl RawServer {
    /// The server's count of requests received so far; `None` for
    /// backends without a server.
    pub(crate) async fn requests_received(&self) -> Result<Option<u64>, BoxError> {
        match self {
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) => {
                let mut total = 0;
                for url in urls {
                    total += redis_commands(url).await?;
                }
                Ok(Some(total))
            }
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(hosts) => {
                let mut total = 0;
                for host in hosts.split(',') {
                    total += zookeeper_packets(host).await?;
                }
                Ok(Some(total))
            }
            #[cfg(feature = "etcd")]
            RawServer::Etcd(endpoints) => {
                let mut total = 0;
                for endpoint in endpoints {
                    total += etcd_messages(endpoint).await?;
                }
                Ok(Some(total))
            }
            // The backend behind the lock service.
            #[cfg(feature = "http")]
            RawServer::Http { behind, .. } => Box::pin(behind.requests_received()).await,
            RawServer::Memory(_) | RawServer::File(_) => Ok(None),
        }
    }

    /// What [`requests_received`](Self::requests_received) counts.
    pub(crate) fn requests_counter(&self) -> Option<&'static str> {
        match self {
            #[cfg(feature = "redis")]
            RawServer::Redis(_) => Some("Redis INFO total_commands_processed"),
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(_) => Some("ZooKeeper mntr zk_packets_received"),
            #[cfg(feature = "etcd")]
            RawServer::Etcd(_) => Some("etcd /metrics grpc_server_msg_received_total"),
            #[cfg(feature = "http")]
            RawServer::Http { behind, .. } => behind.requests_counter(),
            RawServer::Memory(_) | RawServer::File(_) => None,
        }
    }
}

/// `total_commands_processed` of one Redis server (the `INFO` asking for
/// it counts too; it is one command per reading).
#[cfg(feature = "redis")]
async fn redis_commands(url: &str) -> Result<u64, BoxError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    field(&info, "total_commands_processed:")
        .ok_or_else(|| format!("no total_commands_processed in INFO from {url}").into())
}

/// `zk_packets_received` of one ZooKeeper server, from the `mntr`
/// four-letter command (on the client port; it must be in
/// `4lw.commands.whitelist`).
#[cfg(feature = "zookeeper")]
async fn zookeeper_packets(host: &str) -> Result<u64, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = if host.contains(':') && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:2181")
    };
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.write_all(b"mntr").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    field(&answer, "zk_packets_received").ok_or_else(|| {
        format!("no zk_packets_received in the mntr answer of {address} (is mntr whitelisted?)")
            .into()
    })
}

/// The sum of `grpc_server_msg_received_total` over every method of one
/// etcd member, from its `/metrics` (plain HTTP, as the bench's other etcd
/// figures).
#[cfg(feature = "etcd")]
async fn etcd_messages(endpoint: &str) -> Result<u64, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let status = answer.split(' ').nth(1);
    if !answer.starts_with("HTTP/1.") || status != Some("200") {
        let status = answer.lines().next().unwrap_or_default();
        return Err(format!("GET {endpoint}/metrics: {status}").into());
    }
    let total = answer
        .lines()
        .filter(|line| line.starts_with("grpc_server_msg_received_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Ok(total as u64)
}

/// The number after `name` on the line that starts with it.
#[allow(dead_code)]
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn a_counter_is_read_from_its_line() {
        let info = "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:42\r\n";
        assert_eq!(field(info, "total_commands_processed:"), Some(42));
        let mntr = "zk_packets_sent\t4\nzk_packets_received\t5\n";
        assert_eq!(field(mntr, "zk_packets_received"), Some(5));
        assert_eq!(field(mntr, "zk_missing"), None);
    }
}
