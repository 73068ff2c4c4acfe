//! Attempts and waiting: the lock recipe.
//!
//! Each key maps to the directory `<prefix>/<encoded key>`
//! ([`encode_component`](distlock_core::backend::key::encode_component):
//! no collisions, long keys hashed). A contender creates its ephemeral
//! sequential node there (see the `node` module), lists the directory,
//! and holds the lock if its sequence is the lowest. Otherwise it watches
//! its own node, its immediate predecessor and the node ahead of that (so
//! at most two waiters watch any node: no herd effect), and takes the
//! holder's deletion as its grant without listing again (see
//! [`wait_turn`]). Waiters are served in arrival order.
//!
//! Round trips:
//! - Uncontended acquisition: 2 requests (create, list) once the directory
//!   exists; release: 1 (delete); `try_lock` on a held key: 3 (create,
//!   list, delete).
//! - A waiter: create, list, and one round trip setting its watches (2 or
//!   3 requests), then nothing while its predecessor holds, except one
//!   listing (plus a watch) when the node two ahead goes. A handoff costs
//!   the holder's delete and nothing else on the critical path: its floor
//!   is the delete's round trip (a quorum write, fsynced), as the server
//!   notifies the watcher when it applies the delete, just before it
//!   answers the holder.
//! - Fencing token: the lock node's `czxid`, the zxid of the transaction
//!   that created it, from the create's answer (no extra request). Zxids
//!   grow across the whole ensemble's history, so tokens keep growing even
//!   when the directory is removed and made again (a sequence number
//!   restarts at 0 in a new directory).
//!
//! Written here rather than wrapping `zookeeper_client::Client::lock`,
//! which has the same shape and cancellation safety, because the contract
//! needs what that call does not give: a `try_lock` that never waits; the
//! node's czxid from the create answer (the fencing token; otherwise a
//! third request); an owner-checked release that reports `NotHeld`;
//! container lock directories with their parents made on demand; a guard
//! tied to our session watcher instead of a borrowed client; and a
//! handoff that costs no request after the holder's delete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use distlock_core::backend::{self_renewed_guard, CleanupOnDrop};
use distlock_core::{Error, LockGuard, LockOptions, Result};
use zookeeper_client as zk;

use crate::held::{delete_abandoned, delete_unnamed, ZooKeeperHeld};
use crate::liveness::Mark;
use crate::node::{self, sequence_of, Created};
use crate::session::{is_connection_loss, loss_backoff, op_error, retry_on_loss, Session};
use crate::{ZooKeeperLock, BACKEND};

/// What an unfinished attempt's cleanup runs: built (and boxed) only when
/// it runs.
type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the armed cleanup deletes, named in its warning if it cannot run.
const ABANDONED_NODE: &str = "a zookeeper lock node";

/// An attempt's node, created and queued (see [`ZooKeeperLock::enqueue`]).
struct Enqueued<F: FnOnce() -> Cleanup> {
    session: Arc<Session>,
    /// The key's lock directory.
    dir: String,
    created: Created,
    /// The node's path, `<dir>/<name>`.
    path: String,
    /// Deletes the node unless disarmed.
    pending: CleanupOnDrop<F, Cleanup>,
    /// Whether the session's watch covers this attempt's node.
    mark: Mark,
}

