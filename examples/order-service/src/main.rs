//! `order-service`: an example HTTP service that runs as several replicas.
//! `POST /order {"item_name": "item1", "quantity": 1}` decrements the
//! item's stock under a distlock lock (`<prefix>/stock/<item>`), and the
//! write carries the lock's fencing token, which the shared store (Redis)
//! checks: a write from a replica whose lock has ended is refused.
//!
//! Answers: 200 with the remaining stock, 409 out of stock, 400 bad
//! input, 404 unknown item, 503 when the lock cannot be had within
//! `--lock-wait` (or the store refused a stale write). See README.md.

mod orders;
mod store;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use distlock::LockOptions;

/// An order service whose replicas share one stock under distlock locks.
#[derive(Parser, Debug)]
#[command(name = "order-service")]
struct Args {
    /// Where this replica listens; port 0 picks a free port (the address
    /// is printed on stdout).
    #[arg(long, env = "ORDER_SERVICE_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// The lock service: `distlock serve` (http://), or any distlock URL.
    #[arg(long, env = "DISTLOCK_URL", default_value = "http://127.0.0.1:8181")]
    lock_url: String,
    /// The shared stock store (Redis).
    #[arg(
        long,
        env = "ORDER_STORE_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    store_url: String,
    /// Namespace of the lock keys (`<prefix>/stock/<item>`) and store keys
    /// (`<prefix>:stock:<item>`).
    #[arg(long, env = "ORDER_SERVICE_PREFIX", default_value = "order-service")]
    prefix: String,
    /// How long an order waits for its item's lock before a 503.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lock_wait: Duration,
    /// The lock's TTL (renewed while an order is handled).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lock_ttl: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("order-service: cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> ExitCode {
    let options = LockOptions::new().ttl(args.lock_ttl).wait(args.lock_wait);
    if let Err(err) = options.validate() {
        eprintln!("order-service: {err}");
        return ExitCode::from(64);
    }
    let locks = match distlock::connect(&args.lock_url).await {
        Ok(locks) => locks,
        Err(err) => {
            eprintln!(
                "order-service: lock service: {}",
                distlock::error::describe(&err)
            );
            return ExitCode::from(69);
        }
    };
    let store = match store::Store::connect(&args.store_url, &args.prefix).await {
        Ok(store) => store,
        Err(err) => {
            eprintln!("order-service: {err}");
            return ExitCode::from(69);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("order-service: cannot listen on {}: {err}", args.listen);
            return ExitCode::from(69);
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    let app = Arc::new(orders::App {
        locks,
        options,
        prefix: args.prefix,
        store,
        replica: addr.to_string(),
    });
    // Tests and scripts read this line to learn the port.
    println!(
        "order-service: listening on http://{addr} (locks {}, store {})",
        app.locks.url(),
        distlock::error::redact_url(&args.store_url)
    );
    let served = axum::serve(listener, orders::router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("order-service: {err}");
            ExitCode::from(69)
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
