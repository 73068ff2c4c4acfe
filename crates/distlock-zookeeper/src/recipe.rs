//! The lock recipe: one ephemeral sequential node per contender in the
//! key's directory; the lowest sequence holds the lock; each waiter
//! watches its own node, its predecessor and the node ahead of that, and
//! takes the holder's deletion as its grant without listing again (see
//! [`wait_turn`]).
//!
//! Written here rather than wrapping `zookeeper_client::Client::lock`,
//! which has the same shape and cancellation safety, because the contract
//! needs what that call does not give: a `try_lock` that never waits; the
//! node's czxid from the create answer (the fencing token; otherwise a
//! third request); an owner-checked release that reports `NotHeld`;
//! container lock directories with their parents made on demand; and a
//! guard tied to our session watcher instead of a borrowed client; and a
//! handoff that costs no request after the holder's delete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::HeldLock;
use distlock_core::{Backoff, Error, Result};
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
    /// Behind `predecessor` (the closest node ahead of ours). `second` is
    /// the node ahead of the predecessor, `None` when the predecessor is
    /// the only node ahead: the holder, after which nobody can queue in
    /// front of us.
    Behind {
        predecessor: String,
        second: Option<String>,
    },
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

/// The delays between retries of a request cut off by a connection loss.
/// No jitter: while the client reconnects it queues the retried requests
/// itself, so there is nothing to spread out.
pub(crate) fn loss_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(10), Duration::from_millis(320)).jitter(0.0)
}

