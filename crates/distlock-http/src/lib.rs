//! The `http://` and `https://` backend of distlock: a client of the lock
//! service (`distlock serve`, the `distlock-serve` crate), so a Rust
//! program can move from `redis://` to `http://lock-service:8181`
//! without code changes.
//!
//! - Fencing tokens come from the backend behind the service.
//! - The service never renews a lease by itself: this client refreshes
//!   it (every `ttl / 3`, through the core's renewal), and `lost()` fires
//!   when a refresh is refused or the TTL passes without one.
//! - `lock` waits with server-side long polls of up to `long_poll` each,
//!   so it never polls; transient failures (connection errors, 5xx) are
//!   retried with exponential backoff and jitter: 200 ms doubling to 5 s
//!   plus up to 1 s at random by default, or `LockOptions::backoff` when
//!   set, or the URL options below.
//! - Dropping a guard releases it in the background.
//! - The bearer token comes from `$DISTLOCK_TOKEN` or the file the
//!   `token_file` option names; it never appears in logs or `Debug`.
//!
//! URL: `http(s)://host:port[/path][?token_file=/etc/distlock/token&timeout=5s&connect_timeout=2s&long_poll=20s&retry_initial=200ms&retry_max=5s&retry_jitter=1s]`.
//!
//! Round trips: an acquire, a refresh and a release are one HTTP request
//! each, plus the backend's own cost inside the service.
//!
//! One gap no client can close: if a `lock` future is dropped while the
//! service is granting it, the grant's answer is lost and the lease stays
//! until its TTL (the service gives up waiting as soon as it sees the
//! connection close, which covers every other moment).

#![warn(missing_docs)]

mod acquire;
mod api;
mod config;
mod held;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{self, validity_deadline, Lease, RenewalScheduler};
use distlock_core::{
    Backoff, Capabilities, DistributedLock, Error, LockGuard, LockOptions, Result,
};
use tokio::time::Instant;

use acquire::InFlightAcquire;
use api::{duration, AcquireRequest, Answer, Api, Health};
pub use api::{path_segment, KeyStatus};
pub use config::{HttpConfig, RetryPolicy, Token, TOKEN_ENV};

/// The backend's name in errors and spans.
pub const BACKEND: &str = "http";

/// A client of the distlock lock service.
pub struct HttpLock {
    api: Arc<Api>,
    scheduler: RenewalScheduler,
    capabilities: Capabilities,
    remote_backend: String,
}

impl std::fmt::Debug for HttpLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLock")
            .field("endpoint", &self.api.endpoint)
            .field("remote_backend", &self.remote_backend)
            .field("token", &self.api.config.token)
            .finish()
    }
}

