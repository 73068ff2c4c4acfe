//! Noticing a held lock's node deleted behind our back (by an operator,
//! or anyone with write access), with one watch per session instead of a
//! request per lock.
//!
//! The session, not a TTL, keeps a lock, so nothing needs renewing; what
//! needs noticing is a node that disappears while the session lives. One
//! persistent recursive watch on the lock prefix (ZooKeeper 3.6+) reports
//! every deletion under it, and a deletion of a node we hold marks its
//! lease lost (`NotHeld`) at once. Holding 10,000 locks then costs no
//! request: the session's heartbeat is the only steady traffic.
//!
//! A watch only reports what happens after the server registered it, so a
//! node is *covered* once its existence was confirmed by a request sent
//! after the watch was in place. A lock whose acquisition began once the
//! watch was on is covered at its grant. Others (granted before the watch
//! was set, or across a disconnection, during which ZooKeeper may drop
//! events, see ZOOKEEPER-4698) are verified in batches: one `getEphemerals`
//! under the prefix, sent after the watch is on, lists every node of the
//! session, and a held node missing from it is lost.
//!
//! The watch is set lazily, when the first unverified lock has been held
//! for a third of its TTL (when the per-lock check used to fall due): a
//! client whose locks are short-lived never sets it, and never receives
//! the notifications of other clients' lock nodes that a recursive watch
//! brings. Once set, it stays for the session's life.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use distlock_core::backend::{Lease, WeakLease};
use distlock_core::LostReason;
use tokio::sync::Notify;
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::session::{is_session_end, Session};

/// The held nodes of one session, and whether its watch covers them.
#[derive(Default)]
pub(crate) struct HeldNodes {
    state: Mutex<State>,
    /// Wakes the session's liveness task (a node to verify, a
    /// reconnection).
    wake: Notify,
}

#[derive(Default)]
struct State {
    nodes: HashMap<Arc<str>, Held>,
    /// Numbers the insertions: a listing judges only the nodes inserted
    /// before it was sent (a later one may have been created after it).
    inserted: u64,
    /// How many nodes wait for a listing: with none (the usual state once
    /// the watch is on), the task's wake-ups do not scan the table.
    unverified: usize,
    /// Bumped at every disconnection: events may be lost while away.
    epoch: u64,
    /// The watch is registered on the server.
    watching: bool,
    /// Once the session ended: nothing to watch any more.
    ended: bool,
}

struct Held {
    lease: WeakLease,
    /// Its insertion's number.
    seq: u64,
    /// When to verify it with a listing; `None` once covered by the watch.
    verify_at: Option<Instant>,
}

/// Taken when an acquisition starts: whether the watch covers what it
/// will confirm (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    epoch: u64,
    watching: bool,
}

impl State {
    /// Removes `path`'s entry, keeping the count of unverified ones.
    fn take(&mut self, path: &str) -> Option<Held> {
        let held = self.nodes.remove(path)?;
        if held.verify_at.is_some() {
            self.unverified -= 1;
        }
        Some(held)
    }
}

impl HeldNodes {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a starting acquisition records.
    pub(crate) fn mark(&self) -> Mark {
        let state = self.state();
        Mark {
            epoch: state.epoch,
            watching: state.watching,
        }
    }

    /// Watches `path`, the node of a lock just granted (its acquisition
    /// started at `mark`), for deletion; `ttl` paces its verification if
    /// the watch does not cover it yet.
    pub(crate) fn insert(&self, path: Arc<str>, lease: &Lease, mark: Mark, ttl: Duration) {
        let mut state = self.state();
        if state.ended {
            return;
        }
        let covered = mark.watching && state.watching && mark.epoch == state.epoch;
        let verify_at = (!covered).then(|| Instant::now() + ttl / 3);
        let seq = state.inserted;
        state.inserted += 1;
        state.unverified += usize::from(verify_at.is_some());
        let replaced = state.nodes.insert(
            path,
            Held {
                lease: lease.downgrade(),
                seq,
                verify_at,
            },
        );
        if replaced.is_some_and(|old| old.verify_at.is_some()) {
            state.unverified -= 1;
        }
        drop(state);
        if verify_at.is_some() {
            self.wake.notify_one();
        }
    }

    /// Stops watching `path` (released).
    pub(crate) fn remove(&self, path: &str) {
        self.state().take(path);
    }

    /// The connection dropped: events may be lost until it is back.
    pub(crate) fn disconnected(&self) {
        self.state().epoch += 1;
    }

