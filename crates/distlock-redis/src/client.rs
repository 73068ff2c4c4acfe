//! The client: attempts, waiting, release and extend over one server or a
//! Redlock quorum (one server is a quorum of one).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::{self_renewed_guard, validity_deadline, HeldLock, Lease, WeakLease};
use distlock_core::{Error, LockGuard, LockOptions, LostReason, Result};
use futures::future::join_all;
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tracing::Instrument;

use crate::keys::LockKeys;
use crate::node::{timed_out, Node};
use crate::renewal::Renewals;
use crate::scripts::{LuaScript, ABANDON, ACQUIRE, EXTEND, RELEASE, RELEASE_FAIR};
use crate::subscriber::Subscription;

/// How long a fair waiter's queue entry lives without a refresh: a waiter
/// that crashed delays the ones behind it by at most this long.
pub(crate) const WAITER_TTL: Duration = Duration::from_secs(3);
/// The longest a release hands the queue's head the lock for (fair mode):
/// a head that died since its last refresh blocks the lock this long, not
/// for its whole TTL. A live head extends the lock to its TTL as soon as
/// it gets the grant.
pub(crate) const HANDOFF_CLAIM: Duration = WAITER_TTL;
/// How often a fair waiter refreshes its queue entry while it waits.
pub(crate) const WAITER_REFRESH: Duration = Duration::from_secs(1);
/// How long the fence counter outlives the last grant. Tokens stay
/// increasing after it expires (they are seeded from the server clock).
const FENCE_IDLE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) struct Shared {
    pub name: &'static str,
    pub nodes: Vec<Node>,
    pub quorum: usize,
    pub prefix: String,
    pub fair: bool,
    pub timeout: Duration,
    pub endpoints: String,
    pub renewals: Arc<Renewals>,
    pub client_id: String,
    seq: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the idle renewal task see that the client is gone.
        self.renewals.wake_task();
    }
}

/// What one attempt found.
pub(crate) enum Outcome {
    Granted(Granted),
    /// Held elsewhere; `retry_in` is the holder's remaining TTL when known.
    Busy {
        retry_in: Option<Duration>,
        /// Fair mode: when the attempt was sent and the server's clock (ms)
        /// while it ran, to bound a later handed-off grant's validity.
        clock: Option<ServerClock>,
    },
}

/// A lock the server gave this owner.
pub(crate) struct Granted {
    token: u64,
    /// Until when this client vouches for it.
    valid_until: Instant,
    /// What the server set the lock's TTL to: less than asked for when a
    /// release handed it over (see [`HANDOFF_CLAIM`]).
    granted_for: Duration,
}

/// A local instant no later than the moment the server's clock read
/// `server_ms`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServerClock {
    sent_at: Instant,
    server_ms: i64,
}

/// A grant a release published for a fair waiter (direct handoff).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Grant<'a> {
    pub token: u64,
    /// The server's clock (ms) when it set the lock for the waiter.
    pub server_ms: i64,
    /// The TTL (ms) the release set: the waiter's, capped by the claim
    /// window.
    pub granted_ms: u64,
    pub owner: &'a str,
}

impl<'a> Grant<'a> {
    /// Parses `grant <token> <server ms> <px> <owner>` (see
    /// `RELEASE_FAIR`).
    pub fn parse(message: &'a str) -> Option<Self> {
        let mut parts = message.strip_prefix("grant ")?.splitn(4, ' ');
        let token = parts.next()?.parse().ok()?;
        let server_ms = parts.next()?.parse().ok()?;
        let granted_ms = parts.next()?.parse().ok()?;
        let owner = parts.next()?;
        Some(Grant {
            token,
            server_ms,
            granted_ms,
            owner,
        })
    }

