//! Leases: the client's session lease, kept alive by one stream for all
//! the locks it carries, and per-lock leases for locks with their own TTL.
//!
//! - Each client grants one session lease at connect and keeps it alive
//!   with one keep-alive stream (every `session_ttl / 3`) shared by all of
//!   its locks. Renewed locks whose `LockOptions::ttl` differs from the
//!   session TTL (in whole seconds) share one more such lease per TTL,
//!   granted on first use. A lock whose `auto_renew` is off gets a lease
//!   of its own ([`Binding::Own`]), granted in the acquire path (one more
//!   round trip), which expires on the server after its TTL.
//! - A guard is vouched for until `sent_at + TTL - drift` of the last
//!   successful keep-alive of its lease (`sent_at` is when that keep-alive
//!   was sent, the TTL is what etcd answered). `lost()` fires when etcd
//!   answers that the lease is gone (revoked or expired) or when no
//!   keep-alive succeeds before that deadline; a keep-alive that answers
//!   after the deadline does not bring the locks back. A session-lease
//!   lock learns of a revocation at the next keep-alive, within
//!   `session_ttl / 3`.
//! - A lost session is replaced by a new one on the next attempt, one at
//!   a time; the old lease is revoked so that no lock outlives our giving
//!   up on it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock_core::backend::{validity_deadline, Lease, SessionLeases};
use distlock_core::{Backoff, LockOptions};
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::lease_seconds;
use crate::health::{Disruptions, Health};
use crate::rpc::{bounded, interrupted, is_lease_not_found, Failure};
use crate::EtcdLock;

/// Why the session was lost when etcd says its lease is gone.
pub(crate) const LEASE_GONE: &str = "etcd says the session lease expired or was revoked";

/// What one keep-alive round trip said about a lease.
pub(crate) enum Refresh {
    /// The lease lives `ttl` from when the request was sent.
    Alive(Duration),
    /// The lease is gone on the server (expired or revoked).
    Gone,
}

/// One keep-alive stream for one lease. etcd-client binds a stream to a
/// lease id, so each lease has its own; the session's is shared by every
/// lock on the session.
pub(crate) struct KeepAlive {
    id: i64,
    /// The TTL the lease was granted with (what a refresh restores).
    granted: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl KeepAlive {
    pub(crate) fn new(id: i64, granted: Duration) -> Self {
        KeepAlive {
            id,
            granted,
            stream: None,
        }
    }

    /// One keep-alive round trip, opening the stream if needed. The
    /// caller bounds it with a timeout and records `sent_at` before it.
    pub(crate) async fn refresh(&mut self, client: &Client) -> Result<Refresh, etcd_client::Error> {
        let outcome = self.refresh_inner(client).await;
        if outcome.is_err() {
            // A broken stream is reopened next time.
            self.stream = None;
        }
        outcome
    }

    async fn refresh_inner(&mut self, client: &Client) -> Result<Refresh, etcd_client::Error> {
        match &mut self.stream {
            Some((keeper, stream)) => {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(response) if response.ttl() > 0 => {
                        Ok(Refresh::Alive(Duration::from_secs(response.ttl() as u64)))
                    }
                    Some(_) => Ok(Refresh::Gone),
                    None => Err(etcd_client::Error::LeaseKeepAliveError(
                        "the keep-alive stream ended".into(),
                    )),
                }
            }
            None => {
                // Opening the stream sends the first keep-alive and reads
                // its answer; etcd-client reports a dead lease as an error.
                match client.lease_client().keep_alive(self.id).await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        Ok(Refresh::Alive(self.granted))
                    }
                    Err(etcd_client::Error::LeaseKeepAliveError(why))
                        if why.contains("not found") =>
                    {
                        Ok(Refresh::Gone)
                    }
                    Err(err) => Err(err),
                }
            }
        }
    }
}

struct SessionState {
    /// Until when the last keep-alive vouches for the lease.
    valid_until: Instant,
    /// Locks carried by the session, updated on every keep-alive; ended
    /// once the session is lost.
    leases: SessionLeases,
}

impl SessionState {
    /// True once the session was lost or its deadline passed.
    fn is_lost(&self) -> bool {
        self.leases.ended().is_some() || Instant::now() >= self.valid_until
    }
}

