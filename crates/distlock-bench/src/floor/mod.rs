//! The raw protocol floors: the cheapest acquire + release each service's
//! own client can do, with no distlock code in the way, one raw read round
//! trip and one raw durable write. The bench measures them beside the
//! lock, on the same server, runtime and connection shape (one client per
//! worker).
//!
//! One module per backend says what its floor is made of: `redis` (also
//! Redlock), `zookeeper`, `etcd`, `memory` and `file`; the last two have no
//! server, so no round trips. The floor's keys and nodes are unique to the
//! run, and [`RawServer::cleanup`] removes them after it.

mod file;
#[cfg(feature = "http")]
mod http;
mod memory;

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "zookeeper")]
mod zookeeper;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use distlock::{BoxError, Service};

use memory::LeaseTable;

/// One worker's raw client, bound to one key.
#[async_trait]
pub(crate) trait RawClient: Send {
    /// One raw acquire + release of this client's key.
    async fn cycle(&mut self) -> Result<(), BoxError>;

    /// One raw round trip to the server (`Ok(false)` when the backend has
    /// no server to talk to).
    async fn round_trip(&mut self) -> Result<bool, BoxError>;

    /// The service's cheapest durable single write, on the same connection
    /// as the round trip, to a key or node unique to the run (`Ok(false)`
    /// when the backend has no server to talk to). A lock's release is a
    /// write of this kind, so this is what a handoff compares with.
    async fn write_round_trip(&mut self) -> Result<bool, BoxError>;
}

/// What the floor of a backend is made of, for the output.
pub(crate) struct FloorInfo {
    /// The raw cycle, e.g. `SET NX PX + EVALSHA compare-and-delete`.
    pub(crate) cycle: &'static str,
    /// The raw round trip, or `None` when there is no server.
    pub(crate) round_trip: Option<&'static str>,
    /// The raw durable write, or `None` when there is no server.
    pub(crate) write_round_trip: Option<&'static str>,
}

/// The raw side of the service a lock URL names.
pub(crate) enum RawServer {
    /// `memory://`: a keyed lease table shared by the run's clients.
    Memory(Arc<LeaseTable>),
    /// `file:///dir`: open + flock of a file per key, a fencing counter
    /// increment, unlink + close.
    File(PathBuf),
    /// `redis://`, `rediss://` (one server) or `redlock://` (each
    /// instance, in parallel).
    #[cfg(feature = "redis")]
    Redis(Vec<String>),
    /// `zk://hosts/...`: the connect string (hosts only).
    #[cfg(feature = "zookeeper")]
    ZooKeeper(String),
    /// `etcd://hosts/...`: the endpoints.
    #[cfg(feature = "etcd")]
    Etcd(Vec<String>),
    /// `http://` (the lock service): its base URL, and the raw side of
    /// the backend it fronts.
    #[cfg(feature = "http")]
    Http {
        /// The service's base URL.
        base: String,
        /// The URL of the backend behind it.
        behind_url: String,
        /// The raw side of that backend.
        behind: Box<RawServer>,
    },
}

