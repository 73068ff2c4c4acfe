//! The raw protocol floors: the cheapest acquire + release each service's
//! own client can do, with no distlock code in the way, one raw read round
//! trip and one raw durable write. `distlock bench` measures them beside the
//! lock, on the same server, runtime and connection shape (one client per
//! worker).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use distlock::BoxError;

/// One worker's raw client, bound to one key.
#[async_trait]
pub trait RawClient: Send {
    /// One raw acquire + release of this client's key.
    async fn cycle(&mut self) -> Result<(), BoxError>;

    /// One raw round trip to the server (`Ok(false)` when the backend has
    /// no server to talk to).
    async fn round_trip(&mut self) -> Result<bool, BoxError>;

    /// The service's cheapest durable single write, on the same connection
    /// as the round trip, to a key or node unique to the run (`Ok(false)`
    /// when the backend has no server to talk to). A lock's release is a
    /// write of this kind, so this is what a handoff compares with.
    async fn write_round_trip(&mut self) -> Result<bool, BoxError>;
}

/// What the floor of a backend is made of, for the output.
pub struct FloorInfo {
    /// The raw cycle, e.g. `SET NX PX + EVALSHA compare-and-delete`.
    pub cycle: &'static str,
    /// The raw round trip, or `None` when there is no server.
    pub round_trip: Option<&'static str>,
    /// The raw durable write, or `None` when there is no server.
    pub write_round_trip: Option<&'static str>,
}

/// The raw side of the service a lock URL names.
pub enum RawServer {
    /// `memory://`: a keyed lease table shared by the run's clients.
    Memory(Arc<LeaseTable>),
    /// `file:///dir`: open + flock of a file per key, a fencing counter
    /// increment, unlink + close.
    File(std::path::PathBuf),
    /// `redis://`, `rediss://` (one server) or `redlock://` (each
    /// instance, in parallel).
    #[cfg(feature = "redis")]
    Redis(Vec<String>),
    /// `zk://hosts/...`: the connect string (hosts only).
    #[cfg(feature = "zookeeper")]
    ZooKeeper(String),
    /// `etcd://hosts/...`: the endpoints.
    #[cfg(feature = "etcd")]
    Etcd(Vec<String>),
}

