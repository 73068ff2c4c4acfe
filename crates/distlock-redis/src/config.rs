//! Connection URLs: `redis://`, `rediss://` and `redlock://`.

use std::time::Duration;

use distlock_core::backend::url::percent_decode;
use distlock_core::error::redact_url;
use distlock_core::{Error, Result};

/// The default key prefix: every key this backend writes starts with it.
pub const DEFAULT_PREFIX: &str = "distlock";

/// The default bound on connecting and on each server reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// One Redis server of a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeConfig {
    /// The URL handed to the `redis` crate (may hold a password).
    pub url: String,
    /// `host:port`, for messages.
    pub endpoint: String,
}

/// Where and how a [`RedisLock`](crate::RedisLock) connects, parsed from a
/// URL (see the crate docs for the forms) or built in code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    pub(crate) nodes: Vec<NodeConfig>,
    pub(crate) redlock: bool,
    pub(crate) prefix: String,
    pub(crate) fair: bool,
    pub(crate) timeout: Duration,
}

impl RedisConfig {
    /// Parses a `redis://`, `rediss://` or `redlock://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::invalid_url(redact_url(url), reason);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected redis://, rediss:// or redlock://"))?;
        let (location, query) = match rest.split_once('?') {
            Some((location, query)) => (location, Some(query)),
            None => (rest, None),
        };
        let mut config = RedisConfig {
            nodes: Vec::new(),
            redlock: false,
            prefix: DEFAULT_PREFIX.to_owned(),
            fair: true,
            timeout: DEFAULT_TIMEOUT,
        };
        let mut tls = false;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value).ok_or_else(|| bad("bad percent-encoding"))?;
            match name {
                "prefix" => config.prefix = value,
                "fair" => {
                    config.fair =
                        parse_bool(&value).ok_or_else(|| bad("fair must be true or false"))?
                }
                "tls" => {
                    tls = parse_bool(&value).ok_or_else(|| bad("tls must be true or false"))?
                }
                "timeout_ms" => {
                    let ms: u64 = value
                        .parse()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| bad("timeout_ms must be a positive integer"))?;
                    config.timeout = Duration::from_millis(ms);
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown option {name:?} (known: prefix, fair, timeout_ms, tls for redlock)"
                    )))
                }
            }
        }
        check_prefix(&config.prefix).map_err(|reason| bad(&reason))?;
        let (userinfo, hosts_and_path) = match location.rsplit_once('@') {
            Some((userinfo, tail)) => (Some(userinfo), tail),
            None => (None, location),
        };
        let (hosts, path) = match hosts_and_path.split_once('/') {
            Some((hosts, path)) => (hosts, path),
            None => (hosts_and_path, ""),
        };
        if !path.is_empty() && path.parse::<u32>().is_err() {
            return Err(bad("the path must be a database number, e.g. /0"));
        }
        let node_scheme = match scheme {
            "redis" | "rediss" => {
                if hosts.contains(',') {
                    return Err(bad(
                        "one host for redis://; use redlock://h1:p1,h2:p2,h3:p3 for a quorum",
                    ));
                }
                scheme
            }
            "redlock" => {
                config.redlock = true;
                // Redlock's queues would disagree between instances.
                config.fair = false;
                if tls {
                    "rediss"
                } else {
                    "redis"
                }
            }
            _ => return Err(bad("unknown scheme; expected redis, rediss or redlock")),
        };
        if tls && !config.redlock {
            return Err(bad(
                "tls=true is for redlock://; use rediss:// for one server",
            ));
        }
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            let endpoint = if host.starts_with('[') {
                if host.contains("]:") {
                    host.to_owned()
                } else {
                    format!("{host}:6379")
                }
            } else if host.contains(':') {
                let (_, port) = host.rsplit_once(':').unwrap_or_default();
                if port.parse::<u16>().is_err() {
                    return Err(bad("bad port"));
                }
                host.to_owned()
            } else {
                format!("{host}:6379")
            };
            let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let db = if path.is_empty() {
                String::new()
            } else {
                format!("/{path}")
            };
            config.nodes.push(NodeConfig {
                url: format!("{node_scheme}://{auth}{endpoint}{db}"),
                endpoint,
            });
        }
        Ok(config)
    }

    /// Sets the key prefix (no `{` or `}`: they would break the hash tag).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        check_prefix(&prefix).map_err(Error::InvalidConfig)?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Turns fair (FIFO) waiting on or off. Redlock clients are never fair.
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair && !self.redlock;
        self
    }

    /// Bounds connecting and each server reply.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The `host:port` of every server.
    pub fn endpoints(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.endpoint.as_str()).collect()
    }

    /// Whether this is a Redlock quorum.
    pub fn is_redlock(&self) -> bool {
        self.redlock
    }

    /// Whether waiters are served in arrival order.
    pub fn is_fair(&self) -> bool {
        self.fair
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }
}

fn check_prefix(prefix: &str) -> std::result::Result<(), String> {
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(format!(
            "the key prefix must be non-empty and contain no braces, got {prefix:?}"
        ));
    }
    Ok(())
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_instance_forms() {
        let c = RedisConfig::from_url("redis://127.0.0.1").unwrap();
        assert_eq!(c.endpoints(), ["127.0.0.1:6379"]);
        assert!(c.is_fair() && !c.is_redlock());
        assert_eq!(c.key_prefix(), "distlock");
        let c = RedisConfig::from_url(
            "rediss://:s3cret@cache.example:6380/2?prefix=myapp&fair=false&timeout_ms=500",
        )
        .unwrap();
        assert_eq!(c.nodes[0].url, "rediss://:s3cret@cache.example:6380/2");
        assert_eq!(c.endpoints(), ["cache.example:6380"]);
        assert_eq!(c.key_prefix(), "myapp");
        assert!(!c.is_fair());
        assert_eq!(c.timeout, Duration::from_millis(500));
    }

    #[test]
    fn redlock_forms() {
        let c = RedisConfig::from_url("redlock://u:p@h1:1,h2:2,h3/1?prefix=x").unwrap();
        assert!(c.is_redlock() && !c.is_fair());
        assert_eq!(c.endpoints(), ["h1:1", "h2:2", "h3:6379"]);
        assert_eq!(c.nodes[2].url, "redis://u:p@h3:6379/1");
        let c = RedisConfig::from_url("redlock://h1:1,h2:2?tls=true").unwrap();
        assert_eq!(c.nodes[1].url, "rediss://h2:2");
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
            "memcache://h",
            "redis://u:hunter2@h/x",
            "redlock://h1,,h2",
        ] {
            let err = RedisConfig::from_url(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
