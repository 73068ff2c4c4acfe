//! Local-file backend of distlock: locks shared by the processes of one
//! host, held with OS advisory locks (`flock(2)`) on one file per key.
//!
//! **URL:** `file:///some/dir` (the host empty or `localhost`); the
//! directory is created if missing and takes no options. In code:
//! [`FileLock::connect`], [`FileLock::with_config`] with a [`FileConfig`],
//! or [`FileLock::open`]`(dir)`.
//!
//! **What it promises:**
//! - A holder whose process dies loses the lock at once: the OS drops its
//!   `flock`. There is no TTL (capabilities `ttl_expiry = false`,
//!   `session_based = true`); with `auto_renew`, every `ttl / 3` the holder
//!   checks that its lock file is still the one it locked, and `lost()`
//!   fires if someone deleted or replaced it. The directory belongs to
//!   distlock: nothing else should rename or delete files in it.
//! - Release deletes the lock file: nothing is left behind but the
//!   fencing counter.
//! - Not fair: on a release every waiter retries and any may win.
//! - Each [`FileLock`] opens its own file descriptions, so two `FileLock`s
//!   in one process exclude each other like two processes do.
//! - It needs a tokio runtime with I/O and time enabled.
//!
//! **Fencing tokens** come from one counter file per directory
//! (`.fencing_token`), incremented under its own `flock` by every grant:
//! strictly increasing per key and across keys. A token is the larger of
//! the last one plus one and the system clock in microseconds, so tokens
//! stay above those issued before a host crash (which may lose the
//! counter's last, unsynced, increments) as long as the clock does not go
//! back across the reboot.
//!
//! ```no_run
//! use std::time::Duration;
//! use distlock_core::{DistributedLock, LockOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> distlock_core::Result<()> {
//! let locks = distlock_file::FileLock::connect("file:///var/lock/myapp").await?;
//! let options = LockOptions::new().wait(Duration::from_secs(5));
//! let guard = locks.lock("nightly-report", &options).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod acquire;
mod config;
mod counter;
mod held;
mod watch;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use distlock_core::backend::{self, RenewalScheduler};
use distlock_core::{Capabilities, DistributedLock, Error, LockGuard, LockOptions, Result};

pub use config::FileConfig;
use counter::FencingCounter;
use watch::DirWatch;

const BACKEND: &str = "file";

/// A lock service over a directory of lock files. Cheap to clone; clones
/// share the counter file's handle but every acquisition opens its own lock
/// file description.
#[derive(Clone, Debug)]
pub struct FileLock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Starts a held lock's ownership check once it is due (most locks
    /// are released sooner).
    renewals: RenewalScheduler,
    /// The directory as errors name it.
    endpoint: Arc<str>,
    /// The directory's fencing counter.
    counter: FencingCounter,
    /// The process's inotify watch on the directory, shared with the
    /// process's other clients of it, taken by the first acquire that has
    /// to wait (waiters poll when inotify is unavailable).
    watch: DirWatch,
}

impl FileLock {
    /// Parses `file:///some/dir` (see [`FileConfig::from_url`]) and opens
    /// that directory. Async only for uniformity with the other backends:
    /// opening is a few local system calls.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open_config(FileConfig::from_url(url)?)
    }

    /// Uses `config.dir` for lock files, creating it if missing. Async,
    /// like every backend's `with_config`; [`open`](Self::open) is the
    /// synchronous shorthand.
    pub async fn with_config(config: FileConfig) -> Result<Self> {
        Self::open_config(config)
    }

    fn open_config(config: FileConfig) -> Result<Self> {
        config.validate()?;
        let FileConfig { dir } = config;
        let endpoint = dir.display().to_string();
        fs::create_dir_all(&dir).map_err(|err| Error::connection(BACKEND, &endpoint, err))?;
        let counter =
            FencingCounter::open(&dir).map_err(|err| Error::connection(BACKEND, &endpoint, err))?;
        Ok(FileLock {
            inner: Arc::new(Inner {
                renewals: RenewalScheduler::new(),
                endpoint: endpoint.into(),
                dir,
                counter,
                watch: DirWatch::default(),
            }),
        })
    }

    /// Uses `dir` for lock files, creating it if missing: shorthand for
    /// `with_config(FileConfig::new(dir))`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_config(FileConfig::new(dir.as_ref()))
    }

    /// The directory holding the lock files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The path of `key`'s lock file (it exists only while the lock is held
    /// or being taken).
    pub fn lock_path(&self, key: &str) -> PathBuf {
        let name = acquire::lock_file_name(key);
        let mut path = PathBuf::with_capacity(self.inner.dir.as_os_str().len() + 1 + name.len());
        path.push(&self.inner.dir);
        path.push(name);
        path
    }
}

/// Connects to the service named by `url` (`file:///some/dir`).
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(FileLock::connect(url).await?))
}

#[async_trait]
impl backend::LockBackend for FileLock {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fair: false,
            session_based: true,
            ttl_expiry: false,
            strict_fencing: true,
            cross_process: true,
            resumable: false,
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.attempt(key, options).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        self.acquire(key, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_opens_the_url_directory() {
        let dir = std::env::temp_dir().join(format!("distlock-file-url-{}", fastrand::u64(..)));
        let url = format!("file://{}", dir.display());
        let locks = FileLock::connect(&url).await.expect("file URL");
        assert_eq!(locks.dir(), dir);
        assert!(dir.join(counter::COUNTER_FILE).exists());
        for bad in ["file://otherhost/tmp/x", "file:///", "redis://x", "file:"] {
            let err = FileLock::connect(bad).await.expect_err(bad);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err}");
        }
        fs::remove_dir_all(dir).unwrap();
    }
}
