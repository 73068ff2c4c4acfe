//! `redis+sentinel://`: the primary that Redis Sentinels name, followed
//! across failovers.
//!
//! - **Finding the primary**: at connect, the Sentinels are asked (in the
//!   URL's order, with `redis::sentinel`) for the master's address, and
//!   the server there must call itself a primary (`ROLE`). All requests
//!   then go to one reconnecting, multiplexed connection to it, and its
//!   waiters share one pub/sub connection, exactly as on `redis://`.
//! - **Following a failover**, two ways:
//!   - every Sentinel is watched on its `+switch-master` channel (one
//!     pub/sub connection per Sentinel). The Sentinel that wins a failover
//!     announces the new primary there at once; the client checks with
//!     `ROLE` that it is a primary and switches to it. This matters after
//!     a manual `SENTINEL FAILOVER`, when the old primary keeps accepting
//!     writes for seconds until a Sentinel demotes it;
//!   - a request that fails in a way a failover causes (no connection, no
//!     answer, `READONLY`, `MASTERDOWN`, `LOADING`) asks the Sentinels
//!     again before its error is returned, so the caller's retry (`lock`
//!     retries such errors within its wait) reaches the new primary.
//! - **A switch** closes the old primary's pub/sub connection, which wakes
//!   every waiter to attempt on the new primary and subscribe there. Locks
//!   held keep renewing on the new primary: a lock the new primary has
//!   (replicated before the failover) stays held; one it never received
//!   is refused at the next renewal, and `lost()` fires with `NotHeld`.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult};
use tokio::time::Instant;

use crate::client::{is_failing_over, is_unreachable};
use crate::config::RedisConfig;
use crate::node::{connect_lazy, timed_out};
use crate::subscriber::Subscriber;

/// How long a Sentinel watcher waits before connecting again after its
/// connection failed.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// Errors answered within this long of the last look-up do not trigger
/// another (an outage fails many requests at once).
const RESOLVE_SPACING: Duration = Duration::from_millis(200);

/// The primary a client uses, and how to find the next one.
pub(crate) struct SentinelPrimary {
    master: String,
    sentinels: String,
    config: RedisConfig,
    own_message: String,
    /// The look-up client and the Sentinels' order (rotated after one did
    /// not answer). Held across a look-up: one at a time.
    lookup: tokio::sync::Mutex<Lookup>,
    current: RwLock<Arc<Current>>,
    /// When the last look-up ended.
    resolved_at: Mutex<Instant>,
    /// Dropped with the client: stops the watchers.
    _closer: tokio::sync::watch::Sender<()>,
}

struct Lookup {
    sentinel: Sentinel,
    infos: Vec<ConnectionInfo>,
}

/// The primary in use.
pub(crate) struct Current {
    /// Its `host:port`.
    pub endpoint: String,
    /// Bumped on every switch: a request's error refers to the primary it
    /// was sent to.
    pub generation: u64,
    pub conn: ConnectionManager,
    pub subscriber: Arc<Subscriber>,
}

impl SentinelPrimary {
    /// Asks the Sentinels of `config` for the primary and connects to it;
    /// starts watching them.
    pub async fn connect(config: &RedisConfig, own_message: String) -> RedisResult<Arc<Self>> {
        let master = config
            .sentinel_master
            .clone()
            .expect("a Sentinel configuration");
        let infos = config
            .endpoints
            .iter()
            .map(|endpoint| sentinel_info(config, endpoint))
            .collect::<RedisResult<Vec<_>>>()?;
        let mut lookup = Lookup {
            sentinel: Sentinel::build(infos.clone())?,
            infos: infos.clone(),
        };
        let bound = config.connect_timeout + config.timeout;
        let endpoint = lookup.resolve(config, &master, bound).await?;
        let current = new_current(config, &endpoint, 0, own_message.clone())?;
        let (closer, closed) = tokio::sync::watch::channel(());
        let primary = Arc::new(SentinelPrimary {
            sentinels: config.endpoints.join(","),
            master,
            config: config.clone(),
            own_message,
            lookup: tokio::sync::Mutex::new(lookup),
            current: RwLock::new(Arc::new(current)),
            resolved_at: Mutex::new(Instant::now()),
            _closer: closer,
        });
        for info in infos {
            tokio::spawn(watch(Arc::downgrade(&primary), info, closed.clone()));
        }
        Ok(primary)
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.read().unwrap().clone()
    }

    /// `<primary> (Sentinel master <name> via <sentinels>)`, for errors.
    pub fn describe(&self) -> String {
        format!(
            "{} (Sentinel master {} via {})",
            self.current().endpoint,
            self.master,
            self.sentinels
        )
    }

    /// Called with a request's error: when a failover may explain it and
    /// the request went to the primary still in use, asks the Sentinels
    /// for the primary (bounded by the timeout) and switches if it moved.
    pub async fn after_error(&self, generation: u64, err: &redis::RedisError) {
        if !may_be_failover(err) {
            return;
        }
        let mut lookup = self.lookup.lock().await;
        if self.current().generation != generation
            || self.resolved_at.lock().unwrap().elapsed() < RESOLVE_SPACING
        {
            // Someone else looked already.
            return;
        }
        let found = lookup
            .resolve(&self.config, &self.master, self.config.timeout)
            .await;
        *self.resolved_at.lock().unwrap() = Instant::now();
        drop(lookup);
        match found {
            Ok(endpoint) => self.switch_to(&endpoint),
            Err(lookup_err) => {
                tracing::debug!(master = %self.master, error = %lookup_err, "distlock: Sentinels named no primary");
            }
        }
    }

