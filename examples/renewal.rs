//! A long job under a short lease: automatic renewal keeps the lock while
//! the job runs, and the job stops as soon as `lost()` fires.
//!
//! The lease TTL is 1 s and the job takes several seconds: the guard
//! renews the lease in the background (about every ttl/3). The job runs
//! in steps inside a `select!` with `guard.lost()`, so if the lock is lost
//! (server unreachable past the deadline, session expired, key deleted)
//! the job stops before its next step instead of working on without the
//! lock. The second job shows that branch: on `memory://` the example
//! takes the lock away mid-job as a fault would; on a server, stop it
//! (`kill -STOP`) or delete the lock while a long job runs
//! (`JOB_SECS=60`).
//!
//! ```text
//! cargo run -p distlock-examples --example renewal                                   # memory:// (no server)
//! DISTLOCK_URL=etcd://127.0.0.1:2379/myapp JOB_SECS=60 cargo run -p distlock-examples --features etcd --example renewal
//! ```

use std::time::Duration;

use distlock::{LockGuard, LockOptions, LostReason};

/// Runs `steps` steps of work while the lock is held; stops at the first
/// sign of loss. Returns how many steps ran.
async fn run_job(guard: &LockGuard, steps: u32) -> Result<u32, (u32, LostReason)> {
    let lost = guard.lost();
    tokio::pin!(lost);
    for step in 0..steps {
        tokio::select! {
            // `biased`: check for loss before starting each step.
            biased;
            reason = &mut lost => return Err((step, reason)),
            () = work(step) => {}
        }
        // Whatever a step writes should carry guard.fencing_token() (see
        // the fencing example), since a loss can land mid-step.
    }
    Ok(steps)
}

async fn work(_step: u32) {
    tokio::time::sleep(Duration::from_millis(250)).await;
}

#[tokio::main]
async fn main() -> distlock::Result<()> {
    let url = std::env::var(distlock::URL_ENV).unwrap_or_else(|_| "memory://".to_owned());
    let job_secs: u32 = std::env::var("JOB_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(3);
    let locks = distlock::connect(&url).await?;
    let options = LockOptions::new()
        .ttl(Duration::from_secs(1))
        .auto_renew(true)
        .wait(Duration::from_secs(5));

    // Job 1: runs several TTLs long; renewal keeps the lock.
    let guard = locks.lock("renewal/compaction", &options).await?;
    println!(
        "job 1: holding {:?} (fencing token {}) with a {:?} lease for a {job_secs} s job",
        guard.key(),
        guard.fencing_token(),
        options.ttl,
    );
    match run_job(&guard, job_secs * 4).await {
        Ok(steps) => println!(
            "job 1: finished all {steps} steps, lock still held: {}",
            guard.is_held()
        ),
        Err((step, reason)) => println!("job 1: stopped at step {step}: {reason}"),
    }
    guard.release().await?;

    // Job 2: the lock is lost mid-job and the job stops.
    let guard = locks.lock("renewal/compaction", &options).await?;
    if let Some(name) = url.strip_prefix("memory://") {
        // The in-process backend can take a lock away as a fault would.
        let store = distlock::memory::MemoryLock::named(name.trim_end_matches('/'));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            store.revoke("renewal/compaction");
        });
    } else {
        println!("job 2: stop the server or delete the lock now to see the job stop");
    }
    match run_job(&guard, job_secs * 4).await {
        Ok(steps) => println!("job 2: finished all {steps} steps"),
        Err((step, reason)) => {
            println!("job 2: lock lost at step {step} ({reason}); stopped without finishing")
        }
    }
    // Releasing a lost lock reports NotHeld; that is expected here.
    match guard.release().await {
        Ok(()) => println!("released"),
        Err(err) if err.is_not_held() => println!("release: {err}"),
        Err(err) => return Err(err),
    }
    Ok(())
}
