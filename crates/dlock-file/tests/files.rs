//! What the file backend leaves on disk, and its fencing counter.

use std::time::Duration;

use dlock_core::{DistributedLock, LockOptions};
use dlock_file::FileLock;

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("dlock-file-files-{:016x}", fastrand::u64(..)))
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Held locks are files named after their keys; released ones leave only
/// the fencing counter behind, even when waiters raced the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_leaves_only_the_counter() {
    let dir = temp_dir();
    let clients: Vec<FileLock> = (0..4).map(|_| FileLock::open(&dir).unwrap()).collect();
    let options =
        LockOptions::new()
            .wait(Duration::from_secs(20))
            .backoff(dlock_core::Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            ));
    let held = clients[0].try_lock("a/b", &options).await.unwrap().unwrap();
    assert_eq!(names(&dir), [".fencing_token", "a%2Fb.lock"]);
    let holder = std::fs::read_to_string(dir.join("a%2Fb.lock")).unwrap();
    assert_eq!(
        holder,
        format!(
            "pid={} fencing_token={}\n",
            std::process::id(),
            held.fencing_token()
        )
    );
    held.release().await.unwrap();
    let mut tasks = Vec::new();
    for client in clients {
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..50 {
                let guard = client
                    .lock(&format!("k{}", round % 3), &options)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(names(&dir), [".fencing_token"]);
    let counter = std::fs::read_to_string(dir.join(".fencing_token")).unwrap();
    assert_eq!(counter.trim().parse::<u64>().unwrap(), 1 + 4 * 50);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A waiter wakes on the release (inotify), not on its next poll: with a
/// 10 s backoff it still gets the lock right after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_wakes_on_release() {
    let dir = temp_dir();
    let (holder, waiter) = (FileLock::open(&dir).unwrap(), FileLock::open(&dir).unwrap());
    let slow_polls = LockOptions::new().wait(Duration::from_secs(8)).backoff(
        dlock_core::Backoff::new(Duration::from_secs(10), Duration::from_secs(10)).jitter(0.0),
    );
    let held = holder.try_lock("k", &slow_polls).await.unwrap().unwrap();
    let waiting = tokio::spawn(async move {
        let guard = waiter.lock("k", &slow_polls).await;
        (guard, std::time::Instant::now())
    });
    // Let the waiter make its first attempt and start waiting; nothing
    // observable from outside says it has.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released_at = std::time::Instant::now();
    held.release().await.unwrap();
    let (guard, acquired_at) = waiting.await.unwrap();
    let guard = guard.expect("the waiter got the lock");
    let handoff = acquired_at - released_at;
    assert!(handoff < Duration::from_secs(2), "handoff took {handoff:?}");
    guard.release().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
