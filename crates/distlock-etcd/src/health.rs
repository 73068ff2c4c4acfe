//! Member health: a member that stops answering leaves the client's
//! balancer within about a second, and comes back once it answers again.
//!
//! A stopped etcd process (SIGSTOP, a VM pause, a partition that keeps TCP
//! up) keeps its connections open and the kernel still accepts new ones.
//! To the balanced channel of etcd-client it looks ready: a third of the
//! requests and watches went to it and waited for their timeout, or for
//! the HTTP/2 ping to fail, after which the reconnect "succeeded" at the
//! TCP level and the member took requests again, for as long as it was
//! stopped (the fault suite measured 4-6 s without a lock for a 6 s pause).
//! etcd's own Go client has a health-checking balancer for this; this is
//! its counterpart:
//!
//! - Every [`PROBE_INTERVAL`] a task sends `Status` to each member on a
//!   connection of its own (not the balancer's), bounded by
//!   [`PROBE_TIMEOUT`]. A member that does not answer in time is removed
//!   from the client's balancer; one that answers again is added back. The
//!   last members that answer are never removed, and nothing changes when
//!   none answers (the trouble is then ours, or the whole cluster's).
//! - Requests and watches already sent to a removed member would still
//!   wait on its connection: removing a member therefore interrupts every
//!   request in flight ([`Health::disrupted`]), which is sent again,
//!   now to the members that answer. One in flight to a healthy member is
//!   sent again too, which is safe (the paths that use it treat the
//!   interruption like a timeout, with the outcome unknown) and rare (only
//!   at a removal).
//! - So does a new leader (a higher raft term in a `Status` answer): a
//!   write that a follower forwarded to the old leader, or proposed while
//!   it had none, may have been dropped by raft, and etcd 3.4 answers it
//!   only after its request timeout (7 s by default). Measured with the
//!   leader stopped: a lease grant sent to a follower just before the
//!   election hung 5 s, to the client's timeout, with the new leader
//!   elected 0.3 s after it was sent.
//! - The task holds the client weakly and is aborted when the client is
//!   dropped, so it keeps nothing alive.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use crate::Inner;

/// How often each member is asked for its status.
const PROBE_INTERVAL: Duration = Duration::from_millis(300);
/// How long a member may take to answer before it leaves the balancer:
/// with [`PROBE_INTERVAL`], a member that stops is out within 800 ms. A
/// `Status` is answered locally by any member, leader or not, in well
/// under a millisecond when it runs.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The health of a client's members: the task that checks them and the
/// signal that a member left the balancer.
pub(crate) struct Health {
    /// Counts removals from the balancer and leader changes; requests in
    /// flight watch it.
    disruptions: watch::Sender<u64>,
    task: Mutex<Option<AbortHandle>>,
}

impl Health {
    pub(crate) fn new() -> Self {
        Health {
            disruptions: watch::channel(0).0,
            task: Mutex::new(None),
        }
    }

    /// Resolves when a member is removed from the balancer or a new leader
    /// is seen after this future was first polled: a request in flight may
    /// be stuck on that member, or lost with the old leader.
    pub(crate) async fn disrupted(&self) {
        self.disruptions().next().await;
    }

    /// The disruptions from now on, for work that spans several awaits (a
    /// wait in the queue, the session's keep-alive).
    pub(crate) fn disruptions(&self) -> Disruptions {
        Disruptions(self.disruptions.subscribe())
    }

    /// Starts checking the members of `inner`'s client (nothing to do for
    /// one member: there is no other to send requests to).
    pub(crate) fn start(inner: &Arc<Inner>, options: ConnectOptions) {
        let mut endpoints = inner.config.endpoints.clone();
        endpoints.sort();
        endpoints.dedup();
        if endpoints.len() < 2 {
            return;
        }
        let span =
            tracing::debug_span!("distlock.health", backend = "etcd", endpoints = %inner.endpoints);
        let task =
            tokio::spawn(check_members(Arc::downgrade(inner), endpoints, options).instrument(span));
        *inner.health.task.lock().unwrap() = Some(task.abort_handle());
    }

