//! Resuming a lock granted to another client, from its resume token.
//!
//! Only a lock on a lease of its own can move: a session-bound lock lives
//! and dies with its client's session. The key of such a lock holds 128
//! random bits (the lease's secret), so the token is
//! `<lease id hex>.<secret>.<etcd key>`: knowing the key's name and its
//! lease, which anyone who can list keys learns, is not enough. Resuming
//! reads the key (it must still be on that lease, with that secret) and
//! the lease's remaining TTL: two round trips.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use distlock_core::backend::{scheduled_guard, validity_deadline, Lease};
use distlock_core::{Error, LockGuard, LockOptions, Result};
use tokio::time::Instant;

use crate::held::EtcdHeld;
use crate::keys::Reservation;
use crate::session::{Binding, OwnLease};
use crate::{EtcdLock, NAME};

/// The resume token of a lock on `own` lease whose key is `etcd_key`.
pub(crate) fn token(own: &OwnLease, etcd_key: &str) -> String {
    format!("{:x}.{}.{etcd_key}", own.id, own.secret)
}

/// The parts of a token, if it is well formed.
fn parse(token: &str) -> Option<(i64, &str, &str)> {
    let mut parts = token.splitn(3, '.');
    let lease_id = i64::from_str_radix(parts.next()?, 16).ok()?;
    let secret = parts.next()?;
    let etcd_key = parts.next()?;
    let well_formed = secret.len() == 32 && secret.bytes().all(|byte| byte.is_ascii_hexdigit());
    well_formed.then_some((lease_id, secret, etcd_key))
}

impl EtcdLock {
    /// The guard of `key`'s lock from another client's `resume_token`, if
    /// that lock is still held: its key on its lease, with its secret.
    pub(crate) async fn resume_lock(
        &self,
        key: &str,
        fencing_token: u64,
        resume_token: &str,
        options: &LockOptions,
    ) -> Result<LockGuard> {
        let Some((lease_id, secret, etcd_key)) = parse(resume_token) else {
            return Err(Error::not_held(key));
        };
        // The token must name a key of this lock, not of another one.
        let dir = self.lock_key_prefix(key);
        if !etcd_key
            .strip_prefix(dir.as_str())
            .is_some_and(|name| !name.is_empty() && !name.contains('/'))
        {
            return Err(Error::not_held(key));
        }
        let found = self
            .call("resume", key, async {
                self.inner.client.kv_client().get(etcd_key, None).await
            })
            .await?;
        let still_ours = found
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == lease_id && kv.value() == secret.as_bytes());
        if !still_ours {
            return Err(Error::not_held(key));
        }
        let sent_at = Instant::now();
        let lease_state = self
            .call("resume", key, async {
                self.inner
                    .client
                    .lease_client()
                    .time_to_live(lease_id, None)
                    .await
            })
            .await?;
        // etcd counts whole seconds: under one left, it is as good as gone.
        if lease_state.ttl() <= 0 {
            return Err(Error::not_held(key));
        }
        let remaining = Duration::from_secs(lease_state.ttl() as u64);
        let granted_ttl = Duration::from_secs(lease_state.granted_ttl().max(1) as u64);
        let valid_until = validity_deadline(sent_at, remaining);
        let own = OwnLease::with_secret(lease_id, granted_ttl, valid_until, secret.to_owned());
        let lease = Lease::new(key, fencing_token, granted_ttl, Some(valid_until));
        let held = Arc::new(EtcdHeld {
            owner: self.clone(),
            key: key.to_owned(),
            etcd_key: etcd_key.into(),
            // The name belongs to the lease, not to this client's names.
            reservation: Reservation::OwnLease,
            release_started: AtomicBool::new(false),
            binding: Binding::Own(Arc::new(own)),
            lease: lease.clone(),
            // Only session-bound keys are watched; this lease's keep-alive
            // says when it ends.
            watch_id: None,
        });
        tracing::debug!(lease_id, fencing_token, "distlock: etcd lock resumed");
        Ok(scheduled_guard(
            NAME,
            lease,
            held,
            &self.inner.renewals,
            options.auto_renew,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_back_and_garbage_does_not() {
        let secret = "0123456789abcdef0123456789abcdef";
        let token = format!("694d9a6f2c1e3b07.{secret}.jobs/nightly/694d9a6f2c1e3b07");
        assert_eq!(
            parse(&token),
            Some((0x694d9a6f2c1e3b07, secret, "jobs/nightly/694d9a6f2c1e3b07"))
        );
        assert_eq!(parse("zz.0123.key"), None);
        assert_eq!(parse("1f.short.key"), None);
        assert_eq!(parse(&format!("1f.{secret}")), None);
    }
}
