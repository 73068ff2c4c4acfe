//! The floor of `http://` (the lock service): the lock cycle of the
//! backend the service fronts (`--behind URL`), taken directly with
//! distlock as the service takes it (`lock`, no renewal), plus the service's own
//! HTTP round trip, `GET /v1/locks/{key}`, which the service answers from
//! its memory without a backend request. A lock cycle through the service
//! is an acquire and a release: at best the backend's cycle plus two such
//! round trips.

use async_trait::async_trait;
use distlock::{BoxError, LockOptions};

use super::{FloorInfo, RawClient, RawServer};

/// A worker's HTTP client beside a direct client of the backend behind.
pub(crate) struct HttpRaw {
    http: reqwest::Client,
    status_url: String,
    key: String,
    behind: distlock::Locker,
    raw_behind: Box<dyn RawClient>,
}

impl HttpRaw {
    /// A client of the service at `base` for `key`, and one of `behind`.
    pub(crate) async fn connect(
        base: &str,
        behind_url: &str,
        behind: &RawServer,
        key: &str,
    ) -> Result<Self, BoxError> {
        // reqwest is built without a TLS provider of its own (the http
        // backend installs ring); a floor-only run may come here first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?;
        Ok(HttpRaw {
            http,
            status_url: format!(
                "{}/v1/locks/{}",
                base.trim_end_matches('/'),
                distlock_http::path_segment(key)
            ),
            key: key.to_owned(),
            behind: distlock::connect(behind_url).await?,
            raw_behind: Box::pin(behind.client(key)).await?,
        })
    }
}

#[async_trait]
impl RawClient for HttpRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let options = LockOptions::new().auto_renew(false);
        let guard = self.behind.lock(&self.key, &options).await?;
        guard.release().await?;
        Ok(())
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        let response = self.http.get(&self.status_url).send().await?;
        let status = response.status();
        response.bytes().await?;
        if !status.is_success() {
            return Err(format!("GET {} answered {status}", self.status_url).into());
        }
        Ok(true)
    }

    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        self.raw_behind.write_round_trip().await
    }
}

/// The backend's own cycle, with the service's HTTP round trip.
pub(crate) fn info(behind: &RawServer) -> FloorInfo {
    FloorInfo {
        cycle: "the --behind backend's own lock + release through distlock, without renewal",
        round_trip: Some("HTTP GET /v1/locks/{key} (no backend request)"),
        ..behind.info()
    }
}
