//! `wait_replicas`: a grant counts once enough replicas have it.
//!
//! Redis replicates asynchronously: a primary acknowledges a grant before
//! any replica has it, and a failover in between promotes a replica that
//! never saw it, which then grants the lock again. With `wait_replicas=N`
//! every grant is followed by `WAIT N <wait_timeout>` on the lock's
//! primary, and the lock is handed out only when at least `N` replicas
//! acknowledged it; otherwise the attempt gives it back (its cleanup
//! deletes it and wakes the waiters) and fails with
//! [`Error::Unavailable`], which `lock` retries within its wait.
//!
//! `WAIT` counts the writes of the connection it is sent on, so it is
//! pipelined behind an owner-checked `PEXPIRE` of the lock (the `EXTEND`
//! script) on the same connection: that write comes after the grant in the
//! replication stream, whichever connection granted (a fair handoff is
//! written by the releasing client), so its acknowledgement covers the
//! grant. On a Redis Cluster the pipeline goes to the lock's slot.
//! It costs one round trip per grant, plus the replicas' acknowledgement
//! time (up to `wait_timeout` when too few are connected).

use std::fmt;
use std::time::Duration;

use distlock_core::{Error, Result};
use tracing::Instrument;

use crate::client::Shared;
use crate::keys::LockKeys;
use crate::node::timed_out;
use crate::scripts::EXTEND;

/// Fewer replicas than `wait_replicas` acknowledged a grant in time.
#[derive(Debug)]
pub(crate) struct ReplicationError {
    acked: i64,
    wanted: u32,
    timeout: Duration,
}

impl fmt::Display for ReplicationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of the {} replicas that wait_replicas requires acknowledged the grant within {} (WAIT); the lock was given back",
            self.acked,
            self.wanted,
            humantime::format_duration(self.timeout)
        )
    }
}

impl std::error::Error for ReplicationError {}

impl Shared {
    /// With `wait_replicas`, waits until that many replicas acknowledged
    /// the grant of `key` to `owner`. On failure the caller gives the lock
    /// back (its cleanup) and returns the error.
    pub(crate) async fn wait_for_replicas(
        &self,
        key: &str,
        keys: &LockKeys,
        owner: &str,
        ttl: Duration,
    ) -> Result<()> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let span = tracing::debug_span!(
            "distlock.wait_replicas",
            backend = self.name,
            key = %key,
            replicas = self.wait_replicas
        );
        async {
            let wait_ms = self.wait_timeout.as_millis().max(1) as u64;
            let mut pipe = redis::pipe();
            pipe.load_script(EXTEND.script()).ignore();
            pipe.invoke_script(
                EXTEND
                    .script()
                    .key(&keys.lock)
                    .arg(owner)
                    .arg(ttl.as_millis() as u64),
            );
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(wait_ms);
            let mut conn = self.nodes[0].conn();
            let bound = self.timeout + self.wait_timeout;
            let (extended, acked): (i64, i64) =
                match tokio::time::timeout(bound, pipe.query_async(&mut conn)).await {
                    Ok(result) => result.map_err(|err| self.op_error("replicate", key, err))?,
                    Err(_) => {
                        return Err(self.op_error("replicate", key, timed_out("no answer to WAIT")))
                    }
                };
            if extended != 1 {
                return Err(Error::backend(
                    self.name,
                    self.endpoint(),
                    "replicate",
                    key,
                    "the lock was gone before its replicas were counted",
                ));
            }
            if acked < i64::from(self.wait_replicas) {
                tracing::debug!(acked, "distlock: too few replicas acknowledged a grant");
                return Err(Error::unavailable(
                    self.name,
                    self.endpoint(),
                    "replicate",
                    key,
                    ReplicationError {
                        acked,
                        wanted: self.wait_replicas,
                        timeout: self.wait_timeout,
                    },
                ));
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_says_how_many_replicas_acknowledged() {
        let err = ReplicationError {
            acked: 2,
            wanted: 5,
            timeout: Duration::from_millis(100),
        };
        assert_eq!(
            err.to_string(),
            "2 of the 5 replicas that wait_replicas requires acknowledged the grant within 100ms (WAIT); the lock was given back"
        );
    }
}
