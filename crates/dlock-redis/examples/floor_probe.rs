//! Development probe (not the benchmark; use `dlock bench` for figures to
//! publish): uncontended try_lock + release against the raw floor
//! (`SET NX PX` + owner-checked delete) on 127.0.0.1:6379 and Redlock on
//! 6380-6382. Run: `cargo run --release -p dlock-redis --example floor_probe`.

use dlock_core::{DistributedLock, LockOptions};
use std::time::{Duration, Instant};

fn pct(mut v: Vec<Duration>) -> String {
    v.sort();
    format!("p50 {:?} p99 {:?}", v[v.len() / 2], v[v.len() * 99 / 100])
}

async fn run() {
    const N: usize = 3000;
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let del = redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0");
    let mut raw = Vec::new();
    for i in 0..N {
        let t = Instant::now();
        let ok: Option<String> = redis::cmd("SET")
            .arg("floor-probe-raw")
            .arg(i)
            .arg("NX")
            .arg("PX")
            .arg(30000)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ok.is_some());
        let _: i64 = del
            .key("floor-probe-raw")
            .arg(i)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        raw.push(t.elapsed());
    }
    for url in [
        "redis://127.0.0.1:6379?fair=true",
        "redis://127.0.0.1:6379?fair=false",
        "redlock://127.0.0.1:6380,127.0.0.1:6381,127.0.0.1:6382",
    ] {
        let locks = dlock_redis::RedisLock::connect(url).await.unwrap();
        let opts = LockOptions::new();
        let mut ours = Vec::new();
        for _ in 0..N {
            let t = Instant::now();
            let g = locks.try_lock("floor-probe", &opts).await.unwrap().unwrap();
            g.release().await.unwrap();
            ours.push(t.elapsed());
        }
        println!("{url}: dlock {}", pct(ours));
    }
    println!("raw: {}", pct(raw));
}

fn main() {
    for flavor in ["current_thread", "multi_thread"] {
        println!("== {flavor}");
        let rt = if flavor == "current_thread" {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        rt.block_on(run());
    }
}
