//! The `HeldLock` of a lease the service holds: refresh and release by
//! handle.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{validity_deadline, HeldLock, WeakLease};
use distlock_core::{Error, Result};
use tokio::time::Instant;

use crate::api::{duration, Answer, HandleRequest, LeaseAnswer};
use crate::Api;

/// One lease: its handle is the proof of ownership, so it is never
/// logged or shown in `Debug`.
pub(crate) struct HttpHeld {
    pub api: Arc<Api>,
    pub key: String,
    pub handle: String,
    pub lease: WeakLease,
}

#[async_trait]
impl HeldLock for HttpHeld {
    async fn release(&self) -> Result<()> {
        let request = HandleRequest {
            handle: &self.handle,
            ttl: None,
        };
        let mut attempt = 0u32;
        // An attempt whose outcome is unknown (no answer) may have
        // released: a later `unknown_handle` then means it did.
        let mut outcome_unknown = false;
        // A release is worth retrying only while the lease could still be
        // held: after its TTL the service has let it go.
        let give_up_at = self
            .lease
            .upgrade()
            .and_then(|lease| lease.valid_until())
            .unwrap_or_else(|| Instant::now() + self.api.config.timeout);
        loop {
            let answer = self
                .api
                .post::<_, serde_json::Value>(
                    "/v1/release",
                    &request,
                    self.api.config.timeout,
                    "release",
                    &self.key,
                )
                .await;
            match answer {
                Ok(Answer::Ok(_)) => return Ok(()),
                Ok(Answer::Refused(status, body)) => {
                    if outcome_unknown && body.error == "unknown_handle" {
                        return Ok(());
                    }
                    tracing::debug!(%status, error = %body.error, "release refused");
                    return Err(Error::not_held(&self.key));
                }
                Err(err) if err.is_unreachable() => {
                    outcome_unknown = true;
                    let delay = self.api.config.retry.delay(attempt);
                    if Instant::now() + delay >= give_up_at {
                        return Err(err);
                    }
                    tracing::debug!(error = %err, ?delay, "release failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn extend(&self, ttl: Duration) -> Result<()> {
        let request = HandleRequest {
            handle: &self.handle,
            ttl: Some(duration(ttl)),
        };
        let sent_at = Instant::now();
        let answer = self
            .api
            .post::<_, LeaseAnswer>(
                "/v1/refresh",
                &request,
                self.api.config.timeout,
                "extend",
                &self.key,
            )
            .await?;
        match answer {
            Answer::Ok(_) => {
                if let Some(lease) = self.lease.upgrade() {
                    lease.set_valid_until(Some(validity_deadline(sent_at, ttl)));
                }
                Ok(())
            }
            Answer::Refused(status, body) => {
                tracing::debug!(%status, error = %body.error, "refresh refused");
                Err(Error::not_held(&self.key))
            }
        }
    }
}
