//! distlock: distributed locks with one API over Redis (one instance or a
//! Redlock quorum), ZooKeeper, etcd, local files and memory.
//!
//! Pick the backend with a URL from configuration, not in code:
//!
//! ```
//! use std::time::Duration;
//! use distlock::{connect, LockOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> distlock::Result<()> {
//! let url = std::env::var("DISTLOCK_URL").unwrap_or_else(|_| "memory://".into());
//! # let url = "memory://doc-example";
//! let locks = connect(&url).await?;
//! let options = LockOptions::new().ttl(Duration::from_secs(15)).wait(Duration::from_secs(5));
//! let guard = locks.lock("billing/run-invoices", &options).await?;
//! // ... do the work, passing guard.fencing_token() to what you write ...
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! | URL | backend | cargo feature |
//! |---|---|---|
//! | `memory://` or `memory://name` | in-process | always on |
//! | `file:///var/lock/myapp` | local files, OS advisory locks | `file` |
//! | `redis://[:password@]host:6379[/db]`, `rediss://…` | single Redis | `redis` |
//! | `redlock://h1:6379,h2:6379,h3:6379` | Redlock quorum | `redis` |
//! | `redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster` | the Redis primary Sentinel names, followed across failovers | `redis` |
//! | `redis+cluster://h1:7000,h2:7001,h3:7002` | Redis Cluster | `redis` |
//! | `zk://h1:2181,h2:2181/prefix` | ZooKeeper | `zookeeper` |
//! | `etcd://h1:2379,h2:2379/prefix` | etcd v3 | `etcd` |
//! | `http://host:8181`, `https://…` | the lock service, `distlock serve` | `http` |

#![warn(missing_docs)]

mod config;
mod service;

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

pub use config::LockConfig;
pub use distlock_core::{
    error, memory, Backoff, BoxError, Capabilities, DistributedLock, Error, LockGuard, LockOptions,
    LostReason, Result, DEFAULT_TTL,
};
pub use service::Service;

/// The environment variable [`connect_from_env`] reads.
pub const URL_ENV: &str = "DISTLOCK_URL";

/// A connected lock service: an `Arc<dyn DistributedLock>` that remembers
/// its (password-redacted) URL. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Locker {
    inner: Arc<dyn DistributedLock>,
    url: String,
}

impl Locker {
    /// Wraps any lock service.
    pub fn new(inner: Arc<dyn DistributedLock>, url: impl Into<String>) -> Self {
        Locker {
            inner,
            url: error::redact_url(&url.into()),
        }
    }

    /// The URL it was connected with, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The shared lock service.
    pub fn as_arc(&self) -> Arc<dyn DistributedLock> {
        self.inner.clone()
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.inner.backend())
            .field("url", &self.url)
            .finish()
    }
}

impl Deref for Locker {
    type Target = dyn DistributedLock;

    fn deref(&self) -> &Self::Target {
        &*self.inner
    }
}

/// Connects to the lock service named by `url` (see the table in the
/// crate docs). A scheme whose cargo feature is off is
/// [`Error::FeatureNotEnabled`].
pub async fn connect(url: &str) -> Result<Locker> {
    let inner: Arc<dyn DistributedLock> = match Service::of_url(url)? {
        Service::Memory => {
            let name = url["memory://".len()..].trim_end_matches('/');
            Arc::new(memory::MemoryLock::named(name))
        }
        Service::File => connect_file(url).await?,
        Service::Redis | Service::Redlock | Service::RedisSentinel | Service::RedisCluster => {
            connect_redis(url).await?
        }
        Service::ZooKeeper => connect_zookeeper(url).await?,
        Service::Etcd => connect_etcd(url).await?,
        Service::Http => connect_http(url).await?,
    };
    Ok(Locker::new(inner, url))
}

/// Connects to the URL in `$DISTLOCK_URL`.
pub async fn connect_from_env() -> Result<Locker> {
    match std::env::var(URL_ENV) {
        Ok(url) => connect(&url).await,
        Err(_) => Err(Error::InvalidConfig(format!(
            "{URL_ENV} is not set; set it to a lock URL such as redis://127.0.0.1:6379"
        ))),
    }
}

macro_rules! backend_connector {
    ($fn_name:ident, $feature:literal, $backend:literal, $krate:ident) => {
        #[cfg(feature = $feature)]
        async fn $fn_name(url: &str) -> Result<Arc<dyn DistributedLock>> {
            $krate::connect(url).await
        }

        #[cfg(not(feature = $feature))]
        async fn $fn_name(_url: &str) -> Result<Arc<dyn DistributedLock>> {
            Err(Error::FeatureNotEnabled {
                backend: $backend,
                feature: $feature,
            })
        }
    };
}

backend_connector!(connect_file, "file", "file", distlock_file);
backend_connector!(connect_redis, "redis", "redis", distlock_redis);
backend_connector!(
    connect_zookeeper,
    "zookeeper",
    "zookeeper",
    distlock_zookeeper
);
backend_connector!(connect_etcd, "etcd", "etcd", distlock_etcd);
backend_connector!(connect_http, "http", "http", distlock_http);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_urls_share_named_stores() {
        let a = connect("memory://facade-test").await.unwrap();
        let b = connect("memory://facade-test").await.unwrap();
        let other = connect("memory://facade-test-other").await.unwrap();
        let options = LockOptions::new();
        let guard = a.try_lock("k", &options).await.unwrap().unwrap();
        assert!(b.try_lock("k", &options).await.unwrap().is_none());
        assert!(other.try_lock("k", &options).await.unwrap().is_some());
        guard.release().await.unwrap();
        assert_eq!(a.backend(), "memory");
    }

    #[tokio::test]
    async fn bad_urls_are_clear_errors() {
        let err = connect("nope://x").await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
        assert!(err.to_string().contains("unknown scheme `nope`"), "{err}");
        let err = connect("localhost:6379").await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
        let err = connect("ftp://u:pw@h/x").await.unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[cfg(not(feature = "etcd"))]
    #[tokio::test]
    async fn a_disabled_feature_is_named() {
        let err = connect("etcd://127.0.0.1:2379").await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::FeatureNotEnabled {
                    feature: "etcd",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`etcd` cargo feature"), "{err}");
    }
}

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