impl ZooKeeperLock {
    /// Creates this attempt's node in `key`'s lock directory. Until
    /// `pending` is disarmed, dropping it (or this future, mid-create)
    /// deletes the node, one whose create answer was lost included.
    async fn enqueue(&self, key: &str) -> Result<Enqueued<impl FnOnce() -> Cleanup + Send>> {
        let session = self.inner.sessions.live(&self.inner.config).await?;
        // Before any request of the attempt (see the `liveness` module).
        let mark = session.held.mark();
        let dir = self.lock_directory(key);
        let protected = node::protected_prefix();
        let creating = CleanupOnDrop::arm(ABANDONED_NODE, {
            let (session, dir, protected) = (session.clone(), dir.clone(), protected.clone());
            let key = key.to_owned();
            move || Box::pin(delete_unnamed(session, dir, protected, key)) as Cleanup
        });
        let created = match node::create_node(&session, &dir, &protected, key).await {
            Ok(created) => created,
            Err(err) => {
                creating.run_now().await;
                return Err(err);
            }
        };
        // No await from here to the return: the named cleanup takes over.
        creating.disarm();
        let path = format!("{dir}/{}", created.name);
        let pending = CleanupOnDrop::arm(ABANDONED_NODE, {
            let (session, path, key) = (session.clone(), path.clone(), key.to_owned());
            move || Box::pin(delete_abandoned(session, path, key)) as Cleanup
        });
        Ok(Enqueued {
            session,
            dir,
            created,
            path,
            pending,
            mark,
        })
    }

    /// One attempt: takes the lock if our node is first, else deletes it.
    pub(crate) async fn attempt(
        &self,
        key: &str,
        options: &LockOptions,
    ) -> Result<Option<LockGuard>> {
        let Enqueued {
            session,
            dir,
            created,
            path,
            pending,
            mark,
        } = self.enqueue(key).await?;
        match position(&session, &dir, &created, key).await {
            Ok(Position::First) => {
                pending.disarm();
                Ok(Some(
                    self.grant(session, key, &created, path, options, None, mark),
                ))
            }
            Ok(Position::Behind { .. }) => {
                pending.run_now().await;
                Ok(None)
            }
            Err(err) => {
                pending.run_now().await;
                Err(err)
            }
        }
    }

    /// Queues and waits until our node is first (see [`wait_turn`]).
    pub(crate) async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let Enqueued {
            session,
            dir,
            created,
            path,
            pending,
            mark,
        } = self.enqueue(key).await?;
        let own_watch = match wait_turn(&session, &dir, &created, key).await {
            Ok(own_watch) => own_watch,
            Err(err) => {
                pending.run_now().await;
                return Err(err);
            }
        };
        // No await between here and the grant: a drop of this future
        // either deletes our node (the pending cleanup) or hands it over.
        pending.disarm();
        Ok(self.grant(session, key, &created, path, options, own_watch, mark))
    }

    /// The guard of a granted lock. Nothing renews it (the session keeps
    /// it); the session's watch notices its node's deletion (`liveness`).
    #[allow(clippy::too_many_arguments)]
    fn grant(
        &self,
        session: Arc<Session>,
        key: &str,
        created: &Created,
        path: String,
        options: &LockOptions,
        own_watch: Option<OwnWatch>,
        mark: Mark,
    ) -> LockGuard {
        // czxid is a positive zxid: (epoch << 32) | counter.
        let fencing_token = created.czxid as u64;
        let lease = session.new_lease(key, fencing_token, options.ttl);
        let path: Arc<str> = path.into();
        session.held.insert(path.clone(), &lease, mark, options.ttl);
        let held = Arc::new(ZooKeeperHeld {
            path,
            key: key.to_owned(),
            session,
            _own_watch: own_watch,
        });
        tracing::debug!(fencing_token, node = %held.path, "acquired");
        self_renewed_guard(BACKEND, lease, held)
    }
}

/// Where our node stands in the queue.
enum Position {
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

/// Lists the directory and places `own` in the queue: one request.
async fn position(session: &Arc<Session>, dir: &str, own: &Created, key: &str) -> Result<Position> {
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
            remove_twin(session, format!("{dir}/{name}"), key);
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

/// Deletes a duplicate node of our own in the background (retried until
/// it is gone, as an abandoned attempt's node is: it queues ahead of our
/// own node, holding up everyone else).
fn remove_twin(session: &Arc<Session>, path: String, key: &str) {
    tracing::warn!(%path, "deleting a duplicate lock node left by a retried create");
    tokio::spawn(delete_abandoned(session.clone(), path, key.to_owned()));
}

/// A one-shot watch on a node, set by a request whose answer we have.
struct Watch {
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
async fn wait_turn(
    session: &Arc<Session>,
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
