//! What the file backend leaves on disk, and its fencing counter.

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_file::FileLock;

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("distlock-file-files-{:016x}", fastrand::u64(..)))
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Held locks are (empty) files named after their keys, flocked by the
/// holder; released ones leave only the fencing counter behind, even when
/// waiters raced the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_leaves_only_the_counter() {
    let dir = temp_dir();
    let clients: Vec<FileLock> = (0..4).map(|_| FileLock::open(&dir).unwrap()).collect();
    let options =
        LockOptions::new()
            .wait(Duration::from_secs(20))
            .backoff(distlock_core::Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            ));
    let held = clients[0].try_lock("a/b", &options).await.unwrap().unwrap();
    assert_eq!(names(&dir), [".fencing_token", "a%2Fb.lock"]);
    // Who holds it is the kernel's to say (what `lslocks` reads): an
    // exclusive flock by this process on the file's inode.
    let inode =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.join("a%2Fb.lock")).unwrap());
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let pid = std::process::id().to_string();
    assert!(
        locks.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&"FLOCK")
                && fields.get(3) == Some(&"WRITE")
                && fields.get(4) == Some(&pid.as_str())
                && fields
                    .get(5)
                    .is_some_and(|id| id.rsplit(':').next() == Some(inode.to_string().as_str()))
        }),
        "no flock by pid {pid} on inode {inode} in /proc/locks:\n{locks}"
    );
    let mut tokens = vec![held.fencing_token()];
    held.release().await.unwrap();
    let mut tasks = Vec::new();
    for client in clients {
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for round in 0..50 {
                let guard = client
                    .lock(&format!("k{}", round % 3), &options)
                    .await
                    .unwrap();
                tokens.push(guard.fencing_token());
                tokio::task::yield_now().await;
                guard.release().await.unwrap();
            }
            tokens
        }));
    }
    for task in tasks {
        tokens.extend(task.await.unwrap());
    }
    assert_eq!(names(&dir), [".fencing_token"]);
    // Every grant took its own token from the counter, which keeps the
    // last one.
    let counter = std::fs::read_to_string(dir.join(".fencing_token")).unwrap();
    let last = tokens.iter().copied().max().unwrap();
    assert_eq!(counter.trim().parse::<u64>().unwrap(), last);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 1 + 4 * 50, "a token was given twice");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A waiter wakes on the release (inotify), not on its next poll: with a
/// 10 s backoff it still gets the lock right after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_wakes_on_release() {
    let dir = temp_dir();
    let (holder, waiter) = (FileLock::open(&dir).unwrap(), FileLock::open(&dir).unwrap());
    let slow_polls = LockOptions::new().wait(Duration::from_secs(8)).backoff(
        distlock_core::Backoff::new(Duration::from_secs(10), Duration::from_secs(10)).jitter(0.0),
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

/// A waiter whose acquire is dropped (its wait elapsed) leaves nothing
/// that stops the client's other waiters from waking on the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiter_does_not_stop_the_wakeup_of_others() {
    let dir = temp_dir();
    let holder = FileLock::open(&dir).unwrap();
    // One client for both waiters: they share its watch.
    let waiters = FileLock::open(&dir).unwrap();
    let slow_polls = |wait| {
        LockOptions::new().wait(wait).backoff(
            distlock_core::Backoff::new(Duration::from_secs(10), Duration::from_secs(10))
                .jitter(0.0),
        )
    };
    let held = holder
        .try_lock("k", &slow_polls(Duration::from_secs(1)))
        .await
        .unwrap()
        .unwrap();
    let patient = tokio::spawn({
        let waiters = waiters.clone();
        async move { waiters.lock("k", &slow_polls(Duration::from_secs(8))).await }
    });
    let impatient = waiters
        .lock("k", &slow_polls(Duration::from_millis(100)))
        .await;
    assert!(
        impatient.is_err(),
        "the lock is held: the short wait elapses"
    );
    let released_at = std::time::Instant::now();
    held.release().await.unwrap();
    let guard = patient
        .await
        .unwrap()
        .expect("the patient waiter got the lock");
    let handoff = released_at.elapsed();
    assert!(handoff < Duration::from_secs(2), "handoff took {handoff:?}");
    guard.release().await.unwrap();
    assert_eq!(names(&dir), [".fencing_token"]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// While another client increments the fencing counter, an acquire waits
/// for it (off the runtime's thread) and then gets a larger token.
#[tokio::test(flavor = "current_thread")]
async fn acquire_waits_for_a_busy_counter() {
    let dir = temp_dir();
    let client = FileLock::open(&dir).unwrap();
    let options = LockOptions::new().wait(Duration::from_secs(5));
    let first = client.try_lock("a", &options).await.unwrap().unwrap();
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    // Someone else's increment in progress: their own file description.
    let counter = std::fs::File::options()
        .read(true)
        .write(true)
        .open(dir.join(".fencing_token"))
        .unwrap();
    counter.lock().unwrap();
    let attempt = tokio::spawn({
        let client = client.clone();
        let options = options.clone();
        async move { client.try_lock("b", &options).await }
    });
    // The runtime stays free while the attempt waits on its blocking
    // thread: this task runs, and the attempt has not finished.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!attempt.is_finished(), "the counter is locked");
    counter.unlock().unwrap();
    let second = attempt.await.unwrap().unwrap().expect("b is free");
    assert!(second.fencing_token() > first_token);
    second.release().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A held lock's file deleted or replaced by hand (a rename onto its name)
/// fires `lost()` with `NotHeld` at the renewal's next check (every
/// `ttl / 3`, 100 ms here), and the release then deletes nothing.
#[tokio::test]
async fn deleted_or_replaced_lock_file_is_lost_at_the_next_check() {
    let dir = temp_dir();
    let client = FileLock::open(&dir).unwrap();
    let options = LockOptions::new().ttl(Duration::from_millis(300));
    let within = Duration::from_secs(10);

    let deleted = client.try_lock("deleted", &options).await.unwrap().unwrap();
    std::fs::remove_file(client.lock_path("deleted")).unwrap();
    let reason = tokio::time::timeout(within, deleted.lost())
        .await
        .expect("lost() fires after the delete");
    assert_eq!(reason, distlock_core::LostReason::NotHeld);
    assert!(!deleted.is_held());
    assert!(deleted.release().await.unwrap_err().is_not_held());

    let replaced = client
        .try_lock("replaced", &options)
        .await
        .unwrap()
        .unwrap();
    let impostor = dir.join("impostor");
    std::fs::write(&impostor, b"").unwrap();
    std::fs::rename(&impostor, client.lock_path("replaced")).unwrap();
    let reason = tokio::time::timeout(within, replaced.lost())
        .await
        .expect("lost() fires after the rename");
    assert_eq!(reason, distlock_core::LostReason::NotHeld);
    // The release must not delete a file it does not hold.
    assert!(replaced.release().await.unwrap_err().is_not_held());
    assert!(client.lock_path("replaced").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A counter that lost its last increments (a host crash: it is not
/// synced to disk) still gives tokens above those issued before, from the
/// clock.
#[tokio::test(flavor = "current_thread")]
async fn tokens_keep_growing_when_the_counter_loses_its_increments() {
    let dir = temp_dir();
    let client = FileLock::open(&dir).unwrap();
    let first = client
        .try_lock("a", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    // What the disk may hold after a crash: an older value.
    std::fs::write(dir.join(".fencing_token"), "0\n").unwrap();
    let second = client
        .try_lock("a", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert!(
        second.fencing_token() > first_token,
        "{} after {first_token}",
        second.fencing_token()
    );
    second.release().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
