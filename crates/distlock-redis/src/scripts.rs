//! The Lua scripts: each lock operation is one script, so one round trip.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind};

/// A Lua script run by its hash.
///
/// `redis::Script::key` and `arg` copy each argument into an invocation
/// and then again into the command it sends; [`LuaScript::command`] starts
/// the command and the caller appends keys and arguments once.
pub(crate) struct LuaScript {
    script: Script,
}

impl LuaScript {
    fn new(code: &str) -> Self {
        LuaScript {
            script: Script::new(code),
        }
    }

    /// The script, for pipelines (`load_script`, `invoke_script`).
    pub fn script(&self) -> &Script {
        &self.script
    }

    /// `EVALSHA <hash> <numkeys>`: append the keys, then the arguments.
    pub fn command(&self, numkeys: usize) -> Cmd {
        let mut command = redis::cmd("EVALSHA");
        command.arg(self.script.get_hash()).arg(numkeys);
        command
    }

    /// Sends `command` (made by [`Self::command`]); a server without the
    /// script (restarted, `SCRIPT FLUSH`) gets it loaded and the command
    /// sent again.
    pub async fn run<T: FromRedisValue>(
        &self,
        connection: &mut impl ConnectionLike,
        command: &Cmd,
    ) -> RedisResult<T> {
        match command.query_async(connection).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(connection).await?;
                command.query_async(connection).await
            }
            result => result,
        }
    }
}

/// Lua shared by the scripts that grant a lock: `grant_token(fence,
/// fence_ttl)` returns the fencing token of a grant, `max(last token + 1,
/// server time in µs)`, and stores it with `fence_ttl` ms to live. The
/// usual case is one call: the clock moved on since the last grant, so the
/// time is written as the new token and the old one only checked; the
/// counter keeps tokens growing when the clock steps back or two grants
/// fall within one µs. Seeding from the clock keeps tokens growing when the
/// counter is lost (a restart without persistence, a failover to a replica
/// that missed the last writes, the counter's own expiry when idle).
const GRANT_TOKEN_LUA: &str = r#"
local function grant_token(fence, fence_ttl)
  local t = redis.call('TIME')
  -- Kept as text: no number formatting on every grant.
  local now = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
  local last = tonumber(redis.call('SET', fence, now, 'PX', fence_ttl, 'GET'))
  if last and last >= tonumber(now) then
    redis.call('SET', fence, string.format('%.0f', last + 1), 'PX', fence_ttl)
    return last + 1
  end
  return tonumber(now)
end
"#;

/// A script whose body may call `grant_token` (see [`GRANT_TOKEN_LUA`]).
fn with_grant_token(body: &str) -> LuaScript {
    LuaScript::new(&[GRANT_TOKEN_LUA, body].concat())
}

