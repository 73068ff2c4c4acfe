//! The `zk://` URL: hosts, lock prefix and session options.

use std::time::Duration;

use distlock_core::backend::url::{self, UrlParts};
use distlock_core::error::redact_url;
use distlock_core::{Error, Result};

/// The session timeout asked of the server when the URL names none: how
/// long a crashed or partitioned holder keeps its locks.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The node under which lock directories live when the URL names none.
pub const DEFAULT_PREFIX: &str = "/distlock";

/// A parsed `zk://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZooKeeperConfig {
    /// `host:port` of each server, in the URL's order.
    pub hosts: Vec<String>,
    /// Absolute path of the node that holds one directory per lock key,
    /// without a trailing `/`.
    pub prefix: String,
    /// The session timeout asked of the server (it may clamp it into its
    /// `minSessionTimeout..maxSessionTimeout`).
    pub session_timeout: Duration,
    /// How long [`connect`](crate::ZooKeeperLock::connect) may take before
    /// giving up.
    pub connect_timeout: Duration,
}

impl ZooKeeperConfig {
    /// Parses `zk://h1:2181,h2:2181/prefix?session_timeout=10s` (also
    /// `zookeeper://`). A host without a port gets 2181; an empty path or
    /// `/` means [`DEFAULT_PREFIX`]. Options: `session_timeout` and
    /// `connect_timeout` (humantime durations such as `10s`, `1500ms`).
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
        let prefix = parse_prefix(path).map_err(|reason| bad(&reason))?;
        let mut config = ZooKeeperConfig {
            hosts,
            prefix,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            connect_timeout: Duration::ZERO,
        };
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
                "session_timeout" => config.session_timeout = duration()?,
                "connect_timeout" => connect_timeout = Some(duration()?),
                _ => {
                    return Err(bad(&format!(
                        "unknown option {name:?} (known: session_timeout, connect_timeout)"
                    )))
                }
            }
        }
        if config.session_timeout < Duration::from_millis(100)
            || config.session_timeout > Duration::from_secs(24 * 3600)
        {
            return Err(bad("session_timeout must be between 100ms and 24h"));
        }
        config.connect_timeout = connect_timeout.unwrap_or(config.session_timeout);
        if config.connect_timeout.is_zero() {
            return Err(bad("connect_timeout must not be zero"));
        }
        Ok(config)
    }

    /// The hosts as ZooKeeper's connect string: `h1:2181,h2:2181`.
    pub fn connect_string(&self) -> String {
        self.hosts.join(",")
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

fn parse_prefix(path: &str) -> std::result::Result<String, String> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(DEFAULT_PREFIX.to_owned());
    }
    for component in trimmed[1..].split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(format!(
                "prefix {path:?} has an empty, `.` or `..` component"
            ));
        }
        if component.chars().any(|c| c.is_control()) {
            return Err(format!("prefix {path:?} has a control character"));
        }
    }
    if trimmed == "/zookeeper" || trimmed.starts_with("/zookeeper/") {
        return Err("the /zookeeper tree is reserved by the server".into());
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_prefix_and_options() {
        let config =
            ZooKeeperConfig::from_url("zk://h1:2181,h2,[::1]:2182/apps/locks/?session_timeout=4s")
                .unwrap();
        assert_eq!(config.hosts, ["h1:2181", "h2:2181", "[::1]:2182"]);
        assert_eq!(config.connect_string(), "h1:2181,h2:2181,[::1]:2182");
        assert_eq!(config.prefix, "/apps/locks");
        assert_eq!(config.session_timeout, Duration::from_secs(4));
        assert_eq!(config.connect_timeout, Duration::from_secs(4));

        let config = ZooKeeperConfig::from_url("zookeeper://127.0.0.1:2181").unwrap();
        assert_eq!(config.prefix, DEFAULT_PREFIX);
        assert_eq!(config.session_timeout, DEFAULT_SESSION_TIMEOUT);
        let config =
            ZooKeeperConfig::from_url("zk://127.0.0.1/?connect_timeout=1500ms&session_timeout=20s")
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
            "zk://h:2181?session_timeout=soon",
            "zk://h:2181?colour=blue",
            "zk://h:2181?session_timeout",
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
}
