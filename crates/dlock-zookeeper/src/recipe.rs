//! The lock recipe: one ephemeral sequential node per contender in the
//! key's directory; the lowest sequence holds the lock; each waiter
//! watches only its immediate predecessor.
//!
//! Written here rather than wrapping `zookeeper_client::Client::lock`,
//! which has the same shape and cancellation safety, because the contract
//! needs what that call does not give: a `try_lock` that never waits; the
//! node's czxid from the create answer (the fencing token; otherwise a
//! third request); an owner-checked release that reports `NotHeld`;
//! container lock directories with their parents made on demand; and a
//! guard tied to our session watcher instead of a borrowed client.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::{Error, HeldLock, Result};
use tokio::runtime::Handle;
use tracing::Instrument;
use zookeeper_client as zk;

use crate::session::Session;
use crate::BACKEND;

/// Every lock node's name is `_c_<uuid>-lock-<sequence>`, the shape of
/// Apache Curator's "protected" lock nodes: the random part lets a client
/// whose create was cut off by a connection loss find its own node, and
/// the shared `lock-` tag plus the server's sequence give the queue order.
const LOCK_TAG: &str = "lock-";

/// A node this process created in a lock directory.
pub(crate) struct Created {
    /// Node name within the directory.
    pub(crate) name: String,
    /// Its protected prefix, `_c_<uuid>-`.
    pub(crate) protected: String,
    /// The server's sequence number, the queue position.
    pub(crate) sequence: i64,
    /// The zxid that created the node: the fencing token.
    pub(crate) czxid: i64,
}

/// Where our node stands in the queue.
pub(crate) enum Position {
    /// Lowest sequence: we hold the lock.
    First,
    /// Behind this node (its name), which we must wait for.
    Behind(String),
}

/// The protected part of a new node's name: `_c_<uuid v4>-`.
pub(crate) fn protected_prefix() -> String {
    let mut bytes = [0u8; 16];
    for byte in bytes.iter_mut() {
        *byte = fastrand::u8(..);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "_c_{}-{}-{}-{}-{}-",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The queue sequence of a lock node's name, `None` for other children.
pub(crate) fn sequence_of(name: &str) -> Option<i64> {
    let (_, digits) = name.rsplit_once(LOCK_TAG)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn is_connection_loss(err: &zk::Error) -> bool {
    matches!(err, zk::Error::ConnectionLoss)
}

/// True when the error means the session (and so every ephemeral node it
/// made) is gone.
pub(crate) fn is_session_end(err: &zk::Error) -> bool {
    matches!(
        err,
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
    )
}

/// Retries an idempotent request across connection losses. The client
/// queues requests while it reconnects and fails them once the session
/// has ended, so this ends with the session.
pub(crate) async fn retry_on_loss<T, F, Fut>(mut request: F) -> std::result::Result<T, zk::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, zk::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match request().await {
            Err(err) if is_connection_loss(&err) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 << attempt.min(6))).await;
            }
            result => return result,
        }
    }
}

fn ephemeral_sequential() -> zk::CreateOptions<'static> {
    zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all())
}

/// Creates our node in `dir` (making the directory, a container node, and
/// the prefix above it when missing). After a connection loss it looks for
/// the node by its protected prefix instead of creating a second one.
pub(crate) async fn create_node(
    session: &Session,
    dir: &str,
    protected: &str,
    key: &str,
) -> Result<Created> {
    let node_prefix = format!("{dir}/{protected}{LOCK_TAG}");
    let mut made_dir = 0;
    loop {
        match session
            .client
            .create(&node_prefix, &[], &ephemeral_sequential())
            .await
        {
            Ok((stat, sequence)) => {
                return Ok(Created {
                    name: format!("{protected}{LOCK_TAG}{sequence}"),
                    protected: protected.to_owned(),
                    sequence: sequence.into_i64(),
                    czxid: stat.czxid,
                })
            }
            // The directory is missing (first use, or the server removed
            // the empty container): make it, then create again. Bounded,
            // in case the container keeps vanishing under us.
            Err(zk::Error::NoNode) if made_dir < 5 => {
                make_dir(session, dir, key).await?;
                made_dir += 1;
            }
            Err(err) if is_connection_loss(&err) => {
                if let Some(found) = find_own(session, dir, protected, key).await? {
                    return Ok(found);
                }
            }
            Err(err) => return Err(op_error(session, "acquire", key, err)),
        }
    }
}

