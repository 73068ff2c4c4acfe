//! The conformance suite of distlock.
//!
//! Every backend runs the same generic cases against a real server. A
//! backend describes how to make clients (and, optionally, how to take a
//! held lock away, as a fault would) in a [`Harness`], and one macro call
//! turns every case into a named test:
//!
//! ```ignore
//! async fn harness() -> Option<distlock_testkit::Harness> {
//!     if !distlock_testkit::service_ready("redis", "127.0.0.1:6379").await {
//!         return None; // skipped, unless DISTLOCK_REQUIRE_SERVICES=1 made it fail
//!     }
//!     Some(distlock_testkit::Harness::new("redis", || async {
//!         Ok(std::sync::Arc::new(distlock_redis::RedisLock::connect("redis://127.0.0.1:6379").await?) as _)
//!     }))
//! }
//! distlock_testkit::conformance_tests!(harness());
//! ```
//!
//! Cases that need a capability the backend does not declare (fairness,
//! TTL expiry, a fault hook) return early with a note on stderr. A backend
//! that declares fairness also gives a queue probe
//! ([`Harness::with_queue_probe`]): the FIFO case starts each waiter once
//! the previous one is queued on the server.
//!
//! With the feature `servers`, [`servers`] starts private Redis, ZooKeeper
//! and etcd servers for tests that count requests or inject faults.

pub mod cases;
pub mod events;
mod resume;
#[cfg(feature = "servers")]
pub mod servers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

pub use distlock_core::{Capabilities, DistributedLock, Result};

/// Makes a new client (its own connection or session) of the backend.
pub type ConnectFn =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn DistributedLock>>> + Send + Sync>;

/// Takes the lock on a key away from its holder, as a fault would
/// (deletes the key, revokes the lease, expires the session...).
pub type FaultFn = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

/// Counts the waiters queued on a key, as the backend's server (or store)
/// records them.
pub type QueueProbeFn = Arc<dyn Fn(String) -> BoxFuture<'static, usize> + Send + Sync>;

/// How the suite reaches one backend.
#[derive(Clone)]
pub struct Harness {
    name: String,
    connect: ConnectFn,
    take_away: Option<FaultFn>,
    queue_probe: Option<QueueProbeFn>,
    short_ttl: Duration,
}

impl Harness {
    /// A harness named `name` whose clients come from `connect`.
    pub fn new<F, Fut>(name: impl Into<String>, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn DistributedLock>>> + Send + 'static,
    {
        Harness {
            name: name.into(),
            connect: Arc::new(move || Box::pin(connect())),
            take_away: None,
            queue_probe: None,
            short_ttl: Duration::from_millis(800),
        }
    }

    /// Adds the fault hook the `lost_fires_on_fault` case uses.
    pub fn with_fault<F, Fut>(mut self, take_away: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.take_away = Some(Arc::new(move |key| Box::pin(take_away(key))));
        self
    }

    /// Adds the probe with which the `fifo_fairness` case sees each waiter
    /// queued before the next one arrives (the API has no "queued" event).
    /// Required when the backend declares fairness.
    pub fn with_queue_probe<F, Fut>(mut self, probe: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = usize> + Send + 'static,
    {
        self.queue_probe = Some(Arc::new(move |key| Box::pin(probe(key))));
        self
    }

    /// Sets the TTL of the expiry and renewal cases (default 800 ms).
    pub fn with_short_ttl(mut self, ttl: Duration) -> Self {
        self.short_ttl = ttl;
        self
    }

    /// The backend's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TTL of the expiry and renewal cases.
    pub fn short_ttl(&self) -> Duration {
        self.short_ttl
    }

    /// A new client; panics with the backend's name if it cannot connect.
    pub async fn client(&self) -> Arc<dyn DistributedLock> {
        match (self.connect)().await {
            Ok(client) => client,
            Err(err) => panic!("{}: cannot make a client: {err} ({err:?})", self.name),
        }
    }

    /// Takes the lock on `key` away, if the backend has a fault hook.
    pub async fn take_away(&self, key: &str) -> bool {
        match &self.take_away {
            Some(take_away) => {
                take_away(key.to_owned()).await;
                true
            }
            None => false,
        }
    }

    /// How many waiters are queued on `key`; `None` without a probe.
    pub async fn queued(&self, key: &str) -> Option<usize> {
        match &self.queue_probe {
            Some(probe) => Some(probe(key.to_owned()).await),
            None => None,
        }
    }

    /// Whether a queue probe is set.
    pub fn has_queue_probe(&self) -> bool {
        self.queue_probe.is_some()
    }

    /// Whether a fault hook is set.
    pub fn has_fault_hook(&self) -> bool {
        self.take_away.is_some()
    }
}

/// True when `DISTLOCK_REQUIRE_SERVICES=1`: missing servers fail tests.
pub fn services_required() -> bool {
    std::env::var("DISTLOCK_REQUIRE_SERVICES").is_ok_and(|value| value == "1" || value == "true")
}

/// Whether the service `name` answers on `addr` (a TCP connect within
/// 2 s). When it does not: panics if [`services_required`], otherwise
/// prints a skip note and returns false.
pub async fn service_ready(name: &str, addr: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(addr);
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Ok(_)) => true,
        outcome => {
            let why = match outcome {
                Ok(Err(err)) => err.to_string(),
                _ => "no answer within 2s".to_owned(),
            };
            if services_required() {
                panic!(
                    "{name} is required (DISTLOCK_REQUIRE_SERVICES=1) but {addr} does not answer: {why}; start it with `bash scripts/services.sh start`"
                );
            }
            eprintln!("skipping: {name} at {addr} does not answer ({why}); run `bash scripts/services.sh start`");
            false
        }
    }
}

/// Whether the program `name` is on the `PATH`, for tests that run
/// another project's tool (`etcdctl`, `javac`). When it is not: panics if
/// [`services_required`], naming the Debian `package` and how to install
/// it, otherwise prints a skip note and returns false.
pub fn program_ready(name: &str, package: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(name).is_file()) {
        return true;
    }
    if services_required() {
        panic!(
            "{name} is required (DISTLOCK_REQUIRE_SERVICES=1) but not on the PATH; install Debian's {package} with `bash scripts/services.sh install`"
        );
    }
    eprintln!("skipping: {name} is not on the PATH (Debian's {package}; `bash scripts/services.sh install`)");
    false
}

/// Polls `condition` every 20 ms until it holds, and panics naming `what`
/// if `within` passes first: for server-side state that has no event to
/// await (a node deleted in the background, a watch registered).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A key no other test run uses: `distlock-test/<case>/<random>`.
pub fn unique_key(case: &str) -> String {
    format!("distlock-test/{case}/{:016x}", fastrand::u64(..))
}

/// Expands to one `#[tokio::test]` per conformance case. The argument is
/// an expression of type `impl Future<Output = Option<Harness>>`
/// (`None` skips every case). Call it inside a module of its own.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
            try_lock_while_held,
            release_then_reacquire,
            empty_key_is_invalid,
            mutual_exclusion,
            fencing_tokens_increase,
            ttl_expiry_frees_lock,
            renewal_keeps_lock,
            lock_wait_times_out,
            dropped_lock_future_leaves_nothing,
            dropped_guard_is_released_promptly,
            lost_fires_on_fault,
            awkward_keys,
            thousand_locks_one_client,
            fifo_fairness,
            resume_from_token
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $harness.await else { return };
                $crate::cases::$case(&harness).await;
            }
        )*
    };
}