    /// Stops the task (the client is being dropped).
    pub(crate) fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// Removals from the balancer and leader changes after a point in time.
pub(crate) struct Disruptions(watch::Receiver<u64>);

impl Disruptions {
    /// Resolves at the next disruption not seen yet. Cancellation-safe.
    pub(crate) async fn next(&mut self) {
        if self.0.changed().await.is_err() {
            // The sender lives as long as the client: nothing to wait for.
            std::future::pending::<()>().await;
        }
    }
}

/// One member as the health task sees it.
struct Member {
    /// `host:port`, as configured.
    endpoint: String,
    /// The URI the balancer knows it by (etcd-client adds `http://` to a
    /// bare `host:port`; this crate does not enable TLS).
    uri: String,
    /// The probe's own connection, once made.
    probe: Option<Client>,
    in_balancer: bool,
}

/// Probes every member every [`PROBE_INTERVAL`] and updates the client's
/// balancer; ends when the client is gone.
async fn check_members(inner: Weak<Inner>, endpoints: Vec<String>, options: ConnectOptions) {
    let mut members: Vec<Member> = endpoints
        .into_iter()
        .map(|endpoint| Member {
            uri: format!("http://{endpoint}"),
            endpoint,
            probe: None,
            in_balancer: true,
        })
        .collect();
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The highest raft term any member reported: it grows with each
    // election.
    let mut term = None;
    loop {
        ticks.tick().await;
        let terms = probe_all(&mut members, &options).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let answered: Vec<bool> = terms.iter().map(Option::is_some).collect();
        let removed = update_balancer(&inner, &mut members, &answered).await;
        let newest = terms.iter().flatten().max().copied();
        let elected = matches!((term, newest), (Some(old), Some(new)) if new > old);
        if elected {
            tracing::info!(
                term = newest,
                "distlock: etcd has a new leader; requests in flight are sent again"
            );
        }
        term = term.max(newest);
        if removed || elected {
            inner.health.disruptions.send_modify(|count| *count += 1);
        }
    }
}

/// Sends one `Status` to each member at once: the raft term of each that
/// answered in time.
async fn probe_all(members: &mut [Member], options: &ConnectOptions) -> Vec<Option<u64>> {
    let mut probes = JoinSet::new();
    for (index, member) in members.iter_mut().enumerate() {
        let (endpoint, client, options) = (
            member.endpoint.clone(),
            member.probe.take(),
            options.clone(),
        );
        probes.spawn(async move { (index, probe(endpoint, client, options).await) });
    }
    let mut terms = vec![None; members.len()];
    while let Some(outcome) = probes.join_next().await {
        if let Ok((index, (client, term))) = outcome {
            members[index].probe = client;
            terms[index] = term;
        }
    }
    terms
}

/// One `Status` to `endpoint` on the probe's own connection (made first if
/// need be), bounded by [`PROBE_TIMEOUT`]: the member's raft term if it
/// answered. The connection is kept for the next probe, answered or not:
/// a new one per probe to a stopped member would pile up in its accept
/// queue.
async fn probe(
    endpoint: String,
    client: Option<Client>,
    options: ConnectOptions,
) -> (Option<Client>, Option<u64>) {
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    let client = match client {
        Some(client) => client,
        None => {
            let connect = Client::connect([endpoint.as_str()], Some(options));
            match tokio::time::timeout_at(deadline, connect).await {
                Ok(Ok(client)) => client,
                Ok(Err(err)) => {
                    tracing::debug!(endpoint, error = %err, "distlock: etcd health probe could not connect");
                    return (None, None);
                }
                Err(_) => return (None, None),
            }
        }
    };
    let mut status = client.maintenance_client();
    let term = match tokio::time::timeout_at(deadline, status.status()).await {
        Ok(Ok(status)) => Some(status.raft_term()),
        Ok(Err(err)) => {
            tracing::debug!(endpoint, error = %err, "distlock: etcd health probe failed");
            None
        }
        Err(_) => None,
    };
    (Some(client), term)
}

/// Adds the members that answered back to the balancer and removes those
/// that did not, unless none answered; whether one was removed.
async fn update_balancer(inner: &Inner, members: &mut [Member], answered: &[bool]) -> bool {
    if !answered.iter().any(|ok| *ok) {
        // Nobody answers: removing members would leave nothing to send
        // requests to, and the trouble is likely on our side.
        return false;
    }
    let mut removed = false;
    for (member, &ok) in members.iter_mut().zip(answered) {
        if ok == member.in_balancer {
            continue;
        }
        let change = if ok {
            inner.client.add_endpoint(&member.uri).await
        } else {
            inner.client.remove_endpoint(&member.uri).await
        };
        match change {
            Ok(()) if ok => {
                tracing::info!(
                    endpoint = member.endpoint,
                    "distlock: etcd member answers again; requests go to it again"
                );
            }
            Ok(()) => {
                removed = true;
                tracing::warn!(endpoint = member.endpoint, timeout = ?PROBE_TIMEOUT, "distlock: etcd member did not answer in time; requests go to the others");
            }
            Err(err) => {
                // The balancer is gone with the client: nothing to update.
                tracing::debug!(endpoint = member.endpoint, error = %err, "distlock: etcd balancer update failed");
                return removed;
            }
        }
        member.in_balancer = ok;
    }
    removed
}
