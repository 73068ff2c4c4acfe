//! Development probe: handoff latency (release to the waiter holding the
//! lock) and 8-way contention on 127.0.0.1:6379 and Redlock on 6380-6382.
//! Run: `cargo run --release -p dlock-redis --example handoff_probe`.

use dlock_core::{DistributedLock, LockOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pct(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:?} p90 {:?} max {:?}",
        v[v.len() / 2],
        v[v.len() * 9 / 10],
        v[v.len() - 1]
    )
}

#[tokio::main]
async fn main() {
    for url in [
        "redis://127.0.0.1:6379?fair=true",
        "redis://127.0.0.1:6379?fair=false",
        "redlock://127.0.0.1:6380,127.0.0.1:6381,127.0.0.1:6382",
    ] {
        let a = dlock_redis::RedisLock::connect(url).await.unwrap();
        let b = Arc::new(dlock_redis::RedisLock::connect(url).await.unwrap());
        let mut lat = Vec::new();
        for i in 0..200 {
            let key = format!("handoff-probe-{i}");
            let g = a
                .try_lock(&key, &LockOptions::new())
                .await
                .unwrap()
                .unwrap();
            let (b2, k2) = (b.clone(), key.clone());
            let waiter = tokio::spawn(async move {
                let g = b2
                    .lock(&k2, &LockOptions::new().wait(Duration::from_secs(10)))
                    .await
                    .unwrap();
                let t = Instant::now();
                g.release().await.unwrap();
                t
            });
            tokio::time::sleep(Duration::from_millis(5)).await; // let it subscribe
            let t = Instant::now();
            g.release().await.unwrap();
            let got = waiter.await.unwrap();
            lat.push(got - t);
        }
        println!("{url}: handoff {}", pct(lat));
        // 8 contenders, 50 rounds each
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let c = dlock_redis::RedisLock::connect(url).await.unwrap();
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let g = c
                        .lock(
                            "contended-probe",
                            &LockOptions::new().wait(Duration::from_secs(30)),
                        )
                        .await
                        .unwrap();
                    g.release().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "{url}: 8x50 contended in {:?} ({:.0}/s)",
            t.elapsed(),
            400.0 / t.elapsed().as_secs_f64()
        );
    }
}
