//! Noticing a held lock's key deleted behind our back (by hand, or by a
//! stray cleanup), with watches multiplexed on one watch stream per client
//! instead of a read per lock every `ttl / 3`.
//!
//! A session-bound lock is kept valid by its session's keep-alive; what
//! needs noticing is its key disappearing while the lease lives. Each such
//! lock, once held for a third of its session's TTL (when its first check
//! used to fall due; most locks are released before), gets a watch on its
//! own key, created on the client's one watch stream with an id we choose.
//! The watch starts at the revision after the key's creation, so etcd
//! replays a delete that happened before the watch existed: no gap, and no
//! read. A delete event marks the lease lost (`NotHeld`), after asking
//! etcd whether the session lease went with it (then the whole session is
//! lost, as the keep-alive would find). A release cancels its watch.
//!
//! Watching each key rather than a prefix works whatever the keys are
//! named (a layout without a common distlock prefix included). While
//! holding, the stream carries nothing; holding 10,000 locks costs no
//! request beyond the session's keep-alive.
//!
//! When the stream breaks (a member stops, a leader changes, a member
//! leaves the balancer), it is opened again and every watch created again
//! from its key's creation: the replay covers what happened meanwhile. A
//! watch etcd cancels (its start revision was compacted) is replaced by
//! one read of the key, then a watch from that read's revision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use distlock_core::backend::{Lease, WeakLease};
use distlock_core::LostReason;
use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::held::check_session_lease;
use crate::session::Session;
use crate::Inner;

/// The watched keys of one client.
#[derive(Default)]
pub(crate) struct HeldKeys {
    state: Mutex<State>,
    /// Wakes the client's watch task (a key falls due, a release).
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Our watch ids (never 0: etcd picks one then).
    next_id: i64,
    keys: HashMap<i64, Held>,
    /// Watches to cancel on the current stream (released locks).
    cancels: Vec<i64>,
    /// The client is gone.
    ended: bool,
}

struct Held {
    etcd_key: Arc<str>,
    /// The key's create revision: events of an older key of that name are
    /// not ours.
    created: i64,
    /// The revision the watch starts from.
    start: i64,
    lease: WeakLease,
    session: Weak<Session>,
    /// When to create its watch; `None` once created on the current
    /// stream.
    due: Option<Instant>,
    /// Its watch was cancelled by etcd: read the key before watching again.
    read_first: bool,
}

