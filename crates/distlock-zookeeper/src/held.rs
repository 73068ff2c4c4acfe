//! A granted lock (release, the ownership check), and the cleanup of an
//! attempt that did not finish.
//!
//! - Release is one `delete` of our own node. Its path holds our random
//!   protected prefix, so it can never name another owner's node. If the
//!   holder was the only node ahead of a waiter, that delete is the
//!   waiter's grant (see the `acquire` module).
//! - The session, not a TTL, keeps the lock, so nothing is extended: with
//!   `auto_renew`, the core calls [`HeldLock::extend`] every `ttl / 3`,
//!   which checks with one `exists` that our node still exists and belongs
//!   to our session. That is how a node deleted by an operator fires
//!   `lost()`.
//! - An attempt arms a [`CleanupOnDrop`](distlock_core::backend::CleanupOnDrop)
//!   before it creates its node: a dropped or timed-out `lock`, a failed
//!   one, and a `try_lock` that finds the lock held delete their node, so
//!   there are no orphan nodes and no ghost waiters. Before the create has
//!   answered, the node's name is not known:
//!   [`delete_unnamed`] finds it by its protected prefix (requests go out
//!   in call order, so a listing sent now sees a create that was already
//!   sent); after, [`delete_abandoned`] deletes it by path.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::HeldLock;
use distlock_core::{Error, Result};
use zookeeper_client as zk;

use crate::acquire::OwnWatch;
use crate::node::find_own;
use crate::session::{
    is_connection_loss, is_session_end, loss_backoff, op_error, retry_on_loss, Session,
};
use crate::BACKEND;

/// Deletes the node an unfinished attempt created in `dir` with
/// `protected`, found by listing (the create's answer never came).
pub(crate) async fn delete_unnamed(session: Arc<Session>, dir: String, protected: String) {
    match find_own(&session, &dir, &protected, "").await {
        Ok(Some(found)) => delete_abandoned(session, format!("{dir}/{}", found.name)).await,
        Ok(None) => {}
        Err(err) => tracing::debug!(error = %err, "cannot look for an abandoned node"),
    }
}

/// Deletes the lock node at `path`, which an unfinished attempt created.
/// Nothing to do if it is gone, or went with its session.
pub(crate) async fn delete_abandoned(session: Arc<Session>, path: String) {
    match retry_on_loss(|| session.client.delete(&path, None)).await {
        Ok(()) => tracing::debug!(%path, "deleted the lock node of an unfinished attempt"),
        Err(zk::Error::NoNode) => {}
        Err(err) if is_session_end(&err) => {}
        Err(err) => {
            tracing::warn!(%path, error = %err, "cannot delete an abandoned lock node; it stays until the session ends")
        }
    }
}

/// A granted lock: our node's path in the session that made it.
pub(crate) struct ZooKeeperHeld {
    pub(crate) session: Arc<Session>,
    pub(crate) path: String,
    pub(crate) key: String,
    /// Fires when our release deletes the node; dropped afterwards.
    pub(crate) _own_watch: Option<OwnWatch>,
}

#[async_trait]
impl HeldLock for ZooKeeperHeld {
    /// One `delete` of our own node. The path holds our random protected
    /// prefix, so it can never name another owner's node.
    async fn release(&self) -> Result<()> {
        let mut losses = 0u32;
        loop {
            match self.session.client.delete(&self.path, None).await {
                Ok(()) => return Ok(()),
                // A retry after a lost answer finds nothing: the first
                // delete went through.
                Err(zk::Error::NoNode) if losses > 0 => return Ok(()),
                Err(zk::Error::NoNode) => return Err(Error::not_held(&self.key)),
                Err(err) if is_session_end(&err) => return Err(Error::not_held(&self.key)),
                Err(err) if is_connection_loss(&err) => {
                    tokio::time::sleep(loss_backoff().delay(losses)).await;
                    losses = losses.saturating_add(1);
                }
                Err(err) => return Err(op_error(&self.session, "release", &self.key, err)),
            }
        }
    }

    /// Checks that our node still exists and belongs to our session (one
    /// `exists`). The session, not a TTL, keeps the lock, so nothing is
    /// extended; this is how a deleted node is noticed.
    async fn extend(&self, ttl: Duration) -> Result<()> {
        if self.session.ended() {
            return Err(Error::not_held(&self.key));
        }
        if !self.session.connected() {
            return Err(Error::backend(
                BACKEND,
                self.session.endpoint.clone(),
                "extend",
                &self.key,
                "the session is suspended (disconnected); its locks are vouched for only until the grace period ends",
            ));
        }
        let budget = (ttl / 2)
            .min(self.session.ttl)
            .max(Duration::from_millis(50));
        let sent_at = tokio::time::Instant::now();
        match tokio::time::timeout(budget, self.session.client.check_stat(&self.path)).await {
            Ok(Ok(Some(stat))) if stat.ephemeral_owner == self.session.id => {
                self.session.contacted(sent_at);
                Ok(())
            }
            Ok(Ok(_)) => Err(Error::not_held(&self.key)),
            Ok(Err(err)) if is_session_end(&err) => Err(Error::not_held(&self.key)),
            Ok(Err(err)) => Err(op_error(&self.session, "extend", &self.key, err)),
            Err(_) => Err(Error::backend(
                BACKEND,
                self.session.endpoint.clone(),
                "extend",
                &self.key,
                format!("no answer within {budget:?}"),
            )),
        }
    }
}
