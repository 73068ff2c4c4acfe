//! Fencing a write: the resource, not the lock, rejects a stale writer.
//!
//! A lock is a lease. A holder can pause (GC, swap, a slow disk) or its
//! write can sit in a network queue until after its lease has ended and
//! another client got the lock; checking `is_held()` just before writing
//! does not help, because the write still travels after the check. The
//! fix: send the guard's fencing token with every write, and have the
//! resource refuse a token smaller than the largest it has seen.
//!
//! Here writer A takes the lock and sends a write that is delayed; A's
//! lease ends (we release it; in production it expires during the pause);
//! writer B takes the lock, gets a larger token and writes; then A's late
//! write arrives and is refused.
//!
//! ```text
//! cargo run -p distlock-examples --example fencing                                  # memory:// (no server)
//! DISTLOCK_URL=redis://127.0.0.1:6379 cargo run -p distlock-examples --example fencing # any backend
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::LockOptions;

/// A resource that remembers the largest fencing token it has accepted,
/// as a database row with a `fencing_token` column does with
/// `UPDATE ... WHERE fencing_token <= $token`.
#[derive(Default)]
struct FencedStore {
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    highest_token: u64,
    value: String,
}

#[derive(Debug)]
struct StaleToken {
    token: u64,
    highest: u64,
}

impl FencedStore {
    /// Writes `value` unless a writer with a newer token has written.
    fn write(&self, fencing_token: u64, value: &str) -> Result<(), StaleToken> {
        let mut state = self.state.lock().unwrap();
        if fencing_token < state.highest_token {
            return Err(StaleToken {
                token: fencing_token,
                highest: state.highest_token,
            });
        }
        state.highest_token = fencing_token;
        state.value = value.to_owned();
        Ok(())
    }

    fn value(&self) -> String {
        self.state.lock().unwrap().value.clone()
    }
}

#[tokio::main]
async fn main() -> distlock::Result<()> {
    let url = std::env::var(distlock::URL_ENV).unwrap_or_else(|_| "memory://".to_owned());
    // Two clients, as two replicas of a service would have.
    let writer_a = distlock::connect(&url).await?;
    let writer_b = distlock::connect(&url).await?;
    let options = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait(Duration::from_secs(5));
    let store = Arc::new(FencedStore::default());
    let key = "fencing/invoice-42";

    let guard_a = writer_a.lock(key, &options).await?;
    let token_a = guard_a.fencing_token();
    println!("A holds the lock with fencing token {token_a} and sends its write");
    // A's write leaves now but lands late.
    let late_write = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            store.write(token_a, "written by A")
        })
    };
    // A's lease ends before the write lands.
    guard_a.release().await?;

    let guard_b = writer_b.lock(key, &options).await?;
    let token_b = guard_b.fencing_token();
    println!("B holds the lock with fencing token {token_b}");
    store
        .write(token_b, "written by B")
        .expect("B has the newest token");
    println!("B's write was accepted");

    match late_write.await.expect("the late write task") {
        Ok(()) => panic!("the store accepted a stale write"),
        Err(StaleToken { token, highest }) => {
            println!("A's late write was refused: token {token} < {highest}")
        }
    }
    guard_b.release().await?;
    assert_eq!(store.value(), "written by B");
    println!("the store holds {:?}", store.value());
    Ok(())
}
