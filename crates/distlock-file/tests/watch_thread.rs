//! The file backend's watch thread: one per directory and process, started
//! by the first waiter, ended with the directory's last client. Alone in its test binary, because it counts the threads of
//! its process.

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_file::FileLock;

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("distlock-file-watch-{:016x}", fastrand::u64(..)))
}

/// Threads of this process named like the file backend's watch thread.
fn watch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "distlock-watch")
        .count()
}

/// The first client that has to wait starts the directory's watch thread;
/// later waits, by it or by other clients of the directory, share it; it
/// ends when the clients are dropped.
#[tokio::test(flavor = "current_thread")]
async fn one_watch_thread_per_directory() {
    let dir = temp_dir();
    let (holder, waiter) = (FileLock::open(&dir).unwrap(), FileLock::open(&dir).unwrap());
    let other_waiter = FileLock::open(&dir).unwrap();
    let short = LockOptions::new().wait(Duration::from_millis(30));
    let before = watch_threads();
    let held = holder.try_lock("k", &short).await.unwrap().unwrap();
    let free = waiter.lock("other", &short).await.unwrap();
    free.release().await.unwrap();
    assert_eq!(watch_threads(), before, "no watch while nothing waits");
    for _ in 0..3 {
        assert!(waiter.lock("k", &short).await.is_err());
        assert!(other_waiter.lock("k", &short).await.is_err());
    }
    assert_eq!(watch_threads(), before + 1);
    held.release().await.unwrap();
    drop((holder, waiter, other_waiter));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while watch_threads() != before {
        assert!(
            std::time::Instant::now() < deadline,
            "the watch thread outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::remove_dir_all(dir).unwrap();
}