/// Acquire.
///
/// KEYS: lock, fence, queue, waiters. ARGV: owner, ttl_ms, waiter id (`""`
/// when not waiting), waiter entry TTL in ms (`0`: not fair), fence TTL ms.
///
/// Returns `{code, value, holder, extra}`:
/// - `{1, fencing_token, "", 0}` when granted now;
/// - `{2, fencing_token, "", pttl}` (fair mode) when a release already
///   handed the lock to this waiter (see [`RELEASE_FAIR`]): its grant
///   message was lost or not read yet; `pttl` is what is left of its TTL;
/// - `{0, pttl, holder, now_ms}` when held (`pttl` = the holder's remaining
///   TTL in ms, `holder` its owner value), `{0, -1, "", now_ms}` when free
///   but other waiters are queued first (fair mode). `now_ms` is the
///   server's clock (0 when not fair): a waiter relates a later grant's
///   server time to its own clock with it.
///
/// A fair waiter's queue entry is `deadline_ms:ttl_ms` (the deadline of the
/// entry, the TTL the waiter asked for), so a release can hand it the lock.
///
pub(crate) static ACQUIRE: LazyLock<LuaScript> = LazyLock::new(|| {
    with_grant_token(
        r#"
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner, ttl, waiter = ARGV[1], ARGV[2], ARGV[3]
local waiter_ttl, fence_ttl = tonumber(ARGV[4]), ARGV[5]

-- The reply of a grant (the lock is already set).
local function fenced()
  return {1, grant_token(fence, fence_ttl), '', 0}
end

if waiter_ttl == 0 then
  if not redis.call('SET', lock, owner, 'NX', 'PX', ttl) then
    return {0, redis.call('PTTL', lock), redis.call('GET', lock) or '', 0}
  end
  return fenced()
end

-- Fair mode, fast path: nobody queued and the lock free.
if redis.call('EXISTS', queue) == 0 and redis.call('SET', lock, owner, 'NX', 'PX', ttl) then
  return fenced()
end

-- Fair mode: a FIFO of waiters; a waiter that stops refreshing its entry
-- (a crashed process) is dropped from the head when its entry expires.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local head = redis.call('LINDEX', queue, 0)
  if not head then break end
  local entry = redis.call('HGET', waiters, head)
  local deadline = entry and tonumber(string.match(entry, '^%d+'))
  if deadline and deadline > now_ms then break end
  redis.call('LPOP', queue)
  redis.call('HDEL', waiters, head)
end

local function enqueue()
  if waiter == '' then return end
  local entry = string.format('%.0f', now_ms + waiter_ttl) .. ':' .. ttl
  if redis.call('HSET', waiters, waiter, entry) == 1 then
    redis.call('RPUSH', queue, waiter)
  end
  redis.call('PEXPIRE', queue, waiter_ttl * 2)
  redis.call('PEXPIRE', waiters, waiter_ttl * 2)
end

local holder = redis.call('GET', lock)
if holder then
  if waiter ~= '' and holder == owner then
    -- A release handed the lock to this waiter (direct handoff).
    local token = tonumber(redis.call('GET', fence)) or 0
    return {2, token, '', redis.call('PTTL', lock)}
  end
  enqueue()
  return {0, redis.call('PTTL', lock), holder, now_ms}
end
local head = redis.call('LINDEX', queue, 0)
if head and head ~= waiter then
  enqueue()
  return {0, -1, '', now_ms}
end
if head then
  redis.call('LPOP', queue)
  redis.call('HDEL', waiters, waiter)
end
redis.call('SET', lock, owner, 'PX', ttl)
return fenced()
"#,
    )
});

/// Owner-checked release. KEYS: lock. ARGV: owner, channel (`""`: do not
/// publish), message. Returns 1 if deleted, 0 if not ours.
pub(crate) static RELEASE: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(RELEASE_LUA));

/// [`RELEASE`] for a Redis Cluster (`SPUBLISH`).
pub(crate) static RELEASE_SHARDED: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(&sharded(RELEASE_LUA)));

const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.call('PUBLISH', ARGV[2], ARGV[3])
  end
  return 1
end
return 0
"#;

/// Owner-checked release with direct handoff (fair mode, one server).
///
/// KEYS: lock, fence, queue, waiters. ARGV: owner, channel, fence idle TTL
/// in ms, claim window in ms. Returns 1 if released, 0 if not ours.
///
/// Stale queue heads (entry deadline passed) are dropped first. When the
/// head is fresh, the lock becomes its own right here (`SET lock <head> PX
/// <px>`, fenced like an acquire), the head leaves the queue, and the
/// grant is published as `grant <token> <server ms> <px> <owner>` on the
/// channel of the head's client (`<channel>:<client id>`, see
/// `LockKeys::grant_channel`); the waiter holds the lock without another
/// round trip. `px` is the TTL the head asked for, capped by the claim
/// window: a head that died since its last refresh then holds the lock
/// for that window, not for its whole TTL, and a live head extends it to
/// its TTL at once (in the background). Otherwise (no fresh head) the
/// lock is deleted and an empty message wakes the waiters; so it is when
/// the head's entry has no TTL part (the acquire script always writes
/// one).
pub(crate) static RELEASE_FAIR: LazyLock<LuaScript> =
    LazyLock::new(|| with_grant_token(RELEASE_FAIR_LUA));

/// [`RELEASE_FAIR`] for a Redis Cluster (`SPUBLISH`).
pub(crate) static RELEASE_FAIR_SHARDED: LazyLock<LuaScript> =
    LazyLock::new(|| with_grant_token(&sharded(RELEASE_FAIR_LUA)));

