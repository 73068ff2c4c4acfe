//! `HttpConfig`: where the service is, its token, timeouts and retries.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use distlock_core::backend::url::{options, percent_decode, UrlParts};
use distlock_core::error::redact_url;
use distlock_core::{Error, Result};

/// The environment variable the bearer token is read from when the URL
/// names no `token_file`.
pub const TOKEN_ENV: &str = "DISTLOCK_TOKEN";

/// A bearer token: never printed, in `Debug` or in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Exponential backoff with additive jitter for transient failures
/// (connection errors, 502, 503, 504): the n-th delay is
/// `min(initial * 2^n, max)` plus a random part of up to `max_jitter`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// The first delay (default 200 ms).
    pub initial: Duration,
    /// The largest delay before jitter (default 5 s).
    pub max: Duration,
    /// The largest random addition to each delay (default 1 s).
    pub max_jitter: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            max_jitter: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.max);
        base + self.max_jitter.mul_f64(fastrand::f64())
    }
}

/// How an [`HttpLock`](crate::HttpLock) reaches the service.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HttpConfig {
    /// The service's base URL, `http(s)://host:port[/path]`, without options.
    pub base_url: String,
    /// The bearer token, if the service needs one.
    pub token: Option<Token>,
    /// Bound on one request, beyond a long poll's wait (default 5 s).
    pub timeout: Duration,
    /// Bound on connecting (default 2 s).
    pub connect_timeout: Duration,
    /// The longest wait asked of the server in one acquire request; a
    /// longer `wait` is several long polls (default 20 s, under the
    /// service's default limit of 60 s).
    pub long_poll: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
}

impl HttpConfig {
    /// The service at `base_url`, with the token from `$DISTLOCK_TOKEN`
    /// if set.
    pub fn new(base_url: impl Into<String>) -> Self {
        HttpConfig {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token: std::env::var(TOKEN_ENV)
                .ok()
                .map(|token| token.trim().to_owned())
                .filter(|token| !token.is_empty())
                .map(Token),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            long_poll: Duration::from_secs(20),
            retry: RetryPolicy::default(),
        }
    }

    /// Parses `http(s)://host:port[/path][?options]`. Options: `token_file`
    /// (a file whose first line is the token; else `$DISTLOCK_TOKEN`),
    /// `timeout`, `connect_timeout`, `long_poll`, `retry_initial`,
    /// `retry_max`, `retry_jitter`.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |reason: String| Error::invalid_url(redact_url(url), reason);
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(scheme, _)| *scheme == "http" || *scheme == "https")
            .ok_or_else(|| invalid("expected http://host:port or https://host:port".into()))?;
        let parts = UrlParts::split(rest);
        if parts.userinfo.is_some() {
            return Err(invalid(
                "credentials in the URL are not supported; use token_file or $DISTLOCK_TOKEN"
                    .into(),
            ));
        }
        if parts.hosts.is_empty() || parts.hosts.contains(',') {
            return Err(invalid("expected exactly one host".into()));
        }
        let mut config = HttpConfig::new(format!("{scheme}://{}{}", parts.hosts, parts.path));
        for pair in options(parts.query) {
            let (name, value) = pair.map_err(invalid)?;
            let value = percent_decode(value)
                .ok_or_else(|| invalid(format!("option {name}: bad percent-encoding")))?;
            let duration = || {
                humantime::parse_duration(&value)
                    .map_err(|err| invalid(format!("option {name}={value}: {err}")))
            };
            match name {
                "token_file" => {
                    config.token = Some(read_token(PathBuf::from(&value)).map_err(invalid)?)
                }
                "timeout" => config.timeout = duration()?,
                "connect_timeout" => config.connect_timeout = duration()?,
                "long_poll" => config.long_poll = duration()?,
                "retry_initial" => config.retry.initial = duration()?,
                "retry_max" => config.retry.max = duration()?,
                "retry_jitter" => config.retry.max_jitter = duration()?,
                other => return Err(invalid(format!("unknown option `{other}`"))),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.timeout.is_zero() || self.connect_timeout.is_zero() || self.long_poll.is_zero() {
            return Err(Error::InvalidConfig(
                "http: timeout, connect_timeout and long_poll must be positive".into(),
            ));
        }
        if self.retry.initial.is_zero() || self.retry.max < self.retry.initial {
            return Err(Error::InvalidConfig(format!(
                "http: retries need 0 < retry_initial <= retry_max, got {:?} and {:?}",
                self.retry.initial, self.retry.max
            )));
        }
        Ok(())
    }
}

fn read_token(path: PathBuf) -> std::result::Result<Token, String> {
    let text = std::fs::read_to_string(&path)
        .map_err(|err| format!("token_file {}: {err}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!("token_file {} is empty", path.display()));
    }
    Ok(Token(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options_and_refuses_unknown_ones() {
        let config = HttpConfig::from_url(
            "http://127.0.0.1:8181/locks?timeout=2s&retry_initial=50ms&retry_max=1s&retry_jitter=0s",
        )
        .unwrap();
        assert_eq!(config.base_url, "http://127.0.0.1:8181/locks");
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!(config.retry.delay(0), Duration::from_millis(50));
        assert_eq!(config.retry.delay(10), Duration::from_secs(1));
        let err = HttpConfig::from_url("http://h:1?nope=1").unwrap_err();
        assert!(err.to_string().contains("unknown option `nope`"), "{err}");
        assert!(HttpConfig::from_url("http://a:1,b:2").is_err());
    }

    #[test]
    fn the_token_is_read_from_a_file_and_never_printed() {
        let path = std::env::temp_dir().join(format!("distlock-http-token-{}", fastrand::u64(..)));
        std::fs::write(&path, "s3cret-token\n").unwrap();
        let config =
            HttpConfig::from_url(&format!("http://h:1?token_file={}", path.display())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            config.token.as_ref().map(Token::expose),
            Some("s3cret-token")
        );
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn the_default_retry_policy_is_200ms_to_5s_with_up_to_1s_of_jitter() {
        let policy = RetryPolicy::default();
        for attempt in 0..30 {
            let nominal = Duration::from_millis(200)
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(Duration::from_secs(5));
            let delay = policy.delay(attempt);
            assert!(
                delay >= nominal && delay <= nominal + Duration::from_secs(1),
                "{attempt}: {delay:?}"
            );
        }
    }
}
