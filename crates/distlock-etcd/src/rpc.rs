//! Requests to etcd: one timeout per request, an interruption when a
//! member leaves the balancer (see the `health` module), error context,
//! which errors are worth retrying, and the TCP probe that makes a refused
//! connect fail at once.

use std::future::Future;
use std::time::Duration;

use distlock_core::{BoxError, Error};

use crate::{EtcdLock, Inner, NAME};

/// An error and whether waiting longer may help.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) retry: bool,
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Self {
        failure.error
    }
}

impl EtcdLock {
    /// [`Error::Backend`] with this client's endpoints.
    pub(crate) fn error(
        &self,
        operation: &'static str,
        key: &str,
        source: impl Into<BoxError>,
    ) -> Error {
        Error::backend(NAME, self.inner.endpoints.clone(), operation, key, source)
    }

    /// Runs one request bounded by the configured timeout, interrupted
    /// when a member leaves the balancer ([`Inner::request`]).
    pub(crate) async fn call<T>(
        &self,
        operation: &'static str,
        key: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Failure> {
        match self.inner.request(request).await {
            Ok(value) => Ok(value),
            Err(source) => {
                let retry = is_retryable(&source);
                Err(Failure {
                    error: self.error(operation, key, source),
                    retry,
                })
            }
        }
    }
}

impl Inner {
    /// `request`, bounded by the configured timeout; or an
    /// [interruption](is_interrupted) when a member leaves the balancer
    /// meanwhile, as the request may be stuck on that member. Either way
    /// its outcome is unknown, and it is worth sending again.
    pub(crate) async fn request<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, etcd_client::Error> {
        tokio::select! {
            outcome = bounded(self.config.timeout, request) => outcome,
            () = self.health.disrupted() => Err(interrupted()),
        }
    }
}

/// The error of a request abandoned because a member left the balancer.
pub(crate) fn interrupted() -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "a member stopped answering or the leader changed while the request was in flight",
    ))
}

/// Whether `err` is [`interrupted`]: the request was abandoned, not
/// answered.
pub(crate) fn is_interrupted(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::IoError(io) if io.kind() == std::io::ErrorKind::Interrupted)
}

/// `request`, or a timeout error once `timeout` has passed.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(timeout, request).await {
        Ok(outcome) => outcome,
        Err(_) => Err(timed_out(timeout)),
    }
}

/// The error of a request that got no answer within `timeout`.
pub(crate) fn timed_out(timeout: Duration) -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {timeout:?}"),
    ))
}

/// etcd's answer to a write on a lease it does not know.
pub(crate) fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::NotFound && status.message().contains("lease not found"))
}

/// Whether a failed request may succeed later (connection trouble, a
/// leader election), as opposed to a refusal (auth, bad request).
pub(crate) fn is_retryable(err: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match err {
        E::IoError(_) | E::TransportError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(status) => {
            use tonic::Code;
            matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Unknown
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Internal
                    | Code::ResourceExhausted
            )
        }
        _ => false,
    }
}

/// Connects to each endpoint by TCP; `Ok` as soon as one answers.
/// etcd-client connects lazily and queues requests while no member is
/// reachable; this probe turns "refused" into a clear, prompt error.
pub(crate) async fn probe(endpoints: &[String], timeout: Duration) -> std::io::Result<()> {
    let mut probes = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        probes.spawn(async move {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&endpoint)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(std::io::Error::new(
                    err.kind(),
                    format!("{endpoint}: {err}"),
                )),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{endpoint}: no answer within {timeout:?}"),
                )),
            }
        });
    }
    let mut first_error = None;
    while let Some(outcome) = probes.join_next().await {
        match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(join) => {
                first_error.get_or_insert(std::io::Error::other(join));
            }
        }
    }
    Err(first_error.unwrap_or_else(|| std::io::Error::other("no endpoint")))
}
