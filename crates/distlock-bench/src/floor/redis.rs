//! The Redis floor: `SET NX PX` + an `EVALSHA` compare-and-delete (Redlock:
//! the SETs on every instance in parallel, then the deletes); rtt = `PING`,
//! write rtt = `SET <key> 1` (Redlock: every instance in parallel).

use async_trait::async_trait;
use distlock::BoxError;

use super::{FloorInfo, RawClient};

/// What the floor of one server (`instances` = 1) or of a Redlock quorum
/// is made of.
pub(super) fn info(instances: usize) -> FloorInfo {
    if instances > 1 {
        FloorInfo {
            cycle: "SET NX PX on every instance in parallel, then EVALSHA compare-and-delete on every instance in parallel",
            round_trip: Some("PING"),
            write_round_trip: Some("SET key 1, on every instance in parallel"),
        }
    } else {
        FloorInfo {
            cycle: "SET NX PX + EVALSHA compare-and-delete",
            round_trip: Some("PING"),
            write_round_trip: Some("SET key 1"),
        }
    }
}

/// Deletes the key only if it still holds our token.
const COMPARE_AND_DELETE: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"#;

pub(super) struct RedisRaw {
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
pub(super) async fn cleanup(urls: &[String], keys: &[String]) {
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
    pub(super) async fn connect(urls: &[String], key: &str) -> Result<Self, BoxError> {
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