/// The client's session lease.
pub(crate) struct Session {
    pub(crate) id: i64,
    /// The TTL etcd granted (it may round up what was asked).
    pub(crate) ttl: Duration,
    state: Mutex<SessionState>,
    lost_tx: watch::Sender<bool>,
    task: Mutex<Option<AbortHandle>>,
}

impl Session {
    pub(crate) fn new(id: i64, ttl: Duration, valid_until: Instant) -> Arc<Self> {
        Arc::new(Session {
            id,
            ttl,
            state: Mutex::new(SessionState {
                valid_until,
                leases: SessionLeases::new(),
            }),
            lost_tx: watch::channel(false).0,
            task: Mutex::new(None),
        })
    }

    /// True once the session was lost or its deadline passed.
    pub(crate) fn is_lost(&self) -> bool {
        self.state.lock().unwrap().is_lost()
    }

    fn valid_until(&self) -> Instant {
        self.state.lock().unwrap().valid_until
    }

    /// Resolves once the session is lost (or its deadline passes).
    pub(crate) async fn lost(&self) {
        let mut rx = self.lost_tx.subscribe();
        loop {
            let deadline = self.valid_until();
            if *rx.borrow_and_update() || Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Builds a lease for a lock granted on this session and registers it
    /// for keep-alive updates; `None` if the session is already lost.
    pub(crate) fn attach(&self, make: impl FnOnce(Instant) -> Lease) -> Option<Lease> {
        let mut state = self.state.lock().unwrap();
        if state.is_lost() {
            return None;
        }
        let lease = make(state.valid_until);
        // Not ended (checked under the same lock): always registered.
        state.leases.register(&lease).then_some(lease)
    }

    /// Records a keep-alive answer. Returns false when it came too late:
    /// the old deadline had passed, so the locks may have been lost in
    /// between and are not brought back.
    fn renewed(&self, valid_until: Instant) -> bool {
        let mut state = self.state.lock().unwrap();
        if state.is_lost() {
            return false;
        }
        state.valid_until = valid_until;
        state.leases.set_valid_until(Some(valid_until));
        true
    }

    /// Marks the session and every lock on it lost
    /// (`SessionLost(why)`). The first call wins: a later one, with
    /// another reason, does nothing.
    pub(crate) fn lose(&self, why: &str) {
        let locks = {
            let mut state = self.state.lock().unwrap();
            if state.leases.ended().is_some() {
                return;
            }
            state.leases.end(why)
        };
        // Only a loss that takes held locks with it deserves a warning; a
        // client closing with nothing held is routine.
        if locks == 0 {
            tracing::debug!(lease_id = self.id, why, "distlock: etcd session ended");
        } else {
            tracing::warn!(
                lease_id = self.id,
                why,
                locks,
                "distlock: etcd session lost"
            );
        }
        self.lost_tx.send_replace(true);
    }

    /// Starts the keep-alive task.
    pub(crate) fn start(
        self: &Arc<Self>,
        client: Client,
        timeout: Duration,
        disruptions: Disruptions,
    ) {
        let task = tokio::spawn(keep_session_alive(
            client,
            self.clone(),
            timeout,
            disruptions,
        ));
        *self.task.lock().unwrap() = Some(task.abort_handle());
    }

    /// Stops the keep-alive, marks the session lost and revokes the lease
    /// in the background (which deletes every key still on it).
    pub(crate) fn close(&self, client: &Client, why: &str) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        if self.state.lock().unwrap().leases.ended().is_some() {
            return;
        }
        self.lose(why);
        spawn_revoke(client.clone(), self.id);
    }
}

/// Revokes `id` in the background, if a runtime is there to do it, trying
/// again until etcd confirms it (or says the lease is gone) or
/// [`REVOKE_FOR`] has passed.
///
/// One try is not enough: a session given up during an election (no
/// keep-alive could succeed) is revoked while there is no leader, the try
/// times out, and the lease, which the new leader renews for a whole TTL,
/// keeps its keys, and with them the lock, from everyone meanwhile (found
/// by the fault suite with the leader partitioned; docs/choosing.md). Each
/// try is bounded by a second, so that the first one after the election
/// goes through.
pub(crate) fn spawn_revoke(client: Client, id: i64) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let deadline = Instant::now() + REVOKE_FOR;
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut retry = 0;
        loop {
            let revoke = async { client.lease_client().revoke(id).await };
            let error = match tokio::time::timeout(Duration::from_secs(1), revoke).await {
                Ok(Ok(_)) => return,
                Ok(Err(err)) if is_lease_not_found(&err) => return,
                Ok(Err(err)) => err.to_string(),
                Err(_) => "no answer within 1s".to_owned(),
            };
            if Instant::now() >= deadline {
                tracing::debug!(lease_id = id, %error, "distlock: etcd lease revoke failed; the lease ends with its TTL");
                return;
            }
            tokio::time::sleep(backoff.delay(retry)).await;
            retry += 1;
        }
    });
}