const RELEASE_FAIR_LUA: &str = r#"
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner, channel, fence_idle = ARGV[1], ARGV[2], tonumber(ARGV[3])
local claim = tonumber(ARGV[4])
if redis.call('GET', lock) ~= owner then
  return 0
end
if not redis.call('LINDEX', queue, 0) then
  -- Nobody queued (the uncontended case): a plain release.
  redis.call('DEL', lock)
  redis.call('PUBLISH', channel, '')
  return 1
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local head = redis.call('LINDEX', queue, 0)
  if not head then break end
  local entry = redis.call('HGET', waiters, head)
  local deadline, ttl
  if entry then
    deadline, ttl = string.match(entry, '^(%d+):?(%d*)$')
    deadline = tonumber(deadline)
  end
  if deadline and deadline > now_ms then
    if ttl == '' then break end
    local px = math.min(tonumber(ttl), claim)
    redis.call('SET', lock, head, 'PX', px)
    local token = grant_token(fence, fence_idle + tonumber(ttl))
    redis.call('LPOP', queue)
    redis.call('HDEL', waiters, head)
    -- On the channel of the head's client (the waiter id up to its last
    -- ':'): the other clients have nothing to do.
    redis.call('PUBLISH', channel .. ':' .. (string.match(head, '^(.*):') or head),
      'grant ' .. string.format('%.0f', token) .. ' ' .. string.format('%.0f', now_ms)
        .. ' ' .. string.format('%.0f', px) .. ' ' .. head)
    return 1
  end
  redis.call('LPOP', queue)
  redis.call('HDEL', waiters, head)
end
redis.call('DEL', lock)
redis.call('PUBLISH', channel, '')
return 1
"#;

/// Owner-checked extend. KEYS: lock. ARGV: owner, ttl_ms.
/// Returns 1 if extended, 0 if not ours.
pub(crate) static EXTEND: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Resume: the lock's remaining TTL in ms if `owner` still holds it,
/// else -3. KEYS: lock. ARGV: owner.
pub(crate) static RESUME: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PTTL', KEYS[1])
end
return -3
"#,
    )
});

/// Cleanup of an abandoned attempt (a dropped or failed `lock` future):
/// deletes the lock if this attempt got it after all, leaves the queue,
/// and wakes the other waiters if either changed anything.
/// KEYS: lock, queue, waiters. ARGV: owner, waiter id, channel.
pub(crate) static ABANDON: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(ABANDON_LUA));

/// [`ABANDON`] for a Redis Cluster (`SPUBLISH`).
pub(crate) static ABANDON_SHARDED: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(&sharded(ABANDON_LUA)));

const ABANDON_LUA: &str = r#"
local changed = false
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  changed = true
end
if ARGV[2] ~= '' and redis.call('HDEL', KEYS[3], ARGV[2]) == 1 then
  redis.call('LREM', KEYS[2], 1, ARGV[2])
  changed = true
end
if changed then
  redis.call('PUBLISH', ARGV[3], '')
  return 1
end
return 0
"#;

/// The scripts that publish, for one topology.
pub(crate) struct Publishing {
    pub release: &'static LuaScript,
    pub release_fair: &'static LuaScript,
    pub abandon: &'static LuaScript,
}

impl Publishing {
    /// `PUBLISH` (one server, Sentinel, Redlock) or, on a Redis Cluster,
    /// `SPUBLISH`: the channels carry the lock's hash tag, so a sharded
    /// message stays in the lock's slot (the script may only touch it).
    pub fn new(sharded: bool) -> Self {
        if sharded {
            Publishing {
                release: &RELEASE_SHARDED,
                release_fair: &RELEASE_FAIR_SHARDED,
                abandon: &ABANDON_SHARDED,
            }
        } else {
            Publishing {
                release: &RELEASE,
                release_fair: &RELEASE_FAIR,
                abandon: &ABANDON,
            }
        }
    }
}

/// `code` with its `PUBLISH` calls made `SPUBLISH`.
fn sharded(code: &str) -> String {
    code.replace("'PUBLISH'", "'SPUBLISH'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_scripts_publish_in_the_slot() {
        for code in [RELEASE_LUA, RELEASE_FAIR_LUA, ABANDON_LUA] {
            let sharded = sharded(code);
            assert!(!sharded.contains("'PUBLISH'") && sharded.contains("'SPUBLISH'"));
        }
    }
}