impl RawServer {
    /// The raw side of `url`'s service.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "expected <scheme>://...".to_owned())?;
        let hosts = || -> Vec<String> {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            let authority = authority.rsplit('@').next().unwrap_or_default();
            authority
                .split(',')
                .filter(|host| !host.is_empty())
                .map(str::to_owned)
                .collect()
        };
        match scheme {
            "memory" => Ok(RawServer::Memory(Default::default())),
            "file" => {
                let dir = rest.split('?').next().unwrap_or_default();
                if dir.is_empty() {
                    return Err("file:// needs a directory, e.g. file:///tmp/locks".into());
                }
                Ok(RawServer::File(dir.into()))
            }
            #[cfg(feature = "redis")]
            "redis" | "rediss" => Ok(RawServer::Redis(vec![url.to_owned()])),
            #[cfg(feature = "redis")]
            "redlock" => {
                let hosts = hosts();
                if hosts.is_empty() {
                    return Err("redlock:// needs at least one host".into());
                }
                Ok(RawServer::Redis(
                    hosts
                        .into_iter()
                        .map(|host| format!("redis://{host}"))
                        .collect(),
                ))
            }
            #[cfg(feature = "zookeeper")]
            "zk" | "zookeeper" => Ok(RawServer::ZooKeeper(hosts().join(","))),
            #[cfg(feature = "etcd")]
            "etcd" => Ok(RawServer::Etcd(
                hosts()
                    .into_iter()
                    .map(|host| format!("http://{host}"))
                    .collect(),
            )),
            other => {
                let _ = hosts;
                Err(format!(
                    "no raw floor for scheme `{other}` in this build of distlock"
                ))
            }
        }
    }

    /// What the floor measures.
    pub fn info(&self) -> FloorInfo {
        match self {
            RawServer::Memory(_) => FloorInfo {
                cycle: "a keyed lease table: token counter + insert-if-free (owner, expiry) + owner-checked remove, under a std Mutex",
                round_trip: None,
                write_round_trip: None,
            },
            RawServer::File(_) => FloorInfo {
                cycle: "open + flock(LOCK_EX|LOCK_NB) + fstat (link check) + counter (flock + pread + pwrite + unlock) + unlink + close",
                round_trip: None,
                write_round_trip: None,
            },
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) if urls.len() > 1 => FloorInfo {
                cycle: "SET NX PX on every instance in parallel, then EVALSHA compare-and-delete on every instance in parallel",
                round_trip: Some("PING"),
                write_round_trip: Some("SET key 1, on every instance in parallel"),
            },
            #[cfg(feature = "redis")]
            RawServer::Redis(_) => FloorInfo {
                cycle: "SET NX PX + EVALSHA compare-and-delete",
                round_trip: Some("PING"),
                write_round_trip: Some("SET key 1"),
            },
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(_) => FloorInfo {
                cycle: "create ephemeral-sequential + getChildren + delete",
                round_trip: Some("exists (check_stat)"),
                write_round_trip: Some("setData (persistent node)"),
            },
            #[cfg(feature = "etcd")]
            RawServer::Etcd(_) => FloorInfo {
                cycle: "txn(create_revision == 0 -> put with lease) + delete",
                round_trip: Some("range (get one key)"),
                write_round_trip: Some("put (one key, no lease)"),
            },
        }
    }

    /// A new client of its own (own connection or session) for `key`; `key`
    /// is unique to this run.
    pub async fn client(&self, key: &str) -> Result<Box<dyn RawClient>, BoxError> {
        match self {
            RawServer::Memory(table) => Ok(Box::new(MemoryRaw {
                table: table.clone(),
                key: key.to_owned(),
                owner: table.next_token.fetch_add(1, Ordering::Relaxed),
            })),
            RawServer::File(dir) => {
                std::fs::create_dir_all(dir)?;
                // One counter for the directory, as the backend's; opened
                // once per client, as the backend does.
                let counter = std::fs::File::options()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(dir.join(FILE_FLOOR_COUNTER))?;
                Ok(Box::new(FileRaw {
                    path: file_floor_path(dir, key),
                    counter,
                }))
            }
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) => Ok(Box::new(redis_raw::RedisRaw::connect(urls, key).await?)),
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(hosts) => Ok(Box::new(zk_raw::ZkRaw::connect(hosts, key).await?)),
            #[cfg(feature = "etcd")]
            RawServer::Etcd(endpoints) => {
                Ok(Box::new(etcd_raw::EtcdRaw::connect(endpoints, key).await?))
            }
        }
    }

    /// Removes what the floor left behind (best effort).
    pub async fn cleanup(&self, keys: &[String]) {
        match self {
            RawServer::File(dir) => {
                for key in keys {
                    let _ = std::fs::remove_file(file_floor_path(dir, key));
                }
                let _ = std::fs::remove_file(dir.join(FILE_FLOOR_COUNTER));
            }
            #[cfg(feature = "redis")]
            RawServer::Redis(urls) => redis_raw::cleanup(urls, keys).await,
            #[cfg(feature = "zookeeper")]
            RawServer::ZooKeeper(hosts) => zk_raw::cleanup(hosts, keys).await,
            #[cfg(feature = "etcd")]
            RawServer::Etcd(endpoints) => etcd_raw::cleanup(endpoints, keys).await,
            RawServer::Memory(_) => {}
        }
    }
}

/// The floor's file for `key` (keys are the bench's own, so a plain
/// character mapping is unique enough).
fn file_floor_path(dir: &std::path::Path, key: &str) -> std::path::PathBuf {
    let name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!(".distlock-bench-floor-{name}"))
}

