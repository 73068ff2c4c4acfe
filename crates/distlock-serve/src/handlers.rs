//! The endpoints: acquire (with a server-side long poll), refresh,
//! release, a key's status, health and metrics.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use distlock::{LockGuard, LockOptions};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::{AppState, HeldLease, ResumableHandle};

/// `POST /v1/acquire`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// The lock's key: any non-empty UTF-8 string within the key limit.
    pub key: String,
    /// The lease's TTL, e.g. `"30s"`; 30 s when absent.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// How long the server may wait for the lock (a long poll); absent or
    /// zero: one attempt.
    #[serde(default, with = "humantime_serde")]
    pub wait: Option<Duration>,
}

/// `POST /v1/refresh`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The handle the acquire answered.
    pub handle: String,
    /// The new TTL from now; the acquire's TTL when absent.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

/// `POST /v1/release`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The handle the acquire answered.
    pub handle: String,
}

/// The answer to an acquire or a refresh.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// The lock's key.
    pub key: String,
    /// The lease's handle (acquire only): the proof of ownership for
    /// refresh and release. Secret.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub handle: Option<String>,
    /// The backend's fencing token.
    pub fencing_token: u64,
    /// The TTL the lease lives by, in milliseconds.
    pub ttl_ms: u64,
    /// When the lease ends unless refreshed (RFC 3339, UTC, the server's
    /// clock; the server vouches for slightly less than the TTL).
    pub expires_at: String,
}

/// The answer to `GET /v1/locks/{key}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The lock's key.
    pub key: String,
    /// Whether this instance holds the lock for a client.
    pub held: bool,
    /// The holder's fencing token, when held.
    pub fencing_token: Option<u64>,
    /// When the holder's lease ends unless refreshed, when held.
    pub expires_at: Option<String>,
    /// Acquire requests waiting on the key at this instance.
    pub waiters: usize,
}

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                rejection.body_text(),
            )
        } else {
            ApiError::bad_request("bad_body", rejection.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|err| {
        let kind = match err.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "malformed_json",
        };
        ApiError::bad_request(kind, format!("request body: {err}"))
    })
}

/// The wall-clock time at which `guard`'s lease ends, and its TTL.
fn expiry(guard: &LockGuard) -> String {
    let remaining = guard.remaining().unwrap_or_default();
    humantime::format_rfc3339_millis(SystemTime::now() + remaining).to_string()
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u128::from(u64::MAX)) as u64
}

/// `POST /v1/acquire`: one attempt, or a long poll up to `wait`.
pub async fn acquire(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: AcquireRequest = parse(body)?;
    let limits = &state.limits;
    limits.check_key(&request.key)?;
    let ttl = limits.check_ttl(request.ttl.unwrap_or(distlock::DEFAULT_TTL))?;
    let wait = limits.check_wait(request.wait.unwrap_or_default())?;
    // The service never renews on a client's behalf: the client's
    // refreshes are the only renewals.
    let options = LockOptions::new().ttl(ttl).auto_renew(false);
    let key = request.key;
    let span = tracing::info_span!("serve.acquire", key = %key, ?ttl, ?wait);
    let started = Instant::now();
    let outcome = async {
        if wait.is_zero() {
            match state.locker.try_lock(&key, &options).await {
                Ok(Some(guard)) => Ok(guard),
                Ok(None) => Err(ApiError::busy(&key)),
                Err(err) => Err(ApiError::from_lock_error(&err)),
            }
        } else {
            let options = options.clone().wait(wait);
            let mut lock = std::pin::pin!(state.locker.lock(&key, &options));
            // Counted as a waiter only once the backend has had its first
            // attempt and is waiting, so `waiters` in a key's status means
            // "queued", not "arrived".
            let first = std::future::poll_fn(|cx| Poll::Ready(lock.as_mut().poll(cx))).await;
            let result = match first {
                Poll::Ready(result) => result,
                Poll::Pending => {
                    let _waiting = state.wait_on(&key);
                    lock.await
                }
            };
            result.map_err(|err| ApiError::from_lock_error(&err))
        }
    }
    .instrument(span)
    .await;
    crate::metrics::acquire(
        started.elapsed(),
        match &outcome {
            Ok(_) => "granted",
            Err(err) => err.kind,
        },
    );
    let guard = outcome?;
    let answer = LeaseAnswer {
        key: key.clone(),
        handle: None,
        fencing_token: guard.fencing_token(),
        ttl_ms: millis(ttl),
        expires_at: expiry(&guard),
    };
    let handle = state.insert(guard, ttl);
    tracing::debug!(key = %key, fencing_token = answer.fencing_token, "granted");
    Ok(Json(LeaseAnswer {
        handle: Some(handle),
        ..answer
    })
    .into_response())
}

