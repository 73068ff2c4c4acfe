//! A granted lock (release, the ownership check), and the cleanup of an
//! attempt that did not finish.
//!
//! - Release is one `delete` of our own node. Its path holds our random
//!   protected prefix, so it can never name another owner's node. If the
//!   holder was the only node ahead of a waiter, that delete is the
//!   waiter's grant (see the `acquire` module). A connection loss is
//!   retried at once (the client queues the request until it reconnects).
//! - A release that fails otherwise (the client gave up on a connection
//!   that stopped answering and failed the request with a plain message,
//!   not a connection loss) reports the error to the caller, and the
//!   delete is retried in the background ([`delete_in_background`]), with
//!   backoff (50 ms doubling to 2 s), until the node is deleted or found
//!   gone, or the session ends (expired, closed, or the client dropped:
//!   the task holds the session weakly). Before this, such a node stayed
//!   behind our live session, and every waiter, this client's next
//!   attempt included, waited until a later fault ended the session
//!   (issue 12: stalls of 19 to 43 s).
//! - The session, not a TTL, keeps the lock, so nothing is renewed. A
//!   node deleted by an operator fires `lost()` through the session's one
//!   watch (the `liveness` module), with no request per lock.
//!   [`HeldLock::extend`] (a caller's explicit `extend`) checks with one
//!   `exists` that our node still exists and belongs to our session.
//! - An attempt arms a [`CleanupOnDrop`](distlock_core::backend::CleanupOnDrop)
//!   before it creates its node: a dropped or timed-out `lock`, a failed
//!   one, and a `try_lock` that finds the lock held delete their node, so
//!   there are no orphan nodes and no ghost waiters. Before the create has
//!   answered, the node's name is not known:
//!   [`delete_unnamed`] finds it by its protected prefix (requests go out
//!   in call order, so a listing sent now sees a create that was already
//!   sent); after, [`delete_abandoned`] deletes it by path. A cleanup that
//!   fails is retried in the background like a release.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{removal_backoff, retry_in_background, HeldLock, Retry};
use distlock_core::{Error, Result};
use zookeeper_client as zk;

use crate::acquire::OwnWatch;
use crate::node::find_own;
use crate::session::{
    is_connection_loss, is_session_end, loss_backoff, op_error, retry_on_loss, Session,
};
use crate::BACKEND;

/// A node to delete that a release or an unfinished attempt left behind.
#[derive(Clone)]
enum Leftover {
    /// A node whose path we know.
    Path(String),
    /// The node an attempt created in `dir` with `protected`, if any: the
    /// create's answer never came.
    Unnamed { dir: String, protected: String },
}

/// Deletes the node an unfinished attempt created in `dir` with
/// `protected`, found by listing (the create's answer never came). If
/// that fails, it is retried in the background.
pub(crate) async fn delete_unnamed(
    session: Arc<Session>,
    dir: String,
    protected: String,
    key: String,
) {
    match find_own(&session, &dir, &protected, &key).await {
        Ok(Some(found)) => delete_abandoned(session, format!("{dir}/{}", found.name), key).await,
        Ok(None) => {}
        Err(_) if session.ended() => {}
        Err(err) => {
            tracing::debug!(error = %err, "cannot look for an abandoned node; retrying in the background");
            delete_in_background(
                &session,
                Leftover::Unnamed { dir, protected },
                key,
                ABANDONED,
            );
        }
    }
}

/// Deletes the lock node at `path`, which an unfinished attempt created.
/// Nothing to do if it is gone, or went with its session. If the delete
/// fails, it is retried in the background.
pub(crate) async fn delete_abandoned(session: Arc<Session>, path: String, key: String) {
    match retry_on_loss(|| session.client.delete(&path, None)).await {
        Ok(()) => tracing::debug!(%path, "deleted the lock node of an unfinished attempt"),
        Err(zk::Error::NoNode) => {}
        Err(err) if is_session_end(&err) => {}
        Err(err) => {
            tracing::debug!(%path, error = %err, "cannot delete an abandoned lock node; retrying in the background");
            delete_in_background(&session, Leftover::Path(path), key, ABANDONED);
        }
    }
}

