//! Where a lock lives in Redis.
//!
//! Every name of one lock shares the hash tag `{<encoded key>}`, so the
//! lock, its fence counter and its wait queue sit in one cluster slot. The
//! key is encoded with [`distlock_core::backend::key::encode_component`] (injective,
//! no braces, long keys hashed), so a key holding `{` or `}` cannot move
//! the tag and distinct keys never share names.

use distlock_core::backend::key::encode_component;
use redis::Cmd;

use crate::scripts::LuaScript;

/// Longest encoded key kept verbatim; longer ones are hashed.
const MAX_ENCODED: usize = 256;

/// The Redis names of one lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LockKeys {
    /// The lock itself: `SET NX PX`, value = owner.
    pub lock: String,
    /// The fencing counter.
    pub fence: String,
    /// Fair mode: waiter ids in arrival order (a list).
    pub queue: String,
    /// Fair mode: waiter id -> deadline of its queue entry (a hash).
    pub waiters: String,
    /// The channel a release publishes on.
    pub channel: String,
}

impl LockKeys {
    /// `EVALSHA` of `script` with the four names as its keys, in the order
    /// the acquire and fair release scripts take them: lock, fence, queue,
    /// waiters. The caller appends the arguments.
    pub fn script_command(&self, script: &LuaScript) -> Cmd {
        let mut command = script.command(4);
        command
            .arg(&self.lock)
            .arg(&self.fence)
            .arg(&self.queue)
            .arg(&self.waiters);
        command
    }

    /// The channel on which a fair release hands the lock to a waiter of
    /// the client `client_id`: `<channel>:<client id>`, as `RELEASE_FAIR`
    /// builds it from the waiter id (`<client id>:<attempt>`). Per client,
    /// not per attempt, so that it can stay subscribed between waits.
    pub fn grant_channel(&self, client_id: &str) -> String {
        let mut name = String::with_capacity(self.channel.len() + 1 + client_id.len());
        name.push_str(&self.channel);
        name.push(':');
        name.push_str(client_id);
        name
    }
}

impl LockKeys {
    pub fn new(prefix: &str, key: &str) -> Self {
        let tag = encode_component(key, MAX_ENCODED);
        // Built by appending, not `format!`: this runs on every acquisition.
        let mut base = String::with_capacity(prefix.len() + tag.len() + 4);
        base.push_str(prefix);
        base.push_str(":{");
        base.push_str(&tag);
        base.push_str("}:");
        let name = |suffix: &str| {
            let mut name = String::with_capacity(base.len() + suffix.len());
            name.push_str(&base);
            name.push_str(suffix);
            name
        };
        LockKeys {
            lock: name("lock"),
            fence: name("fence"),
            queue: name("queue"),
            waiters: name("waiters"),
            channel: name("released"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_in_keys_do_not_move_the_hash_tag() {
        let keys = LockKeys::new("app", "a}{b");
        assert_eq!(keys.lock, "app:{a%7D%7Bb}:lock");
        assert_eq!(keys.fence, "app:{a%7D%7Bb}:fence");
        let long = LockKeys::new("app", &"x".repeat(1000));
        assert!(long.lock.len() < 100, "{}", long.lock);
        assert_ne!(LockKeys::new("app", "a/b"), LockKeys::new("app", "a_b"));
    }
}