impl HttpLock {
    /// Connects to the service at `url` (see the crate docs for options).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(HttpConfig::from_url(url)?).await
    }

    /// Connects with `config`: asks the service's `/healthz` which
    /// backend it fronts and what that backend promises.
    pub async fn with_config(config: HttpConfig) -> Result<Self> {
        config.validate()?;
        let api = Arc::new(Api::new(config)?);
        let health = match api.get::<Health>("/healthz", "connect", "").await {
            Ok(Answer::Ok(health)) => health,
            Ok(Answer::Refused(status, body)) => {
                return Err(Error::connection(
                    BACKEND,
                    api.endpoint.clone(),
                    format!(
                        "/healthz answered {status} {}: {}",
                        body.error, body.message
                    ),
                ))
            }
            Err(Error::Unavailable { source, .. }) | Err(Error::Backend { source, .. }) => {
                return Err(Error::connection(BACKEND, api.endpoint.clone(), source))
            }
            Err(err) => return Err(err),
        };
        let remote = health.capabilities.unwrap_or_default();
        Ok(HttpLock {
            api,
            scheduler: RenewalScheduler::new(),
            capabilities: Capabilities {
                fair: remote.fair,
                // The service holds every lease with its client's TTL.
                session_based: false,
                ttl_expiry: true,
                strict_fencing: remote.strict_fencing,
                cross_process: true,
                resumable: false,
            },
            remote_backend: health.backend,
        })
    }

    /// The backend behind the service, e.g. `redis`.
    pub fn remote_backend(&self) -> &str {
        &self.remote_backend
    }

    /// The service's view of `key` (`GET /v1/locks/{key}`): whether the
    /// instance holds it, its fencing token, and how many clients wait on
    /// it there.
    pub async fn status(&self, key: &str) -> Result<KeyStatus> {
        let path = format!("/v1/locks/{}", api::path_segment(key));
        match self.api.get::<KeyStatus>(&path, "status", key).await? {
            Answer::Ok(status) => Ok(status),
            Answer::Refused(status, body) => Err(Error::backend(
                BACKEND,
                self.api.endpoint.clone(),
                "status",
                key,
                format!("{status} {}: {}", body.error, body.message),
            )),
        }
    }

    /// One acquire request; `wait` is the server-side long poll.
    async fn attempt(
        &self,
        key: &str,
        options: &LockOptions,
        wait: Option<Duration>,
    ) -> Result<Option<LockGuard>> {
        let request = AcquireRequest {
            key,
            ttl: duration(options.ttl),
            wait: wait.map(duration),
        };
        let timeout = self.api.config.timeout + wait.unwrap_or_default();
        let body = serde_json::to_value(&request).map_err(|err| {
            Error::backend(BACKEND, self.api.endpoint.clone(), "acquire", key, err)
        })?;
        let sent_at = Instant::now();
        let answer = InFlightAcquire::send(&self.api, key, body, timeout)
            .answer()
            .await?;
        match answer {
            Answer::Ok(granted) => {
                let handle = granted.handle.ok_or_else(|| {
                    Error::backend(
                        BACKEND,
                        self.api.endpoint.clone(),
                        "acquire",
                        key,
                        "the answer has no handle",
                    )
                })?;
                let lease = Lease::new(
                    key,
                    granted.fencing_token,
                    options.ttl,
                    Some(validity_deadline(sent_at, options.ttl)),
                );
                let held = Arc::new(held::HttpHeld {
                    api: self.api.clone(),
                    key: key.to_owned(),
                    handle,
                    lease: lease.downgrade(),
                });
                Ok(Some(backend::scheduled_guard(
                    BACKEND,
                    lease,
                    held,
                    &self.scheduler,
                    options.auto_renew,
                )))
            }
            Answer::Refused(_, body) if body.error == "busy" || body.error == "wait_elapsed" => {
                Ok(None)
            }
            Answer::Refused(status, body) => Err(Error::backend(
                BACKEND,
                self.api.endpoint.clone(),
                "acquire",
                key,
                format!("{status} {}: {}", body.error, body.message),
            )),
        }
    }

    /// The delay before retry `attempt` after a transient failure:
    /// `options.backoff` when the caller set one, else the configured
    /// policy.
    fn retry_delay(&self, options: &LockOptions, attempt: u32) -> Duration {
        if options.backoff != Backoff::default() {
            options.backoff.delay(attempt)
        } else {
            self.api.config.retry.delay(attempt)
        }
    }
}

#[async_trait]
impl backend::LockBackend for HttpLock {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.attempt(key, options, None).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        // The server waits as long as the caller: the core's bound, which
        // starts first, drops this future about when the server answers.
        // A grant racing that drop is released by the dropped request (see
        // the `acquire` module), so the whole wait stays usable.
        let deadline = options.wait.map(|wait| Instant::now() + wait);
        let mut failures = 0u32;
        loop {
            let long_poll = match deadline {
                Some(deadline) => deadline
                    .saturating_duration_since(Instant::now())
                    .min(self.api.config.long_poll),
                None => self.api.config.long_poll,
            };
            if long_poll.is_zero() {
                // Only reached when the server answered before the core's
                // own bound fired.
                return Err(Error::Timeout {
                    key: key.to_owned(),
                    waited: options.wait.unwrap_or_default(),
                    unreachable: failures,
                    last_error: None,
                });
            }
            match self.attempt(key, options, Some(long_poll)).await {
                Ok(Some(guard)) => return Ok(guard),
                Ok(None) => failures = 0,
                Err(err) if err.is_unreachable() => {
                    let delay = self.retry_delay(options, failures);
                    tracing::debug!(error = %err, ?delay, "the lock service is unreachable; retrying");
                    failures += 1;
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Connects to `url` (the facade's entry point).
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(HttpLock::connect(url).await?))
}