impl HeldKeys {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `etcd_key` (created at revision `created`, on `session`'s
    /// lease) from a third of the session's TTL on; returns the id for
    /// [`remove`](Self::remove).
    pub(crate) fn insert(
        &self,
        etcd_key: Arc<str>,
        created: i64,
        lease: &Lease,
        session: &Arc<Session>,
    ) -> i64 {
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        if !state.ended {
            state.keys.insert(
                id,
                Held {
                    etcd_key,
                    created,
                    start: created + 1,
                    lease: lease.downgrade(),
                    session: Arc::downgrade(session),
                    due: Some(Instant::now() + session.ttl / 3),
                    read_first: false,
                },
            );
        }
        drop(state);
        self.wake.notify_one();
        id
    }

    /// Stops watching (released); a created watch is cancelled.
    pub(crate) fn remove(&self, id: i64) {
        let mut state = self.state();
        if let Some(held) = state.keys.remove(&id) {
            if held.due.is_none() {
                state.cancels.push(id);
                drop(state);
                self.wake.notify_one();
            }
        }
    }

    /// The client is gone: the task ends.
    pub(crate) fn end(&self) {
        let mut state = self.state();
        state.ended = true;
        state.keys = HashMap::new();
        drop(state);
        self.wake.notify_one();
    }

    /// Every watch must be created again (a new stream).
    fn all_due(&self) {
        let now = Instant::now();
        let mut state = self.state();
        state.cancels.clear();
        for held in state.keys.values_mut() {
            held.due.get_or_insert(now);
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.state().keys.values().filter_map(|held| held.due).min()
    }
}

/// What the task sends next.
struct Create {
    id: i64,
    key: Vec<u8>,
    start: i64,
    read_first: bool,
}

/// The client's watch task: creates the watches that fall due on one
/// stream, cancels released ones, and marks the leases of deleted keys
/// lost. Holds the client weakly; ends when it is dropped.
pub(crate) async fn watch_held_keys(weak: Weak<Inner>, keys: Arc<HeldKeys>) {
    let mut stream: Option<WatchStream> = None;
    let mut disruptions = match weak.upgrade() {
        Some(inner) => inner.health.disruptions(),
        None => return,
    };
    loop {
        if keys.state().ended {
            return;
        }
        let now = Instant::now();
        let (creates, cancels) = {
            let mut state = keys.state();
            let creates: Vec<Create> = state
                .keys
                .iter_mut()
                .filter(|(_, held)| held.due.is_some_and(|due| due <= now))
                .map(|(&id, held)| {
                    held.due = None;
                    Create {
                        id,
                        key: held.etcd_key.as_bytes().to_vec(),
                        start: held.start,
                        read_first: std::mem::take(&mut held.read_first),
                    }
                })
                .collect();
            (creates, std::mem::take(&mut state.cancels))
        };
        if !creates.is_empty() || !cancels.is_empty() {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            if let Err(err) = send(&inner, &keys, &mut stream, creates, cancels).await {
                tracing::debug!(error = %err, "distlock: etcd held-key watch stream failed; opening it again");
                stream = None;
                keys.all_due();
                drop(inner);
                tokio::time::sleep(RETRY).await;
            }
            continue;
        }
        let due = keys.next_due();
        let streaming = stream.is_some();
        let mut broken = false;
        let sleep = async {
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        let message = async {
            match stream.as_mut() {
                Some(stream) => stream.message().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = keys.wake.notified() => {}
            // The stream may be stuck on the member that left.
            () = disruptions.next(), if streaming => broken = true,
            message = message => match message {
                Ok(Some(response)) => handle(&weak, &keys, response),
                Ok(None) | Err(_) => broken = true,
            },
        }
        if broken {
            stream = None;
            keys.all_due();
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Pause before opening a broken stream again.
const RETRY: Duration = Duration::from_millis(200);

/// Creates and cancels watches on the stream, opening it if needed.
async fn send(
    inner: &Inner,
    keys: &HeldKeys,
    stream: &mut Option<WatchStream>,
    creates: Vec<Create>,
    cancels: Vec<i64>,
) -> Result<(), etcd_client::Error> {
    for id in cancels {
        if let Some(stream) = stream.as_mut() {
            stream.cancel(id).await?;
        }
    }
    for mut create in creates {
        if create.read_first {
            // Its start revision was compacted: read what is there now.
            let found = inner
                .request(async { inner.client.kv_client().get(create.key.clone(), None).await })
                .await?;
            let ours = found.kvs().first().is_some_and(|kv| {
                let state = keys.state();
                state
                    .keys
                    .get(&create.id)
                    .is_some_and(|held| kv.create_revision() == held.created)
            });
            if !ours {
                key_deleted(inner, keys, create.id).await;
                continue;
            }
            let revision = found.header().map_or(0, |header| header.revision());
            create.start = revision + 1;
            if let Some(held) = keys.state().keys.get_mut(&create.id) {
                held.start = create.start;
            }
        }
        let options = WatchOptions::new()
            .with_start_revision(create.start)
            .with_watch_id(create.id);
        match stream.as_mut() {
            Some(stream) => stream.watch(create.key, Some(options)).await?,
            None => {
                let opened = inner
                    .request(async {
                        inner
                            .client
                            .watch_client()
                            .watch(create.key.clone(), Some(options))
                            .await
                    })
                    .await?;
                *stream = Some(opened);
            }
        }
    }
    Ok(())
}

/// One message of the stream: a deleted key, or a cancelled watch.
fn handle(weak: &Weak<Inner>, keys: &Arc<HeldKeys>, response: etcd_client::WatchResponse) {
    let id = response.watch_id();
    if response.canceled() {
        let mut state = keys.state();
        if let Some(held) = state.keys.get_mut(&id) {
            tracing::debug!(
                watch_id = id,
                reason = response.cancel_reason(),
                "distlock: etcd cancelled a held-key watch; reading the key"
            );
            held.due = Some(Instant::now());
            held.read_first = true;
            drop(state);
            keys.wake.notify_one();
        }
        return;
    }
    let deleted = {
        let state = keys.state();
        state.keys.get(&id).is_some_and(|held| {
            response.events().iter().any(|event| {
                event.event_type() == EventType::Delete
                    && event.kv().is_some_and(|kv| {
                        kv.key() == held.etcd_key.as_bytes() && kv.mod_revision() > held.created
                    })
            })
        })
    };
    if deleted {
        let (weak, keys) = (weak.clone(), keys.clone());
        tokio::spawn(async move {
            if let Some(inner) = weak.upgrade() {
                key_deleted(&inner, &keys, id).await;
            }
        });
    }
}

/// The key watched as `id` is gone: its lease is lost, with the whole
/// session first if the session lease went with it.
async fn key_deleted(inner: &Inner, keys: &HeldKeys, id: i64) {
    let Some(held) = keys.state().keys.remove(&id) else {
        return;
    };
    let Some(lease) = held.lease.upgrade() else {
        return;
    };
    if let Some(session) = held.session.upgrade() {
        check_session_lease(inner, &session, lease.key()).await;
    }
    tracing::warn!(key = %lease.key(), "distlock: etcd lock key deleted while held");
    lease.mark_lost(LostReason::NotHeld);
}
