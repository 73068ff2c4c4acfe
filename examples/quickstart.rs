//! Quick start: take a lock, use its fencing token, release it.
//!
//! Runs on `$DISTLOCK_URL`, or in-process (`memory://`) when it is unset:
//! `cargo run -p distlock-examples --example quickstart`.

use std::time::Duration;

use distlock::LockOptions;

#[tokio::main]
async fn main() -> distlock::Result<()> {
    let url = std::env::var(distlock::URL_ENV).unwrap_or_else(|_| "memory://".to_owned());
    let locks = distlock::connect(&url).await?;
    let options = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait(Duration::from_secs(5));

    let guard = locks.lock("quickstart/report", &options).await?;
    println!(
        "{} holds {:?} with fencing token {}",
        locks.url(),
        guard.key(),
        guard.fencing_token()
    );
    // Another attempt while it is held gets None instead of waiting.
    assert!(locks
        .try_lock("quickstart/report", &options)
        .await?
        .is_none());
    guard.release().await?;
    println!("released");
    Ok(())
}
