//! One pub/sub connection per client and server, shared by all its
//! waiters: a waiter subscribes to its lock's release channel and wakes
//! when a release (or an abandoned attempt) publishes on it; a fair waiter
//! also subscribes to a channel of its own, where a release hands it the
//! lock.
//!
//! On a Redis Cluster the same is done with sharded pub/sub: the scripts
//! `SPUBLISH` (the channels carry the lock's hash tag, so they live in its
//! slot), and one RESP3 cluster connection per client `SSUBSCRIBE`s on the
//! slot's primary and receives the messages as pushes. The redis crate
//! subscribes again after a reconnection or a slot move; a message sent
//! meanwhile is lost, which the waiters' timers cover (see
//! [`acquire`](crate::acquire)).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::RedisConfig;
use crate::node::timed_out;

/// How long a subscription nobody uses stays on: a client that waits for
/// the same lock again within this time (a contended lock, taken in a
/// loop) starts waiting without a `SUBSCRIBE` and a second attempt.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// Subscriptions of one client to one server (or one Redis Cluster).
pub(crate) struct Subscriber {
    source: Source,
    /// Set by [`close`](Self::close): no more subscriptions here.
    closed: AtomicBool,
    /// Messages this client published itself and must not wake on.
    own_message: String,
    timeout: Duration,
    /// The live connection. Held across SUBSCRIBE/UNSUBSCRIBE so they
    /// reach the server in the order the reference counts changed.
    current: tokio::sync::Mutex<Option<Arc<PubSubConn>>>,
}

/// Where a subscriber connects.
enum Source {
    Server(Box<redis::Client>),
    /// A Redis Cluster (its configuration): sharded pub/sub over RESP3.
    Cluster(RedisConfig),
}

/// Where SUBSCRIBE and UNSUBSCRIBE go.
#[derive(Clone)]
enum Sink {
    Server(PubSubSink),
    Cluster(ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channels: &[&str]) -> redis::RedisResult<()> {
        match self {
            Sink::Server(sink) => sink.subscribe(channels).await,
            Sink::Cluster(conn) => conn.ssubscribe(channels).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::Server(sink) => sink.unsubscribe(channel).await,
            Sink::Cluster(conn) => conn.sunsubscribe(channel).await,
        }
    }
}

struct PubSubConn {
    sink: Sink,
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
        Self::with_source(Source::Server(Box::new(client)), timeout, own_message)
    }

    /// Sharded pub/sub on the Redis Cluster of `config`.
    pub fn cluster(config: &RedisConfig, own_message: String) -> Arc<Self> {
        let source = Source::Cluster(config.clone());
        Self::with_source(source, config.timeout, own_message)
    }

    fn with_source(source: Source, timeout: Duration, own_message: String) -> Arc<Self> {
        Arc::new(Subscriber {
            source,
            closed: AtomicBool::new(false),
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
        if self.closed.load(Ordering::Acquire) {
            return Err(timed_out("the server is no longer the primary"));
        }
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

    /// Ends this subscriber for good (Sentinel: the server is no longer
    /// the primary): its connection counts as dead, and every waiter on it
    /// wakes, attempts again and subscribes on the client's new primary.
    pub fn close(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Release);
        let this = self.clone();
        let close = async move {
            if let Some(conn) = this.current.lock().await.take() {
                conn.kill();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(close);
            }
            Err(_) => {
                if let Ok(mut current) = self.current.try_lock() {
                    if let Some(conn) = current.take() {
                        conn.kill();
                    }
                }
            }
        }
    }

    async fn open(&self) -> redis::RedisResult<Arc<PubSubConn>> {
        let config = match &self.source {
            Source::Server(client) => client,
            Source::Cluster(config) => return self.open_cluster(config).await,
        };
        let pubsub = match tokio::time::timeout(self.timeout, config.get_async_pubsub()).await {
            Ok(result) => result?,
            Err(_) => return Err(timed_out("pub/sub connection timed out")),
        };
        let (sink, mut stream) = pubsub.split();
        let sink = Sink::Server(sink);
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
                conn.deliver(msg.get_channel_name(), msg.get_payload_bytes());
            }
            // The connection is gone: wake every waiter so it retries and
            // subscribes again on a new connection.
            if let Some(conn) = weak.upgrade() {
                conn.kill();
            }
        });
        Ok(conn)
    }

    /// A RESP3 cluster connection whose pushes carry the sharded messages.
    async fn open_cluster(&self, config: &RedisConfig) -> redis::RedisResult<Arc<PubSubConn>> {
        let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
        let connect = crate::cluster::connect(config, Some(pushes));
        let cluster =
            match tokio::time::timeout(config.connect_timeout + self.timeout, connect).await {
                Ok(result) => result?,
                Err(_) => return Err(timed_out("cluster pub/sub connection timed out")),
            };
        let (closer, mut closed) = tokio::sync::oneshot::channel::<()>();
        let conn = Arc::new(PubSubConn {
            sink: Sink::Cluster(cluster),
            channels: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            _closer: closer,
        });
        let weak = Arc::downgrade(&conn);
        let own_message = self.own_message.clone();
        tokio::spawn(async move {
            loop {
                let push = tokio::select! {
                    push = received.recv() => match push {
                        Some(push) => push,
                        None => break,
                    },
                    _ = &mut closed => return,
                };
                let Some(conn) = weak.upgrade() else { return };
                match (push.kind, &push.data[..]) {
                    (
                        PushKind::SMessage | PushKind::Message,
                        [Value::BulkString(channel), Value::BulkString(payload), ..],
                    ) if payload.as_slice() != own_message.as_bytes() => {
                        conn.deliver(&String::from_utf8_lossy(channel), payload);
                    }
                    // The crate subscribes again by itself; meanwhile a
                    // message may be lost: wake the waiters to ask the
                    // server.
                    (PushKind::Disconnection, _) => conn.wake_all(),
                    _ => {}
                }
            }
            if let Some(conn) = weak.upgrade() {
                conn.kill();
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

impl PubSubConn {
    /// Wakes the waiters of `channel` with `payload`.
    fn deliver(&self, channel: &str, payload: &[u8]) {
        let channels = self.channels.lock().unwrap();
        if let Some(entry) = channels.get(channel) {
            let message: Arc<str> = String::from_utf8_lossy(payload).into();
            entry.wake.send_modify(|w| {
                w.message = Some(message);
            });
        }
    }

    /// Wakes every waiter without a message: each asks the server.
    fn wake_all(&self) {
        for entry in self.channels.lock().unwrap().values() {
            entry.wake.send_modify(|w| {
                w.message = None;
            });
        }
    }

    /// Marks the connection dead and wakes every waiter, which then
    /// subscribes again (on a new connection).
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.wake_all();
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
