//! `etcd://` URLs: endpoints, key prefix, key layout, credentials and
//! options.

use std::time::Duration;

use distlock_core::backend::url::{self, percent_decode, UrlParts};
use distlock_core::error::redact_url;
use distlock_core::{Error, Result};

/// The session lease's TTL when the URL does not set `session_ttl`.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(30);
/// The bound on each request when the URL does not set `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The bound on connecting when the URL does not set `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The key prefix of the [`Layout::Distlock`] layout when none is given.
pub const DEFAULT_PREFIX: &str = "distlock";

/// How the keys of a lock are laid out in etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Layout {
    /// etcd's own lock recipe, shared with Go's `concurrency.Mutex` and
    /// `etcdctl lock`: lock `name` is the keys `name/<lease id in hex>`
    /// (`prefix/name/...` with a prefix), ordered by create revision. URL
    /// option `layout=mutex`.
    #[default]
    Mutex,
    /// distlock's earlier layout, for sharing locks with distlock clients
    /// from before the mutex layout: `prefix/<encoded name>/<lease>-<seq>`,
    /// prefix `distlock` when none is given. URL option `layout=distlock`.
    Distlock,
}

/// How to reach etcd and where the locks live.
///
/// ```
/// use std::time::Duration;
/// use distlock_etcd::EtcdConfig;
///
/// let config = EtcdConfig::from_url("etcd://app:s3cret@10.0.0.1:2379,10.0.0.2:2379/myapp/locks?session_ttl=10s").unwrap();
/// assert_eq!(config.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
/// assert_eq!(config.prefix, "myapp/locks");
/// assert_eq!(config.user, Some(("app".to_owned(), "s3cret".to_owned())));
/// assert_eq!(config.session_ttl, Duration::from_secs(10));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// `host:port` of each member to use.
    pub endpoints: Vec<String>,
    /// Key prefix of every lock (no leading or trailing `/`); may be empty.
    pub prefix: String,
    /// How the keys of a lock are laid out.
    pub layout: Layout,
    /// User name and password, if etcd has authentication on.
    pub user: Option<(String, String)>,
    /// TTL of the client's session lease, which carries every lock whose
    /// `LockOptions::ttl` equals it (whole seconds, at least 2 s on etcd 3.4).
    pub session_ttl: Duration,
    /// Bound on each request.
    pub timeout: Duration,
    /// Bound on connecting and creating the session.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("layout", &self.layout)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("session_ttl", &self.session_ttl)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl EtcdConfig {
    /// A configuration for `endpoints` (`host:port`) with the defaults:
    /// no prefix, the [mutex](Layout::Mutex) layout, no credentials,
    /// `session_ttl` 30 s, `timeout` 5 s and `connect_timeout` 5 s.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: String::new(),
            layout: Layout::default(),
            user: None,
            session_ttl: DEFAULT_SESSION_TTL,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Parses `etcd://[user:password@]host:port[,host:port...][/prefix][?options]`.
    ///
    /// Options: `session_ttl`, `timeout`, `connect_timeout`, each a duration
    /// such as `30s` or `500ms`; `layout`, `mutex` (the default) or
    /// `distlock` ([`Layout`]). User and password may be percent-encoded.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |reason: String| Error::invalid_url(redact_url(url), reason);
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| invalid("the scheme must be etcd://".into()))?;
        let UrlParts {
            userinfo,
            hosts,
            path,
            query,
        } = UrlParts::split(rest);
        let user = match userinfo {
            None => None,
            Some(userinfo) => {
                let (name, password) = userinfo.split_once(':').ok_or_else(|| {
                    invalid("credentials must be user:password (etcd needs both)".into())
                })?;
                let name = percent_decode(name).ok_or_else(|| invalid("bad user name".into()))?;
                let password =
                    percent_decode(password).ok_or_else(|| invalid("bad password".into()))?;
                if name.is_empty() {
                    return Err(invalid("the user name is empty".into()));
                }
                Some((name, password))
            }
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            endpoints.push(parse_endpoint(host.trim()).map_err(invalid)?);
        }
        let prefix =
            percent_decode(path.trim_matches('/')).ok_or_else(|| invalid("bad prefix".into()))?;
        let mut config = EtcdConfig {
            endpoints,
            prefix,
            user,
            ..EtcdConfig::new(Vec::<String>::new())
        };
        for option in url::options(query) {
            let (name, value) = option.map_err(invalid)?;
            if name == "layout" {
                config.layout = match value {
                    "mutex" => Layout::Mutex,
                    "distlock" => Layout::Distlock,
                    other => {
                        return Err(invalid(format!(
                            "option layout={other:?}: expected mutex or distlock"
                        )))
                    }
                };
                continue;
            }
            let field = match name {
                "session_ttl" => &mut config.session_ttl,
                "timeout" => &mut config.timeout,
                "connect_timeout" => &mut config.connect_timeout,
                other => {
                    return Err(invalid(format!(
                        "unknown option {other:?}; expected session_ttl, timeout, connect_timeout or layout"
                    )))
                }
            };
            *field = humantime::parse_duration(value).map_err(|err| {
                invalid(format!(
                    "option {name}={value:?} is not a duration like 5s: {err}"
                ))
            })?;
        }
        config.validate().map_err(|err| match err {
            Error::InvalidConfig(reason) => invalid(reason),
            other => other,
        })?;
        Ok(config)
    }

    /// Checks the values: at least one `host:port` endpoint, a prefix
    /// without a leading or trailing `/` (or none), a user name if credentials are
    /// given, `session_ttl` between 1 s and a year, positive timeouts. The
    /// error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig(reason));
        if self.endpoints.is_empty() {
            return invalid("endpoints must name at least one etcd member (host:port)".into());
        }
        for endpoint in &self.endpoints {
            if parse_endpoint(endpoint).as_ref() != Ok(endpoint) {
                return invalid(format!(
                    "endpoints: {endpoint:?} is not host:port (bracket IPv6 literals)"
                ));
            }
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return invalid(format!(
                "prefix must have no leading or trailing /, got {:?}",
                self.prefix
            ));
        }
        if matches!(&self.user, Some((name, _)) if name.is_empty()) {
            return invalid("user: the user name is empty".into());
        }
        if self.session_ttl < Duration::from_secs(1) || self.session_ttl > MAX_LEASE_TTL {
            return invalid(format!(
                "session_ttl must be between 1s and {MAX_LEASE_TTL:?}, got {:?}",
                self.session_ttl
            ));
        }
        for (name, value) in [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("{name} must be positive, got {value:?}"));
            }
        }
        Ok(())
    }

    /// The endpoints as one string for messages.
    pub(crate) fn endpoints_label(&self) -> String {
        self.endpoints.join(",")
    }
}

