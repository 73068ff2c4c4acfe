//! The file backend passes the conformance suite: every client is its own
//! `FileLock` on one temporary directory per test.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use distlock_file::FileLock;
use distlock_testkit::Harness;

/// A fresh directory under the system temp dir, removed when the test's
/// harness (which owns it through its connect closure) is dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        TempDir(std::env::temp_dir().join(format!(
            "distlock-file-conformance-{:016x}",
            fastrand::u64(..)
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn harness() -> Option<Harness> {
    let dir = Arc::new(TempDir::new());
    let fault_dir = dir.0.clone();
    Some(
        Harness::new("file", move || {
            let dir = dir.clone();
            async move { Ok(Arc::new(FileLock::open(&dir.0)?) as _) }
        })
        // A fault: someone deletes the holder's lock file. The holder's
        // ownership check (run by the core's renewal) notices.
        .with_fault(move |key| {
            let path = FileLock::open(&fault_dir).expect("open").lock_path(&key);
            async move {
                std::fs::remove_file(&path)
                    .unwrap_or_else(|err| panic!("deleting {}: {err}", path.display()));
            }
        })
        .with_short_ttl(Duration::from_millis(300)),
    )
}

distlock_testkit::conformance_tests!(harness());
