//! Batched renewal: one task per client renews all of its auto-renewed
//! locks with one pipeline per server and tick (about `ttl / 3`), instead
//! of one task and one round trip per lock.
//!
//! A lock the servers no longer have for this owner is marked lost at
//! once (`NotHeld`). While they cannot be reached, renewal retries (with
//! [`RETRY`]'s delays) until the lease's local deadline, when `lost()`
//! fires.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use distlock_core::backend::{validity_deadline, Lease, WeakLease};
use distlock_core::{Backoff, LostReason};
use futures::future::join_all;
use redis::{ErrorKind, ServerErrorKind};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::client::Shared;
use crate::node::{timed_out, Conn};
use crate::scripts::EXTEND;

/// Delays between the retries of a renewal the servers did not answer:
/// 50 ms doubling up to 800 ms (never past a third of what is left of the
/// lease), without jitter.
static RETRY: LazyLock<Backoff> = LazyLock::new(|| {
    Backoff::new(Duration::from_millis(50), Duration::from_millis(800)).jitter(0.0)
});

#[derive(Default)]
pub(crate) struct Renewals {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    /// When the task plans to wake next (`None`: idle until notified).
    target: Option<Instant>,
    running: bool,
}

struct Entry {
    lease: WeakLease,
    lock_key: Arc<str>,
    owner: Arc<str>,
    next_due: Instant,
    failures: u32,
}

struct Due {
    id: u64,
    lease: Lease,
    lock_key: Arc<str>,
    owner: Arc<str>,
}

impl Renewals {
    /// Adds a lease to the client's renewal; returns its id for
    /// [`remove`](Self::remove). `due_now`: renew at once (a lock handed
    /// over for less than its TTL), else after a third of the TTL.
    pub fn register(
        this: &Arc<Self>,
        shared: &Arc<Shared>,
        lease: &Lease,
        lock_key: Arc<str>,
        owner: Arc<str>,
        due_now: bool,
    ) -> u64 {
        let next_due = if due_now {
            Instant::now()
        } else {
            Instant::now() + lease.ttl() / 3
        };
        let mut state = this.state.lock().unwrap();
        let id = state.next_id;
        state.next_id += 1;
        state.entries.insert(
            id,
            Entry {
                lease: lease.downgrade(),
                lock_key,
                owner,
                next_due,
                failures: 0,
            },
        );
        if !state.running {
            state.running = true;
            state.target = Some(next_due);
            tokio::spawn(run(this.clone(), Arc::downgrade(shared)));
        } else if !matches!(state.target, Some(target) if target <= next_due) {
            // Only wake the task when this lock is due before its plan.
            state.target = Some(next_due);
            this.wake.notify_one();
        }
        id
    }

    /// Wakes the task (it exits when the client is gone).
    pub fn wake_task(&self) {
        self.wake.notify_one();
    }

    /// Stops renewing a lock (on release).
    pub fn remove(&self, id: u64) {
        self.state.lock().unwrap().entries.remove(&id);
    }

    /// Picks the leases due now (and those due within half their renewal
    /// interval, so locks taken at different times share ticks); forgets
    /// finished ones.
    fn take_due(&self) -> (Vec<Due>, Option<Instant>) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let mut due = Vec::new();
        state.entries.retain(|&id, entry| {
            let Some(lease) = entry.lease.upgrade().filter(Lease::is_held) else {
                return false;
            };
            if entry.next_due <= now + lease.ttl() / 6 {
                due.push(Due {
                    id,
                    lease,
                    lock_key: entry.lock_key.clone(),
                    owner: entry.owner.clone(),
                });
            }
            true
        });
        let target = if due.is_empty() {
            state.entries.values().map(|e| e.next_due).min()
        } else {
            None
        };
        state.target = target;
        (due, target)
    }
}

async fn run(renewals: Arc<Renewals>, shared: Weak<Shared>) {
    loop {
        let (due, target) = renewals.take_due();
        if !due.is_empty() {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let span =
                tracing::debug_span!("distlock.renew", backend = shared.name, locks = due.len());
            renew(&shared, &renewals, due).instrument(span).await;
            continue;
        }
        if shared.strong_count() == 0 {
            return;
        }
        match target {
            Some(target) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(target) => {}
                    _ = renewals.wake.notified() => {}
                }
            }
            None => renewals.wake.notified().await,
        }
    }
}