/// Retries an idempotent request across connection losses, on
/// [`loss_backoff`]. The client queues requests while it reconnects and
/// fails them once the session has ended, so this ends with the session.
pub(crate) async fn retry_on_loss<T, F, Fut>(mut request: F) -> std::result::Result<T, zk::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, zk::Error>>,
{
    let mut losses = 0u32;
    loop {
        match request().await {
            Err(err) if is_connection_loss(&err) => {
                tokio::time::sleep(loss_backoff().delay(losses)).await;
                losses = losses.saturating_add(1);
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
pub(crate) async fn find_own(
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
    // The two closest nodes ahead of ours: (sequence, name), closest first.
    let mut ahead: [Option<(i64, String)>; 2] = [None, None];
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
        if sequence >= own.sequence {
            continue;
        }
        let closer =
            |slot: &Option<(i64, String)>| slot.as_ref().is_none_or(|(s, _)| sequence > *s);
        if closer(&ahead[0]) {
            ahead[1] = ahead[0].replace((sequence, name));
        } else if closer(&ahead[1]) {
            ahead[1] = Some((sequence, name));
        }
    }
    if !present {
        return Err(disappeared(session, dir, own, key));
    }
    let [predecessor, second] = ahead;
    Ok(match predecessor {
        None => Position::First,
        Some((_, predecessor)) => Position::Behind {
            predecessor,
            second: second.map(|(_, name)| name),
        },
    })
}

fn disappeared(session: &Session, dir: &str, own: &Created, key: &str) -> Error {
    Error::backend(
        BACKEND,
        session.endpoint.clone(),
        "acquire",
        key,
        format!(
            "our lock node {dir}/{} disappeared (session expired or node deleted)",
            own.name
        ),
    )
}

/// Deletes a duplicate node of our own in the background.
fn remove_twin(session: &Session, path: String) {
    tracing::warn!(%path, "deleting a duplicate lock node left by a retried create");
    let client = session.client.clone();
    tokio::spawn(async move {
        let _ = retry_on_loss(|| client.delete(&path, None)).await;
    });
}

/// A one-shot watch on a node, set by a request whose answer we have.
pub(crate) struct Watch {
    /// The node's name within the lock directory.
    name: String,
    state: WatchState,
}

enum WatchState {
    Pending(Pin<Box<dyn Future<Output = zk::WatchedEvent> + Send>>),
    Fired(zk::EventType),
}

impl Watch {
    fn armed(name: &str, watcher: zk::OneshotWatcher) -> Self {
        Watch {
            name: name.to_owned(),
            state: WatchState::Pending(Box::pin(watcher.changed())),
        }
    }

    /// The node was already gone when we asked to watch it.
    fn gone(name: &str) -> Self {
        Watch {
            name: name.to_owned(),
            state: WatchState::Fired(zk::EventType::NodeDeleted),
        }
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<zk::EventType> {
        match &mut self.state {
            WatchState::Fired(event) => Poll::Ready(*event),
            WatchState::Pending(changed) => {
                let event = std::task::ready!(changed.as_mut().poll(cx));
                tracing::trace!(node = %self.name, ?event, "watch fired");
                self.state = WatchState::Fired(event.event_type);
                Poll::Ready(event.event_type)
            }
        }
    }

    /// What fired, without waiting. The client dispatches notifications in
    /// the order the server sent them, so an event the server sent before
    /// the one we are handling is already here.
    fn fired(&mut self) -> Option<zk::EventType> {
        match self.poll_fired(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(event) => Some(event),
            Poll::Pending => None,
        }
    }

    fn is(&mut self, name: &str) -> bool {
        self.name == name && self.fired().is_none()
    }
}

/// Kept by a granted lock until it is released: the watch on our own node,
/// which then fires (our delete) instead of being removed by one more
/// request. (The mutex only makes it `Sync`; nobody locks it.)
pub(crate) struct OwnWatch {
    _watch: std::sync::Mutex<Watch>,
}

impl OwnWatch {
    fn new(watch: Watch) -> Self {
        OwnWatch {
            _watch: std::sync::Mutex::new(watch),
        }
    }
}

/// True when the session's state changed since `states` was last read: a
/// disconnection (the server re-sends watch events on reconnection, in no
/// particular order across nodes) or the session's end.
fn state_changed(states: &mut zk::StateWatcher) -> bool {
    let changed = std::pin::pin!(states.changed());
    changed
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

/// Waits in the queue until our node is the lowest, and returns the watch
/// on our own node (if one was set) for the guard to keep.
///
/// Each waiter watches its predecessor and, when there is one, the node
/// ahead of it (at most two successors watch any node: no herd). Once the
/// predecessor is the only node ahead, it holds the lock, and no node can
/// ever queue ahead of us again (sequences only grow, and every lower node
/// existed when we listed): its deletion alone grants us the lock, with no
/// request after the holder's delete. The node two ahead going away is our
/// cue to list again, while the predecessor still holds. If the
/// predecessor was itself waiting when we listed (it may have abandoned,
/// leaving an earlier holder), its deletion makes us list again.
///
/// The shortcut also requires that our own node still exists (a watch on
/// it, set with our first watches, has not fired) and that the connection
/// stayed up since (after a reconnection, the server replays deletions in
/// no particular order, so ours might follow the predecessor's); otherwise
/// we list again, which checks both.
pub(crate) async fn wait_turn(
    session: &Session,
    dir: &str,
    own: &Created,
    key: &str,
) -> Result<Option<OwnWatch>> {
    let own_path = format!("{dir}/{}", own.name);
    let mut own_watch: Option<Watch> = None;
    let mut states = session.client.state_watcher();
    // Whether the shortcut may still be taken in this acquisition.
    let mut calm = false;
    let mut predecessor_watch: Option<Watch> = None;
    let mut second_watch: Option<Watch> = None;
    // Connection losses seen so far, for the pause before listing again.
    let mut losses = 0u32;
    loop {
        let (predecessor, second) = match position(session, dir, own, key).await? {
            Position::First => return Ok(own_watch.map(OwnWatch::new)),
            Position::Behind {
                predecessor,
                second,
            } => (predecessor, second),
        };
        // Requests go out at call time and are answered in order: all the
        // watches below cost one round trip together.
        let watch_own = own_watch.is_none().then(|| {
            calm = states.state() == zk::SessionState::SyncConnected;
            session.client.check_and_watch_stat(&own_path)
        });
        let predecessor_path = format!("{dir}/{predecessor}");
        let keep_predecessor = predecessor_watch
            .as_mut()
            .is_some_and(|watch| watch.is(&predecessor));
        let watch_predecessor =
            (!keep_predecessor).then(|| session.client.get_and_watch_data(&predecessor_path));
        let second_path = second.as_ref().map(|name| format!("{dir}/{name}"));
        let keep_second = match (&second, second_watch.as_mut()) {
            (Some(name), Some(watch)) => watch.is(name),
            _ => false,
        };
        let watch_second = match &second_path {
            Some(path) if !keep_second => Some(session.client.get_and_watch_data(path)),
            _ => None,
        };
        if second.is_none() {
            second_watch = None;
        }
        let mut lost_connection = false;
        if let Some(request) = watch_own {
            match request.await {
                Ok((Some(_), watcher)) => own_watch = Some(Watch::armed(&own.name, watcher)),
                Ok((None, _)) => return Err(disappeared(session, dir, own, key)),
                Err(err) if is_connection_loss(&err) => lost_connection = true,
                Err(err) => return Err(op_error(session, "wait", key, err)),
            }
        }
        for (request, slot, name) in [
            (
                watch_predecessor,
                &mut predecessor_watch,
                Some(&predecessor),
            ),
            (watch_second, &mut second_watch, second.as_ref()),
        ] {
            let (Some(request), Some(name)) = (request, name) else {
                continue;
            };
            *slot = match request.await {
                Ok((_, _, watcher)) => Some(Watch::armed(name, watcher)),
                Err(zk::Error::NoNode) => Some(Watch::gone(name)),
                Err(err) if is_connection_loss(&err) => {
                    lost_connection = true;
                    None
                }
                Err(err) => return Err(op_error(session, "wait", key, err)),
            };
        }
        if lost_connection {
            calm = false;
            tokio::time::sleep(loss_backoff().delay(losses)).await;
            losses = losses.saturating_add(1);
            continue;
        }
        let Some(ahead) = predecessor_watch.as_mut() else {
            continue;
        };
        let (mut two_ahead, mut ours) = (second_watch.as_mut(), own_watch.as_mut());
        let predecessor_event = std::future::poll_fn(|cx| {
            if let Poll::Ready(event) = ahead.poll_fired(cx) {
                return Poll::Ready(Some(event));
            }
            // The node two ahead went (it is watched afresh after each
            // listing), or our own node was deleted or touched (that
            // watch is never set again: it wakes us once): list again.
            if let Some(watch) = two_ahead.as_deref_mut() {
                if watch.poll_fired(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            match ours.as_deref_mut() {
                Some(watch) if matches!(watch.state, WatchState::Pending(_)) => {
                    watch.poll_fired(cx).map(|_| None)
                }
                _ => Poll::Pending,
            }
        })
        .await;
        // Only the holder's deletion grants the lock without a listing.
        let holder_gone = second.is_none() && predecessor_event == Some(zk::EventType::NodeDeleted);
        if state_changed(&mut states) {
            calm = false;
        }
        let own_intact = own_watch
            .as_mut()
            .is_some_and(|watch| watch.fired().is_none());
        if holder_gone && calm && own_intact {
            tracing::trace!(%predecessor, "the holder's node is gone: our turn");
            return Ok(own_watch.map(OwnWatch::new));
        }
        // Anything else (the node two ahead went, a waiting predecessor
        // left, a data change, a session event): list again.
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

/// Deletes the node an unfinished attempt created in `dir` with
/// `protected`, found by listing (the create's answer never came; requests
/// go out in call order, so a listing sent now sees a create already sent).
pub(crate) async fn delete_unnamed(session: Arc<Session>, dir: String, protected: String) {
    match find_own(&session, &dir, &protected, "").await {
        Ok(Some(found)) => delete_abandoned(session, format!("{dir}/{}", found.name)).await,
        Ok(None) => {}
        Err(err) => tracing::debug!(error = %err, "cannot look for an abandoned node"),
    }
}

/// Deletes the lock node at `path`, which an unfinished attempt created
/// (dropped future, error, `try_lock` that found the lock held): no
/// orphan nodes, no ghost waiters. Nothing to do if it is gone, or went
/// with its session.
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