/// The in-process analogue of `SET NX PX` + compare-and-delete: what any
/// keyed lock with expiry and fencing tokens must do at the least (the
/// key is copied into the table, as a lock service must).
#[derive(Default)]
pub struct LeaseTable {
    /// Holder and expiry per key.
    held: Mutex<HashMap<String, (u64, Instant)>>,
    next_token: AtomicU64,
}

struct MemoryRaw {
    table: Arc<LeaseTable>,
    key: String,
    owner: u64,
}

#[async_trait]
impl RawClient for MemoryRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let table = &self.table;
        let _fencing_token = table.next_token.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        {
            let mut held = table.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.get(&self.key) {
                Some((_, expiry)) if *expiry > now => {
                    return Err(format!("raw lease on {} already held", self.key).into())
                }
                _ => {
                    held.insert(self.key.clone(), (self.owner, now + MEMORY_FLOOR_TTL));
                }
            }
        }
        let mut held = table.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(&self.key).map(|(owner, _)| *owner) == Some(self.owner) {
            held.remove(&self.key);
            Ok(())
        } else {
            Err(format!("raw lease on {} was not ours to remove", self.key).into())
        }
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }

    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }
}

/// The memory floor's lease time (the lock's default TTL).
const MEMORY_FLOOR_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The file floor's fencing counter (the backend's is `.fencing_token`).
const FILE_FLOOR_COUNTER: &str = ".distlock-bench-floor-counter";

/// The smallest correct flock protocol: lock the key's file, check that
/// the locked inode still has a link (a release deletes the file, and
/// whoever locks the deleted inode it had opened must not think it holds
/// the lock: without this check the protocol double-grants under
/// contention), increment the directory's counter under its own `flock`,
/// then delete and close the file. The backend adds to it a check that
/// the path still names its file before deleting, and the lease.
struct FileRaw {
    path: std::path::PathBuf,
    counter: std::fs::File,
}

impl FileRaw {
    fn increment(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        self.counter.lock()?;
        let mut buf = [0u8; 32];
        let read = self.counter.read_at(&mut buf, 0);
        let next = read.and_then(|len| {
            let last = std::str::from_utf8(&buf[..len])
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(0);
            self.counter
                .write_all_at(format!("{:020}\n", last + 1).as_bytes(), 0)?;
            Ok(last + 1)
        });
        self.counter.unlock()?;
        next
    }
}

#[async_trait]
impl RawClient for FileRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.path)?;
        file.try_lock()
            .map_err(|err| format!("flock {}: {err}", self.path.display()))?;
        if std::os::unix::fs::MetadataExt::nlink(&file.metadata()?) == 0 {
            return Err(format!("{} was deleted under the floor", self.path.display()).into());
        }
        self.increment()?;
        std::fs::remove_file(&self.path)?;
        drop(file);
        Ok(())
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }

    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }
}

#[cfg(feature = "redis")]
mod redis_raw {
    use super::*;

    /// Deletes the key only if it still holds our token.
    const COMPARE_AND_DELETE: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"#;

    pub struct RedisRaw {
        connections: Vec<redis::aio::MultiplexedConnection>,
        key: String,
        /// The raw write's key (apart from `key`, which the cycle sets NX).
        write_key: String,
        token: String,
        script: redis::Script,
    }

    fn write_key_of(key: &str) -> String {
        format!("distlock-bench-floor-write:{key}")
    }

    async fn set_on(
        connection: &mut redis::aio::MultiplexedConnection,
        key: &str,
    ) -> Result<(), BoxError> {
        let () = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .query_async(connection)
            .await?;
        Ok(())
    }