impl RawServer {
    /// The raw side of `url`'s service; for the lock service, `behind`
    /// names the backend it fronts.
    pub(crate) fn from_url(url: &str, behind: Option<&str>) -> Result<Self, String> {
        let service = Service::of_url(url).map_err(|err| err.to_string())?;
        let rest = url.split_once("://").map_or("", |(_, rest)| rest);
        let hosts = || -> Vec<String> {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            let authority = authority.rsplit('@').next().unwrap_or_default();
            authority
                .split(',')
                .filter(|host| !host.is_empty())
                .map(str::to_owned)
                .collect()
        };
        match service {
            Service::Memory => Ok(RawServer::Memory(Default::default())),
            Service::File => {
                let dir = rest.split('?').next().unwrap_or_default();
                if dir.is_empty() {
                    return Err("file:// needs a directory, e.g. file:///tmp/locks".into());
                }
                Ok(RawServer::File(dir.into()))
            }
            #[cfg(feature = "redis")]
            Service::Redis => Ok(RawServer::Redis(vec![url.to_owned()])),
            #[cfg(feature = "redis")]
            Service::Redlock => {
                let hosts = hosts();
                if hosts.is_empty() {
                    return Err("redlock:// needs at least one host".into());
                }
                Ok(RawServer::Redis(
                    hosts
                        .into_iter()
                        .map(|host| format!("redis://{host}"))
                        .collect(),
                ))
            }
            #[cfg(feature = "zookeeper")]
            Service::ZooKeeper => Ok(RawServer::ZooKeeper(hosts().join(","))),
            #[cfg(feature = "etcd")]
            Service::Etcd => Ok(RawServer::Etcd(
                hosts()
                    .into_iter()
                    .map(|host| format!("http://{host}"))
                    .collect(),
            )),
            #[cfg(feature = "http")]
            Service::Http => {
                let Some(behind) = behind else {
                    return Err("the floor of the lock service is the backend it fronts plus HTTP round trips: name that backend with --behind URL".into());
                };
                if matches!(Service::of_url(behind), Ok(Service::Http)) {
                    return Err(format!("--behind {behind}: name the backend the service fronts, not another service"));
                }
                let base = url.split('?').next().unwrap_or(url).to_owned();
                Ok(RawServer::Http {
                    base,
                    behind_url: behind.to_owned(),
                    behind: Box::new(RawServer::from_url(behind, None)?),
                })
            }
            #[allow(unreachable_patterns)]
            other => {
                let _ = hosts;
                Err(format!(
                    "no raw floor for {other} in this build of distlock"
                ))
            }
        }
    }

    /// What the floor measures.
    pub(crate) fn info(&self) -> FloorInfo {
        match self {
            RawServer::Memory(_) => memory::INFO,
            RawServer::File(_) => file::INFO,
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) => redis::info(urls.len()),
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(_) => zookeeper::INFO,
            #[cfg(feature = "etcd")]
            RawServer::Etcd(_) => etcd::INFO,
            #[cfg(feature = "http")]
            RawServer::Http { behind, .. } => http::info(behind),
        }
    }

    /// A new client of its own (own connection or session) for `key`; `key`
    /// is unique to this run.
    pub(crate) async fn client(&self, key: &str) -> Result<Box<dyn RawClient>, BoxError> {
        match self {
            RawServer::Memory(table) => Ok(Box::new(memory::MemoryRaw::new(table, key))),
            RawServer::File(dir) => Ok(Box::new(file::FileRaw::open(dir, key)?)),
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) => Ok(Box::new(redis::RedisRaw::connect(urls, key).await?)),
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(hosts) => {
                Ok(Box::new(zookeeper::ZkRaw::connect(hosts, key).await?))
            }
            #[cfg(feature = "etcd")]
            RawServer::Etcd(endpoints) => {
                Ok(Box::new(etcd::EtcdRaw::connect(endpoints, key).await?))
            }
            #[cfg(feature = "http")]
            RawServer::Http {
                base,
                behind_url,
                behind,
            } => Ok(Box::new(
                http::HttpRaw::connect(base, behind_url, behind, key).await?,
            )),
        }
    }

    /// Removes what the floor left behind (best effort).
    pub(crate) async fn cleanup(&self, keys: &[String]) {
        match self {
            #[cfg(feature = "http")]
            RawServer::Http { behind, .. } => Box::pin(behind.cleanup(keys)).await,
            RawServer::File(dir) => file::cleanup(dir, keys),
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) => redis::cleanup(urls, keys).await,
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(hosts) => zookeeper::cleanup(hosts, keys).await,
            #[cfg(feature = "etcd")]
            RawServer::Etcd(endpoints) => etcd::cleanup(endpoints, keys).await,
            RawServer::Memory(_) => {}
        }
    }
}
