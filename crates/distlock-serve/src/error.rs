//! The service's error answers: a status and a JSON body naming the
//! problem, `{"error": "<kind>", "message": "..."}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use distlock::Error;

/// An error answer of the API. `kind` is stable (clients branch on it);
/// `message` is for people.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable name of the problem, e.g. `busy`, `unknown_handle`.
    pub kind: &'static str,
    /// What went wrong, with the key or field it concerns.
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error answer.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or out of limits.
    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, message)
    }

    /// 409 `busy`: another owner holds the lock (a try without `wait`).
    pub fn busy(key: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "busy",
            format!("lock {key:?} is held by another owner"),
        )
    }

    /// 404 `unknown_handle`: no lease with this handle (never granted,
    /// already released, or forgotten after it expired).
    pub fn unknown_handle() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_handle",
            "no lease has this handle: it was never granted, was released, or expired and was forgotten",
        )
    }

    /// 409 `expired`: the lease's TTL passed without a refresh.
    pub fn expired(key: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "expired",
            format!("the lease on {key:?} expired before this request; another owner may hold the lock now"),
        )
    }

    /// Maps a distlock error on `key` to its answer.
    pub fn from_lock_error(err: &Error) -> Self {
        let message = describe(err);
        match err {
            Error::InvalidKey { .. } => Self::bad_request("invalid_key", message),
            Error::InvalidConfig(_) => Self::bad_request("invalid_options", message),
            Error::Timeout { key, waited, .. } => Self::new(
                StatusCode::CONFLICT,
                "wait_elapsed",
                format!("lock {key:?} was still held by another owner after waiting {waited:?}"),
            ),
            Error::NotHeld { key } => Self::new(
                StatusCode::CONFLICT,
                "not_held",
                format!("the lease on {key:?} is no longer held: it expired or another owner has the lock"),
            ),
            Error::Connection { .. } | Error::Unavailable { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", message)
            }
            _ => Self::new(StatusCode::BAD_GATEWAY, "backend_error", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::error(self.kind);
        let body = serde_json::to_vec(&Body {
            error: self.kind,
            message: &self.message,
        })
        .unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

pub(crate) use distlock::error::describe;