/// The lease `handle` names: the one this instance keeps while it still
/// vouches for it, else (a resumable handle, perhaps granted or last
/// refreshed by another instance) the lease resumed on the backend.
async fn find_lease(state: &AppState, handle: &str) -> Result<Arc<HeldLease>, ApiError> {
    let kept = state.get(handle);
    if let Some(lease) = &kept {
        let held = match lease.guard.try_lock() {
            Ok(slot) => slot.as_ref().is_some_and(LockGuard::is_held),
            // In use by another request on the same handle.
            Err(_) => true,
        };
        if held {
            return Ok(lease.clone());
        }
    }
    let Some(resumable) = ResumableHandle::decode(handle) else {
        return kept.ok_or_else(|| state.missing(handle));
    };
    let ttl = kept.map_or_else(|| resumable.ttl(), |lease| lease.ttl());
    let options = LockOptions::new().ttl(ttl).auto_renew(false);
    let resumed = state
        .locker
        .resume(
            &resumable.key,
            resumable.fencing_token,
            &resumable.resume_token,
            &options,
        )
        .await;
    match resumed {
        Ok(guard) => Ok(state.insert_as(handle.to_owned(), guard, ttl)),
        Err(err) if err.is_not_held() => {
            state.remove(handle);
            Err(ApiError::from_lock_error(&err))
        }
        Err(err) if err.is_unsupported() => Err(state.missing(handle)),
        Err(err) => Err(ApiError::from_lock_error(&err)),
    }
}

/// `POST /v1/refresh`: extends the lease by `ttl` from now.
pub async fn refresh(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseAnswer>, ApiError> {
    let request: RefreshRequest = parse(body)?;
    let lease = find_lease(&state, &request.handle).await?;
    let ttl = match request.ttl {
        Some(ttl) => state.limits.check_ttl(ttl)?,
        None => lease.ttl(),
    };
    let slot = lease.guard.lock().await;
    let Some(guard) = slot.as_ref() else {
        return Err(ApiError::unknown_handle());
    };
    if !guard.is_held() {
        drop(slot);
        state.remove(&request.handle);
        return Err(ApiError::expired(&lease.key));
    }
    match guard.extend(ttl).await {
        Ok(()) => {
            lease.set_ttl(ttl);
            Ok(Json(LeaseAnswer {
                key: lease.key.clone(),
                handle: None,
                fencing_token: lease.fencing_token,
                ttl_ms: millis(ttl),
                expires_at: expiry(guard),
            }))
        }
        Err(err) => {
            if err.is_not_held() {
                drop(slot);
                state.remove(&request.handle);
            }
            Err(ApiError::from_lock_error(&err))
        }
    }
}

/// `POST /v1/release`: ends the lease now.
pub async fn release(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: ReleaseRequest = parse(body)?;
    let lease = find_lease(&state, &request.handle).await?;
    state.remove(&request.handle);
    let Some(guard) = lease.guard.lock().await.take() else {
        return Err(ApiError::unknown_handle());
    };
    let was_held = guard.is_held();
    let result = guard.release().await;
    match result {
        // Released on the backend, but the lease had already run out:
        // another owner may have held the lock meanwhile, which the
        // client must know.
        _ if !was_held => Err(ApiError::expired(&lease.key)),
        Ok(()) => Ok(Json(serde_json::json!({
            "key": lease.key,
            "released": true,
            "fencing_token": lease.fencing_token,
        }))),
        Err(err) => Err(ApiError::from_lock_error(&err)),
    }
}

/// `GET /v1/locks/{key}`: whether this instance holds the key for a
/// client, and its fencing token. Never the handle.
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Json<KeyStatus>, ApiError> {
    state.limits.check_key(&key)?;
    let (lease, waiters) = state.on_key(&key);
    let mut status = KeyStatus {
        key,
        held: false,
        fencing_token: None,
        expires_at: None,
        waiters,
    };
    if let Some(lease) = lease {
        if let Some(guard) = lease.guard.lock().await.as_ref() {
            if guard.is_held() {
                status.held = true;
                status.fencing_token = Some(lease.fencing_token);
                status.expires_at = Some(expiry(guard));
            }
        }
    }
    Ok(Json(status))
}

/// The key `/healthz` takes and releases to see that the backend answers.
pub const HEALTH_KEY: &str = "distlock-serve/healthz";

/// `GET /healthz`: 200 when the backend answers a lock attempt within
/// 2 s, 503 otherwise.
pub async fn healthz(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let options = LockOptions::new()
        .ttl(Duration::from_secs(5))
        .auto_renew(false);
    let attempt = state.locker.try_lock(HEALTH_KEY, &options);
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        // Held by another instance's probe: the backend answered all the same.
        Ok(Ok(guard)) => {
            if let Some(guard) = guard {
                let _ = guard.release().await;
            }
            let capabilities = state.locker.capabilities();
            Ok(Json(serde_json::json!({
                "status": "ok",
                "backend": state.locker.backend(),
                "leases": state.held_count(),
                // What the backend promises; the http:// client reports
                // fairness and fencing from it.
                "capabilities": {
                    "fair": capabilities.fair,
                    "strict_fencing": capabilities.strict_fencing,
                    "session_based": capabilities.session_based,
                    "ttl_expiry": capabilities.ttl_expiry,
                },
            })))
        }
        Ok(Err(err)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            crate::error::describe(&err),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            format!(
                "the {} backend did not answer within 2s",
                state.locker.backend()
            ),
        )),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::prometheus().render(),
    )
        .into_response()
}

/// Any other route.
pub async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_route",
        format!("no endpoint at {}", uri.path()),
    )
}