/// One pipeline per server (on a Redis Cluster: per slot, see
/// [`cluster`](crate::cluster)): one owner-checked PEXPIRE script per
/// lock, the script loaded only when a server says it lacks it.
async fn renew(shared: &Shared, renewals: &Renewals, due: Vec<Due>) {
    let ttls: Vec<u64> = due
        .iter()
        .map(|d| d.lease.ttl().as_millis() as u64)
        .collect();
    // One server: its reply timeout. Redlock: the per-instance bound of
    // the shortest TTL, so a paused instance does not eat the validity.
    let bound = if shared.nodes.len() > 1 {
        let shortest = ttls.iter().copied().min().unwrap_or(0);
        shared.node_timeout(Duration::from_millis(shortest))
    } else {
        shared.timeout
    };
    let sent_at = Instant::now();
    // Per node, per lock: 1 extended, 0 refused, or the error.
    let results: Vec<Vec<redis::RedisResult<i64>>> = join_all(shared.nodes.iter().map(|node| {
        let (due, ttls) = (&due, &ttls);
        async move {
            if node.is_cluster() {
                renew_by_slot(node.conn(), due, ttls, bound).await
            } else {
                let all: Vec<usize> = (0..due.len()).collect();
                renew_batch(node.conn(), due, ttls, &all, bound).await
            }
        }
    }))
    .await;
    let now = Instant::now();
    let total = shared.nodes.len();
    let mut state = renewals.state.lock().unwrap();
    for (i, d) in due.iter().enumerate() {
        if !state.entries.contains_key(&d.id) {
            // Released while the pipeline was in flight.
            continue;
        }
        let ttl = d.lease.ttl();
        let (mut extended, mut refused) = (0, 0);
        let mut first_error: Option<&redis::RedisError> = None;
        for result in results.iter().map(|per_lock| &per_lock[i]) {
            match result {
                Ok(1) => extended += 1,
                Ok(_) => refused += 1,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let deadline = validity_deadline(sent_at, Duration::from_millis(ttls[i]));
        if extended >= shared.quorum && now < deadline {
            d.lease.set_valid_until(Some(deadline));
            if let Some(entry) = state.entries.get_mut(&d.id) {
                entry.next_due = sent_at + ttl / 3;
                entry.failures = 0;
            }
        } else if refused > total - shared.quorum {
            d.lease.mark_lost(LostReason::NotHeld);
            state.entries.remove(&d.id);
        } else {
            let why = first_error.map_or_else(|| "no quorum".to_owned(), |e| e.to_string());
            let left = d.lease.remaining().unwrap_or(Duration::ZERO);
            if left.is_zero() {
                d.lease.mark_lost(LostReason::RenewalFailed(why));
                state.entries.remove(&d.id);
            } else if let Some(entry) = state.entries.get_mut(&d.id) {
                tracing::warn!(key = %d.lease.key(), error = %why, "distlock: renewal failed, retrying before the deadline");
                let delay = RETRY.delay(entry.failures).min(left / 3);
                entry.next_due = now + delay;
                entry.failures += 1;
            }
        }
    }
}

/// Renews the locks `which` (indexes into `due`) with one pipeline of
/// `EVALSHA`s on `conn`; one result per lock of `due` (the others: an
/// error, unused). A server without the script (restarted, `SCRIPT
/// FLUSH`) answers `NOSCRIPT`: the script is loaded then and the pipeline
/// sent again, so the usual tick is one round trip with no `SCRIPT LOAD`.
async fn renew_batch(
    mut conn: Conn,
    due: &[Due],
    ttls: &[u64],
    which: &[usize],
    bound: Duration,
) -> Vec<redis::RedisResult<i64>> {
    let mut pipe = redis::pipe();
    for &i in which {
        let mut command = EXTEND.command(1);
        command
            .arg(&*due[i].lock_key)
            .arg(&*due[i].owner)
            .arg(ttls[i]);
        pipe.add_command(command);
    }
    let replies = tokio::time::timeout(bound, async {
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                EXTEND.script().load_async(&mut conn).await?;
                pipe.query_async::<Vec<i64>>(&mut conn).await
            }
            replies => replies,
        }
    })
    .await;
    let replies = match replies {
        Ok(Ok(values)) if values.len() == which.len() => Ok(values),
        Ok(Ok(_)) => Err(timed_out(
            "renewal pipeline answered the wrong number of replies",
        )),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(timed_out("no answer to the renewal pipeline")),
    };
    let mut results: Vec<redis::RedisResult<i64>> = (0..due.len())
        .map(|_| Err(timed_out("not in this batch")))
        .collect();
    for (n, &i) in which.iter().enumerate() {
        results[i] = match &replies {
            Ok(values) => Ok(values[n]),
            Err(err) => Err(err.clone()),
        };
    }
    results
}

/// Renews on a Redis Cluster: a pipeline may only touch one slot, so the
/// locks are batched by hash tag (the slot's name), the batches sent at
/// once.
async fn renew_by_slot(
    conn: Conn,
    due: &[Due],
    ttls: &[u64],
    bound: Duration,
) -> Vec<redis::RedisResult<i64>> {
    let mut batches: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, d) in due.iter().enumerate() {
        batches.entry(hash_tag(&d.lock_key)).or_default().push(i);
    }
    let replies = join_all(
        batches
            .values()
            .map(|which| renew_batch(conn.clone(), due, ttls, which, bound)),
    )
    .await;
    let mut results: Vec<redis::RedisResult<i64>> =
        (0..due.len()).map(|_| Err(timed_out("no batch"))).collect();
    for (which, mut batch) in batches.values().zip(replies) {
        for &i in which {
            results[i] = std::mem::replace(&mut batch[i], Ok(0));
        }
    }
    results
}

/// The hash tag of a lock key (`prefix:{tag}:lock`), which decides its
/// slot; the whole key when it has none.
fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or(key, |(tag, _)| tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_50ms_up_to_800ms() {
        let delays: Vec<u128> = (0..7).map(|n| RETRY.delay(n).as_millis()).collect();
        // Within a rounding of the float arithmetic.
        for (delay, expected) in delays.iter().zip([50, 100, 200, 400, 800, 800, 800]) {
            assert!(delay.abs_diff(expected) <= 1, "{delays:?}");
        }
    }
}
