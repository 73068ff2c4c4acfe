//! The stock store: one Redis hash per item, shared by every replica, with
//! the item's stock and the highest fencing token that wrote it. A write
//! carrying a token below that one is refused by the store itself (a Lua
//! script, atomic in Redis), so a replica whose lock ended while its write
//! was on the way cannot overwrite a newer holder's work.

use redis::aio::ConnectionManager;
use redis::Script;

/// Writes the stock unless a newer lock holder has written; records every
/// write and refusal in the audit list.
///
/// KEYS[1] the item's hash, KEYS[2] the audit list. ARGV[1] the fencing
/// token, ARGV[2] the new stock, ARGV[3] the stock as the writer read it
/// (empty for none), ARGV[4] the item's name.
///
/// Tokens are compared as decimal strings (length, then text), exact for
/// any u64, where Lua's numbers would round above 2^53.
const FENCED_WRITE: &str = r"
local function below(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local highest = redis.call('HGET', KEYS[1], 'fence')
if highest and below(ARGV[1], highest) then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
  redis.call('RPUSH', KEYS[2], 'refused ' .. ARGV[4] .. ' ' .. ARGV[1] .. ' ' .. highest)
  return {'refused', highest}
end
local before = redis.call('HGET', KEYS[1], 'stock') or ''
redis.call('HSET', KEYS[1], 'stock', ARGV[2], 'fence', ARGV[1])
redis.call('RPUSH', KEYS[2], 'write ' .. ARGV[4] .. ' ' .. ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. before .. ' ' .. ARGV[2])
return {'written', ARGV[1]}
";

/// What the store did with a fenced write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The stock was written.
    Written,
    /// A newer lock holder (with token `highest`) has written: refused.
    Stale {
        /// The highest token the item has seen.
        highest: String,
    },
}

/// A store error: the Redis command that failed, and why.
#[derive(Debug)]
pub struct StoreError {
    /// What was being done.
    pub operation: &'static str,
    /// The Redis client's error.
    pub source: redis::RedisError,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store: {} failed: {}", self.operation, self.source)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The shared stock store.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    fenced_write: Script,
}

impl Store {
    /// Connects to the Redis at `url`; keys start with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let wrap = |operation| move |source| StoreError { operation, source };
        let client = redis::Client::open(url).map_err(wrap("parse the store URL"))?;
        let conn = client
            .get_connection_manager()
            .await
            .map_err(wrap("connect"))?;
        Ok(Store {
            conn,
            prefix: prefix.to_owned(),
            fenced_write: Script::new(FENCED_WRITE),
        })
    }

    /// The item's hash.
    pub fn item_key(&self, item: &str) -> String {
        format!("{}:stock:{item}", self.prefix)
    }

    /// The audit list of writes and refusals.
    pub fn audit_key(&self) -> String {
        format!("{}:writes", self.prefix)
    }

    /// The item's stock, `None` for an unknown item.
    pub async fn stock(&self, item: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("HGET")
            .arg(self.item_key(item))
            .arg("stock")
            .query_async(&mut conn)
            .await
            .map_err(|source| StoreError {
                operation: "read the stock",
                source,
            })
    }

    /// Writes `stock` for `item` with the writer's fencing `token`, unless
    /// a newer holder has written; `read` is the stock the writer based it
    /// on (for the audit list).
    pub async fn write_stock(
        &self,
        item: &str,
        token: u64,
        read: Option<i64>,
        stock: i64,
    ) -> Result<WriteOutcome, StoreError> {
        let mut conn = self.conn.clone();
        let reply: (String, String) = self
            .fenced_write
            .key(self.item_key(item))
            .key(self.audit_key())
            .arg(token.to_string())
            .arg(stock)
            .arg(read.map(|r| r.to_string()).unwrap_or_default())
            .arg(item)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| StoreError {
                operation: "write the stock",
                source,
            })?;
        Ok(match reply.0.as_str() {
            "written" => WriteOutcome::Written,
            _ => WriteOutcome::Stale { highest: reply.1 },
        })
    }
}