    /// Switches to `endpoint` unless it is the primary in use already.
    fn switch_to(&self, endpoint: &str) {
        let mut current = self.current.write().unwrap();
        if current.endpoint == endpoint {
            return;
        }
        let next = match new_current(
            &self.config,
            endpoint,
            current.generation + 1,
            self.own_message.clone(),
        ) {
            Ok(next) => next,
            Err(err) => {
                tracing::warn!(master = %self.master, primary = %endpoint, error = %err, "distlock: cannot use the new primary");
                return;
            }
        };
        tracing::info!(master = %self.master, from = %current.endpoint, to = %endpoint, "distlock: following a Sentinel failover");
        let old = std::mem::replace(&mut *current, Arc::new(next));
        drop(current);
        // Its waiters wake, attempt on the new primary and subscribe there.
        old.subscriber.close();
    }

    /// A `+switch-master` announcement for our master: checks that the
    /// announced server is a primary, then switches to it.
    async fn announced(&self, endpoint: String) {
        if self.current().endpoint == endpoint {
            return;
        }
        match is_primary(&self.config, &endpoint).await {
            Ok(true) => self.switch_to(&endpoint),
            Ok(false) => {
                tracing::debug!(primary = %endpoint, "distlock: announced primary is not one (yet)");
            }
            Err(err) => {
                tracing::debug!(primary = %endpoint, error = %err, "distlock: cannot check the announced primary");
            }
        }
    }
}

impl Lookup {
    /// The primary's `host:port` as the Sentinels name it (checked with
    /// `ROLE` by the redis crate), within `bound`. A look-up that times out
    /// moves the first Sentinel to the end, so a paused one is not asked
    /// first again.
    async fn resolve(
        &mut self,
        config: &RedisConfig,
        master: &str,
        bound: Duration,
    ) -> RedisResult<String> {
        let node = node_info(config);
        let found =
            tokio::time::timeout(bound, self.sentinel.async_master_for(master, Some(&node))).await;
        match found {
            Ok(client) => Ok(endpoint_of(client?.get_connection_info())),
            Err(_) => {
                self.infos.rotate_left(1);
                self.sentinel = Sentinel::build(self.infos.clone())?;
                Err(timed_out("the Sentinels named no primary in time"))
            }
        }
    }
}

/// Whether `err` may mean that the primary changed: it could not be
/// reached, or it refuses writes as a replica, or is not ready.
fn may_be_failover(err: &redis::RedisError) -> bool {
    is_unreachable(err) || is_failing_over(err)
}

/// Watches one Sentinel's `+switch-master` channel until the client is
/// dropped, reconnecting after failures.
async fn watch(
    primary: Weak<SentinelPrimary>,
    info: ConnectionInfo,
    mut closed: tokio::sync::watch::Receiver<()>,
) {
    loop {
        let Some(timeout) = primary.upgrade().map(|p| p.config.timeout) else {
            return;
        };
        let subscribed = async {
            let client = redis::Client::open(info.clone())?;
            let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                .await
                .map_err(|_| timed_out("Sentinel pub/sub connection timed out"))??;
            tokio::time::timeout(timeout, pubsub.subscribe("+switch-master"))
                .await
                .map_err(|_| timed_out("Sentinel SUBSCRIBE timed out"))??;
            RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::select! {
            pubsub = subscribed => pubsub,
            _ = closed.changed() => return,
        };
        match pubsub {
            Ok(pubsub) => {
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        _ = closed.changed() => return,
                    };
                    let Some(message) = message else { break };
                    let payload = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                    // `<master name> <old ip> <old port> <new ip> <new port>`
                    let parts: Vec<&str> = payload.split(' ').collect();
                    let Some(primary) = primary.upgrade() else {
                        return;
                    };
                    if let [name, _, _, ip, port] = parts[..] {
                        if name == primary.master {
                            primary.announced(join_host_port(ip, port)).await;
                        }
                    }
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "distlock: cannot watch a Sentinel; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_RETRY) => {}
            _ = closed.changed() => return,
        }
    }
}

/// Whether the server at `endpoint` answers `ROLE` as a primary.
async fn is_primary(config: &RedisConfig, endpoint: &str) -> RedisResult<bool> {
    let client = redis::Client::open(config.connection_info(endpoint)?)?;
    let check = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        Ok(matches!(role.first(), Some(redis::Value::BulkString(kind)) if kind == b"master"))
    };
    tokio::time::timeout(config.connect_timeout + config.timeout, check)
        .await
        .map_err(|_| timed_out("no answer to ROLE"))?
}

fn new_current(
    config: &RedisConfig,
    endpoint: &str,
    generation: u64,
    own_message: String,
) -> RedisResult<Current> {
    let (conn, subscriber) = connect_lazy(
        config.connection_info(endpoint)?,
        config.timeout,
        config.connect_timeout,
        own_message,
    )?;
    Ok(Current {
        endpoint: endpoint.to_owned(),
        generation,
        conn,
        subscriber,
    })
}

/// How to reach a Sentinel: no database, no credentials (those are the
/// data nodes'), TLS as configured.
fn sentinel_info(config: &RedisConfig, endpoint: &str) -> RedisResult<ConnectionInfo> {
    config.connection_addr(endpoint)?.into_connection_info()
}

/// How the redis crate reaches the primary it finds.
fn node_info(config: &RedisConfig) -> SentinelNodeConnectionInfo {
    let info =
        SentinelNodeConnectionInfo::default().set_redis_connection_info(config.redis_settings());
    if config.tls {
        info.set_tls_mode(redis::TlsMode::Secure)
    } else {
        info
    }
}

fn endpoint_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            join_host_port(host, &port.to_string())
        }
        other => other.to_string(),
    }
}

fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