/// How long a revoke is tried: past a session TTL plus an election, the
/// lease has ended on its own.
const REVOKE_FOR: Duration = Duration::from_secs(30);

/// Keeps the session lease alive every ttl/3 on one stream, moving every
/// attached lock's deadline to `sent_at + ttl - drift` on each answer.
/// Stops, marking the session lost, when etcd says the lease is gone or no
/// keep-alive succeeds before the deadline. A keep-alive in flight when a
/// member leaves the balancer is sent again at once on a new stream: the
/// old one may be stuck on that member, and with a short session TTL
/// waiting out the timeout there can cost the session.
async fn keep_session_alive(
    client: Client,
    session: Arc<Session>,
    timeout: Duration,
    mut disruptions: Disruptions,
) {
    let interval = session.ttl / 3;
    let mut keep_alive = KeepAlive::new(session.id, session.ttl);
    let mut next = Instant::now() + interval;
    let mut failures: u32 = 0;
    loop {
        tokio::time::sleep_until(next).await;
        let sent_at = Instant::now();
        let left = session.valid_until().saturating_duration_since(sent_at);
        if left.is_zero() {
            session.lose("no keep-alive succeeded before the lease's deadline");
            break;
        }
        let span = tracing::debug_span!("distlock.renew", backend = "etcd", lease_id = session.id);
        let refresh = keep_alive.refresh(&client).instrument(span);
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(left.min(timeout), refresh) => outcome,
            () = disruptions.next() => {
                tracing::debug!(lease_id = session.id, "distlock: etcd keep-alive interrupted (a member left the balancer or the leader changed), sending it again");
                keep_alive.stream = None;
                next = Instant::now();
                continue;
            }
        };
        match outcome {
            Ok(Ok(Refresh::Alive(ttl))) => {
                if !session.renewed(validity_deadline(sent_at, ttl)) {
                    session.lose("the keep-alive answered after the lease's deadline");
                    break;
                }
                failures = 0;
                next = sent_at + interval;
            }
            Ok(Ok(Refresh::Gone)) => {
                session.lose(LEASE_GONE);
                break;
            }
            Ok(Err(err)) => {
                tracing::warn!(lease_id = session.id, error = %err, "distlock: etcd keep-alive failed, retrying");
                next = Instant::now() + retry_delay(failures, left);
                failures += 1;
            }
            Err(_) => {
                tracing::warn!(
                    lease_id = session.id,
                    "distlock: etcd keep-alive got no answer, retrying"
                );
                keep_alive.stream = None;
                next = Instant::now() + retry_delay(failures, left);
                failures += 1;
            }
        }
    }
    // The server may still hold the lease (a paused or partitioned
    // server): revoke it so that no lock outlives our giving up on it.
    spawn_revoke(client, session.id);
}

/// The delay before keep-alive retry number `retry` (0-based): 100 ms
/// doubling up to 800 ms, and at most a quarter of the `left` validity.
fn retry_delay(retry: u32, left: Duration) -> Duration {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800)).jitter(0.0);
    backoff.delay(retry).min(left / 4)
}

