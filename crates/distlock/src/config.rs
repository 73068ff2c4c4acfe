//! A serde configuration block for a lock service and its options.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{connect, LockOptions, Locker, Result};

/// Where the locks live and how they are taken, as read from a config
/// file. Durations are humantime strings (`"30s"`, `"1m 30s"`).
///
/// ```
/// let config: distlock::LockConfig = serde_json::from_str(
///     r#"{ "url": "redis://127.0.0.1:6379", "ttl": "10s", "wait": "2s" }"#,
/// ).unwrap();
/// assert_eq!(config.options().ttl, std::time::Duration::from_secs(10));
/// assert!(config.options().auto_renew);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LockConfig {
    /// The lock service's URL, e.g. `etcd://10.0.0.5:2379/myapp`.
    pub url: String,
    /// Lease TTL (default 30 s).
    #[serde(with = "humantime_serde", default = "default_ttl")]
    pub ttl: Duration,
    /// How long `lock` may wait (default: until acquired).
    #[serde(with = "humantime_serde", default)]
    pub wait: Option<Duration>,
    /// Renew held locks in the background (default true).
    #[serde(default = "default_true")]
    pub auto_renew: bool,
}

fn default_ttl() -> Duration {
    distlock_core::DEFAULT_TTL
}

fn default_true() -> bool {
    true
}

impl LockConfig {
    /// A config for `url` with default options.
    pub fn new(url: impl Into<String>) -> Self {
        LockConfig {
            url: url.into(),
            ttl: default_ttl(),
            wait: None,
            auto_renew: true,
        }
    }

    /// The lock options this config describes.
    pub fn options(&self) -> LockOptions {
        LockOptions::new()
            .ttl(self.ttl)
            .wait_opt(self.wait)
            .auto_renew(self.auto_renew)
    }

    /// Connects to the configured service after checking the options.
    pub async fn connect(&self) -> Result<Locker> {
        self.options().validate()?;
        connect(&self.url).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_refused() {
        let config: LockConfig = serde_json::from_str(r#"{ "url": "memory://" }"#).unwrap();
        assert_eq!(config, LockConfig::new("memory://"));
        let bad = serde_json::from_str::<LockConfig>(r#"{ "url": "memory://", "tll": "1s" }"#);
        assert!(bad.is_err());
        let bad = serde_json::from_str::<LockConfig>(r#"{ "url": "memory://", "ttl": "soon" }"#);
        assert!(bad.is_err());
    }

    #[tokio::test]
    async fn a_zero_ttl_is_refused_before_connecting() {
        let mut config = LockConfig::new("memory://");
        config.ttl = Duration::ZERO;
        assert!(config.connect().await.is_err());
    }
}
