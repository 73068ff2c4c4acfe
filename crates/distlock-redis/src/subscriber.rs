//! One pub/sub connection per client and server, shared by all its
//! waiters: a waiter subscribes to its lock's release channel and wakes
//! when a release (or an abandoned attempt) publishes on it; a fair waiter
//! also subscribes to a channel of its own, where a release hands it the
//! lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::node::timed_out;

/// How long a subscription nobody uses stays on: a client that waits for
/// the same lock again within this time (a contended lock, taken in a
/// loop) starts waiting without a `SUBSCRIBE` and a second attempt.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// Subscriptions of one client to one server.
pub(crate) struct Subscriber {
    client: redis::Client,
    /// Messages this client published itself and must not wake on.
    own_message: String,
    timeout: Duration,
    /// The live connection. Held across SUBSCRIBE/UNSUBSCRIBE so they
    /// reach the server in the order the reference counts changed.
    current: tokio::sync::Mutex<Option<Arc<PubSubConn>>>,
}

struct PubSubConn {
    sink: PubSubSink,
    channels: Mutex<HashMap<String, Channel>>,
    dead: AtomicBool,
    /// Dropped with the connection: stops the dispatcher, which closes the
    /// socket (dropping the sink alone would not).
    _closer: tokio::sync::oneshot::Sender<()>,
}

struct Channel {
    /// Waiters holding a [`Subscription`].
    refs: usize,
    /// Whether the server confirmed the subscription.
    subscribed: bool,
    /// When `refs` last fell to 0: the subscription lingers for
    /// [`LINGER`] after that, for the client's next wait on the lock.
    idle_since: Instant,
    /// Whether a task is waiting to end the subscription once it has been
    /// idle for [`LINGER`].
    sweeping: bool,
    /// Set on every message (its payload) and when the connection dies
    /// (`None`). Only the latest is kept: a waiter that misses a message
    /// still wakes and asks the server.
    wake: watch::Sender<Wake>,
}

/// The latest event of a channel.
#[derive(Clone, Default)]
struct Wake {
    message: Option<Arc<str>>,
}

/// A waiter's subscription to one channel; when the last one is dropped,
/// the channel is unsubscribed after [`LINGER`] unless used again by then
/// (in the background).
pub(crate) struct Subscription {
    subscriber: Arc<Subscriber>,
    conn: Arc<PubSubConn>,
    channel: String,
    wake: watch::Receiver<Wake>,
}

