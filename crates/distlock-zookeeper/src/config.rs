//! The `zk://` URL and the configuration it parses to: hosts, lock
//! prefix and session options.

use std::time::Duration;

use distlock_core::backend::url::{self, UrlParts};
use distlock_core::error::redact_url;
use distlock_core::{Error, Result};

/// The session TTL asked of the server when none is set: how long a
/// crashed or partitioned holder keeps its locks.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);

/// The node under which lock directories live when the URL names none.
pub const DEFAULT_PREFIX: &str = "/distlock";

/// The shortest and longest session TTL accepted.
const SESSION_TTL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(24 * 3600));

/// How to reach the ensemble and where the locks live.
///
/// ```
/// use std::time::Duration;
/// use distlock_zookeeper::ZooKeeperConfig;
///
/// let config = ZooKeeperConfig::from_url("zk://zk1:2181,zk2/myapp/locks?session_ttl=4s").unwrap();
/// assert_eq!(config.hosts, ["zk1:2181", "zk2:2181"]);
/// assert_eq!(config.prefix, "/myapp/locks");
/// assert_eq!(config.session_ttl, Duration::from_secs(4));
/// assert_eq!(config.connect_timeout, Duration::from_secs(4));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZooKeeperConfig {
    /// `host[:port]` of each server, in the URL's order (port 2181 when
    /// missing; IPv6 as `[::1]:2181`).
    pub hosts: Vec<String>,
    /// Absolute path of the node that holds one directory per lock key,
    /// without a trailing `/`.
    pub prefix: String,
    /// The session timeout asked of the server (it may clamp it into its
    /// `minSessionTimeout..maxSessionTimeout`): how long a crashed or
    /// partitioned holder keeps its locks. Between 100ms and 24h.
    pub session_ttl: Duration,
    /// How long [`connect`](crate::ZooKeeperLock::connect) may take before
    /// giving up. A URL without `connect_timeout` sets it to `session_ttl`.
    pub connect_timeout: Duration,
}

impl ZooKeeperConfig {
    /// A configuration for `hosts` (`host[:port]`) with the defaults:
    /// prefix [`DEFAULT_PREFIX`], session TTL [`DEFAULT_SESSION_TTL`] and a
    /// connect timeout of the same length.
    pub fn new<S: Into<String>>(hosts: impl IntoIterator<Item = S>) -> Self {
        ZooKeeperConfig {
            hosts: hosts.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            session_ttl: DEFAULT_SESSION_TTL,
            connect_timeout: DEFAULT_SESSION_TTL,
        }
    }

    /// Parses `zk://h1:2181,h2:2181/prefix?session_ttl=10s` (also
    /// `zookeeper://`). A host without a port gets 2181; an empty path or
    /// `/` means [`DEFAULT_PREFIX`]. Options: `session_ttl` and
    /// `connect_timeout` (humantime durations such as `10s`, `1500ms`);
    /// `connect_timeout` defaults to the session TTL.
    pub fn from_url(url: &str) -> Result<Self> {
        let shown = redact_url(url);
        let bad = |reason: &str| Error::invalid_url(shown.clone(), reason);
        let rest = url
            .strip_prefix("zk://")
            .or_else(|| url.strip_prefix("zookeeper://"))
            .ok_or_else(|| bad("expected a zk:// or zookeeper:// URL"))?;
        let UrlParts {
            userinfo,
            hosts: host_list,
            path,
            query,
        } = UrlParts::split(rest);
        if userinfo.is_some() {
            return Err(bad(
                "credentials in the URL are not supported by the zookeeper backend",
            ));
        }
        let mut hosts = Vec::new();
        for host in host_list.split(',') {
            hosts.push(parse_host(host).map_err(|reason| bad(&reason))?);
        }
        let mut config = ZooKeeperConfig::new(hosts);
        if !path.trim_end_matches('/').is_empty() {
            config.prefix = path.trim_end_matches('/').to_owned();
        }
        let mut connect_timeout = None;
        for option in url::options(query) {
            let (name, value) = option.map_err(|reason| bad(&reason))?;
            let duration = || {
                humantime::parse_duration(value).map_err(|err| {
                    bad(&format!(
                        "{name}={value:?} is not a duration like 10s: {err}"
                    ))
                })
            };
            match name {
                "session_ttl" => config.session_ttl = duration()?,
                "connect_timeout" => connect_timeout = Some(duration()?),
                _ => {
                    return Err(bad(&format!(
                        "unknown option {name:?} (known: session_ttl, connect_timeout)"
                    )))
                }
            }
        }
        config.connect_timeout = connect_timeout.unwrap_or(config.session_ttl);
        config.validate().map_err(|err| match err {
            Error::InvalidConfig(reason) => bad(&reason),
            other => other,
        })?;
        Ok(config)
    }

    /// Checks the values: at least one well-formed host, an absolute
    /// prefix outside `/zookeeper`, a session TTL between 100ms and 24h and
    /// a non-zero connect timeout.
    pub fn validate(&self) -> Result<()> {
        if self.hosts.is_empty() {
            return Err(Error::InvalidConfig(
                "hosts: no ZooKeeper server given".into(),
            ));
        }
        for host in &self.hosts {
            parse_host(host).map_err(|reason| Error::InvalidConfig(format!("hosts: {reason}")))?;
        }
        check_prefix(&self.prefix).map_err(Error::InvalidConfig)?;
        let (shortest, longest) = SESSION_TTL_RANGE;
        if self.session_ttl < shortest || self.session_ttl > longest {
            return Err(Error::InvalidConfig(format!(
                "session_ttl must be between 100ms and 24h, got {:?}",
                self.session_ttl
            )));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "connect_timeout must not be zero".into(),
            ));
        }
        Ok(())
    }

    /// The hosts as ZooKeeper's connect string: `h1:2181,h2:2181` (a host
    /// without a port gets 2181).
    pub fn connect_string(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|host| parse_host(host).unwrap_or_else(|_| host.clone()))
            .collect();
        hosts.join(",")
    }
}