    /// Until when the waiter may vouch for a lock granted with `ttl`, given
    /// `clock` from one of its earlier attempts; `None` if not at all.
    ///
    /// The waiter did not send the `SET`, so its own send time bounds
    /// nothing. But the server set the lock (expiring `ttl` later on the
    /// server's clock, which is what Redis expires keys by) when its clock
    /// read `server_ms`, and it read `clock.server_ms` while running an
    /// attempt sent at `clock.sent_at`. So the lock lives at least
    /// `server_ms + ttl - clock.server_ms` (server ms) after `sent_at`,
    /// less the usual drift allowance. 2 ms more cover both readings being
    /// truncated to whole ms and a script's writes being stamped with its
    /// start time. A grant older than the attempt gives a short or negative
    /// span, hence `None`. (Like every TTL lease this trusts the server's
    /// clock not to jump; the one server is the only clock involved.)
    pub fn valid_until(&self, clock: ServerClock, ttl: Duration) -> Option<Instant> {
        let span = self.server_ms + ttl.as_millis() as i64 - clock.server_ms - 2;
        let span = Duration::from_millis(u64::try_from(span).ok()?);
        let valid_until = validity_deadline(clock.sent_at, span);
        (Instant::now() < valid_until).then_some(valid_until)
    }
}

/// Not enough Redlock instances answered.
#[derive(Debug)]
pub(crate) struct QuorumError {
    pub answered: usize,
    pub needed: usize,
    pub total: usize,
    pub first_error: Option<redis::RedisError>,
}

impl fmt::Display for QuorumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "only {} of {} Redis instances answered; a majority of {} is needed",
            self.answered, self.total, self.needed
        )?;
        if let Some(err) = &self.first_error {
            write!(f, " (first error: {err})")?;
        }
        Ok(())
    }
}

impl std::error::Error for QuorumError {}

impl Shared {
    pub fn new(
        name: &'static str,
        nodes: Vec<Node>,
        prefix: String,
        fair: bool,
        timeout: Duration,
        client_id: String,
    ) -> Self {
        let quorum = nodes.len() / 2 + 1;
        let endpoints = nodes
            .iter()
            .map(|n| n.endpoint.as_str())
            .collect::<Vec<_>>()
            .join(",");
        Shared {
            name,
            nodes,
            quorum,
            prefix,
            fair,
            timeout,
            endpoints,
            renewals: Arc::new(Renewals::default()),
            client_id,
            seq: AtomicU64::new(0),
        }
    }

