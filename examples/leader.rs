//! Leader-style: many replicas, only one runs the job at a time.
//!
//! Every replica loops: wait (bounded) for the lock; whoever gets it is the
//! leader and runs the periodic job while it holds the lock, watching
//! `lost()`; the others keep waiting and take over when it steps down or
//! dies. Waiting uses the backend's notifications, so a takeover happens
//! as soon as the lock is free. Each write the leader makes carries its
//! fencing token, so a deposed leader's late write can be refused.
//!
//! The example runs three replicas in one process for a few seconds (each
//! with its own client, as separate processes would have); each leader
//! steps down after a few ticks, as a deploy would, so you see handovers.
//! Run it in several terminals against a server to see replicas in
//! different processes share one leadership.
//!
//! ```text
//! cargo run -p distlock-examples --example leader                                   # memory:// (no server)
//! DISTLOCK_URL=redis://127.0.0.1:6379 cargo run -p distlock-examples --example leader  # run it twice at once
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use distlock::{LockOptions, Locker};
use tokio::time::Instant;

const KEY: &str = "leader/billing-scheduler";
const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_TERM: u32 = 4;

/// Counts replicas of this process running the job at once: must never
/// exceed 1.
static LEADERS: AtomicUsize = AtomicUsize::new(0);

/// Marks this replica as running the job until dropped.
struct Leading;

impl Leading {
    fn start() -> Self {
        assert_eq!(LEADERS.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
        Leading
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        LEADERS.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn replica(name: String, locks: Locker, until: Instant) -> distlock::Result<u32> {
    let options = LockOptions::new()
        .ttl(Duration::from_secs(5))
        // Bounded waits (longer than a term, so standbys stay queued), so
        // the replica can notice shutdown.
        .wait(Duration::from_secs(1));
    let mut ticks_led = 0;
    while Instant::now() < until {
        let guard = match locks.lock(KEY, &options).await {
            Ok(guard) => guard,
            Err(distlock::Error::Timeout { .. }) => continue,
            Err(err) => return Err(err),
        };
        let leading = Leading::start();
        println!("{name}: leader (fencing token {})", guard.fencing_token());
        let lost = guard.lost();
        tokio::pin!(lost);
        for tick in 0..TICKS_PER_TERM {
            tokio::select! {
                biased;
                reason = &mut lost => {
                    println!("{name}: lost leadership ({reason})");
                    break;
                }
                () = tokio::time::sleep(TICK) => {
                    // The periodic job; pass guard.fencing_token() to what
                    // it writes.
                    println!("{name}:   job tick {tick}");
                    ticks_led += 1;
                }
            }
        }
        drop(leading);
        println!("{name}: stepping down");
        if let Err(err) = guard.release().await {
            println!("{name}: release: {err}");
        }
        // Give the others a chance before competing again.
        tokio::time::sleep(TICK).await;
    }
    Ok(ticks_led)
}

#[tokio::main]
async fn main() -> distlock::Result<()> {
    let url = std::env::var(distlock::URL_ENV).unwrap_or_else(|_| "memory://".to_owned());
    let until = Instant::now() + Duration::from_secs(3);
    let mut replicas = Vec::new();
    for index in 0..3 {
        let locks = distlock::connect(&url).await?;
        let name = format!("replica-{}-{index}", std::process::id());
        replicas.push(tokio::spawn(replica(name, locks, until)));
    }
    let mut total = 0;
    for replica in replicas {
        total += replica.await.expect("replica task")?;
    }
    println!("{total} job ticks, never two leaders at once");
    Ok(())
}