/// A lock's own lease (its TTL differs from the session's, or it must not
/// be renewed).
pub(crate) struct OwnLease {
    pub(crate) id: i64,
    pub(crate) ttl: Duration,
    /// 128 random bits in hex, the value of the lock's key: whoever knows
    /// it (and the lease) may resume the lock (see the `resume` module).
    pub(crate) secret: String,
    keep_alive: tokio::sync::Mutex<KeepAlive>,
    valid_until: Mutex<Instant>,
}

impl OwnLease {
    pub(crate) fn new(id: i64, ttl: Duration, valid_until: Instant) -> Self {
        let mut secret = [0u8; 16];
        getrandom::getrandom(&mut secret).expect("the OS random source failed");
        let secret = format!("{:032x}", u128::from_le_bytes(secret));
        Self::with_secret(id, ttl, valid_until, secret)
    }

    /// The lease of a lock resumed from its `secret`.
    pub(crate) fn with_secret(
        id: i64,
        ttl: Duration,
        valid_until: Instant,
        secret: String,
    ) -> Self {
        OwnLease {
            id,
            ttl,
            secret,
            keep_alive: tokio::sync::Mutex::new(KeepAlive::new(id, ttl)),
            valid_until: Mutex::new(valid_until),
        }
    }

    /// Until when the last grant or refresh vouches for the lease.
    pub(crate) fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap()
    }

    /// One keep-alive: the new deadline, or `None` if the lease is gone.
    pub(crate) async fn refresh(
        &self,
        client: &Client,
        timeout: Duration,
    ) -> Result<Option<Instant>, etcd_client::Error> {
        let mut keep_alive = self.keep_alive.lock().await;
        let sent_at = Instant::now();
        let outcome = match tokio::time::timeout(timeout, keep_alive.refresh(client)).await {
            Ok(outcome) => outcome?,
            Err(_) => {
                keep_alive.stream = None;
                return Err(etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no keep-alive answer within {timeout:?}"),
                )));
            }
        };
        match outcome {
            Refresh::Alive(ttl) => {
                let deadline = validity_deadline(sent_at, ttl);
                let mut valid_until = self.valid_until.lock().unwrap();
                *valid_until = (*valid_until).max(deadline);
                Ok(Some(deadline))
            }
            Refresh::Gone => Ok(None),
        }
    }
}

/// Grants a session lease of `secs` (the grant bounded by `timeout`, and
/// interrupted when a member leaves the balancer) and starts its
/// keep-alive (each bounded by `request_timeout`).
pub(crate) async fn grant_session(
    client: &Client,
    health: &Health,
    secs: i64,
    timeout: Duration,
    request_timeout: Duration,
) -> Result<Arc<Session>, etcd_client::Error> {
    let sent_at = Instant::now();
    let grant = bounded(timeout, async {
        client.lease_client().grant(secs, None).await
    });
    let granted = tokio::select! {
        granted = grant => granted?,
        () = health.disrupted() => return Err(interrupted()),
    };
    let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
    let session = Session::new(granted.id(), ttl, validity_deadline(sent_at, ttl));
    session.start(client.clone(), request_timeout, health.disruptions());
    Ok(session)
}

/// The lease an attempt's key lives on.
#[derive(Clone)]
pub(crate) enum Binding {
    Session(Arc<Session>),
    Own(Arc<OwnLease>),
}

impl Binding {
    pub(crate) fn lease_id(&self) -> i64 {
        match self {
            Binding::Session(session) => session.id,
            Binding::Own(own) => own.id,
        }
    }

    /// The value of an attempt's key: a lock on a lease of its own keeps
    /// its resume secret there; on the session lease, nothing.
    pub(crate) fn key_value(&self) -> &str {
        match self {
            Binding::Own(own) => &own.secret,
            Binding::Session(_) => "",
        }
    }

    pub(crate) fn own_lease(&self) -> Option<i64> {
        match self {
            Binding::Own(own) => Some(own.id),
            Binding::Session(_) => None,
        }
    }

