//! etcd backend of dlock (work in progress: the backend is being written).

use std::sync::Arc;

use dlock_core::{DistributedLock, Error, Result};

/// Connects to the service named by `url`.
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Err(Error::Unsupported {
        backend: "etcd",
        what: format!("connecting to {url}: the backend is not written yet"),
    })
}
