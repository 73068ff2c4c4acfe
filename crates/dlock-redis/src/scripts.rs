//! The Lua scripts: each lock operation is one script, so one round trip.

use std::sync::LazyLock;

use redis::Script;

/// Acquire.
///
/// KEYS: lock, fence, queue, waiters. ARGV: owner, ttl_ms, waiter id (`""`
/// when not waiting), waiter entry TTL in ms (`0`: not fair), fence TTL ms.
///
/// Returns `{1, fencing_token, ""}` when granted, `{0, pttl, holder}` when
/// held (`pttl` = the holder's remaining TTL in ms, `holder` its owner
/// value), `{0, -1, ""}` when free but other waiters are queued first
/// (fair mode).
///
/// The fencing token is `max(counter + 1, server TIME in µs)`: it keeps
/// growing when the counter was lost (a restart without persistence, a
/// failover to a replica that missed the last writes, the counter's own
/// expiry) as long as the server clock does not step back, and the counter
/// keeps it growing when the clock does step back while the counter lives.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner, ttl, waiter = ARGV[1], ARGV[2], ARGV[3]
local waiter_ttl, fence_ttl = tonumber(ARGV[4]), ARGV[5]

local function grant(nx)
  if nx then
    if not redis.call('SET', lock, owner, 'NX', 'PX', ttl) then
      return {0, redis.call('PTTL', lock), redis.call('GET', lock) or ''}
    end
  else
    redis.call('SET', lock, owner, 'PX', ttl)
  end
  local t = redis.call('TIME')
  local now = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
  local token = redis.call('INCR', fence)
  if token < tonumber(now) then
    -- The usual case: the clock moved on by more than one since the last
    -- grant. The counter expires when the lock is idle that long; the
    -- clock then seeds it again.
    redis.call('SET', fence, now, 'PX', fence_ttl)
    token = tonumber(now)
  end
  return {1, token, ''}
end

if waiter_ttl == 0 then
  return grant(true)
end

-- Fair mode: a FIFO of waiters; a waiter that stops refreshing its entry
-- (a crashed process) is dropped from the head when its entry expires.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local head = redis.call('LINDEX', queue, 0)
  if not head then break end
  local deadline = redis.call('HGET', waiters, head)
  if deadline and tonumber(deadline) > now_ms then break end
  redis.call('LPOP', queue)
  redis.call('HDEL', waiters, head)
end

local function enqueue()
  if waiter == '' then return end
  if redis.call('HSET', waiters, waiter, string.format('%.0f', now_ms + waiter_ttl)) == 1 then
    redis.call('RPUSH', queue, waiter)
  end
  redis.call('PEXPIRE', queue, waiter_ttl * 2)
  redis.call('PEXPIRE', waiters, waiter_ttl * 2)
end

local pttl = redis.call('PTTL', lock)
if pttl ~= -2 then
  enqueue()
  return {0, pttl, redis.call('GET', lock) or ''}
end
local head = redis.call('LINDEX', queue, 0)
if head and head ~= waiter then
  enqueue()
  return {0, -1, ''}
end
if head then
  redis.call('LPOP', queue)
  redis.call('HDEL', waiters, waiter)
end
return grant(false)
"#,
    )
});

/// Owner-checked release. KEYS: lock. ARGV: owner, channel (`""`: do not
/// publish), message. Returns 1 if deleted, 0 if not ours.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.call('PUBLISH', ARGV[2], ARGV[3])
  end
  return 1
end
return 0
"#,
    )
});

/// Owner-checked extend. KEYS: lock. ARGV: owner, ttl_ms.
/// Returns 1 if extended, 0 if not ours.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Cleanup of an abandoned attempt (a dropped or failed `lock` future):
/// deletes the lock if this attempt got it after all, leaves the queue,
/// and wakes the other waiters if either changed anything.
/// KEYS: lock, queue, waiters. ARGV: owner, waiter id, channel.
pub(crate) static ABANDON: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
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
"#,
    )
});
