//! The one table of URL schemes: which lock service a URL names, and the
//! cargo feature that builds its backend.

use std::fmt;

use crate::{error, Error, Result};

/// A lock service a URL can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Service {
    /// `memory://[name]`: in-process.
    Memory,
    /// `file:///dir`: local lock files.
    File,
    /// `redis://` or `rediss://`: one Redis server.
    Redis,
    /// `redlock://h1,h2,h3`: a Redlock quorum of Redis servers.
    Redlock,
    /// `redis+sentinel://s1,s2,s3/mymaster`: the Redis primary that
    /// Sentinels name, followed across failovers.
    RedisSentinel,
    /// `redis+cluster://h1:7000,h2:7001`: a Redis Cluster.
    RedisCluster,
    /// `zk://` or `zookeeper://`: a ZooKeeper ensemble.
    ZooKeeper,
    /// `etcd://`: an etcd v3 cluster.
    Etcd,
    /// `http://` or `https://`: the distlock lock service (`distlock serve`).
    Http,
}

/// Every scheme and the service it names, in the order error messages
/// list them.
const SCHEMES: &[(&str, Service)] = &[
    ("memory", Service::Memory),
    ("file", Service::File),
    ("redis", Service::Redis),
    ("rediss", Service::Redis),
    ("redlock", Service::Redlock),
    ("redis+sentinel", Service::RedisSentinel),
    ("redis+cluster", Service::RedisCluster),
    ("zk", Service::ZooKeeper),
    ("zookeeper", Service::ZooKeeper),
    ("etcd", Service::Etcd),
    ("http", Service::Http),
    ("https", Service::Http),
];

impl Service {
    /// The service `url` names by its scheme; a URL without `scheme://`
    /// or with an unknown scheme is [`Error::InvalidUrl`], naming the
    /// schemes there are.
    ///
    /// ```
    /// use distlock::Service;
    /// assert_eq!(Service::of_url("rediss://cache:6380").unwrap(), Service::Redis);
    /// assert_eq!(Service::of_url("zk://h1:2181/app").unwrap().feature(), Some("zookeeper"));
    /// assert_eq!(Service::of_url("redis+sentinel://s1,s2,s3/mymaster").unwrap(), Service::RedisSentinel);
    /// assert_eq!(Service::of_url("redis+cluster://h1:7000").unwrap().feature(), Some("redis"));
    /// assert_eq!(Service::of_url("http://lock-service:8181").unwrap().feature(), Some("http"));
    /// assert!(Service::of_url("mysql://db").is_err());
    /// ```
    pub fn of_url(url: &str) -> Result<Service> {
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(Error::invalid_url(
                error::redact_url(url),
                "expected <scheme>://..., e.g. redis://127.0.0.1:6379",
            ));
        };
        SCHEMES
            .iter()
            .find(|(known, _)| *known == scheme)
            .map(|(_, service)| *service)
            .ok_or_else(|| {
                let known: Vec<&str> = SCHEMES.iter().map(|(known, _)| *known).collect();
                Error::invalid_url(
                    error::redact_url(url),
                    format!(
                        "unknown scheme `{scheme}`; expected one of {}",
                        known.join(", ")
                    ),
                )
            })
    }

    /// The service's name, as backends and benchmarks report it.
    pub fn name(self) -> &'static str {
        match self {
            Service::Memory => "memory",
            Service::File => "file",
            Service::Redis => "redis",
            Service::Redlock => "redlock",
            Service::RedisSentinel => "redis-sentinel",
            Service::RedisCluster => "redis-cluster",
            Service::ZooKeeper => "zookeeper",
            Service::Etcd => "etcd",
            Service::Http => "http",
        }
    }

    /// The cargo feature of the `distlock` crate that builds its backend;
    /// `None` for the in-process backend, which is always there.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Service::Memory => None,
            Service::File => Some("file"),
            Service::Redis | Service::Redlock | Service::RedisSentinel | Service::RedisCluster => {
                Some("redis")
            }
            Service::ZooKeeper => Some("zookeeper"),
            Service::Etcd => Some("etcd"),
            Service::Http => Some("http"),
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_names_its_service_and_unknown_ones_are_listed() {
        for (scheme, service) in SCHEMES {
            assert_eq!(Service::of_url(&format!("{scheme}://x")).unwrap(), *service);
        }
        let err = Service::of_url("nope://x").unwrap_err().to_string();
        assert!(err.contains("unknown scheme `nope`"), "{err}");
        assert!(
            err.contains(
                "memory, file, redis, rediss, redlock, redis+sentinel, redis+cluster, zk, zookeeper, etcd, http, https"
            ),
            "{err}"
        );
    }
}
