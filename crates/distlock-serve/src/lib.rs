//! The distlock lock service: an HTTP/JSON API in front of any distlock
//! backend, for programs that cannot link a client library.
//!
//! | endpoint | body | answer |
//! |---|---|---|
//! | `POST /v1/acquire` | `{"key", "ttl": "30s", "wait": "10s"}` | `{"key", "handle", "fencing_token", "ttl_ms", "expires_at"}`; 409 `busy` or `wait_elapsed` |
//! | `POST /v1/refresh` | `{"handle", "ttl": "30s"}` | `{"key", "fencing_token", "ttl_ms", "expires_at"}`; 404 `unknown_handle`, 409 `expired` or `not_held` |
//! | `POST /v1/release` | `{"handle"}` | `{"key", "released": true, "fencing_token"}`; 404 `unknown_handle`, 409 `expired` or `not_held` |
//! | `GET /v1/locks/{key}` | | `{"key", "held", "fencing_token", "expires_at", "waiters"}` |
//! | `GET /healthz` | | 200 when the backend answers, else 503 |
//! | `GET /metrics` | | Prometheus text format |
//!
//! A refresh or release that reaches another instance than the one that
//! acquired gets 421 `other_instance`: leases live in the instance that
//! granted them, so several instances need sticky routing by handle.
//!
//! A lease lives exactly as long as its client refreshes it: the service
//! holds the backend lock with the client's TTL and never renews it by
//! itself. Errors are `{"error": "<kind>", "message": "..."}` with a 4xx
//! or 5xx status. `docs/lock-service.md` has the whole API.
//!
//! ```no_run
//! # async fn run() -> Result<(), distlock_serve::ServeError> {
//! let config = distlock_serve::ServeConfig::new("redis://127.0.0.1:6379");
//! let server = distlock_serve::Server::bind(config).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(std::future::pending()).await
//! # }
//! ```

#![warn(missing_docs)]

mod error;
mod handlers;
pub mod metrics;
mod state;

use axum::serve::ListenerExt as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use handlers::{
    AcquireRequest, KeyStatus, LeaseAnswer, RefreshRequest, ReleaseRequest, HEALTH_KEY,
};
pub use state::AppState;

/// The address the service listens on by default: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8181";

/// Bounds on what a request may ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest key, in bytes (default 4 KiB).
    pub max_key_bytes: usize,
    /// Shortest TTL (default 100 ms: a lease must outlive a few round trips).
    pub min_ttl: Duration,
    /// Longest TTL (default 1 h).
    pub max_ttl: Duration,
    /// Longest long poll (default 60 s).
    pub max_wait: Duration,
    /// Largest request body, in bytes (default 16 KiB).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4096,
            min_ttl: Duration::from_millis(100),
            max_ttl: Duration::from_secs(3600),
            max_wait: Duration::from_secs(60),
            max_body_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// A non-empty key within `max_key_bytes`.
    pub fn check_key(&self, key: &str) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_key",
                "key must not be empty",
            ));
        }
        if key.len() > self.max_key_bytes {
            return Err(ApiError::bad_request(
                "invalid_key",
                format!(
                    "key is {} bytes; the limit is {}",
                    key.len(),
                    self.max_key_bytes
                ),
            ));
        }
        Ok(())
    }

    /// A TTL within `min_ttl..=max_ttl`.
    pub fn check_ttl(&self, ttl: Duration) -> Result<Duration, ApiError> {
        if ttl < self.min_ttl || ttl > self.max_ttl {
            return Err(ApiError::bad_request(
                "invalid_ttl",
                format!(
                    "ttl {} is outside {}..={}",
                    humantime::format_duration(ttl),
                    humantime::format_duration(self.min_ttl),
                    humantime::format_duration(self.max_ttl)
                ),
            ));
        }
        Ok(ttl)
    }

    /// A wait of at most `max_wait`.
    pub fn check_wait(&self, wait: Duration) -> Result<Duration, ApiError> {
        if wait > self.max_wait {
            return Err(ApiError::bad_request(
                "invalid_wait",
                format!(
                    "wait {} is longer than the limit {}",
                    humantime::format_duration(wait),
                    humantime::format_duration(self.max_wait)
                ),
            ));
        }
        Ok(wait)
    }

    /// Bound on one request: the longest long poll plus time to answer.
    pub fn request_timeout(&self) -> Duration {
        self.max_wait + Duration::from_secs(10)
    }
}