/// One member's `host[:port]`, as `host:port` (etcd's client port 2379
/// when none is given; IPv6 literals in brackets).
fn parse_endpoint(host: &str) -> std::result::Result<String, String> {
    if host.is_empty() {
        return Err("expected host:port[,host:port...]".into());
    }
    let bracketed = |name: &str| name.starts_with('[') && name.ends_with(']');
    if bracketed(host) {
        return Ok(format!("{host}:2379"));
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && (!name.contains(':') || bracketed(name)) => {
            port.parse::<u16>()
                .map_err(|_| format!("bad port in {host:?}"))?;
            Ok(host.to_owned())
        }
        None => Ok(format!("{host}:2379")),
        _ => Err(format!("bad endpoint {host:?} (bracket IPv6 literals)")),
    }
}

/// etcd's largest lease TTL (`MaxLeaseTTL`, 9 000 000 000 s), rounded down
/// to what is useful.
const MAX_LEASE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whole seconds for a lease TTL, rounded up (etcd leases count seconds).
pub(crate) fn lease_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let config = EtcdConfig::from_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(config.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(config.prefix, "");
        assert_eq!(config.layout, Layout::Mutex);
        assert_eq!(config.user, None);
        assert_eq!(config.session_ttl, DEFAULT_SESSION_TTL);

        let config = EtcdConfig::from_url(
            "etcd://u%40x:p%3Aw%2F@h1:2379,h2/app/locks/?session_ttl=5s&timeout=2s&connect_timeout=300ms",
        )
        .unwrap();
        assert_eq!(config.endpoints, ["h1:2379", "h2:2379"]);
        assert_eq!(config.prefix, "app/locks");
        assert_eq!(config.user, Some(("u@x".into(), "p:w/".into())));
        assert_eq!(config.session_ttl, Duration::from_secs(5));
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!(config.connect_timeout, Duration::from_millis(300));
        assert!(!format!("{config:?}").contains("p:w/"), "password in Debug");

        let config = EtcdConfig::from_url("etcd://[::1]:2379,[::1]/p").unwrap();
        assert_eq!(config.endpoints, ["[::1]:2379", "[::1]:2379"]);

        let config = EtcdConfig::from_url("etcd://h/app?layout=distlock").unwrap();
        assert_eq!(config.layout, Layout::Distlock);
        assert_eq!(config.prefix, "app");
        assert!(EtcdConfig::from_url("etcd://h?layout=zk").is_err());
    }

    #[test]
    fn refuses_bad_urls_without_leaking_the_password() {
        for url in [
            "redis://h:1",
            "etcd://",
            "etcd://h1:2379,,h2:2379",
            "etcd://h:notaport",
            "etcd://h:2379?session_ttl=abc",
            "etcd://h:2379?session_ttl=0s",
            "etcd://h:2379?bogus=1s",
            "etcd://h:2379?session_ttl",
            "etcd://user@h:2379",
            "etcd://u:secret@h:99999",
        ] {
            let err = EtcdConfig::from_url(url).expect_err(url);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn options_are_named_in_errors() {
        let err = EtcdConfig::from_url("etcd://h:2379?fair=true").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"fair\"") && text.contains("connect_timeout"),
            "{text}"
        );
        let err = EtcdConfig::from_url("etcd://h:2379?timeout=soon").unwrap_err();
        assert!(err.to_string().contains("timeout=\"soon\""), "{err}");
    }

    #[test]
    fn validate_names_the_field_and_value() {
        EtcdConfig::new(["h:2379"]).validate().unwrap();
        let cases = [
            (EtcdConfig::new(Vec::<String>::new()), "endpoints"),
            (EtcdConfig::new(["h"]), "\"h\""),
            (EtcdConfig::new(["::1:2379"]), "\"::1:2379\""),
            (
                EtcdConfig {
                    prefix: "/app".into(),
                    ..EtcdConfig::new(["h:2379"])
                },
                "prefix must have no leading or trailing /, got \"/app\"",
            ),
            (
                EtcdConfig {
                    user: Some((String::new(), "pw".into())),
                    ..EtcdConfig::new(["h:2379"])
                },
                "user",
            ),
            (
                EtcdConfig {
                    session_ttl: Duration::from_millis(500),
                    ..EtcdConfig::new(["h:2379"])
                },
                "session_ttl must be between 1s and 31536000s, got 500ms",
            ),
            (
                EtcdConfig {
                    timeout: Duration::ZERO,
                    ..EtcdConfig::new(["h:2379"])
                },
                "timeout must be positive, got 0ns",
            ),
            (
                EtcdConfig {
                    connect_timeout: Duration::ZERO,
                    ..EtcdConfig::new(["h:2379"])
                },
                "connect_timeout must be positive, got 0ns",
            ),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(Error::InvalidConfig(reason)) => {
                    assert!(reason.contains(expected), "{reason:?} lacks {expected:?}")
                }
                other => panic!("{config:?}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(800)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(2)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(2001)), 3);
    }
}