fn parse_host(host: &str) -> std::result::Result<String, String> {
    if host.is_empty() {
        return Err("empty host (expected zk://host:port[,host:port...][/prefix])".into());
    }
    // `[v6]:port`, `[v6]`, `name:port`, `name`
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        let (inside, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("unclosed [ in host {host:?}"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("unexpected text after ] in host {host:?}"))?,
            ),
        };
        (format!("[{inside}]"), port)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (host.to_owned(), None),
        }
    };
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("bad host name in {host:?}"));
    }
    let port: u16 = match port {
        None => 2181,
        Some(port) => port
            .parse()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("bad port in host {host:?}"))?,
    };
    Ok(format!("{name}:{port}"))
}

/// Checks a lock prefix: an absolute path without a trailing `/`, with no
/// empty, `.` or `..` component, outside the server's `/zookeeper` tree.
fn check_prefix(prefix: &str) -> std::result::Result<(), String> {
    let Some(relative) = prefix.strip_prefix('/') else {
        return Err(format!(
            "prefix must be an absolute path such as /distlock, got {prefix:?}"
        ));
    };
    for component in relative.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(format!(
                "prefix {prefix:?} has an empty, `.` or `..` component"
            ));
        }
        if component.chars().any(|c| c.is_control()) {
            return Err(format!("prefix {prefix:?} has a control character"));
        }
    }
    if prefix == "/zookeeper" || prefix.starts_with("/zookeeper/") {
        return Err("the /zookeeper tree is reserved by the server".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_prefix_and_options() {
        let config =
            ZooKeeperConfig::from_url("zk://h1:2181,h2,[::1]:2182/apps/locks/?session_ttl=4s")
                .unwrap();
        assert_eq!(config.hosts, ["h1:2181", "h2:2181", "[::1]:2182"]);
        assert_eq!(config.connect_string(), "h1:2181,h2:2181,[::1]:2182");
        assert_eq!(config.prefix, "/apps/locks");
        assert_eq!(config.session_ttl, Duration::from_secs(4));
        assert_eq!(config.connect_timeout, Duration::from_secs(4));

        let config = ZooKeeperConfig::from_url("zookeeper://127.0.0.1:2181").unwrap();
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        assert_eq!(config.session_ttl, DEFAULT_SESSION_TTL);
        let config =
            ZooKeeperConfig::from_url("zk://127.0.0.1/?connect_timeout=1500ms&session_ttl=20s")
                .unwrap();
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        assert_eq!(config.connect_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn refuses_bad_urls_with_a_reason() {
        for url in [
            "redis://h:2181",
            "zk://",
            "zk://h1,,h2",
            "zk://h:notaport",
            "zk://h:0",
            "zk://h:2181/a//b",
            "zk://h:2181/a/../b",
            "zk://h:2181/zookeeper/x",
            "zk://u:secret@h:2181",
            "zk://h:2181?session_ttl=soon",
            "zk://h:2181?colour=blue",
            "zk://h:2181?session_ttl",
            "zk://h:2181?session_ttl=50ms",
            "zk://h:2181?connect_timeout=0s",
            "zk://[::1:2181",
        ] {
            match ZooKeeperConfig::from_url(url) {
                Err(Error::InvalidUrl { url: shown, reason }) => {
                    assert!(!shown.contains("secret"), "{shown}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{url}: expected InvalidUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_old_option_name_is_unknown_and_the_known_ones_are_listed() {
        let err = ZooKeeperConfig::from_url("zk://h:2181?session_timeout=4s").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("session_timeout"), "{text}");
        assert!(text.contains("session_ttl, connect_timeout"), "{text}");
    }

    #[test]
    fn new_has_safe_defaults_and_validate_names_the_field() {
        let config = ZooKeeperConfig::new(["zk1", "zk2:2182"]);
        config.validate().unwrap();
        assert_eq!(config.connect_string(), "zk1:2181,zk2:2182");
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        assert_eq!(config.session_ttl, DEFAULT_SESSION_TTL);
        assert_eq!(config.connect_timeout, DEFAULT_SESSION_TTL);

        let mut bad = config.clone();
        bad.session_ttl = Duration::from_millis(10);
        let mut no_hosts = config.clone();
        no_hosts.hosts.clear();
        let mut relative = config.clone();
        relative.prefix = "locks".into();
        let mut reserved = config.clone();
        reserved.prefix = "/zookeeper".into();
        let mut zero = config.clone();
        zero.connect_timeout = Duration::ZERO;
        for (config, field) in [
            (bad, "session_ttl"),
            (no_hosts, "hosts"),
            (relative, "prefix"),
            (reserved, "zookeeper"),
            (zero, "connect_timeout"),
        ] {
            match config.validate() {
                Err(Error::InvalidConfig(reason)) => {
                    assert!(reason.contains(field), "{field}: {reason}")
                }
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
