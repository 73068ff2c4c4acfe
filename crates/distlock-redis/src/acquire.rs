//! Attempts and waiting, and the fair queue.
//!
//! - **An attempt is one round trip**: the acquire script does `SET lock
//!   owner NX PX ttl` and, when it succeeds, returns a fencing token (see
//!   `GRANT_TOKEN_LUA` in [`scripts`](crate::scripts)). The lock, its
//!   fence counter and its queue share one hash tag (see
//!   [`keys`](crate::keys)). A failed attempt returns the holder's
//!   remaining TTL.
//! - **Waiting is notified**: a release publishes on the lock's channel,
//!   and all waiters of a client share one pub/sub connection per server
//!   ([`subscriber`](crate::subscriber)). A waiter subscribes, then
//!   attempts again, so a release between its failed attempt and its
//!   subscription is not missed. A subscription nobody uses stays on for
//!   [`LINGER`](crate::subscriber::LINGER): a client that waits on the same
//!   lock again within that time starts waiting after its one failed
//!   attempt. Expiry publishes nothing, so a waiter also attempts again
//!   when the holder's remaining TTL runs out, with jitter; without any
//!   subscription it polls with the options' backoff. A dropped `lock`
//!   future unsubscribes and, through its cleanup, deletes a lock it may
//!   have been granted and leaves the queue (in the background).
//! - **Fair mode** (one server, the default there): the acquire script
//!   keeps a FIFO of waiters next to the lock, and a free lock goes to the
//!   head of the queue, so no contender starves. An uncontended attempt is
//!   still one round trip (the queue is empty), and `try_lock` never jumps
//!   the queue. A waiter refreshes its queue entry every
//!   [`WAITER_REFRESH`]; a crashed waiter's entry expires after
//!   [`WAITER_TTL`].
//! - **Direct handoff** (fair mode): the release script itself makes the
//!   queue's head (a waiter whose entry is fresh) the owner, with a new
//!   fencing token, for the TTL that waiter asked for but at most
//!   [`HANDOFF_CLAIM`], and publishes the grant on the channel of that
//!   waiter's client (one message per handoff, however many clients
//!   wait). The waiter holds the lock when the message arrives, without
//!   another round trip, vouching for it from the server clock reading of
//!   its own last attempt (the grant carries the server time it was made
//!   at; see [`Grant::valid_until`]). It then extends the lock to its TTL
//!   in the background ([`held`](crate::held)); the guard is usable at
//!   once, vouched for by the claim window until then. A waiter that
//!   misses the message (its pub/sub connection died, a later message
//!   overwrote it) learns of the grant from its next attempt, on any
//!   wake-up and at the latest after [`WAITER_REFRESH`]. A message on its
//!   grant channel that it cannot parse is taken for a plain release: it
//!   attempts at once, and the attempt says whether the lock is its own.
//!   A waiter dropped at the moment of the handoff deletes the lock it was
//!   given, which wakes the next one.
//!   A waiter whose process died within [`WAITER_TTL`] of its last refresh
//!   can still be handed the lock, and then blocks it for the claim
//!   window, not for its TTL.
//! - **Redlock** sends each attempt to every server at once, each bounded
//!   by a small share of the TTL; a majority grants. Partial grants are
//!   deleted at once, and after a split vote (nobody got a majority) the
//!   contenders are woken and retry after a short random delay.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::backend::{validity_deadline, CleanupOnDrop};
use distlock_core::{LockGuard, LockOptions, Result};
use futures::future::join_all;
use tokio::time::Instant;

use crate::client::{Shared, FENCE_IDLE_TTL};
use crate::keys::LockKeys;
use crate::node::timed_out;
use crate::scripts::ACQUIRE;
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

/// What an abandoned attempt may leave behind, for the warning when its
/// cleanup cannot run.
const ABANDONED: &str = "a Redis lock or queue entry of an abandoned attempt";

impl Shared {
    /// `try_lock`: one attempt, which never queues.
    pub async fn try_acquire(
        self: &Arc<Self>,
        key: &str,
        options: &LockOptions,
    ) -> Result<Option<LockGuard>> {
        let keys = LockKeys::new(&self.prefix, key);
        let owner = self.new_owner();
        let cleanup = CleanupOnDrop::arm(ABANDONED, || self.abandon(&keys, &owner, ""));
        let outcome = match self.attempt(key, &keys, &owner, "", options.ttl).await {
            Ok(Outcome::Granted(granted)) => self
                .wait_for_replicas(key, &keys, &owner, options.ttl)
                .await
                .map(|()| Outcome::Granted(granted)),
            outcome => outcome,
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(err) => {
                cleanup.run_now().await;
                return Err(err);
            }
        };
        cleanup.disarm();
        match outcome {
            Outcome::Granted(granted) => {
                Ok(Some(self.make_guard(key, keys, owner, granted, options)))
            }
            Outcome::Busy { .. } => Ok(None),
        }
    }