    /// The connection is back: every node the watch covered is verified
    /// again with one listing, at once (the others are verified when due,
    /// by a listing sent after now).
    pub(crate) fn reconnected(&self) {
        let mut state = self.state();
        let now = Instant::now();
        let mut newly = 0;
        for held in state.nodes.values_mut() {
            if held.verify_at.is_none() {
                held.verify_at = Some(now);
                newly += 1;
            }
        }
        state.unverified += newly;
        drop(state);
        self.wake.notify_one();
    }

    /// The session ended: its leases went with it (the session marks
    /// them); nothing is watched any more.
    pub(crate) fn end(&self) {
        let mut state = self.state();
        state.ended = true;
        state.nodes = HashMap::new();
        state.unverified = 0;
        drop(state);
        self.wake.notify_one();
    }

    /// Marks the lease of `path` lost, if we hold it.
    fn deleted(&self, path: &str) {
        let held = self.state().take(path);
        if let Some(lease) = held.and_then(|held| held.lease.upgrade()) {
            tracing::warn!(node = %path, key = %lease.key(), "zookeeper: a held lock's node was deleted");
            lease.mark_lost(LostReason::NotHeld);
        }
    }

    /// The earliest verification due, or `None`.
    fn next_due(&self) -> Option<Instant> {
        let state = self.state();
        if state.unverified == 0 {
            return None;
        }
        state.nodes.values().filter_map(|held| held.verify_at).min()
    }
}

/// The session's liveness task: sets the watch when a node first needs
/// it, verifies uncovered nodes with one listing per batch, and marks the
/// leases of deleted nodes lost. Holds the session weakly; ends with it.
pub(crate) async fn watch_held_nodes(weak: Weak<Session>, nodes: Arc<HeldNodes>, prefix: String) {
    let mut watcher: Option<zk::PersistentWatcher> = None;
    loop {
        let due = nodes.next_due();
        let now = Instant::now();
        if due.is_some_and(|due| due <= now) {
            let Some(session) = weak.upgrade() else {
                return;
            };
            if session.ended() {
                return;
            }
            if watcher.is_none() {
                match session
                    .client
                    .watch(&prefix, zk::AddWatchMode::PersistentRecursive)
                    .await
                {
                    Ok(set) => {
                        tracing::debug!(%prefix, "zookeeper: watching the held lock nodes");
                        nodes.state().watching = true;
                        watcher = Some(set);
                    }
                    Err(err) if is_session_end(&err) => return,
                    Err(err) => {
                        tracing::debug!(error = %err, "zookeeper: cannot set the held-node watch; trying again");
                        drop(session);
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            if let Err(err) = verify(&session, &nodes, &prefix).await {
                if is_session_end(&err) {
                    return;
                }
                tracing::debug!(error = %err, "zookeeper: cannot list the session's nodes; trying again");
                drop(session);
                tokio::time::sleep(RETRY).await;
            }
            continue;
        }
        let sleep = async {
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        let event = async {
            match watcher.as_mut() {
                Some(watcher) => watcher.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = nodes.wake.notified() => {}
            event = event => {
                match event.event_type {
                    zk::EventType::NodeDeleted => nodes.deleted(&event.path),
                    // The watcher panics if polled after the session's end.
                    zk::EventType::Session if event.session_state.is_terminated() => return,
                    _ => {}
                }
            }
        }
        if nodes.state().ended {
            return;
        }
    }
}

/// Pause before trying the watch or the listing again.
const RETRY: Duration = Duration::from_millis(200);

/// One listing of the session's ephemeral nodes under `prefix`: every
/// uncovered held node found there is covered from now on (the watch is
/// on), one missing is lost.
async fn verify(session: &Session, nodes: &HeldNodes, prefix: &str) -> Result<(), zk::Error> {
    let (epoch, before) = {
        let state = nodes.state();
        (state.epoch, state.inserted)
    };
    let listed = session.client.list_ephemerals(prefix).await?;
    let listed: std::collections::HashSet<&str> = listed.iter().map(String::as_str).collect();
    let mut gone = Vec::new();
    {
        let mut state = nodes.state();
        // A disconnection while the listing was out: it may predate events
        // lost meanwhile; the reconnection asks for another.
        if state.epoch != epoch {
            return Ok(());
        }
        let mut unverified = state.unverified;
        state.nodes.retain(|path, held| {
            if held.verify_at.is_none() || held.seq >= before {
                return true;
            }
            unverified -= 1;
            if listed.contains(&**path) {
                held.verify_at = None;
                true
            } else {
                gone.push((path.clone(), held.lease.upgrade()));
                false
            }
        });
        state.unverified = unverified;
    }
    for (path, lease) in gone {
        if let Some(lease) = lease {
            tracing::warn!(node = %path, key = %lease.key(), "zookeeper: a held lock's node is gone");
            lease.mark_lost(LostReason::NotHeld);
        }
    }
    Ok(())
}