    /// Deletes the raw writes' keys on every instance.
    pub async fn cleanup(urls: &[String], keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let write_keys: Vec<String> = keys.iter().map(|key| write_key_of(key)).collect();
        for url in urls {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                continue;
            };
            let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let _: Result<i64, _> = redis::cmd("DEL")
                .arg(&write_keys)
                .query_async(&mut connection)
                .await;
        }
    }

    impl RedisRaw {
        pub async fn connect(urls: &[String], key: &str) -> Result<Self, BoxError> {
            let mut connections = Vec::with_capacity(urls.len());
            for url in urls {
                let client = redis::Client::open(url.as_str())?;
                connections.push(client.get_multiplexed_async_connection().await?);
            }
            Ok(RedisRaw {
                connections,
                key: format!("distlock-bench-floor:{key}"),
                write_key: write_key_of(key),
                token: format!("{}-{}", std::process::id(), key),
                script: redis::Script::new(COMPARE_AND_DELETE),
            })
        }

        async fn cycle_on(
            connection: &mut redis::aio::MultiplexedConnection,
            key: &str,
            token: &str,
            script: &redis::Script,
        ) -> Result<(), BoxError> {
            Self::set_on(connection, key, token).await?;
            Self::delete_on(connection, key, token, script).await
        }

        async fn set_on(
            connection: &mut redis::aio::MultiplexedConnection,
            key: &str,
            token: &str,
        ) -> Result<(), BoxError> {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(10_000)
                .query_async(connection)
                .await?;
            if set.is_none() {
                return Err(format!("raw SET NX found {key} already set").into());
            }
            Ok(())
        }

        async fn delete_on(
            connection: &mut redis::aio::MultiplexedConnection,
            key: &str,
            token: &str,
            script: &redis::Script,
        ) -> Result<(), BoxError> {
            let deleted: i64 = script.key(key).arg(token).invoke_async(connection).await?;
            if deleted != 1 {
                return Err(format!("raw compare-and-delete did not delete {key}").into());
            }
            Ok(())
        }
    }

    #[async_trait]
    impl RawClient for RedisRaw {
        async fn cycle(&mut self) -> Result<(), BoxError> {
            let RedisRaw {
                connections,
                key,
                token,
                script,
                ..
            } = self;
            if let [connection] = connections.as_mut_slice() {
                return Self::cycle_on(connection, key, token, script).await;
            }
            // Two phases, as the protocol has them: the lock is held once
            // every instance has answered the SET (a majority decides), and
            // only then released everywhere. Running each instance's whole
            // cycle on its own would end before the slowest SET + delete
            // pair rather than the slowest SET plus the slowest delete.
            let sets = connections
                .iter_mut()
                .map(|connection| Self::set_on(connection, key, token));
            for result in futures::future::join_all(sets).await {
                result?;
            }
            let deletes = connections
                .iter_mut()
                .map(|connection| Self::delete_on(connection, key, token, script));
            for result in futures::future::join_all(deletes).await {
                result?;
            }
            Ok(())
        }

        async fn round_trip(&mut self) -> Result<bool, BoxError> {
            let _: String = redis::cmd("PING")
                .query_async(&mut self.connections[0])
                .await?;
            Ok(true)
        }

        async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
            let RedisRaw {
                connections,
                write_key,
                ..
            } = self;
            if let [connection] = connections.as_mut_slice() {
                set_on(connection, write_key).await?;
                return Ok(true);
            }
            let writes = connections
                .iter_mut()
                .map(|connection| set_on(connection, write_key));
            for result in futures::future::join_all(writes).await {
                result?;
            }
            Ok(true)
        }
    }
}

#[cfg(feature = "zookeeper")]
mod zk_raw {
    use super::*;
    use zookeeper_client as zk;

    const ROOT: &str = "/distlock-bench-floor";

    pub struct ZkRaw {
        client: zk::Client,
        parent: String,
        prefix: String,
    }

    fn parent_of(key: &str) -> String {
        let name: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{ROOT}/{name}")
    }

    async fn create_persistent(client: &zk::Client, path: &str) -> Result<(), BoxError> {
        let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        match client.create(path, b"", &options).await {
            Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
            Err(err) => Err(format!("create {path}: {err}").into()),
        }
    }

