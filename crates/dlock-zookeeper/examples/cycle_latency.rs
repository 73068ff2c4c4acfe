//! Latency of a lock cycle next to the raw ZooKeeper floor (create +
//! getChildren + delete), and of a handoff to a waiter. A quick check for
//! this crate's authors; `dlock bench` is the project's benchmark.
//!
//! ```text
//! cargo run --release -p dlock-zookeeper --example cycle_latency [zk://127.0.0.1:2181] [cycles]
//! ```

use std::time::{Duration, Instant};

use dlock_core::{DistributedLock, LockOptions};
use dlock_zookeeper::ZooKeeperLock;
use zookeeper_client as zk;

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<34} p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms  (n={})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.len()
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "zk://127.0.0.1:2181/dlock-latency".into());
    let cycles: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(2000);
    let locks = ZooKeeperLock::connect(&url).await?;
    let hosts = locks.config().connect_string();

    // The raw floor: the same three requests, straight through the client.
    let raw = zk::Client::connect(&hosts).await?;
    let dir = locks.lock_directory("raw-floor");
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let _ = raw.mkdir(&dir, &persistent).await;
    let sequential = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
    let mut samples = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        let started = Instant::now();
        let (_, sequence) = raw.create(&format!("{dir}/n-"), &[], &sequential).await?;
        raw.list_children(&dir).await?;
        raw.delete(&format!("{dir}/n-{sequence}"), None).await?;
        samples.push(started.elapsed());
    }
    percentiles("raw create+getChildren+delete", samples);

    for (name, options) in [
        ("dlock lock+release (auto_renew)", LockOptions::new()),
        (
            "dlock lock+release (no renewal)",
            LockOptions::new().auto_renew(false),
        ),
    ] {
        let mut samples = Vec::with_capacity(cycles);
        for _ in 0..cycles {
            let started = Instant::now();
            locks.lock("cycle", &options).await?.release().await?;
            samples.push(started.elapsed());
        }
        percentiles(name, samples);
    }

    // Handoff: the holder releases, the waiter (another session) gets it.
    let waiter = ZooKeeperLock::connect(&url).await?;
    let mut samples = Vec::new();
    for _ in 0..cycles / 10 {
        let guard = locks.lock("handoff", &LockOptions::new()).await?;
        let task = tokio::spawn({
            let waiter = waiter.clone();
            async move {
                let guard = waiter.lock("handoff", &LockOptions::new()).await?;
                let granted = Instant::now();
                guard.release().await?;
                Ok::<_, dlock_core::Error>(granted)
            }
        });
        // Let the waiter queue and set its watch before the release
        // (a few round trips on loopback).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let released = Instant::now();
        guard.release().await?;
        let granted = task.await??;
        samples.push(granted.saturating_duration_since(released));
    }
    percentiles("handoff (release -> waiter holds)", samples);
    Ok(())
}
