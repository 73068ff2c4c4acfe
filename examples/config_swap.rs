//! The config swap: one program, any backend, chosen by configuration.
//!
//! The code below never names a backend. The lock service comes from a
//! URL, here inside a JSON config block parsed into `distlock::LockConfig`
//! (the same struct deserializes from TOML or YAML with their serde
//! crates). Moving from a local file lock to Redis, ZooKeeper or etcd is a
//! configuration change:
//!
//! ```text
//! cargo run -p distlock-examples --example config_swap                                   # memory:// (no server)
//! DISTLOCK_URL=file:///tmp/distlock-locks cargo run -p distlock-examples --example config_swap
//! DISTLOCK_URL=redis://127.0.0.1:6379 cargo run -p distlock-examples --example config_swap
//! DISTLOCK_URL=zk://127.0.0.1:2181/myapp cargo run -p distlock-examples --example config_swap
//! DISTLOCK_URL=etcd://127.0.0.1:2379/myapp cargo run -p distlock-examples --features etcd --example config_swap
//! ```

use distlock::LockConfig;

/// What a service would keep in its config file.
const CONFIG: &str = r#"{
    "url": "memory://",
    "ttl": "15s",
    "wait": "5s",
    "auto_renew": true
}"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config: LockConfig = serde_json::from_str(CONFIG)?;
    // Deployments override the URL from the environment.
    if let Ok(url) = std::env::var(distlock::URL_ENV) {
        config.url = url;
    }

    let locks = config.connect().await?;
    let options = config.options();
    let capabilities = locks.capabilities();
    println!(
        "connected to {} (backend `{}`): fair={}, session_based={}, ttl_expiry={}, cross_process={}",
        locks.url(),
        locks.backend(),
        capabilities.fair,
        capabilities.session_based,
        capabilities.ttl_expiry,
        capabilities.cross_process,
    );

    // The same program on every backend: take the lock twice in a row and
    // watch the fencing token grow.
    let mut last_token = 0;
    for round in 1..=2 {
        let guard = locks.lock("config-swap/nightly-report", &options).await?;
        let token = guard.fencing_token();
        println!(
            "round {round}: holding {:?} with fencing token {token}",
            guard.key()
        );
        assert!(token > last_token, "fencing tokens only grow");
        last_token = token;
        guard.release().await?;
    }
    println!("done");
    Ok(())
}