    /// A value no other attempt of any client uses.
    fn new_owner(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}:{seq:x}", self.client_id)
    }

    /// Per-instance bound of a Redlock request: small against the TTL (1%,
    /// at least 50 ms), so a dead or paused instance eats little of the
    /// validity time.
    pub fn node_timeout(&self, ttl: Duration) -> Duration {
        let floor = Duration::from_millis(50);
        (ttl / 100).clamp(floor, self.timeout.max(floor))
    }

    fn op_error(&self, operation: &'static str, key: &str, err: redis::RedisError) -> Error {
        let endpoint = if self.nodes.len() == 1 {
            &self.nodes[0].endpoint
        } else {
            &self.endpoints
        };
        Error::backend(self.name, endpoint.as_str(), operation, key, err)
    }

    /// Runs `op` on every node at once (one node: directly, bounded by the
    /// connection's reply timeout).
    async fn on_all<T, F, Fut>(&self, per_node: Duration, op: F) -> Vec<redis::RedisResult<T>>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.nodes.len() == 1 {
            return vec![op(self.nodes[0].conn.clone()).await];
        }
        join_all(self.nodes.iter().map(|node| {
            let request = op(node.conn.clone());
            async move {
                match tokio::time::timeout(per_node, request).await {
                    Ok(result) => result,
                    Err(_) => Err(timed_out(
                        "no answer within the Redlock per-instance timeout",
                    )),
                }
            }
        }))
        .await
    }

    /// Runs `script`'s `command` on every node at once (see [`on_all`](Self::on_all)).
    async fn script_on_all<T: redis::FromRedisValue>(
        &self,
        per_node: Duration,
        script: &LuaScript,
        command: &redis::Cmd,
    ) -> Vec<redis::RedisResult<T>> {
        self.on_all(per_node, |mut conn| async move {
            script.run::<T>(&mut conn, command).await
        })
        .await
    }

    /// One acquisition attempt; `waiter` is the queue id of a fair waiter
    /// (empty for `try_lock` and unfair clients).
    async fn attempt(
        &self,
        key: &str,
        keys: &LockKeys,
        owner: &str,
        waiter: &str,
        ttl: Duration,
    ) -> Result<Outcome> {
        let ttl_ms = ttl.as_millis() as u64;
        let waiter_ttl_ms = if self.fair {
            WAITER_TTL.as_millis() as u64
        } else {
            0
        };
        let fence_ttl_ms = ttl_ms + FENCE_IDLE_TTL.as_millis() as u64;
        let sent_at = Instant::now();
        let mut command = keys.script_command(&ACQUIRE);
        command
            .arg(owner)
            .arg(ttl_ms)
            .arg(waiter)
            .arg(waiter_ttl_ms)
            .arg(fence_ttl_ms);
        let results = self
            .script_on_all::<(i64, i64, String, i64)>(self.node_timeout(ttl), &ACQUIRE, &command)
            .await;
        let mut token = 0u64;
        let mut granted = 0usize;
        let mut answered = 0usize;
        let mut first_error = None;
        // Refusals: (holder, its remaining TTL).
        let mut holders: Vec<(String, Option<Duration>)> = Vec::new();
        let mut clock = None;
        for result in results {
            match result {
                Ok((1, value, _, _)) => {
                    answered += 1;
                    granted += 1;
                    token = token.max(value.max(0) as u64);
                }
                Ok((2, value, _, pttl)) if self.nodes.len() == 1 => {
                    // Handed to us by a release (fair mode, one server): the
                    // lock had at least `pttl` left when this attempt ran.
                    let pttl = Duration::from_millis(u64::try_from(pttl).unwrap_or(0));
                    let valid_until = validity_deadline(sent_at, pttl);
                    if Instant::now() < valid_until {
                        return Ok(Outcome::Granted(Granted {
                            token: value.max(0) as u64,
                            valid_until,
                            granted_for: pttl,
                        }));
                    }
                    // Too little left to vouch for: give it back.
                    self.release(key, keys, owner, ttl).await.ok();
                    return Ok(Outcome::Busy {
                        retry_in: None,
                        clock: None,
                    });
                }
                Ok((_, pttl, holder, server_ms)) => {
                    if self.fair && server_ms > 0 {
                        clock = Some(ServerClock { sent_at, server_ms });
                    }
                    answered += 1;
                    let pttl = u64::try_from(pttl).ok().map(Duration::from_millis);
                    holders.push((holder, pttl));
                }
                Err(err) => {
                    if first_error.is_none() {
                        first_error = Some(err);
                    }
                }
            }
        }
        let valid_until = validity_deadline(sent_at, ttl);
        if granted >= self.quorum && Instant::now() < valid_until {
            return Ok(Outcome::Granted(Granted {
                token,
                valid_until,
                granted_for: ttl,
            }));
        }
        // A holder with a majority: wait for its release or expiry.
        let majority_holder = holders
            .iter()
            .filter(|(holder, _)| !holder.is_empty())
            .find(|(holder, _)| holders.iter().filter(|(h, _)| h == holder).count() >= self.quorum)
            .map(|(holder, _)| holder.clone());
        let retry_in = match &majority_holder {
            Some(holder) => holders
                .iter()
                .filter(|(h, _)| h == holder)
                .filter_map(|(_, pttl)| *pttl)
                .min(),
            None if self.nodes.len() > 1 && granted > 0 => {
                // A split vote: nobody got a majority; retry after a random delay.
                Some(Duration::from_millis(fastrand::u64(2..20)))
            }
            None => holders.iter().filter_map(|(_, pttl)| *pttl).min(),
        };
        // One server: an unanswered attempt is cleaned up by the caller's
        // drop guard when the error reaches it.
        if granted > 0 || (first_error.is_some() && self.nodes.len() > 1) {
            // Undo partial grants (and grants whose reply was lost). After a
            // split vote, wake the other contenders (our share may have
            // blocked them), but not this client's own waiters.
            let wake = majority_holder.is_none() && granted > 0;
            self.release_all(keys, owner, ttl, wake).await;
        }
        if answered < self.quorum {
            let err = first_error.unwrap_or_else(|| timed_out("no answer"));
            if self.nodes.len() == 1 {
                return Err(self.op_error("acquire", key, err));
            }
            return Err(Error::backend(
                self.name,
                self.endpoints.as_str(),
                "acquire",
                key,
                QuorumError {
                    answered,
                    needed: self.quorum,
                    total: self.nodes.len(),
                    first_error: Some(err),
                },
            ));
        }
        Ok(Outcome::Busy { retry_in, clock })
    }

    /// Owner-checked delete on every node, ignoring errors; `wake`
    /// publishes a retry hint the releasing client itself ignores.
    async fn release_all(&self, keys: &LockKeys, owner: &str, ttl: Duration, wake: bool) {
        let channel = if wake { keys.channel.as_str() } else { "" };
        let mut command = RELEASE.command(1);
        command
            .arg(&keys.lock)
            .arg(owner)
            .arg(channel)
            .arg(self.retry_message());
        let _ = self
            .script_on_all::<i64>(self.node_timeout(ttl), &RELEASE, &command)
            .await;
    }

    /// The message of this client's split-vote releases.
    pub fn retry_message(&self) -> String {
        retry_message(&self.client_id)
    }

    /// Owner-checked delete; `ttl` (the lease's) bounds each Redlock
    /// instance's answer.
    pub async fn release(
        &self,
        key: &str,
        keys: &LockKeys,
        owner: &str,
        ttl: Duration,
    ) -> Result<()> {
        let (script, command) = if self.fair {
            // Fair mode is one server only: hand the lock to the queue's
            // head in the same script.
            let mut command = keys.script_command(&RELEASE_FAIR);
            command
                .arg(owner)
                .arg(&keys.channel)
                .arg(FENCE_IDLE_TTL.as_millis() as u64)
                .arg(HANDOFF_CLAIM.as_millis() as u64);
            (&*RELEASE_FAIR, command)
        } else {
            let mut command = RELEASE.command(1);
            command
                .arg(&keys.lock)
                .arg(owner)
                .arg(&keys.channel)
                .arg("");
            (&*RELEASE, command)
        };
        let results = self
            .script_on_all::<i64>(self.node_timeout(ttl), script, &command)
            .await;
        let (mut deleted, mut refused, mut first_error) = (0, 0, None);
        for result in results {
            match result {
                Ok(1) => deleted += 1,
                Ok(_) => refused += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if deleted >= self.quorum {
            Ok(())
        } else if refused > self.nodes.len() - self.quorum {
            Err(Error::not_held(key))
        } else {
            Err(self.quorum_or_node_error("release", key, deleted + refused, first_error))
        }
    }

    pub async fn extend(
        &self,
        key: &str,
        keys: &LockKeys,
        owner: &str,
        ttl: Duration,
        lease: &WeakLease,
    ) -> Result<()> {
        let ttl_ms = ttl.as_millis() as u64;
        let sent_at = Instant::now();
        let mut command = EXTEND.command(1);
        command.arg(&keys.lock).arg(owner).arg(ttl_ms);
        let results = self
            .script_on_all::<i64>(self.node_timeout(ttl), &EXTEND, &command)
            .await;
        let (mut extended, mut refused, mut first_error) = (0, 0, None);
        for result in results {
            match result {
                Ok(1) => extended += 1,
                Ok(_) => refused += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let deadline = validity_deadline(sent_at, ttl);
        if extended >= self.quorum && Instant::now() < deadline {
            if let Some(lease) = lease.upgrade() {
                lease.set_valid_until(Some(deadline));
            }
            Ok(())
        } else if refused > self.nodes.len() - self.quorum {
            Err(Error::not_held(key))
        } else {
            Err(self.quorum_or_node_error("extend", key, extended + refused, first_error))
        }
    }

    fn quorum_or_node_error(
        &self,
        operation: &'static str,
        key: &str,
        answered: usize,
        first_error: Option<redis::RedisError>,
    ) -> Error {
        if self.nodes.len() == 1 {
            return self.op_error(
                operation,
                key,
                first_error.unwrap_or_else(|| timed_out("no answer")),
            );
        }
        Error::backend(
            self.name,
            self.endpoints.as_str(),
            operation,
            key,
            QuorumError {
                answered,
                needed: self.quorum,
                total: self.nodes.len(),
                first_error,
            },
        )
    }

    /// Cleanup of an attempt whose outcome is unknown or unwanted.
    async fn abandon(&self, keys: &LockKeys, owner: &str, waiter: &str) {
        let mut command = ABANDON.command(3);
        command
            .arg(&keys.lock)
            .arg(&keys.queue)
            .arg(&keys.waiters)
            .arg(owner)
            .arg(waiter)
            .arg(&keys.channel);
        let results = self
            .script_on_all::<i64>(self.timeout, &ABANDON, &command)
            .await;
        for result in results {
            if let Err(err) = result {
                tracing::debug!(error = %err, "distlock: cleanup of an abandoned attempt failed; its TTL will end it");
            }
        }
    }

    /// The guard of a granted lock. `granted_for` is the TTL the server
    /// set; when a handoff set less than `options.ttl` (the claim window),
    /// the lock is extended to `options.ttl` at once, in the background:
    /// the guard is usable meanwhile, vouched for by the shorter validity.
    fn make_guard(
        self: &Arc<Self>,
        key: &str,
        keys: LockKeys,
        owner: String,
        granted: Granted,
        options: &LockOptions,
    ) -> LockGuard {
        let lease = Lease::new(key, granted.token, options.ttl, Some(granted.valid_until));
        let claimed = granted.granted_for < options.ttl;
        let renewal_id = options.auto_renew.then(|| {
            Renewals::register(
                &self.renewals,
                self,
                &lease,
                keys.lock.clone(),
                owner.clone(),
                claimed,
            )
        });
        if claimed && !options.auto_renew {
            self.extend_once(key, &keys, &owner, &lease);
        }
        let held = Arc::new(RedisHeld {
            shared: self.clone(),
            key: key.to_owned(),
            keys,
            owner,
            lease: lease.downgrade(),
            renewal_id,
        });
        self_renewed_guard(self.name, lease, held)
    }

    /// Extends a handed-over lock to its lease's TTL once, in the
    /// background (a guard without auto-renewal still gets the TTL it
    /// asked for). A refusal marks the lease lost; an error leaves it to
    /// expire at the claim window's end.
    fn extend_once(self: &Arc<Self>, key: &str, keys: &LockKeys, owner: &str, lease: &Lease) {
        let (shared, key, keys, owner) =
            (self.clone(), key.to_owned(), keys.clone(), owner.to_owned());
        let (lease, ttl) = (lease.downgrade(), lease.ttl());
        let span =
            tracing::debug_span!("distlock.renew", backend = self.name, key = %key, claim = true);
        tokio::spawn(
            async move {
                match shared.extend(&key, &keys, &owner, ttl, &lease).await {
                    Ok(()) => {}
                    Err(err) if err.is_not_held() => {
                        if let Some(lease) = lease.upgrade() {
                            lease.mark_lost(LostReason::NotHeld);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "distlock: could not extend a handed-over lock; it ends with its claim window");
                    }
                }
            }
            .instrument(span),
        );
    }

    pub async fn try_acquire(
        self: &Arc<Self>,
        key: &str,
        options: &LockOptions,
    ) -> Result<Option<LockGuard>> {
        let keys = LockKeys::new(&self.prefix, key);
        let owner = self.new_owner();
        let mut abandon = Abandon::new(self, &keys, &owner, "");
        match self.attempt(key, &keys, &owner, "", options.ttl).await? {
            Outcome::Granted(granted) => {
                abandon.disarm();
                drop(abandon);
                Ok(Some(self.make_guard(key, keys, owner, granted, options)))
            }
            Outcome::Busy { .. } => {
                abandon.disarm();
                Ok(None)
            }
        }
    }

    pub async fn acquire(self: &Arc<Self>, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let keys = LockKeys::new(&self.prefix, key);
        let owner = self.new_owner();
        // A fair waiter's queue id is its owner value: unique per attempt.
        let waiter = if self.fair { owner.as_str() } else { "" };
        let mut abandon = Abandon::new(self, &keys, &owner, waiter);
        // A release hands a fair waiter the lock on its client's channel
        // (one message, not one per waiting client); the shared one
        // carries plain releases.
        let grant_channel = self.fair.then(|| keys.grant_channel(&self.client_id));
        let mut channels = vec![keys.channel.as_str()];
        channels.extend(grant_channel.as_deref());
        // Subscriptions left from this client's last wait on the lock, if
        // any: then one attempt is all it takes to start waiting.
        let mut subscriptions = self.live_subscriptions(&channels);
        let mut polls: u32 = 0;
        // The latest attempt's view of the server's clock (fair mode).
        let mut clock: Option<ServerClock> = None;
        loop {
            for subscription in &mut subscriptions {
                subscription.mark_seen();
            }
            let retry_in = match self
                .attempt(key, &keys, &owner, waiter, options.ttl)
                .await?
            {
                Outcome::Granted(granted) => {
                    abandon.disarm();
                    drop(abandon);
                    return Ok(self.make_guard(key, keys, owner, granted, options));
                }
                Outcome::Busy {
                    retry_in,
                    clock: seen,
                } => {
                    clock = seen.or(clock);
                    retry_in
                }
            };
            if subscriptions.iter().all(Subscription::is_dead) {
                // Subscribe, then attempt again: a release published
                // between the failed attempt and the subscription is not
                // missed.
                subscriptions = self.subscribe_all(&channels, options.ttl).await;
                if !subscriptions.is_empty() {
                    continue;
                }
            }
            let mut delay = match retry_in {
                // Expiry publishes nothing: retry when the holder's TTL runs
                // out, a little later and spread out.
                Some(pttl) => {
                    pttl + Duration::from_millis(
                        1 + fastrand::u64(..=pttl.as_millis().min(200) as u64 / 10),
                    )
                }
                None => WAITER_REFRESH,
            };
            if self.fair {
                // Also the refresh of the queue entry, and the latest a
                // waiter whose grant message was lost finds the lock is
                // its own (the attempt says so).
                delay = delay.min(WAITER_REFRESH);
            }
            if subscriptions.is_empty() {
                // No notifications: fall back to polling with the backoff.
                delay = delay.min(options.backoff.delay(polls));
                polls += 1;
            }
            let retry_at = Instant::now() + delay;
            loop {
                let message = tokio::select! {
                    _ = tokio::time::sleep_until(retry_at) => break,
                    message = wait_any(&mut subscriptions) => message,
                };
                let Some(grant) = message.as_deref().and_then(Grant::parse) else {
                    // A plain release, an abandoned attempt, a dead
                    // connection: try again.
                    break;
                };
                if grant.owner != owner {
                    // Handed to another waiter: still held, keep waiting
                    // (the timer still refreshes the queue entry).
                    continue;
                }
                // Ours, without another round trip, if we can vouch for it;
                // otherwise the attempt finds out (and the lock is ours or
                // gone by then).
                let granted_for = Duration::from_millis(grant.granted_ms);
                let Some(valid_until) = clock.and_then(|c| grant.valid_until(c, granted_for))
                else {
                    break;
                };
                abandon.disarm();
                drop(abandon);
                let granted = Granted {
                    token: grant.token,
                    valid_until,
                    granted_for,
                };
                return Ok(self.make_guard(key, keys, owner, granted, options));
            }
        }
    }

    /// Live subscriptions to `channels` on every node (see
    /// [`Subscriber::live`](crate::subscriber::Subscriber::live)), or none.
    fn live_subscriptions(&self, channels: &[&str]) -> Vec<Subscription> {
        let mut live = Vec::new();
        for node in &self.nodes {
            match node.subscriber.live(channels) {
                Some(subscriptions) => live.extend(subscriptions),
                None => return Vec::new(),
            }
        }
        live
    }

    async fn subscribe_all(&self, channels: &[&str], ttl: Duration) -> Vec<Subscription> {
        // With Redlock, a paused instance must not hold up waiting on the
        // others.
        let bound = if self.nodes.len() > 1 {
            self.node_timeout(ttl)
        } else {
            self.timeout * 2
        };
        let results = join_all(self.nodes.iter().map(|node| async move {
            let result = match tokio::time::timeout(bound, node.subscriber.subscribe(channels)).await {
                Ok(result) => result,
                Err(_) => Err(timed_out("SUBSCRIBE was not confirmed in time")),
            };
            if let Err(err) = &result {
                tracing::debug!(endpoint = %node.endpoint, error = %err, "distlock: cannot subscribe; waiting by polling");
            }
            result
        }))
        .await;
        results
            .into_iter()
            .filter_map(|r| r.ok())
            .flatten()
            .collect()
    }
}

/// What a client publishes when it gives back a split vote.
pub(crate) fn retry_message(client_id: &str) -> String {
    format!("retry:{client_id}")
}

/// The next message on any subscription (`None`: a connection died).
async fn wait_any(subscriptions: &mut [Subscription]) -> Option<Arc<str>> {
    if subscriptions.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(subscriptions.iter_mut().map(|s| Box::pin(s.woken())))
        .await
        .0
}

/// Cleans up an attempt whose future was dropped or failed before a
/// definite answer: the script may have granted the lock or queued the
/// waiter on the server.
struct Abandon<'a> {
    shared: &'a Arc<Shared>,
    keys: &'a LockKeys,
    owner: &'a str,
    waiter: &'a str,
    armed: bool,
}

impl<'a> Abandon<'a> {
    fn new(shared: &'a Arc<Shared>, keys: &'a LockKeys, owner: &'a str, waiter: &'a str) -> Self {
        Abandon {
            shared,
            keys,
            owner,
            waiter,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, keys, owner, waiter) = (
            self.shared.clone(),
            self.keys.clone(),
            self.owner.to_owned(),
            self.waiter.to_owned(),
        );
        runtime.spawn(async move { shared.abandon(&keys, &owner, &waiter).await });
    }
}

/// One granted lock.
struct RedisHeld {
    shared: Arc<Shared>,
    key: String,
    keys: LockKeys,
    owner: String,
    lease: WeakLease,
    renewal_id: Option<u64>,
}

#[async_trait]
impl HeldLock for RedisHeld {
    async fn release(&self) -> Result<()> {
        if let Some(id) = self.renewal_id {
            self.shared.renewals.remove(id);
        }
        // A finished lease no longer says its TTL: bound by the client's
        // timeout then.
        let ttl = self
            .lease
            .upgrade()
            .map_or(self.shared.timeout * 100, |lease| lease.ttl());
        self.shared
            .release(&self.key, &self.keys, &self.owner, ttl)
            .await
    }

    async fn extend(&self, ttl: Duration) -> Result<()> {
        self.shared
            .extend(&self.key, &self.keys, &self.owner, ttl, &self.lease)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_messages_parse() {
        let grant = Grant::parse("grant 1795245658116459 1795245658116 3000 abc:1f").unwrap();
        assert_eq!(
            grant,
            Grant {
                token: 1795245658116459,
                server_ms: 1795245658116,
                granted_ms: 3000,
                owner: "abc:1f",
            }
        );
        assert_eq!(Grant::parse(""), None);
        assert_eq!(Grant::parse("retry:abc"), None);
        assert_eq!(Grant::parse("grant x 1 2 abc"), None);
        assert_eq!(Grant::parse("grant 1 2 3"), None);
        // An older release's message (no TTL) is not taken for a grant:
        // its waiter learns of it from its next attempt.
        assert_eq!(Grant::parse("grant 1 2 abc:1f"), None);
    }

    #[test]
    fn a_grant_is_vouched_for_from_the_attempt_that_read_the_server_clock() {
        let ttl = Duration::from_secs(10);
        let sent_at = Instant::now();
        let clock = ServerClock {
            sent_at,
            server_ms: 1_000_000,
        };
        // Granted 2 s (server time) after the attempt ran: the lock lives
        // 12 s after that attempt was sent, less the drift allowance.
        let grant = Grant {
            token: 1,
            server_ms: 1_002_000,
            granted_ms: 10_000,
            owner: "o",
        };
        let valid_until = grant.valid_until(clock, ttl).unwrap();
        let span = Duration::from_millis(12_000 - 2);
        assert_eq!(valid_until, validity_deadline(sent_at, span));
        // A grant that expired before the attempt ran vouches for nothing.
        let stale = Grant {
            server_ms: 1_000_000 - 10_000,
            ..grant
        };
        assert_eq!(stale.valid_until(clock, ttl), None);
    }
}