impl Subscriber {
    pub fn new(client: redis::Client, timeout: Duration, own_message: String) -> Arc<Self> {
        Arc::new(Subscriber {
            client,
            own_message,
            timeout,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// Subscribes to `channels` (one `SUBSCRIBE` for those this connection
    /// is not subscribed to yet); returns once the server confirmed them,
    /// so a message published after this returns wakes the subscription.
    pub async fn subscribe(
        self: &Arc<Self>,
        channels: &[&str],
    ) -> redis::RedisResult<Vec<Subscription>> {
        let mut current = self.current.lock().await;
        let conn = match current.as_ref().filter(|c| !c.dead.load(Ordering::Acquire)) {
            Some(conn) => conn.clone(),
            None => {
                let conn = self.open().await?;
                *current = Some(conn.clone());
                conn
            }
        };
        let mut subscriptions = Vec::with_capacity(channels.len());
        let mut to_subscribe = Vec::new();
        for &channel in channels {
            let (wake, needs_subscribe) = {
                let mut entries = conn.channels.lock().unwrap();
                let entry = entries
                    .entry(channel.to_owned())
                    .or_insert_with(|| Channel {
                        refs: 0,
                        subscribed: false,
                        idle_since: Instant::now(),
                        sweeping: false,
                        wake: watch::channel(Wake::default()).0,
                    });
                entry.refs += 1;
                (entry.wake.subscribe(), !entry.subscribed)
            };
            // Made before the SUBSCRIBE: on failure, dropping it gives the
            // reference back.
            subscriptions.push(Subscription {
                subscriber: self.clone(),
                conn: conn.clone(),
                channel: channel.to_owned(),
                wake,
            });
            if needs_subscribe {
                to_subscribe.push(channel);
            }
        }
        if !to_subscribe.is_empty() {
            let mut sink = conn.sink.clone();
            let confirmed = tokio::time::timeout(self.timeout, sink.subscribe(&to_subscribe)).await;
            match confirmed {
                Ok(Ok(())) => {
                    let mut entries = conn.channels.lock().unwrap();
                    for channel in to_subscribe {
                        if let Some(entry) = entries.get_mut(channel) {
                            entry.subscribed = true;
                        }
                    }
                }
                Ok(Err(err)) => {
                    conn.dead.store(true, Ordering::Release);
                    return Err(err);
                }
                Err(_) => {
                    conn.dead.store(true, Ordering::Release);
                    return Err(timed_out("SUBSCRIBE was not confirmed in time"));
                }
            }
        }
        Ok(subscriptions)
    }

    /// Subscriptions to `channels` without a round trip, if the current
    /// connection is alive and the server has confirmed every one of them
    /// (a subscription still lingering from an earlier wait): then any
    /// message published after this returns reaches them. `None` otherwise
    /// (or while another task is subscribing).
    pub fn live(self: &Arc<Self>, channels: &[&str]) -> Option<Vec<Subscription>> {
        let current = self.current.try_lock().ok()?;
        let conn = current
            .as_ref()
            .filter(|c| !c.dead.load(Ordering::Acquire))?
            .clone();
        drop(current);
        let mut entries = conn.channels.lock().unwrap();
        if !channels
            .iter()
            .all(|channel| entries.get(*channel).is_some_and(|e| e.subscribed))
        {
            return None;
        }
        let subscriptions = channels
            .iter()
            .map(|&channel| {
                let entry = entries.get_mut(channel).expect("checked above");
                entry.refs += 1;
                Subscription {
                    subscriber: self.clone(),
                    conn: conn.clone(),
                    channel: channel.to_owned(),
                    wake: entry.wake.subscribe(),
                }
            })
            .collect();
        Some(subscriptions)
    }

    async fn open(&self) -> redis::RedisResult<Arc<PubSubConn>> {
        let pubsub = match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await
        {
            Ok(result) => result?,
            Err(_) => return Err(timed_out("pub/sub connection timed out")),
        };
        let (sink, mut stream) = pubsub.split();
        let (closer, mut closed) = tokio::sync::oneshot::channel::<()>();
        let conn = Arc::new(PubSubConn {
            sink,
            channels: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            _closer: closer,
        });
        let weak = Arc::downgrade(&conn);
        let own_message = self.own_message.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                    _ = &mut closed => return,
                };
                if msg.get_payload_bytes() == own_message.as_bytes() {
                    continue;
                }
                let Some(conn) = weak.upgrade() else { return };
                let channels = conn.channels.lock().unwrap();
                if let Some(entry) = channels.get(msg.get_channel_name()) {
                    let message: Arc<str> = String::from_utf8_lossy(msg.get_payload_bytes()).into();
                    entry.wake.send_modify(|w| {
                        w.message = Some(message);
                    });
                }
            }
            // The connection is gone: wake every waiter so it retries and
            // subscribes again on a new connection.
            if let Some(conn) = weak.upgrade() {
                conn.dead.store(true, Ordering::Release);
                for entry in conn.channels.lock().unwrap().values() {
                    entry.wake.send_modify(|w| {
                        w.message = None;
                    });
                }
            }
        });
        Ok(conn)
    }

    /// Ends `channel`'s subscription once nobody has used it for
    /// [`LINGER`]; stops early when it is in use again. Holds the client's
    /// subscriber and connection weakly while it waits, so that a dropped
    /// client closes its connection at once.
    async fn sweep(subscriber: Weak<Subscriber>, conn: Weak<PubSubConn>, channel: String) {
        loop {
            let Some(strong_conn) = conn.upgrade() else {
                return;
            };
            let due = {
                let mut channels = strong_conn.channels.lock().unwrap();
                match channels.get_mut(&channel) {
                    None => return,
                    Some(entry) if entry.refs > 0 => {
                        entry.sweeping = false;
                        return;
                    }
                    Some(entry) => entry.idle_since + LINGER,
                }
            };
            if Instant::now() >= due {
                if let Some(subscriber) = subscriber.upgrade() {
                    subscriber.release(strong_conn, channel).await;
                }
                return;
            }
            drop(strong_conn);
            tokio::time::sleep_until(due).await;
        }
    }

    async fn release(&self, conn: Arc<PubSubConn>, channel: String) {
        let current = self.current.lock().await;
        let unsubscribe = {
            let mut channels = conn.channels.lock().unwrap();
            match channels.get_mut(&channel) {
                Some(entry) if entry.refs == 0 => {
                    let was_subscribed = entry.subscribed;
                    channels.remove(&channel);
                    was_subscribed
                }
                // In use again: its next drop to no users sweeps it.
                Some(entry) => {
                    entry.sweeping = false;
                    false
                }
                None => false,
            }
        };
        let is_current = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn));
        if unsubscribe && is_current && !conn.dead.load(Ordering::Acquire) {
            let mut sink = conn.sink.clone();
            if tokio::time::timeout(self.timeout, sink.unsubscribe(&channel))
                .await
                .map_or(true, |r| r.is_err())
            {
                conn.dead.store(true, Ordering::Release);
            }
        }
        drop(current);
    }
}

impl Subscription {
    /// Marks everything seen so far; [`woken`](Self::woken) then waits for
    /// the next message.
    pub fn mark_seen(&mut self) {
        self.wake.borrow_and_update();
    }

    /// Resolves at the next message after [`mark_seen`](Self::mark_seen)
    /// with its payload (the latest, when several arrived), or with `None`
    /// when the connection dies.
    pub async fn woken(&mut self) -> Option<Arc<str>> {
        if self.wake.changed().await.is_err() {
            // The entry is gone (cannot happen while we hold a ref); do not spin.
            std::future::pending::<()>().await;
        }
        self.wake.borrow_and_update().message.clone()
    }

    /// Whether the connection died; subscribe again for notifications.
    pub fn is_dead(&self) -> bool {
        self.conn.dead.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The last user starts the linger, and its sweep unless one waits.
        let start_sweep = {
            let mut channels = self.conn.channels.lock().unwrap();
            match channels.get_mut(&self.channel) {
                Some(entry) => {
                    entry.refs -= 1;
                    if entry.refs == 0 {
                        entry.idle_since = Instant::now();
                    }
                    let start = entry.refs == 0 && !entry.sweeping;
                    entry.sweeping |= start;
                    start
                }
                None => false,
            }
        };
        if start_sweep {
            let (subscriber, conn, channel) = (
                Arc::downgrade(&self.subscriber),
                Arc::downgrade(&self.conn),
                std::mem::take(&mut self.channel),
            );
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(Subscriber::sweep(subscriber, conn, channel));
                }
                // No runtime to sweep from: let a later drop start it.
                Err(_) => {
                    if let Some(entry) = self.conn.channels.lock().unwrap().get_mut(&channel) {
                        entry.sweeping = false;
                    }
                }
            }
        }
    }
}