    /// `lock`: attempts until granted, woken by releases, the holder's
    /// expiry or (fair mode) a grant message. The core bounds it by
    /// `options.wait` by dropping it; the armed cleanup then removes what
    /// the last attempt may have left on the server.
    pub async fn acquire(self: &Arc<Self>, key: &str, options: &LockOptions) -> Result<LockGuard> {
        let keys = LockKeys::new(&self.prefix, key);
        let owner = self.new_owner();
        // A fair waiter's queue id is its owner value: unique per attempt.
        let waiter = if self.fair { owner.as_str() } else { "" };
        let cleanup = CleanupOnDrop::arm(ABANDONED, || self.abandon(&keys, &owner, waiter));
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
            let outcome = match self.attempt(key, &keys, &owner, waiter, options.ttl).await {
                Ok(outcome) => outcome,
                Err(err) => {
                    cleanup.run_now().await;
                    return Err(err);
                }
            };
            let retry_in = match outcome {
                Outcome::Granted(granted) => {
                    if let Err(err) = self
                        .wait_for_replicas(key, &keys, &owner, options.ttl)
                        .await
                    {
                        cleanup.run_now().await;
                        return Err(err);
                    }
                    cleanup.disarm();
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
                if let Err(err) = self
                    .wait_for_replicas(key, &keys, &owner, options.ttl)
                    .await
                {
                    cleanup.run_now().await;
                    return Err(err);
                }
                cleanup.disarm();
                let granted = Granted {
                    token: grant.token,
                    valid_until,
                    granted_for,
                };
                return Ok(self.make_guard(key, keys, owner, granted, options));
            }
        }
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
        // One server: an unanswered attempt is cleaned up by the caller
        // (its `CleanupOnDrop`) when the error reaches it.
        if granted > 0 || (first_error.is_some() && self.nodes.len() > 1) {
            // Undo partial grants (and grants whose reply was lost). After a
            // split vote, wake the other contenders (our share may have
            // blocked them), but not this client's own waiters.
            let wake = majority_holder.is_none() && granted > 0;
            self.release_all(keys, owner, ttl, wake).await;
        }
        if answered < self.quorum {
            let first_error = first_error.or_else(|| Some(timed_out("no answer")));
            return Err(self.quorum_or_node_error(
                "acquire",
                key,
                granted,
                answered - granted,
                first_error,
            ));
        }
        Ok(Outcome::Busy { retry_in, clock })
    }

    /// Owner-checked delete on every node, ignoring errors; `wake`
    /// publishes a retry hint the releasing client itself ignores.
    async fn release_all(&self, keys: &LockKeys, owner: &str, ttl: Duration, wake: bool) {
        let channel = if wake { keys.channel.as_str() } else { "" };
        let script = self.scripts.release;
        let mut command = script.command(1);
        command
            .arg(&keys.lock)
            .arg(owner)
            .arg(channel)
            .arg(self.retry_message());
        let _ = self
            .script_on_all::<i64>(self.node_timeout(ttl), script, &command)
            .await;
    }

    /// Live subscriptions to `channels` on every node (see
    /// [`Subscriber::live`](crate::subscriber::Subscriber::live)), or none.
    fn live_subscriptions(&self, channels: &[&str]) -> Vec<Subscription> {
        let mut live = Vec::new();
        for node in &self.nodes {
            match node.subscriber().live(channels) {
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
            let subscriber = node.subscriber();
            let result = match tokio::time::timeout(bound, subscriber.subscribe(channels)).await {
                Ok(result) => result,
                Err(_) => Err(timed_out("SUBSCRIBE was not confirmed in time")),
            };
            if let Err(err) = &result {
                tracing::debug!(endpoint = %node.endpoint(), error = %err, "distlock: cannot subscribe; waiting by polling");
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

/// The next message on any subscription (`None`: a connection died).
async fn wait_any(subscriptions: &mut [Subscription]) -> Option<Arc<str>> {
    if subscriptions.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(subscriptions.iter_mut().map(|s| Box::pin(s.woken())))
        .await
        .0
}

/// What one attempt found.
enum Outcome {
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
    pub token: u64,
    /// Until when this client vouches for it.
    pub valid_until: Instant,
    /// What the server set the lock's TTL to: less than asked for when a
    /// release handed it over (see [`HANDOFF_CLAIM`]).
    pub granted_for: Duration,
}

/// A local instant no later than the moment the server's clock read
/// `server_ms`.
#[derive(Clone, Copy, Debug)]
struct ServerClock {
    sent_at: Instant,
    server_ms: i64,
}

/// A grant a release published for a fair waiter (direct handoff).
#[derive(Debug, PartialEq, Eq)]
struct Grant<'a> {
    token: u64,
    /// The server's clock (ms) when it set the lock for the waiter.
    server_ms: i64,
    /// The TTL (ms) the release set: the waiter's, capped by the claim
    /// window.
    granted_ms: u64,
    owner: &'a str,
}

impl<'a> Grant<'a> {
    /// Parses `grant <token> <server ms> <px> <owner>` (see
    /// `RELEASE_FAIR`).
    fn parse(message: &'a str) -> Option<Self> {
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
    fn valid_until(&self, clock: ServerClock, ttl: Duration) -> Option<Instant> {
        let span = self.server_ms + ttl.as_millis() as i64 - clock.server_ms - 2;
        let span = Duration::from_millis(u64::try_from(span).ok()?);
        let valid_until = validity_deadline(clock.sent_at, span);
        (Instant::now() < valid_until).then_some(valid_until)
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
        // A message without the TTL is not taken for a grant: the waiter
        // attempts again, and the attempt says whether the lock is its own.
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
