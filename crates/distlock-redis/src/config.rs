//! The configuration, and the `redis://`, `rediss://`, `redlock://`,
//! `redis+sentinel://` and `redis+cluster://` URLs that spell it.

use std::fmt;
use std::time::Duration;

use distlock_core::backend::url::{self, percent_decode, UrlParts};
use distlock_core::error::redact_url;
use distlock_core::{Error, Result};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

/// The default key prefix: every key this backend writes starts with it.
pub const DEFAULT_PREFIX: &str = "distlock";

/// The default bound on each server reply (and on connecting, which may
/// take twice as long).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The default bound on connecting to a server: 4 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// The default bound on a `WAIT` for replica acknowledgements (see
/// [`RedisConfig::wait_timeout`]): 100 ms. Replicas on a healthy network
/// acknowledge within a millisecond or two; 100 ms absorbs a busy replica
/// or a slow link while keeping what a missing replica costs each grant
/// small against any sensible TTL (at least 10 ms, usually seconds).
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(100);

/// The port of an endpoint that names none.
const DEFAULT_PORT: u16 = 6379;

/// The port of a Sentinel endpoint that names none.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// The URL options, for the error that names an unknown one.
const OPTIONS: &str =
    "prefix, fair, timeout, connect_timeout, tls, db, wait_replicas, wait_timeout";