/// How to run the service.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServeConfig {
    /// The backend URL, e.g. `redis://127.0.0.1:6379`.
    pub backend_url: String,
    /// Where to listen (default `127.0.0.1:8181`; port 0 picks a free one).
    pub listen: SocketAddr,
    /// The bearer token requests must carry, if any.
    pub token: Option<String>,
    /// Request limits.
    pub limits: Limits,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field(
                "backend_url",
                &distlock::error::redact_url(&self.backend_url),
            )
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("limits", &self.limits)
            .finish()
    }
}

impl ServeConfig {
    /// The service over `backend_url`, on loopback port 8181, without a
    /// token, with the default limits.
    pub fn new(backend_url: impl Into<String>) -> Self {
        ServeConfig {
            backend_url: backend_url.into(),
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            token: None,
            limits: Limits::default(),
        }
    }
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The backend could not be reached or its URL is wrong.
    #[error("cannot connect to the backend")]
    Backend(#[from] distlock::Error),
    /// The listen address could not be bound, or serving failed.
    #[error("cannot serve on {addr}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The router of the API over `state`, with its layers: tracing, the
/// request time and body limits, JSON error bodies and the bearer token.
pub fn router(state: Arc<AppState>) -> Router {
    let limits = state.limits.clone();
    Router::new()
        .route("/v1/acquire", post(handlers::acquire))
        .route("/v1/refresh", post(handlers::refresh))
        .route("/v1/release", post(handlers::release))
        .route("/v1/locks/{*key}", get(handlers::status))
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::unknown_route)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout(),
        ))
        .layer(middleware::map_response(json_errors))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Refuses requests without the bearer token, when one is set. `/healthz`
/// stays open for load balancers; it tells nothing about the locks.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if !state.requires_token() || request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(token) if state.token_matches(token) => next.run(request).await,
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this service needs `Authorization: Bearer <token>` with its token",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Gives the answers the layers and the router make themselves (413 from
/// the body limit, 408 from the time limit, 405) the JSON error body every
/// other error has.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let kind = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ if status.is_client_error() => "bad_request",
        _ => "internal_error",
    };
    let message = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("error")
    );
    let mut answer = ApiError::new(status, kind, message).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// A bound, not yet running service.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    local_addr: SocketAddr,
}

impl Server {
    /// Connects to the backend and binds the listen address.
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        let locker = distlock::connect(&config.backend_url).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Io {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Io {
            addr: config.listen,
            source,
        })?;
        if !local_addr.ip().is_loopback() && config.token.is_none() {
            tracing::warn!(%local_addr, "distlock serve: listening beyond loopback without --token-file: anyone who can reach it can take and release locks");
        }
        metrics::prometheus();
        let state = Arc::new(AppState::new(
            locker,
            config.limits,
            config.token.as_deref(),
        ));
        Ok(Server {
            listener,
            state,
            local_addr,
        })
    }

    /// The address it listens on (with the port picked, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then finishes the requests in
    /// flight.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let sweeper = tokio::spawn(sweep_expired(Arc::downgrade(&self.state)));
        let app = router(self.state);
        // Answers are small and latency is the point: no Nagle delay.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "could not set TCP_NODELAY");
            }
        });
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServeError::Io {
                addr: self.local_addr,
                source,
            });
        sweeper.abort();
        result
    }
}

/// Forgets expired leases every second while the state lives.
async fn sweep_expired(state: std::sync::Weak<AppState>) {
    let mut tick = tokio::time::interval(state::SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        state.sweep_expired();
    }
}
