//! The wire: requests to the service and how its answers map to distlock
//! errors.

use std::time::Duration;

use distlock_core::error::redact_url;
use distlock_core::{Error, Result};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::config::HttpConfig;
use crate::BACKEND;

/// The answer to an acquire or a refresh.
#[derive(Debug, Deserialize)]
pub(crate) struct LeaseAnswer {
    pub fencing_token: u64,
    #[serde(default)]
    pub handle: Option<String>,
}

/// A key's status at the service instance that answered.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStatus {
    /// The lock's key.
    pub key: String,
    /// Whether the instance holds the lock for a client.
    pub held: bool,
    /// The holder's fencing token, when held.
    pub fencing_token: Option<u64>,
    /// When the holder's lease ends unless refreshed (RFC 3339), when held.
    pub expires_at: Option<String>,
    /// Clients waiting on the key at the instance.
    pub waiters: usize,
}

/// `key` as one path segment: everything but unreserved characters
/// percent-encoded (a `/` too, which the service's route accepts either way).
pub fn path_segment(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// An error answer's body.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub message: String,
}

/// What the backend behind the service promises (`GET /healthz`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Health {
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub capabilities: Option<RemoteCapabilities>,
}

/// The backend's capabilities, as the service reports them.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RemoteCapabilities {
    #[serde(default)]
    pub fair: bool,
    #[serde(default)]
    pub strict_fencing: bool,
}

#[derive(Serialize)]
pub(crate) struct AcquireRequest<'a> {
    pub key: &'a str,
    pub ttl: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct HandleRequest<'a> {
    pub handle: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A duration as the service reads it (`1500ms`).
pub(crate) fn duration(value: Duration) -> String {
    format!("{}ms", value.as_millis().max(1))
}

/// What one request got.
pub(crate) enum Answer<T> {
    /// 200 with its body.
    Ok(T),
    /// A 4xx answer: the service refused, and says why.
    Refused(StatusCode, ErrorBody),
}

/// The HTTP client and where the service is.
#[derive(Debug)]
pub(crate) struct Api {
    pub client: reqwest::Client,
    pub config: HttpConfig,
    /// The base URL for messages (no secrets in it: tokens never are in
    /// the URL).
    pub endpoint: String,
    auth: Option<HeaderValue>,
}

impl Api {
    pub fn new(config: HttpConfig) -> Result<Self> {
        // reqwest is built without a default crypto provider (aws-lc-rs
        // needs a C toolchain); ring is the one the workspace has.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = redact_url(&config.base_url);
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|err| Error::connection(BACKEND, endpoint.clone(), err))?;
        let auth = match &config.token {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .map_err(|_| {
                        Error::InvalidConfig("http: the token is not a valid header value".into())
                    })?;
                // Kept out of reqwest's and hyper's Debug output.
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Api {
            client,
            config,
            endpoint,
            auth,
        })
    }

    /// Sends `body` to `path` and reads the answer. A connection failure,
    /// a timeout and a 5xx are `Error::Unavailable` (transient); a 401 is
    /// `Error::Backend`.
    pub async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
        operation: &'static str,
        key: &str,
    ) -> Result<Answer<T>> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.config.base_url))
            .timeout(timeout)
            .json(body);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.map_err(|err| {
            Error::unavailable(BACKEND, self.endpoint.clone(), operation, key, err)
        })?;
        self.read(response, operation, key).await
    }

    /// `GET path`.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        operation: &'static str,
        key: &str,
    ) -> Result<Answer<T>> {
        let mut request = self
            .client
            .get(format!("{}{path}", self.config.base_url))
            .timeout(self.config.timeout);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.map_err(|err| {
            Error::unavailable(BACKEND, self.endpoint.clone(), operation, key, err)
        })?;
        self.read(response, operation, key).await
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
        operation: &'static str,
        key: &str,
    ) -> Result<Answer<T>> {
        let status = response.status();
        let bytes = response.bytes().await.map_err(|err| {
            Error::unavailable(BACKEND, self.endpoint.clone(), operation, key, err)
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(Answer::Ok)
                .map_err(|err| {
                    Error::backend(BACKEND, self.endpoint.clone(), operation, key, err)
                });
        }
        let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
            error: "http_error".into(),
            message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        });
        let why = || format!("{status} {}: {}", body.error, body.message);
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            return Err(Error::unavailable(
                BACKEND,
                self.endpoint.clone(),
                operation,
                key,
                why(),
            ));
        }
        // 421: the lease lives at another instance (a backend the service
        // cannot resume leases of); the request must be routed there.
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::MISDIRECTED_REQUEST {
            return Err(Error::backend(
                BACKEND,
                self.endpoint.clone(),
                operation,
                key,
                why(),
            ));
        }
        if status == StatusCode::BAD_REQUEST {
            return Err(match body.error.as_str() {
                "invalid_key" => Error::InvalidKey {
                    key: key.to_owned(),
                    reason: "refused by the lock service (see its limits)",
                },
                "invalid_ttl" | "invalid_wait" | "invalid_options" => {
                    Error::InvalidConfig(format!("the lock service refused: {}", body.message))
                }
                _ => Error::backend(BACKEND, self.endpoint.clone(), operation, key, why()),
            });
        }
        Ok(Answer::Refused(status, body))
    }
}