/// Where and how a [`RedisLock`](crate::RedisLock) connects: parsed from a
/// URL (see the crate docs for the forms) or built with [`new`](Self::new)
/// or [`redlock`](Self::redlock) and its fields.
///
/// ```
/// use std::time::Duration;
/// use distlock_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("rediss://:s3cret@cache:6380/2?prefix=myapp&timeout=500ms").unwrap();
/// assert_eq!(config.endpoints, ["cache:6380"]);
/// assert!(config.tls && config.fair);
/// assert_eq!((config.db, config.prefix.as_str()), (2, "myapp"));
/// assert_eq!(config.timeout, Duration::from_millis(500));
///
/// let mut config = RedisConfig::redlock(["r1", "r2:6380", "r3"]);
/// config.prefix = "myapp".into();
/// assert_eq!(config.endpoints, ["r1:6379", "r2:6380", "r3:6379"]);
/// config.validate().unwrap();
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `host:port` of each server (`[v6 address]:port` for IPv6): one, or
    /// the independent servers of a Redlock quorum (3 or 5), or the
    /// Sentinels (with [`sentinel_master`](Self::sentinel_master)), or seed
    /// nodes of a Redis Cluster (with [`cluster`](Self::cluster)).
    pub endpoints: Vec<String>,
    /// A Redlock quorum over `endpoints` rather than one server.
    pub redlock: bool,
    /// `Some(master name)`: `endpoints` are Redis Sentinels, and the locks
    /// live on the primary they name for it (`redis+sentinel://`).
    pub sentinel_master: Option<String>,
    /// `endpoints` are seed nodes of a Redis Cluster (`redis+cluster://`).
    pub cluster: bool,
    /// After each grant, wait until this many replicas acknowledged it
    /// (`WAIT`), else give the lock back and fail; 0 (the default) does
    /// not wait. One primary only (`redis://`, Sentinel, Cluster). See
    /// "Replica acknowledgements" in the crate docs for what it narrows.
    pub wait_replicas: u32,
    /// The bound of that `WAIT`; between 1 ms and 1 h, default
    /// [`DEFAULT_WAIT_TIMEOUT`].
    pub wait_timeout: Duration,
    /// TLS to every server (rustls, system roots): `rediss://`, or
    /// `tls=true` on a `redlock://` URL.
    pub tls: bool,
    /// The ACL user, if any.
    pub username: Option<String>,
    /// The password (`AUTH`), if any; `Debug` does not show it.
    pub password: Option<String>,
    /// The database number.
    pub db: u32,
    /// Every key this backend writes starts with it; not empty, no braces
    /// (they would break the hash tag).
    pub prefix: String,
    /// Fair (FIFO) waiting with direct handoff. One server only: Redlock's
    /// instances would disagree on the queue.
    pub fair: bool,
    /// Bound on each server reply; between 1 ms and 1 h.
    pub timeout: Duration,
    /// Bound on connecting to a server (at `connect` and on every
    /// reconnection); between 1 ms and 1 h.
    pub connect_timeout: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("endpoints", &self.endpoints)
            .field("redlock", &self.redlock)
            .field("sentinel_master", &self.sentinel_master)
            .field("cluster", &self.cluster)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("prefix", &self.prefix)
            .field("fair", &self.fair)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// One server at `endpoint` (`host`, `host:port`, `[v6]:port`; port
    /// 6379 when none): no TLS, no password, database 0, the default
    /// prefix and timeout, fair waiting.
    pub fn new(endpoint: impl Into<String>) -> Self {
        RedisConfig {
            endpoints: vec![with_default_port(&endpoint.into())],
            redlock: false,
            sentinel_master: None,
            cluster: false,
            wait_replicas: 0,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            tls: false,
            username: None,
            password: None,
            db: 0,
            prefix: DEFAULT_PREFIX.to_owned(),
            fair: true,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// A Redlock quorum over independent servers (no replication between
    /// them; 3 or 5), with the defaults of [`new`](Self::new) but never
    /// fair.
    pub fn redlock<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        RedisConfig {
            endpoints: endpoints
                .into_iter()
                .map(|endpoint| with_default_port(&endpoint.into()))
                .collect(),
            redlock: true,
            fair: false,
            ..RedisConfig::new("")
        }
    }

    /// The primary that the Sentinels at `sentinels` (`host`, `host:port`;
    /// port 26379 when none) name for `master`, with the defaults of
    /// [`new`](Self::new).
    pub fn sentinel<S: Into<String>>(
        sentinels: impl IntoIterator<Item = S>,
        master: impl Into<String>,
    ) -> Self {
        RedisConfig {
            endpoints: sentinels
                .into_iter()
                .map(|endpoint| with_port(&endpoint.into(), DEFAULT_SENTINEL_PORT))
                .collect(),
            sentinel_master: Some(master.into()),
            ..RedisConfig::new("")
        }
    }

    /// A Redis Cluster reached through the seed nodes `nodes` (any node
    /// will do; more than one in case one is down), with the defaults of
    /// [`new`](Self::new).
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        RedisConfig {
            endpoints: nodes
                .into_iter()
                .map(|endpoint| with_default_port(&endpoint.into()))
                .collect(),
            cluster: true,
            ..RedisConfig::new("")
        }
    }

    /// The topology's backend name, as errors and spans report it:
    /// `redis`, `redlock`, `redis-sentinel` or `redis-cluster`.
    pub(crate) fn backend_name(&self) -> &'static str {
        if self.redlock {
            "redlock"
        } else if self.sentinel_master.is_some() {
            "redis-sentinel"
        } else if self.cluster {
            "redis-cluster"
        } else {
            "redis"
        }
    }

    /// Parses `redis://[user:password@]host[:port][/db]`, `rediss://…`
    /// (TLS), `redlock://[user:password@]h1:p1,h2:p2,h3:p3[/db]`,
    /// `redis+sentinel://[user:password@]s1:26379,s2:26379,s3:26379/<master name>`
    /// or `redis+cluster://[user:password@]h1:7000,h2:7001`, with the
    /// options `prefix`, `fair` (`true`/`false`), `timeout` (a duration
    /// such as `2s` or `500ms`), `connect_timeout`, `wait_replicas` and
    /// `wait_timeout` (one primary only), `db` (Sentinel, where the path is
    /// the master name) and, except for `redis://`/`rediss://`, `tls`.
    /// User and password are the data nodes' (Sentinels are reached
    /// without them). User, password and option values may be
    /// percent-encoded.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid_url(redact_url(url), reason);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad(
                "expected redis://, rediss://, redlock://, redis+sentinel:// or redis+cluster://"
                    .into(),
            )
        })?;
        let UrlParts {
            userinfo,
            hosts,
            path,
            query,
        } = UrlParts::split(rest);
        let mut config = match scheme {
            "redis" | "rediss" if hosts.contains(',') => {
                return Err(bad(
                    "one host for redis://; use redlock://h1:p1,h2:p2,h3:p3 for a quorum".into(),
                ))
            }
            "redis" | "rediss" => RedisConfig {
                tls: scheme == "rediss",
                ..RedisConfig::new("")
            },
            "redlock" => RedisConfig::redlock(Vec::<String>::new()),
            "redis+sentinel" => RedisConfig::sentinel(Vec::<String>::new(), ""),
            "redis+cluster" => RedisConfig::cluster(Vec::<String>::new()),
            _ => return Err(bad(
                "unknown scheme; expected redis, rediss, redlock, redis+sentinel or redis+cluster"
                    .into(),
            )),
        };
        let default_port = if config.sentinel_master.is_some() {
            DEFAULT_SENTINEL_PORT
        } else {
            DEFAULT_PORT
        };
        config.endpoints.clear();
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(bad("missing host".into()));
            }
            let endpoint = with_port(host, default_port);
            if split_endpoint(&endpoint).is_none() {
                return Err(bad(format!(
                    "bad host {host:?}: expected host, host:port or [v6 address]:port"
                )));
            }
            config.endpoints.push(endpoint);
        }
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let decode = |text| {
                percent_decode(text).ok_or_else(|| bad("bad user or password encoding".into()))
            };
            config.username = Some(decode(user)?).filter(|user| !user.is_empty());
            config.password = password.map(decode).transpose()?;
        }
        match path.strip_prefix('/').unwrap_or(path) {
            "" if config.sentinel_master.is_some() => {
                return Err(bad(
                    "the path must be the Sentinel master name, e.g. /mymaster".into(),
                ))
            }
            "" => {}
            name if config.sentinel_master.is_some() => {
                let name = percent_decode(name)
                    .filter(|name| !name.is_empty() && !name.contains('/'))
                    .ok_or_else(|| bad(format!("bad Sentinel master name {name:?}")))?;
                config.sentinel_master = Some(name);
            }
            _ if config.cluster => {
                return Err(bad(
                    "a Redis Cluster has database 0 only; no path after the hosts".into(),
                ))
            }
            db => {
                config.db = db
                    .parse()
                    .map_err(|_| bad("the path must be a database number, e.g. /0".into()))?
            }
        }
        let mut tls = false;
        for option in url::options(query) {
            let (name, value) = option.map_err(bad)?;
            let value = percent_decode(value)
                .ok_or_else(|| bad(format!("option {name}: bad percent-encoding")))?;
            match name {
                "prefix" => config.prefix = value,
                "fair" => config.fair = parse_bool(name, &value).map_err(bad)?,
                "tls" => tls = parse_bool(name, &value).map_err(bad)?,
                "timeout" => config.timeout = parse_duration(name, &value).map_err(bad)?,
                "connect_timeout" => {
                    config.connect_timeout = parse_duration(name, &value).map_err(bad)?
                }
                "wait_replicas" => {
                    config.wait_replicas = value.parse().map_err(|_| {
                        bad(format!(
                            "wait_replicas={value:?}: expected a number of replicas"
                        ))
                    })?
                }
                "wait_timeout" => {
                    config.wait_timeout = parse_duration(name, &value).map_err(bad)?
                }
                "db" if config.sentinel_master.is_some() => {
                    config.db = value
                        .parse()
                        .map_err(|_| bad(format!("db={value:?}: expected a database number")))?
                }
                "db" => {
                    return Err(bad(
                        "db= is for redis+sentinel://; elsewhere the path names the database"
                            .into(),
                    ))
                }
                _ => return Err(bad(format!("unknown option {name:?} (valid: {OPTIONS})"))),
            }
        }
        if tls && !(config.redlock || config.sentinel_master.is_some() || config.cluster) {
            return Err(bad(
                "tls=true is for redlock://, redis+sentinel:// and redis+cluster://; use rediss:// for one server".into(),
            ));
        }
        config.tls |= tls;
        config.check().map_err(bad)?;
        Ok(config)
    }

    /// Checks that the configuration can work; [`RedisLock::with_config`](crate::RedisLock::with_config)
    /// calls it. The error ([`Error::InvalidConfig`]) names the field and
    /// its value.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(Error::InvalidConfig)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("endpoints: at least one server is needed".into());
        }
        if let Some(bad) = self
            .endpoints
            .iter()
            .find(|endpoint| split_endpoint(endpoint).is_none())
        {
            return Err(format!(
                "endpoints: {bad:?} is not host:port or [v6 address]:port"
            ));
        }
        let topologies = [self.redlock, self.sentinel_master.is_some(), self.cluster];
        if topologies.iter().filter(|&&on| on).count() > 1 {
            return Err(
                "redlock, sentinel_master and cluster exclude each other: pick one topology".into(),
            );
        }
        if topologies == [false; 3] && self.endpoints.len() != 1 {
            return Err(format!(
                "endpoints: one server unless redlock, Sentinel or Cluster, got {}",
                self.endpoints.len()
            ));
        }
        if let Some(master) = &self.sentinel_master {
            if master.is_empty() {
                return Err("sentinel_master: the master name must not be empty".into());
            }
        }
        if self.cluster && self.db != 0 {
            return Err(format!(
                "db={}: a Redis Cluster has database 0 only",
                self.db
            ));
        }
        if self.wait_replicas > 0 && self.wait_timeout >= self.timeout {
            return Err(format!(
                "wait_timeout={}: must be shorter than timeout={} (the WAIT's answer comes within timeout)",
                humantime::format_duration(self.wait_timeout),
                humantime::format_duration(self.timeout)
            ));
        }
        if self.redlock && self.wait_replicas > 0 {
            return Err(format!(
                "wait_replicas={}: Redlock's instances have no replicas to wait for",
                self.wait_replicas
            ));
        }
        if self.redlock && self.fair {
            return Err(
                "fair=true is not available with Redlock: its instances' queues would disagree"
                    .into(),
            );
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(format!(
                "prefix={:?}: the key prefix must be non-empty and contain no braces",
                self.prefix
            ));
        }
        for (name, value) in [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
            ("wait_timeout", self.wait_timeout),
        ] {
            if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&value) {
                return Err(format!(
                    "{name}={}: must be between 1ms and 1h",
                    humantime::format_duration(value)
                ));
            }
        }
        Ok(())
    }

    /// How the `redis` crate reaches `endpoint` (one of `endpoints`).
    pub(crate) fn connection_info(&self, endpoint: &str) -> redis::RedisResult<ConnectionInfo> {
        Ok(self
            .connection_addr(endpoint)?
            .into_connection_info()?
            .set_redis_settings(self.redis_settings()))
    }

    /// The address of `endpoint` (a data node or a Sentinel), with TLS as
    /// configured.
    pub(crate) fn connection_addr(&self, endpoint: &str) -> redis::RedisResult<ConnectionAddr> {
        let (host, port) = split_endpoint(endpoint).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad endpoint"))
        })?;
        let host = host.to_owned();
        Ok(if self.tls {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host, port)
        })
    }

    /// Database, user and password of the data nodes.
    pub(crate) fn redis_settings(&self) -> RedisConnectionInfo {
        let mut settings = RedisConnectionInfo::default().set_db(i64::from(self.db));
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        settings
    }
}

