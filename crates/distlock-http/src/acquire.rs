//! An acquire request that leaves nothing behind when its caller gives up.
//!
//! The server cannot tell that a client stopped waiting: an HTTP/1 server
//! learns of a closed connection only when it writes the answer. So a long
//! poll whose caller was dropped (the core's `wait` bound, a cancelled
//! task) could still be granted, and the lease would stay held, blocking
//! everyone, until its TTL. A dropped acquire therefore hands its request
//! to a background task, which reads the answer and releases a grant at
//! once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use distlock_core::Result;
use tokio::runtime::Handle;
use tracing::Instrument;

use crate::api::{Answer, Api, HandleRequest, LeaseAnswer};

type Pending = Pin<Box<dyn Future<Output = Result<Answer<LeaseAnswer>>> + Send>>;

/// One `POST /v1/acquire` in flight.
pub(crate) struct InFlightAcquire {
    request: Option<Pending>,
    api: Arc<Api>,
    key: String,
}

impl InFlightAcquire {
    /// Sends `body` for `key`, bounded by `timeout`.
    pub(crate) fn send(
        api: &Arc<Api>,
        key: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Self {
        let (request_api, request_key) = (api.clone(), key.to_owned());
        let request: Pending = Box::pin(async move {
            request_api
                .post::<_, LeaseAnswer>("/v1/acquire", &body, timeout, "acquire", &request_key)
                .await
        });
        InFlightAcquire {
            request: Some(request),
            api: api.clone(),
            key: key.to_owned(),
        }
    }

    /// The service's answer.
    pub(crate) async fn answer(mut self) -> Result<Answer<LeaseAnswer>> {
        let request = self.request.as_mut().expect("answered once");
        let answer = request.await;
        self.request = None;
        answer
    }
}

impl Drop for InFlightAcquire {
    fn drop(&mut self) {
        let Some(request) = self.request.take() else {
            return;
        };
        let Ok(runtime) = Handle::try_current() else {
            tracing::warn!(key = %self.key, "distlock: an acquire dropped outside a runtime; a grant it gets stays until its TTL");
            return;
        };
        let (api, key) = (self.api.clone(), std::mem::take(&mut self.key));
        let span = tracing::debug_span!("distlock.cleanup", backend = crate::BACKEND, %key);
        runtime.spawn(
            async move {
                let Ok(Answer::Ok(granted)) = request.await else {
                    return;
                };
                let Some(handle) = granted.handle else {
                    return;
                };
                let release = HandleRequest {
                    handle: &handle,
                    ttl: None,
                };
                let timeout = api.config.timeout;
                match api
                    .post::<_, serde_json::Value>("/v1/release", &release, timeout, "release", &key)
                    .await
                {
                    Ok(_) => tracing::debug!(fencing_token = granted.fencing_token, "released a lock granted after its acquire was dropped"),
                    Err(err) => tracing::warn!(error = %err, "distlock: could not release a lock granted after its acquire was dropped; it ends with its TTL"),
                }
            }
            .instrument(span),
        );
    }
}