    impl ZkRaw {
        pub async fn connect(hosts: &str, key: &str) -> Result<Self, BoxError> {
            let client = zk::Client::connect(hosts).await?;
            let parent = parent_of(key);
            create_persistent(&client, ROOT).await?;
            create_persistent(&client, &parent).await?;
            let prefix = format!("{parent}/n-");
            Ok(ZkRaw {
                client,
                parent,
                prefix,
            })
        }
    }

    #[async_trait]
    impl RawClient for ZkRaw {
        async fn cycle(&mut self) -> Result<(), BoxError> {
            let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
            let (_, sequence) = self.client.create(&self.prefix, b"", &options).await?;
            let path = format!("{}{sequence}", self.prefix);
            // A lock recipe reads the children to see whether its node is
            // the first; the floor does the same read.
            let (children, _) = self.client.get_children(&self.parent).await?;
            if children.len() != 1 {
                return Err(format!(
                    "raw floor found {} nodes under {}",
                    children.len(),
                    self.parent
                )
                .into());
            }
            self.client.delete(&path, None).await?;
            Ok(())
        }

        async fn round_trip(&mut self) -> Result<bool, BoxError> {
            self.client.check_stat(&self.parent).await?;
            Ok(true)
        }

        /// The per-key parent is a persistent node unique to the run,
        /// created by `connect` and deleted by `cleanup`: its data is the
        /// write's target (the cycle only touches its children).
        async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
            self.client.set_data(&self.parent, b"1", None).await?;
            Ok(true)
        }
    }

    /// Deletes the per-key parents (they are empty once their sessions'
    /// ephemeral nodes are gone); the raw writes' target goes with them.
    pub async fn cleanup(hosts: &str, keys: &[String]) {
        let Ok(client) = zk::Client::connect(hosts).await else {
            return;
        };
        for key in keys {
            let _ = client.delete(&parent_of(key), None).await;
        }
    }
}

#[cfg(feature = "etcd")]
mod etcd_raw {
    use super::*;
    use etcd_client as etcd;

    pub struct EtcdRaw {
        client: etcd::Client,
        key: String,
        /// The raw write's key (apart from `key`, which the cycle creates).
        write_key: String,
        lease: i64,
    }

    fn write_key_of(key: &str) -> String {
        format!("distlock-bench-floor-write/{key}")
    }

    /// Deletes the raw writes' keys.
    pub async fn cleanup(endpoints: &[String], keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let Ok(mut client) = etcd::Client::connect(endpoints, None).await else {
            return;
        };
        for key in keys {
            let _ = client.delete(write_key_of(key), None).await;
        }
    }

    impl EtcdRaw {
        pub async fn connect(endpoints: &[String], key: &str) -> Result<Self, BoxError> {
            let mut client = etcd::Client::connect(endpoints, None).await?;
            // One lease per client, granted once and reused by every
            // cycle, as a lock client's session lease is.
            let lease = client.lease_grant(30, None).await?.id();
            Ok(EtcdRaw {
                client,
                key: format!("distlock-bench-floor/{key}"),
                write_key: write_key_of(key),
                lease,
            })
        }
    }

    #[async_trait]
    impl RawClient for EtcdRaw {
        async fn cycle(&mut self) -> Result<(), BoxError> {
            let put_if_absent = etcd::Txn::new()
                .when([etcd::Compare::create_revision(
                    self.key.as_str(),
                    etcd::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd::TxnOp::put(
                    self.key.as_str(),
                    "held",
                    Some(etcd::PutOptions::new().with_lease(self.lease)),
                )]);
            let response = self.client.txn(put_if_absent).await?;
            if !response.succeeded() {
                return Err(format!("raw txn found {} already present", self.key).into());
            }
            self.client.delete(self.key.as_str(), None).await?;
            Ok(())
        }

        async fn round_trip(&mut self) -> Result<bool, BoxError> {
            self.client.get(self.key.as_str(), None).await?;
            Ok(true)
        }

        async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
            self.client.put(self.write_key.as_str(), "1", None).await?;
            Ok(true)
        }
    }
}