    /// Resolves when the lease a waiting key lives on is lost. Keeps a
    /// lock's own lease alive while it waits (the session has its own
    /// task).
    pub(crate) async fn lost(&self, locks: &EtcdLock) {
        match self {
            Binding::Session(session) => session.lost().await,
            Binding::Own(own) => loop {
                let deadline = own.valid_until();
                tokio::time::sleep(
                    (own.ttl / 3).min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
                let timeout = deadline
                    .saturating_duration_since(Instant::now())
                    .min(locks.inner.config.timeout);
                match own
                    .refresh(&locks.inner.client, timeout.max(Duration::from_millis(1)))
                    .await
                {
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(_) if Instant::now() >= own.valid_until() => return,
                    Err(err) => {
                        tracing::debug!(error = %err, "distlock: etcd keep-alive of a waiting lock failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
        }
    }
}

impl EtcdLock {
    /// The session, or a new one if it was lost.
    pub(crate) async fn session(&self) -> Result<Arc<Session>, Failure> {
        let current = self.inner.session.lock().unwrap().clone();
        if !current.is_lost() {
            return Ok(current);
        }
        let _one_at_a_time = self.inner.new_session.lock().await;
        let current = self.inner.session.lock().unwrap().clone();
        if !current.is_lost() {
            return Ok(current);
        }
        current.close(
            &self.inner.client,
            "no keep-alive succeeded before the lease's deadline",
        );
        let session = self.grant_shared_lease(self.inner.session_secs).await?;
        tracing::info!(lease_id = session.id, "distlock: new etcd session");
        *self.inner.session.lock().unwrap() = session.clone();
        Ok(session)
    }

    /// A new lease of `secs` kept alive for the locks that share it (the
    /// session's, or one TTL's).
    async fn grant_shared_lease(&self, secs: i64) -> Result<Arc<Session>, Failure> {
        grant_session(
            &self.inner.client,
            &self.inner.health,
            secs,
            self.inner.config.timeout,
            self.inner.config.timeout,
        )
        .await
        .map_err(|source| Failure {
            error: self.error("create session", "", source),
            retry: true,
        })
    }

    /// The session lease shared by the renewed locks whose TTL is `secs`
    /// (not the session's), granted on first use and replaced once lost,
    /// like the session. One lease per TTL rather than per lock: no grant
    /// or revoke per lock, and one keep-alive stream for them all.
    async fn ttl_session(&self, secs: i64) -> Result<Arc<Session>, Failure> {
        let current = self.inner.ttl_sessions.lock().unwrap().get(&secs).cloned();
        if let Some(current) = current.as_ref().filter(|session| !session.is_lost()) {
            return Ok(current.clone());
        }
        let _one_at_a_time = self.inner.new_session.lock().await;
        let current = self.inner.ttl_sessions.lock().unwrap().get(&secs).cloned();
        if let Some(current) = current {
            if !current.is_lost() {
                return Ok(current);
            }
            current.close(
                &self.inner.client,
                "no keep-alive succeeded before the lease's deadline",
            );
        }
        let session = self.grant_shared_lease(secs).await?;
        tracing::debug!(lease_id = session.id, ttl = ?session.ttl, "distlock: new etcd lease for locks of this TTL");
        self.inner
            .ttl_sessions
            .lock()
            .unwrap()
            .insert(secs, session.clone());
        Ok(session)
    }

    /// The lease a new attempt uses: the session's, one shared by the
    /// locks of its TTL, or (without renewal) its own.
    pub(crate) async fn binding(
        &self,
        key: &str,
        options: &LockOptions,
    ) -> Result<Binding, Failure> {
        let secs = lease_seconds(options.ttl);
        if options.auto_renew && secs == self.inner.session_secs {
            return Ok(Binding::Session(self.session().await?));
        }
        if options.auto_renew {
            return Ok(Binding::Session(self.ttl_session(secs).await?));
        }
        self.own_binding(key, secs).await
    }

    /// A new lease of `secs` for one attempt on `key`'s lock.
    pub(crate) async fn own_binding(&self, key: &str, secs: i64) -> Result<Binding, Failure> {
        let sent_at = Instant::now();
        let granted = self
            .call("grant lease", key, async {
                self.inner.client.lease_client().grant(secs, None).await
            })
            .await?;
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        Ok(Binding::Own(Arc::new(OwnLease::new(
            granted.id(),
            ttl,
            validity_deadline(sent_at, ttl),
        ))))
    }
}