/// `endpoint` with the default port when it names none.
fn with_default_port(endpoint: &str) -> String {
    with_port(endpoint, DEFAULT_PORT)
}

/// `endpoint` with `port` when it names none.
fn with_port(endpoint: &str, port: u16) -> String {
    let has_port = match endpoint.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => endpoint.contains(':'),
    };
    if has_port {
        endpoint.to_owned()
    } else {
        format!("{endpoint}:{port}")
    }
}

/// The host (IPv6 without its brackets) and port of `host:port` or
/// `[v6]:port`.
pub(crate) fn split_endpoint(endpoint: &str) -> Option<(&str, u16)> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains([':', '[', ']']) => return None,
        None => host,
    };
    (!host.is_empty()).then_some((host, port))
}

fn parse_bool(name: &str, value: &str) -> std::result::Result<bool, String> {
    match value {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{name}={value:?}: expected true or false")),
    }
}

/// A humantime duration option (`2s`, `500ms`).
fn parse_duration(name: &str, value: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|err| format!("{name}={value:?} is not a duration like 2s or 500ms: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_instance_forms() {
        let c = RedisConfig::from_url("redis://127.0.0.1").unwrap();
        assert_eq!(c, RedisConfig::new("127.0.0.1"));
        assert_eq!(c.endpoints, ["127.0.0.1:6379"]);
        assert!(c.fair && !c.redlock && !c.tls);
        assert_eq!(c.prefix, "distlock");
        let c = RedisConfig::from_url(
            "rediss://:s3cret@cache.example:6380/2?prefix=myapp&fair=false&timeout=500ms&connect_timeout=3s",
        )
        .unwrap();
        assert_eq!(c.endpoints, ["cache.example:6380"]);
        assert!(c.tls && !c.fair);
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (None, Some("s3cret"))
        );
        assert_eq!(c.db, 2);
        assert_eq!(c.prefix, "myapp");
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        let c = RedisConfig::from_url("redis://app:p%40ss@[::1]/").unwrap();
        assert_eq!(c.endpoints, ["[::1]:6379"]);
        assert_eq!(c.username.as_deref(), Some("app"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        let info = c.connection_info(&c.endpoints[0]).unwrap();
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("::1".into(), 6379));
        assert_eq!(info.redis_settings().password(), Some("p@ss"));
    }

    #[test]
    fn redlock_forms() {
        let c = RedisConfig::from_url("redlock://u:p@h1:1,h2:2,h3/1?prefix=x").unwrap();
        assert!(c.redlock && !c.fair && !c.tls);
        assert_eq!(c.endpoints, ["h1:1", "h2:2", "h3:6379"]);
        assert_eq!(c.db, 1);
        let c = RedisConfig::from_url("redlock://h1:1,h2:2?tls=true").unwrap();
        assert!(c.tls);
        let info = c.connection_info("h2:2").unwrap();
        assert!(matches!(
            info.addr(),
            ConnectionAddr::TcpTls { port: 2, .. }
        ));
    }

    #[test]
    fn bad_urls_are_refused_with_the_password_redacted() {
        for url in [
            "redis://h:1,h:2",
            "redis://h:notaport",
            "redis://h/x",
            "redis://h?prefix={a}",
            "redis://h?prefix=",
            "redis://h?what=1",
            "redis://h?fair=maybe",
            "redis://h?timeout=soon",
            "redis://h?timeout=0s",
            "redis://h?timeout_ms=500",
            "redis://h?tls=true",
            "redlock://h1,h2?fair=true",
            "memcache://h",
            "redis://u:hunter2@h/x",
            "redlock://h1,,h2",
        ] {
            let err = RedisConfig::from_url(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let err = RedisConfig::from_url("redis://h?timeout_ms=500").unwrap_err();
        assert!(
            err.to_string().contains("\"timeout_ms\"") && err.to_string().contains("timeout, tls"),
            "{err}"
        );
    }

    #[test]
    fn validate_names_the_field_and_value() {
        RedisConfig::new("cache").validate().unwrap();
        let mut bad = RedisConfig::new("cache");
        bad.prefix = "a{b}".into();
        let err = bad.validate().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(text) if text.contains("prefix=\"a{b}\"")),
            "{err}"
        );
        let mut bad = RedisConfig::redlock(["a", "b", "c"]);
        bad.fair = true;
        assert!(bad.validate().unwrap_err().to_string().contains("fair"));
        let mut bad = RedisConfig::new("cache");
        bad.timeout = Duration::ZERO;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("timeout=0s"));
        let mut bad = RedisConfig::new("cache");
        bad.endpoints.push("other:6379".into());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("endpoints"));
        assert!(RedisConfig::new("h:x").validate().is_err());
    }

    #[test]
    fn sentinel_and_cluster_forms() {
        let c = RedisConfig::from_url(
            "redis+sentinel://u:p@s1,s2:26380,s3/mymaster?db=2&wait_replicas=1&wait_timeout=50ms",
        )
        .unwrap();
        assert_eq!(c.endpoints, ["s1:26379", "s2:26380", "s3:26379"]);
        assert_eq!(c.sentinel_master.as_deref(), Some("mymaster"));
        assert_eq!((c.db, c.wait_replicas), (2, 1));
        assert_eq!(c.wait_timeout, Duration::from_millis(50));
        assert!(c.fair && !c.cluster && !c.redlock);
        assert_eq!(c.backend_name(), "redis-sentinel");
        assert_eq!(c, {
            let mut built = RedisConfig::sentinel(["s1", "s2:26380", "s3"], "mymaster");
            built.db = 2;
            built.wait_replicas = 1;
            built.wait_timeout = Duration::from_millis(50);
            built.username = Some("u".into());
            built.password = Some("p".into());
            built
        });
        let c = RedisConfig::from_url("redis+cluster://h1:7000,h2:7001?tls=true").unwrap();
        assert_eq!(c.endpoints, ["h1:7000", "h2:7001"]);
        assert!(c.cluster && c.tls && c.fair);
        assert_eq!(c.wait_timeout, DEFAULT_WAIT_TIMEOUT);
        assert_eq!(c.backend_name(), "redis-cluster");
        let c = RedisConfig::from_url("redis://h?wait_replicas=2").unwrap();
        assert_eq!(c.wait_replicas, 2);
        for url in [
            "redis+sentinel://s1,s2",
            "redis+sentinel://s1/",
            "redis+cluster://h1/1",
            "redis+cluster://h1?db=1",
            "redis://h?db=1",
            "redis://h?wait_replicas=-1",
            "redis://h?wait_timeout=0s",
            "redlock://h1,h2,h3?wait_replicas=1",
        ] {
            let err = RedisConfig::from_url(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
        }
        let mut both = RedisConfig::cluster(["h"]);
        both.sentinel_master = Some("m".into());
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("one topology"));
    }

    #[test]
    fn debug_hides_the_password() {
        let config = RedisConfig::from_url("redis://u:hunter2@h").unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
    }
}
