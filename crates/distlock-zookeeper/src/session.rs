//! One ZooKeeper session per client, and the task that keeps every lease
//! taken through it up to date with the session's state.
//!
//! The session is the lease: a lock lives while the session that created
//! its node does, so `LockOptions::ttl` does not bound it on the server
//! (capability `ttl_expiry = false`); it only paces the guard's ownership
//! check (`held` module).
//!
//! Validity is bounded by the clock, not only by the connection state: the
//! server may expire the session one session TTL after it last heard from
//! us, and a process that was paused (SIGSTOP, a long GC, a stopped VM)
//! sees no disconnect when it resumes. So a heartbeat (one `exists` every
//! third of the session TTL) records the send time of the last request the
//! server answered, and every lease is vouched for until that time plus
//! the session TTL, less a clock-drift margin. `is_held()` is false, and
//! `lost()` fires, from that deadline on, even in a process that just
//! resumed and has not yet seen its connection drop.
//!
//! When the connection is lost the session is also *suspended*: the guard
//! vouches for at most a third of the session TTL from the disconnect
//! (which the client sees at most ~45% of the TTL after the last answer),
//! then reports `lost()`; a reconnection of the same session in time lets
//! the heartbeat move the deadline on again. A connection attempt is given
//! up after a sixth of the session TTL, so two fit in that grace (the
//! client crate's default, 2/5, is longer than the grace: one attempt
//! hanging on a server that is still starting lost every lock of the
//! session). An expired or closed session fires `lost()` on every guard at
//! once (one watcher task per client drives all leases, through the
//! session's [`SessionLeases`]). After the session has ended, the
//! next acquisition opens a new one ([`SessionSlot::live`]).

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use distlock_core::backend::{validity_deadline, Lease, SessionLeases};
use distlock_core::{Backoff, Error, Result};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::config::ZooKeeperConfig;
use crate::liveness::{watch_held_nodes, HeldNodes};
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

/// How long [`Session::kill`] gives one steal (attaching to the session,
/// then waiting for the close to end it) before it steals the session
/// again.
const KILL_ROUND: Duration = Duration::from_secs(2);

/// A client's current session, replaced by a new one once it has ended.
pub(crate) struct SessionSlot {
    current: Mutex<Arc<Session>>,
    /// Serialises opening a new session after the old one ended.
    reconnecting: tokio::sync::Mutex<()>,
}