/// What the retries of an abandoned attempt's cleanup name in the log.
const ABANDONED: &str = "an abandoned zookeeper lock node";

/// Deletes `node` in the background, retrying with
/// [`removal_backoff`] until it is deleted or found gone, or the session
/// has ended or been dropped (taking the node with it). Holds the session
/// weakly: a dropped client is not kept alive, and its session closes.
fn delete_in_background(session: &Arc<Session>, node: Leftover, key: String, what: &'static str) {
    let session = Arc::downgrade(session);
    retry_in_background(what, removal_backoff(), move || {
        let (session, node, key) = (session.clone(), node.clone(), key.clone());
        async move { delete_once(&session, &node, &key).await }
    });
}

/// One background attempt at deleting `node`.
async fn delete_once(session: &Weak<Session>, node: &Leftover, key: &str) -> Retry {
    let Some(session) = session.upgrade() else {
        return Retry::Done;
    };
    if session.ended() {
        return Retry::Done;
    }
    // Bounded, so that a dropped client's session is not held open by an
    // attempt waiting out a long disconnection: the next attempt asks again.
    let budget = session.ttl / 3;
    let deleted = tokio::time::timeout(budget, async {
        let path = match node {
            Leftover::Path(path) => path.clone(),
            Leftover::Unnamed { dir, protected } => {
                match find_own(&session, dir, protected, key).await {
                    Ok(Some(found)) => format!("{dir}/{}", found.name),
                    Ok(None) => return Ok(()),
                    Err(err) => return Err(err),
                }
            }
        };
        match session.client.delete(&path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(err) if is_session_end(&err) => Ok(()),
            Err(err) => Err(op_error(&session, "delete a leftover node", key, err)),
        }
    })
    .await;
    match deleted {
        Ok(Ok(())) => Retry::Done,
        // The session ended meanwhile: the node went with it.
        Ok(Err(_)) if session.ended() => Retry::Done,
        Ok(Err(err)) => Retry::Again(err.into()),
        Err(_) => Retry::Again(
            Error::backend(
                BACKEND,
                session.endpoint.clone(),
                "delete a leftover node",
                key,
                format!("no answer within {budget:?}"),
            )
            .into(),
        ),
    }
}

/// A granted lock: our node's path in the session that made it.
pub(crate) struct ZooKeeperHeld {
    pub(crate) session: Arc<Session>,
    /// Shared with the session's watch of held nodes.
    pub(crate) path: Arc<str>,
    pub(crate) key: String,
    /// Fires when our release deletes the node; dropped afterwards.
    pub(crate) _own_watch: Option<OwnWatch>,
}

#[async_trait]
impl HeldLock for ZooKeeperHeld {
    /// One `delete` of our own node. The path holds our random protected
    /// prefix, so it can never name another owner's node.
    async fn release(&self) -> Result<()> {
        // Our own delete is no loss to report.
        self.session.held.remove(&self.path);
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
                // Any other failure (a connection given up on, which the
                // client reports as a plain message, not a connection
                // loss): our node may still be there, behind our live
                // session, holding up every waiter. The caller learns of
                // the failure; the delete is retried in the background.
                Err(err) => {
                    delete_in_background(
                        &self.session,
                        Leftover::Path(self.path.to_string()),
                        self.key.clone(),
                        "a released zookeeper lock node",
                    );
                    return Err(op_error(&self.session, "release", &self.key, err));
                }
            }
        }
    }

    /// Checks that our node still exists and belongs to our session (one
    /// `exists`). The session, not a TTL, keeps the lock, so nothing is
    /// extended.
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

impl Drop for ZooKeeperHeld {
    fn drop(&mut self) {
        self.session.held.remove(&self.path);
    }
}