/// Makes the lock directory `dir` as a container node (the server deletes
/// it once it has been used and is empty again), and its parents as
/// persistent nodes.
async fn make_dir(session: &Session, dir: &str, key: &str) -> Result<()> {
    let container = zk::CreateMode::Container.with_acls(zk::Acls::anyone_all());
    for _ in 0..2 {
        match retry_on_loss(|| session.client.create(dir, &[], &container)).await {
            Ok(_) | Err(zk::Error::NodeExists) => return Ok(()),
            Err(zk::Error::NoNode) => {
                let (parent, _) = dir.rsplit_once('/').unwrap_or(("", dir));
                let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
                retry_on_loss(|| session.client.mkdir(parent, &persistent))
                    .await
                    .map_err(|err| op_error(session, "acquire", key, err))?;
            }
            Err(err) => return Err(op_error(session, "acquire", key, err)),
        }
    }
    Ok(())
}

/// Finds the node our session created with `protected`, if the create
/// went through before the connection was lost.
async fn find_own(
    session: &Session,
    dir: &str,
    protected: &str,
    key: &str,
) -> Result<Option<Created>> {
    let children = match retry_on_loss(|| session.client.list_children(dir)).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => return Ok(None),
        Err(err) => return Err(op_error(session, "acquire", key, err)),
    };
    let Some(name) = children
        .into_iter()
        .find(|name| name.starts_with(protected))
    else {
        return Ok(None);
    };
    let path = format!("{dir}/{name}");
    match retry_on_loss(|| session.client.check_stat(&path)).await {
        Ok(Some(stat)) if stat.ephemeral_owner == session.id => Ok(Some(Created {
            sequence: sequence_of(&name).unwrap_or(i64::MAX),
            protected: protected.to_owned(),
            name,
            czxid: stat.czxid,
        })),
        Ok(_) => Ok(None),
        Err(err) => Err(op_error(session, "acquire", key, err)),
    }
}

/// Lists the directory and places `own` in the queue: one request.
pub(crate) async fn position(
    session: &Session,
    dir: &str,
    own: &Created,
    key: &str,
) -> Result<Position> {
    let children = retry_on_loss(|| session.client.list_children(dir))
        .await
        .map_err(|err| op_error(session, "acquire", key, err))?;
    let mut present = false;
    let mut predecessor: Option<(i64, String)> = None;
    for name in children {
        if name == own.name {
            present = true;
            continue;
        }
        if name.starts_with(&own.protected) {
            // A second node of ours: a create we retried after a connection
            // loss landed after all. It must not queue ahead of us.
            remove_twin(session, format!("{dir}/{name}"));
            continue;
        }
        let Some(sequence) = sequence_of(&name) else {
            continue;
        };
        let closer = match &predecessor {
            None => true,
            Some((best, _)) => sequence > *best,
        };
        if sequence < own.sequence && closer {
            predecessor = Some((sequence, name));
        }
    }
    if !present {
        return Err(Error::backend(
            BACKEND,
            session.endpoint.clone(),
            "acquire",
            key,
            format!(
                "our lock node {dir}/{} disappeared (session expired or node deleted)",
                own.name
            ),
        ));
    }
    Ok(match predecessor {
        None => Position::First,
        Some((_, name)) => Position::Behind(name),
    })
}

/// Deletes a duplicate node of our own in the background.
fn remove_twin(session: &Session, path: String) {
    tracing::warn!(%path, "deleting a duplicate lock node left by a retried create");
    let client = session.client.clone();
    tokio::spawn(async move {
        let _ = retry_on_loss(|| client.delete(&path, None)).await;
    });
}

/// Waits until `predecessor` is gone: one request to set the watch, then
/// nothing until the server notifies us.
pub(crate) async fn wait_for_deletion(
    session: &Session,
    dir: &str,
    predecessor: &str,
    key: &str,
) -> Result<()> {
    let path = format!("{dir}/{predecessor}");
    loop {
        match session.client.get_and_watch_data(&path).await {
            Ok((_, _, watcher)) => {
                // A deletion, a data change or the session's end: the
                // caller lists the queue again either way.
                let event = watcher.changed().await;
                tracing::trace!(?event, "predecessor watch fired");
                return Ok(());
            }
            Err(zk::Error::NoNode) => return Ok(()),
            Err(err) if is_connection_loss(&err) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => return Err(op_error(session, "wait", key, err)),
        }
    }
}