impl SessionSlot {
    /// Opens the first session.
    pub(crate) async fn connect(config: &ZooKeeperConfig) -> Result<Self> {
        Ok(SessionSlot {
            current: Mutex::new(Session::connect(config).await?),
            reconnecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The current session, live or not.
    pub(crate) fn current(&self) -> Arc<Session> {
        self.current.lock().unwrap().clone()
    }

    /// The live session, or a new one if it has ended.
    pub(crate) async fn live(&self, config: &ZooKeeperConfig) -> Result<Arc<Session>> {
        let current = self.current();
        if !current.ended() {
            return Ok(current);
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.current();
        if !current.ended() {
            return Ok(current);
        }
        tracing::info!(endpoint = %current.endpoint, "zookeeper session ended; opening a new one");
        let fresh = Session::connect(config).await?;
        *self.current.lock().unwrap() = fresh.clone();
        Ok(fresh)
    }
}

/// A connected ZooKeeper session and the leases that depend on it.
pub(crate) struct Session {
    pub(crate) client: zk::Client,
    /// The session id, the `ephemeralOwner` of every node we create.
    pub(crate) id: i64,
    /// The negotiated session timeout (the session TTL).
    pub(crate) ttl: Duration,
    pub(crate) endpoint: String,
    leases: Mutex<Registry>,
    /// The session watcher and heartbeat tasks.
    tasks: Mutex<Vec<AbortHandle>>,
    /// Asks the heartbeat for an answer now (after a reconnection).
    beat_now: Arc<tokio::sync::Notify>,
    /// The held locks' nodes, watched for deletion (`liveness` module).
    pub(crate) held: Arc<HeldNodes>,
}

/// The session's leases, and the validity a new one starts with.
struct Registry {
    /// Ended once the session has (expired, closed, auth failed).
    leases: SessionLeases,
    /// When the latest request the server answered was sent: the server
    /// heard from the session no earlier than that.
    last_contact: Instant,
    /// Set while the connection is suspended: the end of its grace.
    suspended_until: Option<Instant>,
}

impl Registry {
    /// Until when the session's locks are vouched for: a session TTL after
    /// the last contact (less the drift margin), and no later than the end
    /// of a suspension's grace.
    fn deadline(&self, session_ttl: Duration) -> Instant {
        let contact = validity_deadline(self.last_contact, session_ttl);
        self.suspended_until
            .map_or(contact, |suspended| suspended.min(contact))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Session {
    /// Opens a new session. Fails within `config.connect_timeout` with
    /// `Error::Connection` naming the hosts when no server answers.
    pub(crate) async fn connect(config: &ZooKeeperConfig) -> Result<Arc<Session>> {
        let endpoint = config.connect_string();
        // The server heard from the session no earlier than this.
        let connect_sent_at = Instant::now();
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
            ttl: client.session_timeout(),
            endpoint,
            leases: Mutex::new(Registry {
                leases: SessionLeases::default(),
                last_contact: connect_sent_at,
                suspended_until: None,
            }),
            tasks: Mutex::new(Vec::new()),
            beat_now: Arc::new(tokio::sync::Notify::new()),
            held: Arc::new(HeldNodes::default()),
            client,
        });
        tracing::debug!(session = format_args!("{:#x}", session.id), ttl = ?session.ttl, endpoint = %session.endpoint, "zookeeper session established");
        let mut states = session.client.state_watcher();
        session.on_state(states.state());
        let watcher = tokio::spawn(watch_session(Arc::downgrade(&session), states));
        let heartbeat = tokio::spawn(heartbeat(
            Arc::downgrade(&session),
            session.beat_now.clone(),
            session.ttl / 3,
        ));
        let liveness = tokio::spawn(watch_held_nodes(
            Arc::downgrade(&session),
            session.held.clone(),
            config.prefix.clone(),
        ));
        session.tasks.lock().unwrap().extend([
            watcher.abort_handle(),
            heartbeat.abort_handle(),
            liveness.abort_handle(),
        ]);
        Ok(session)
    }

    /// Ends this session on the server, as an expiry would: attaches a
    /// second connection to the session and closes the session there.
    /// Returns once this client has seen the session end (every lease of
    /// it has then fired `lost()`).
    pub(crate) async fn kill(&self) -> Result<()> {
        let mut states = self.client.state_watcher();
        let deadline = tokio::time::Instant::now() + self.ttl * 2;
        // Why the last steal failed, for the error if none succeeds.
        let mut last_error = None;
        loop {
            let connect = zk::Client::connector()
                .with_session(self.client.session().clone())
                .with_session_timeout(self.ttl)
                // No fail-fast: our own client's reconnection can bump the
                // thief's first connection; it retries until attached.
                .connect(&self.endpoint);
            // Bounded by a round, so a connect that keeps losing the session
            // to our own client is retried (and the session's end looked
            // for) well before the deadline.
            let thief = tokio::time::timeout(KILL_ROUND, connect)
                .await
                .unwrap_or(Err(zk::Error::Timeout));
            match thief {
                // Dropping the only handle sends closeSession from the
                // thief's connection.
                Ok(thief) => drop(thief),
                // An earlier round's close went through.
                Err(zk::Error::SessionExpired) => {}
                // Our own client kept taking the session back until the
                // thief's connect timed out (or the link failed): the
                // session may still have ended; else steal again.
                Err(err) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %err, "zookeeper: could not attach to the session to close it");
                    last_error = Some(err);
                }
            }
            let ended = async {
                let mut state = states.state();
                while !state.is_terminated() {
                    state = states.changed().await;
                }
                state
            };
            // The close is lost when our own client takes the session back
            // first (it reconnects when the thief attaches): steal again.
            let round =
                KILL_ROUND.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if let Ok(state) = tokio::time::timeout(round, ended).await {
                // The watcher task does the same; doing it here too means
                // every lease is marked by the time we return.
                self.on_state(state);
                return Ok(());
            }
            tracing::debug!(endpoint = %self.endpoint, "zookeeper session outlived its close; stealing it again");
            if tokio::time::Instant::now() >= deadline {
                return Err(match last_error {
                    Some(err) => Error::connection(BACKEND, self.endpoint.clone(), err),
                    None => Error::backend(
                        BACKEND,
                        self.endpoint.clone(),
                        "kill_session",
                        "",
                        "the session did not end within twice its timeout",
                    ),
                });
            }
        }
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
    /// that session events reach it; already lost (`SessionLost`) if the
    /// session ended meanwhile.
    pub(crate) fn new_lease(&self, key: &str, fencing_token: u64, ttl: Duration) -> Lease {
        let mut registry = self.leases.lock().unwrap();
        let lease = Lease::new(key, fencing_token, ttl, Some(registry.deadline(self.ttl)));
        // Refused once the session ended: the lease is then lost already.
        registry.leases.register(&lease);
        lease
    }

    pub(crate) fn on_state(&self, state: zk::SessionState) {
        use zk::SessionState::*;
        let mut registry = self.leases.lock().unwrap();
        match state {
            SyncConnected => {
                if registry.suspended_until.take().is_some() {
                    self.held.reconnected();
                    tracing::info!(
                        session = format_args!("{:#x}", self.id),
                        "zookeeper session reconnected; its locks are vouched for again"
                    );
                }
                // A lease whose grace ran out while we were away stays
                // lost (`Expired`) even though the session came back: the
                // server may have handed the lock on meanwhile (to learn
                // otherwise needs a request). The others are vouched for
                // from the last contact, which the heartbeat renews now.
                let deadline = registry.deadline(self.ttl);
                registry.leases.set_valid_until(Some(deadline));
                self.beat_now.notify_one();
            }
            Disconnected | ConnectedReadOnly => {
                if registry.suspended_until.is_none() {
                    self.held.disconnected();
                    let grace = self.ttl * SUSPENDED_VALIDITY_NUM / SUSPENDED_VALIDITY_DEN;
                    tracing::warn!(session = format_args!("{:#x}", self.id), ?grace, "zookeeper session suspended; its locks are vouched for only until the grace ends");
                    registry.suspended_until = Some(Instant::now() + grace);
                    let deadline = registry.deadline(self.ttl);
                    registry.leases.set_valid_until(Some(deadline));
                }
            }
            Expired | Closed | AuthFailed => {
                let why = match state {
                    Expired => "the zookeeper session expired",
                    Closed => "the zookeeper session was closed",
                    _ => "zookeeper authentication failed",
                };
                // Both the watcher task and `kill` report the end: the
                // first reason stays.
                registry.leases.end(why);
                self.held.end();
            }
        }
    }

    /// Records that the server answered a request sent at `sent_at`, and
    /// moves the leases' deadline on accordingly.
    pub(crate) fn contacted(&self, sent_at: Instant) {
        let mut registry = self.leases.lock().unwrap();
        if sent_at <= registry.last_contact {
            return;
        }
        registry.last_contact = sent_at;
        let deadline = registry.deadline(self.ttl);
        registry.leases.set_valid_until(Some(deadline));
    }
}

/// Asks the server for one cheap answer every third of the session TTL (and
/// at once after a reconnection), so that the leases' deadline follows the
/// last time the server heard from us. Ends with the session.
async fn heartbeat(weak: Weak<Session>, beat_now: Arc<tokio::sync::Notify>, interval: Duration) {
    loop {
        // Not holding the session while idle: a dropped client ends it.
        let _ = tokio::time::timeout(interval, beat_now.notified()).await;
        let Some(session) = weak.upgrade() else {
            return;
        };
        if session.ended() {
            return;
        }
        let sent_at = Instant::now();
        match tokio::time::timeout(interval, session.client.check_stat("/")).await {
            Ok(Ok(_)) => session.contacted(sent_at),
            Ok(Err(err)) if is_session_end(&err) => return,
            // A connection loss or a slow answer: the deadline stays where
            // the last answer put it, and the next beat tries again.
            Ok(Err(err)) => tracing::debug!(error = %err, "zookeeper heartbeat failed"),
            Err(_) => tracing::debug!(?interval, "zookeeper heartbeat got no answer in time"),
        }
    }
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

/// How long one connection attempt may take: a sixth of the session TTL
/// (at least 500 ms), so that two attempts fit in the third of it that a
/// suspended session's locks are vouched for.
fn connection_timeout(session_ttl: Duration) -> Duration {
    (session_ttl / 6).max(Duration::from_millis(500))
}

/// The delays between retries of a request cut off by a connection loss.
/// No jitter: while the client reconnects it queues the retried requests
/// itself, so there is nothing to spread out.
pub(crate) fn loss_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(10), Duration::from_millis(320)).jitter(0.0)
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

/// A failed request on `key`'s lock, with the session's endpoint:
/// [`Error::Unavailable`] when the server could not be reached (which
/// `lock` retries within its wait), else [`Error::Backend`].
pub(crate) fn op_error(
    session: &Session,
    operation: &'static str,
    key: &str,
    err: zk::Error,
) -> Error {
    if is_unreachable(&err) {
        Error::unavailable(BACKEND, session.endpoint.clone(), operation, key, err)
    } else {
        Error::backend(BACKEND, session.endpoint.clone(), operation, key, err)
    }
}

/// True when the request's outcome is unknown because the connection
/// failed: a connection loss, a timeout, or the client's own connection
/// errors (`no response from connection in ...`, I/O errors), which it
/// reports as `Custom` errors.
pub(crate) fn is_unreachable(err: &zk::Error) -> bool {
    matches!(
        err,
        zk::Error::ConnectionLoss | zk::Error::Timeout | zk::Error::Custom(_)
    )
}
