//! One ZooKeeper session per client, and the task that keeps every lease
//! taken through it up to date with the session's state.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use distlock_core::backend::{Lease, WeakLease};
use distlock_core::{Error, LostReason, Result};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::config::ZooKeeperConfig;
use crate::BACKEND;

/// Share of the session timeout for which a suspended (disconnected)
/// session still vouches for its locks, counted from when the disconnect
/// is seen. The client notices a silent connection 2/5 of the session
/// timeout (plus a tick of 1/20) after it last heard from the server, and
/// the server expires the session no earlier than a whole session timeout
/// after it last heard from the client: 1 - 2/5 - 1/20 = 55% is left at
/// worst. Claiming a third keeps a margin for scheduling delays and
/// clock-rate differences: a guard stops claiming the lock at most ~78% of
/// the session timeout after the last contact.
const SUSPENDED_VALIDITY_NUM: u32 = 1;
const SUSPENDED_VALIDITY_DEN: u32 = 3;

/// A connected ZooKeeper session and the leases that depend on it.
pub(crate) struct Session {
    pub(crate) client: zk::Client,
    /// The session id, the `ephemeralOwner` of every node we create.
    pub(crate) id: i64,
    /// The negotiated session timeout.
    pub(crate) timeout: Duration,
    pub(crate) endpoint: String,
    leases: Mutex<Registry>,
    watcher: Mutex<Option<AbortHandle>>,
}

#[derive(Default)]
struct Registry {
    leases: Vec<WeakLease>,
    /// Length at which finished entries are pruned next.
    prune_at: usize,
    /// Set while the connection is suspended: the deadline of every lease.
    suspended_until: Option<Instant>,
    /// Set once the session has ended (expired, closed, auth failed).
    ended: Option<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.lock().unwrap().take() {
            watcher.abort();
        }
    }
}

impl Session {
    /// Opens a new session. Fails within `config.connect_timeout` with
    /// `Error::Connection` naming the hosts when no server answers.
    pub(crate) async fn connect(config: &ZooKeeperConfig) -> Result<Arc<Session>> {
        let endpoint = config.connect_string();
        let connecting = zk::Client::connector()
            .with_session_timeout(config.session_ttl)
            // The client's default gives up on a connection attempt after
            // 2/5 of the session timeout, longer than the grace a held lock
            // gets while suspended (1/3): one attempt that hangs (a server
            // still starting accepts but does not answer) lost locks of a
            // server that was back in seconds. A sixth fits two attempts
            // in the grace.
            .with_connection_timeout(connection_timeout(config.session_ttl))
            // Try each host once, then fail: a refused connection must not
            // make `connect` hang until the session timeout.
            .with_fail_eagerly()
            .connect(&endpoint);
        let client = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                let source: distlock_core::BoxError = match err {
                    zk::Error::NoHosts => {
                        "no ZooKeeper server answered (each host was tried once)".into()
                    }
                    err => Box::new(err),
                };
                return Err(Error::connection(BACKEND, endpoint, source));
            }
            Err(_) => {
                return Err(Error::connection(
                    BACKEND,
                    endpoint,
                    format!("no session established within {:?}", config.connect_timeout),
                ))
            }
        };
        let session = Arc::new(Session {
            id: client.session_id().0,
            timeout: client.session_timeout(),
            endpoint,
            leases: Mutex::new(Registry {
                prune_at: 64,
                ..Registry::default()
            }),
            watcher: Mutex::new(None),
            client,
        });
        tracing::debug!(session = format_args!("{:#x}", session.id), timeout = ?session.timeout, endpoint = %session.endpoint, "zookeeper session established");
        let mut states = session.client.state_watcher();
        session.on_state(states.state());
        let task = tokio::spawn(watch_session(Arc::downgrade(&session), states));
        *session.watcher.lock().unwrap() = Some(task.abort_handle());
        Ok(session)
    }

    /// True once the session can no longer hold locks.
    pub(crate) fn ended(&self) -> bool {
        self.client.state().is_terminated()
    }

    /// True while connected to a server of the quorum.
    pub(crate) fn connected(&self) -> bool {
        self.client.state() == zk::SessionState::SyncConnected
    }

    /// A lease on a lock just granted through this session, registered so
    /// that session events reach it.
    pub(crate) fn new_lease(&self, key: &str, fencing_token: u64, ttl: Duration) -> Lease {
        let mut registry = self.leases.lock().unwrap();
        let lease = Lease::new(key, fencing_token, ttl, registry.suspended_until);
        if let Some(why) = &registry.ended {
            lease.mark_lost(LostReason::SessionLost(why.clone()));
            return lease;
        }
        if registry.leases.len() >= registry.prune_at {
            registry.leases.retain(|weak| {
                weak.upgrade()
                    .is_some_and(|lease| lease.lost_reason().is_none())
            });
            registry.prune_at = (registry.leases.len() * 2).max(64);
        }
        registry.leases.push(lease.downgrade());
        lease
    }

    pub(crate) fn on_state(&self, state: zk::SessionState) {
        use zk::SessionState::*;
        let mut registry = self.leases.lock().unwrap();
        match state {
            SyncConnected => {
                if registry.suspended_until.take().is_some() {
                    tracing::info!(
                        session = format_args!("{:#x}", self.id),
                        "zookeeper session reconnected; its locks are vouched for again"
                    );
                }
                for lease in live(&registry.leases) {
                    match lease.lost_reason() {
                        // The grace ran out while we were away: the server
                        // may have handed the lock on meanwhile (to learn
                        // otherwise needs a request); that stays final even
                        // though the session came back.
                        Some(reason) => lease.mark_lost(reason),
                        None => lease.set_valid_until(None),
                    }
                }
            }
            Disconnected | ConnectedReadOnly => {
                if registry.suspended_until.is_none() {
                    let grace = self.timeout * SUSPENDED_VALIDITY_NUM / SUSPENDED_VALIDITY_DEN;
                    let deadline = Instant::now() + grace;
                    tracing::warn!(session = format_args!("{:#x}", self.id), ?grace, "zookeeper session suspended; its locks are vouched for only until the grace ends");
                    registry.suspended_until = Some(deadline);
                    for lease in live(&registry.leases) {
                        lease.set_valid_until(Some(deadline));
                    }
                }
            }
            Expired | Closed | AuthFailed => {
                let why = match state {
                    Expired => "the zookeeper session expired",
                    Closed => "the zookeeper session was closed",
                    _ => "zookeeper authentication failed",
                };
                registry.ended = Some(why.to_owned());
                for lease in live(&registry.leases) {
                    lease.mark_lost(LostReason::SessionLost(why.to_owned()));
                }
                registry.leases.clear();
            }
        }
    }
}

fn live(leases: &[WeakLease]) -> impl Iterator<Item = Lease> + '_ {
    leases.iter().filter_map(WeakLease::upgrade)
}

/// Follows the session's states until it ends or the session is dropped.
async fn watch_session(weak: Weak<Session>, mut states: zk::StateWatcher) {
    loop {
        let state = states.changed().await;
        let Some(session) = weak.upgrade() else {
            return;
        };
        session.on_state(state);
        if state.is_terminated() {
            return;
        }
    }
}

/// How long one connection attempt may take: a sixth of the session
/// timeout (at least 500 ms), so that two attempts fit in the third of it
/// that a suspended session's locks are vouched for.
fn connection_timeout(session_timeout: Duration) -> Duration {
    (session_timeout / 6).max(Duration::from_millis(500))
}