pub(crate) fn op_error(
    session: &Session,
    operation: &'static str,
    key: &str,
    err: zk::Error,
) -> Error {
    Error::backend(BACKEND, session.endpoint.clone(), operation, key, err)
}

/// Deletes our node if the acquisition that made it does not finish
/// (dropped future, error, `try_lock` that found the lock held): no
/// orphan nodes, no ghost waiters.
pub(crate) struct PendingNode {
    session: Arc<Session>,
    dir: String,
    protected: String,
    /// Known once the create answered.
    name: Option<String>,
    armed: bool,
}

impl PendingNode {
    pub(crate) fn new(session: Arc<Session>, dir: String, protected: String) -> Self {
        PendingNode {
            session,
            dir,
            protected,
            name: None,
            armed: true,
        }
    }

    pub(crate) fn created(&mut self, name: &str) {
        self.name = Some(name.to_owned());
    }

    /// The node is now owned by a guard (or deleted): nothing to undo.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for PendingNode {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = Handle::try_current() else {
            tracing::warn!(dir = %self.dir, "dlock: acquisition dropped outside a runtime; its node stays until the session ends");
            return;
        };
        let session = self.session.clone();
        let dir = std::mem::take(&mut self.dir);
        let protected = std::mem::take(&mut self.protected);
        let name = self.name.take();
        let span = tracing::debug_span!("dlock.zookeeper.cleanup", %dir);
        runtime.spawn(
            async move {
                // Requests go out in call order, so a listing made now sees
                // a create that was already sent.
                let name = match name {
                    Some(name) => name,
                    None => match find_own(&session, &dir, &protected, "").await {
                        Ok(Some(found)) => found.name,
                        Ok(None) => return,
                        Err(err) => {
                            tracing::debug!(error = %err, "cannot look for an abandoned node");
                            return;
                        }
                    },
                };
                let path = format!("{dir}/{name}");
                match retry_on_loss(|| session.client.delete(&path, None)).await {
                    Ok(()) => tracing::debug!(%path, "deleted an abandoned lock node"),
                    Err(zk::Error::NoNode) => {}
                    Err(err) if is_session_end(&err) => {}
                    Err(err) => {
                        tracing::warn!(%path, error = %err, "cannot delete an abandoned lock node; it stays until the session ends")
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// A granted lock: our node's path in the session that made it.
pub(crate) struct ZooKeeperHeld {
    pub(crate) session: Arc<Session>,
    pub(crate) path: String,
    pub(crate) key: String,
}

#[async_trait]
impl HeldLock for ZooKeeperHeld {
    /// One `delete` of our own node. The path holds our random protected
    /// prefix, so it can never name another owner's node.
    async fn release(&self) -> Result<()> {
        let mut retried = false;
        loop {
            match self.session.client.delete(&self.path, None).await {
                Ok(()) => return Ok(()),
                // A retry after a lost answer finds nothing: the first
                // delete went through.
                Err(zk::Error::NoNode) if retried => return Ok(()),
                Err(zk::Error::NoNode) => return Err(Error::not_held(&self.key)),
                Err(err) if is_session_end(&err) => return Err(Error::not_held(&self.key)),
                Err(err) if is_connection_loss(&err) => {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(10)).await;
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
            .min(self.session.timeout)
            .max(Duration::from_millis(50));
        match tokio::time::timeout(budget, self.session.client.check_stat(&self.path)).await {
            Ok(Ok(Some(stat))) if stat.ephemeral_owner == self.session.id => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_parse_like_curators() {
        let protected = protected_prefix();
        assert!(protected.starts_with("_c_") && protected.ends_with('-'));
        assert_eq!(protected.len(), 3 + 36 + 1);
        assert_ne!(protected, protected_prefix());
        assert_eq!(
            sequence_of(&format!("{protected}lock-0000000042")),
            Some(42)
        );
        assert_eq!(sequence_of("_c_x-latch-0000000001"), None);
        assert_eq!(sequence_of("lock-"), None);
        assert_eq!(sequence_of("lock-12a"), None);
    }
}
