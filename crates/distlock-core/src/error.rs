//! The one error type of distlock.

use std::time::Duration;

/// A boxed error from a backend's client library, kept as the `source`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used across distlock.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when taking, keeping or releasing a lock.
///
/// Backend client errors are wrapped in [`Error::Connection`] or
/// [`Error::Backend`] with their context; they are never public variants.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key cannot name a lock (today: it is empty).
    #[error("invalid lock key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// Options or configuration values that cannot work (a zero TTL, say).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A connection URL that cannot be parsed or names an unknown scheme.
    #[error("invalid lock URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given (passwords are not redacted by the core; backends
        /// should pass a redacted form).
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The URL names a backend whose cargo feature is not enabled.
    #[error("the {backend} backend needs the `{feature}` cargo feature of the `distlock` crate")]
    FeatureNotEnabled {
        /// The backend the URL asked for.
        backend: &'static str,
        /// The feature that enables it.
        feature: &'static str,
    },

    /// `lock` waited for its whole `wait` without acquiring. If the
    /// service was unreachable meanwhile (the attempts were retried), the
    /// last such error is the `source` and the message counts them.
    #[error("timed out after {waited:?} waiting for lock {key:?}{}", outage_note(*.unreachable, .last_error))]
    Timeout {
        /// The lock's key.
        key: String,
        /// How long it waited.
        waited: Duration,
        /// How many attempts failed because the service could not be
        /// reached (each retried with the options' backoff).
        unreachable: u32,
        /// The last of those failures.
        #[source]
        last_error: Option<Box<Error>>,
    },

    /// The lock is no longer ours: it expired, was taken by another owner,
    /// or was revoked. Nothing of a newer holder was touched.
    #[error("lock {key:?} is not held (it expired or another owner has it)")]
    NotHeld {
        /// The lock's key.
        key: String,
    },

    /// The backend cannot do what was asked: resuming a lock held by
    /// another client, say, where the lock lives in that client's session.
    #[error("the {backend} backend cannot {operation}: {reason}")]
    Unsupported {
        /// The backend, e.g. `zookeeper`.
        backend: &'static str,
        /// What was asked, e.g. `resume a lock`.
        operation: &'static str,
        /// Why not.
        reason: &'static str,
    },

    /// Could not reach or connect to the coordination service.
    #[error("cannot connect to {backend} at {endpoint}")]
    Connection {
        /// The backend, e.g. `redis`.
        backend: &'static str,
        /// The endpoint(s) tried, e.g. `127.0.0.1:6379`.
        endpoint: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// The service could not be reached during an operation on a lock (the
    /// connection dropped or was refused, or no answer came in time), so
    /// the outcome is unknown. `lock` retries it within its `wait`.
    #[error("{backend} at {endpoint} is unreachable: {operation} of lock {key:?} failed")]
    Unavailable {
        /// The backend, e.g. `redis`.
        backend: &'static str,
        /// The endpoint(s) in use.
        endpoint: String,
        /// What was being done: `acquire`, `release`, `extend`, `wait`...
        operation: &'static str,
        /// The lock's key (empty for client-wide operations).
        key: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// The service answered with an error, or the connection failed during
    /// an operation on a lock (backends that tell the two apart report the
    /// latter as [`Error::Unavailable`]).
    #[error("{backend} at {endpoint}: {operation} of lock {key:?} failed")]
    Backend {
        /// The backend, e.g. `etcd`.
        backend: &'static str,
        /// The endpoint(s) in use.
        endpoint: String,
        /// What was being done: `acquire`, `release`, `extend`, `wait`...
        operation: &'static str,
        /// The lock's key (empty for client-wide operations).
        key: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// `Error::NotHeld` for `key`.
    pub fn not_held(key: impl Into<String>) -> Self {
        Error::NotHeld { key: key.into() }
    }

    /// `Error::Connection` with its context.
    pub fn connection(
        backend: &'static str,
        endpoint: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Connection {
            backend,
            endpoint: endpoint.into(),
            source: source.into(),
        }
    }

    /// `Error::Backend` with its context.
    pub fn backend(
        backend: &'static str,
        endpoint: impl Into<String>,
        operation: &'static str,
        key: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            backend,
            endpoint: endpoint.into(),
            operation,
            key: key.into(),
            source: source.into(),
        }
    }

    /// `Error::Unavailable` with its context.
    pub fn unavailable(
        backend: &'static str,
        endpoint: impl Into<String>,
        operation: &'static str,
        key: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Unavailable {
            backend,
            endpoint: endpoint.into(),
            operation,
            key: key.into(),
            source: source.into(),
        }
    }

    /// `Error::InvalidUrl` for `url`.
    pub fn invalid_url(url: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidUrl {
            url: url.into(),
            reason: reason.into(),
        }
    }

    /// True for [`Error::NotHeld`].
    pub fn is_not_held(&self) -> bool {
        matches!(self, Error::NotHeld { .. })
    }

    /// True for [`Error::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Error::Unsupported { .. })
    }

    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True when retrying later may succeed: connection, unavailability
    /// and backend errors.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connection { .. } | Error::Unavailable { .. } | Error::Backend { .. }
        )
    }

    /// True when the service could not be reached ([`Error::Connection`],
    /// [`Error::Unavailable`]): what `lock` retries within its wait.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Connection { .. } | Error::Unavailable { .. })
    }
}

/// The timeout message's note on failed attempts, if any.
fn outage_note(unreachable: u32, last_error: &Option<Box<Error>>) -> String {
    match last_error {
        Some(last) if unreachable > 0 => format!(
            "; {unreachable} attempt(s) meanwhile found the service unreachable, the last: {last}"
        ),
        _ => String::new(),
    }
}

/// `url` with any password replaced by `***`, for error messages and logs.
///
/// ```
/// assert_eq!(distlock_core::error::redact_url("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
/// assert_eq!(distlock_core::error::redact_url("etcd://h:2379/p"), "etcd://h:2379/p");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    if !userinfo.contains(':') {
        return url.to_owned();
    }
    format!("{}{}:***{}", &url[..scheme_end + 3], user, &rest[at..])
}

/// An error and its sources on one line: each source's message is added
/// after a colon unless the message so far already says it, and line
/// breaks become spaces. For command-line and JSON error messages.
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_puts_the_sources_on_one_line_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused\nby peer");
        let err = Error::connection("redis", "127.0.0.1:1", io);
        assert_eq!(
            describe(&err),
            "cannot connect to redis at 127.0.0.1:1: refused by peer"
        );
        let repeated = std::io::Error::other(err.to_string());
        assert_eq!(describe(&repeated), err.to_string());
    }

    #[test]
    fn messages_carry_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::connection("redis", "127.0.0.1:1", io);
        assert_eq!(err.to_string(), "cannot connect to redis at 127.0.0.1:1");
        let source = std::error::Error::source(&err).expect("source kept");
        assert_eq!(source.to_string(), "refused");
        assert!(err.is_transient());
        assert!(Error::not_held("k").is_not_held());
    }
}
