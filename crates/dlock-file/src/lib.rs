//! Local-file backend of dlock (`file:///some/dir`): locks shared by the
//! processes of one host, held with OS advisory locks (`flock(2)`).
//!
//! - One lock file per key in the directory, named with
//!   [`dlock_core::key::encode_component`] (any key is safe, long keys are
//!   hashed) plus `.lock`. Holding the lock means holding an exclusive
//!   `flock` on that file; the OS drops it when the holder's process dies,
//!   so a crashed holder frees the lock at once.
//! - Release deletes the lock file, so nothing is left behind. A waiter that
//!   locked a file just before it was deleted would hold a lock on a
//!   nameless inode; after locking, every acquirer checks that the path
//!   still names the inode it locked (device and inode number), else it
//!   starts over.
//! - Fencing tokens come from one counter file for the whole directory
//!   (`.fencing_token`), incremented under its own `flock` while the key's
//!   lock is held: tokens are strictly increasing per key (and across keys)
//!   and survive the lock files' deletion.
//! - Waiting: `flock` has no asynchronous wait (and a blocking `flock` on a
//!   helper thread could not be cancelled), so a waiter retries when an
//!   inotify watch on the directory reports the lock file's deletion (a
//!   release), and otherwise with the options' backoff (a holder that died
//!   leaves its file behind, unlocked). Not fair: any waiter may win. Like
//!   the network backends, it needs a tokio runtime with I/O and time
//!   enabled.
//! - An OS lock has no TTL: the lock lives as long as the holder's process
//!   (capability `ttl_expiry = false`, `session_based = true`). With
//!   `auto_renew`, the core checks every `ttl / 3` that the lock file is
//!   still the one this holder locked; if someone deleted or replaced it,
//!   `lost()` fires.
//! - Each [`FileLock`] opens its own file descriptions, so two `FileLock`s
//!   in one process exclude each other like two processes do.
//!
//! ```no_run
//! use std::time::Duration;
//! use dlock_core::{DistributedLock, LockOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dlock_core::Result<()> {
//! let locks = dlock_file::FileLock::open("/var/lock/myapp")?;
//! let options = LockOptions::new().wait(Duration::from_secs(5));
//! let guard = locks.lock("nightly-report", &options).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::key::encode_component;
use dlock_core::{
    Capabilities, DistributedLock, Error, HeldLock, Lease, LockBackend, LockGuard, LockOptions,
    Result,
};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

const BACKEND: &str = "file";

/// Longest encoded key used as a file name (plus `.lock`), well under the
/// usual 255-byte limit.
const MAX_NAME: usize = 200;

/// The counter file's name: encoded keys never start with a dot.
const COUNTER_FILE: &str = ".fencing_token";

/// Width of the zero-padded decimal counter, so each update overwrites the
/// same bytes in one write.
const COUNTER_WIDTH: usize = 20;

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
    /// The fencing counter. The mutex orders this client's own tasks (they
    /// share one file description, which `flock` does not exclude from
    /// itself); the `flock` orders clients and processes.
    counter: Mutex<File>,
}

impl FileLock {
    /// Uses `dir` for lock files, creating it if missing.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let endpoint = dir.display().to_string();
        fs::create_dir_all(&dir).map_err(|err| Error::connection(BACKEND, &endpoint, err))?;
        let counter = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(dir.join(COUNTER_FILE))
            .map_err(|err| Error::connection(BACKEND, &endpoint, err))?;
        Ok(FileLock {
            inner: Arc::new(Inner {
                dir,
                counter: Mutex::new(counter),
            }),
        })
    }

    /// Parses `file:///some/dir` (an empty host or `localhost`) and opens
    /// that directory.
    pub fn from_url(url: &str) -> Result<Self> {
        let redacted = dlock_core::error::redact_url(url);
        let parsed = url::Url::parse(url)
            .map_err(|err| Error::invalid_url(&redacted, format!("not a URL: {err}")))?;
        if parsed.scheme() != "file" {
            return Err(Error::invalid_url(
                &redacted,
                "expected file:///absolute/directory",
            ));
        }
        match parsed.host_str() {
            None | Some("") | Some("localhost") => {}
            Some(host) => {
                return Err(Error::invalid_url(
                    &redacted,
                    format!("file locks are local: the host must be empty or localhost, not `{host}` (write file:///dir)"),
                ))
            }
        }
        let dir = parsed.to_file_path().map_err(|()| {
            Error::invalid_url(&redacted, "expected an absolute directory, file:///dir")
        })?;
        if dir.as_os_str().is_empty() || dir == Path::new("/") {
            return Err(Error::invalid_url(
                &redacted,
                "name a directory for the lock files, e.g. file:///tmp/dlock",
            ));
        }
        Self::open(dir)
    }

    /// The directory holding the lock files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The path of `key`'s lock file (it exists only while the lock is held
    /// or being taken).
    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.inner
            .dir
            .join(format!("{}.lock", encode_component(key, MAX_NAME)))
    }

    fn endpoint(&self) -> String {
        self.inner.dir.display().to_string()
    }

    /// One attempt, on a blocking thread (a few syscalls, plus a short wait
    /// on the counter's lock). If the future is dropped, the thread still
    /// finishes and its result, the locked file, is dropped, which unlocks
    /// it: nothing is left behind.
    async fn attempt(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        let this = self.clone();
        let owned_key = key.to_owned();
        let taken = tokio::task::spawn_blocking(move || this.attempt_blocking(&owned_key))
            .await
            .map_err(|err| Error::backend(BACKEND, self.endpoint(), "acquire", key, err))??;
        let Some((file, identity, fencing_token)) = taken else {
            return Ok(None);
        };
        tracing::debug!(fencing_token, "acquired");
        let lease = Lease::new(key, fencing_token, options.ttl, None);
        let held = Arc::new(HeldFile {
            key: key.to_owned(),
            path: self.lock_path(key),
            identity,
            endpoint: self.endpoint(),
            file: Mutex::new(Some(file)),
        });
        Ok(Some(LockGuard::new(
            BACKEND,
            lease,
            held,
            options.auto_renew,
        )))
    }

    fn attempt_blocking(&self, key: &str) -> Result<Option<(Flock<File>, Identity, u64)>> {
        let path = self.lock_path(key);
        let fail = |operation: &'static str, err: std::io::Error| {
            Error::backend(BACKEND, self.endpoint(), operation, key, err)
        };
        // A few rounds at most: each retry means a holder released (and
        // deleted the file) between our open and our lock.
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .map_err(|err| fail("open lock file", err))?;
            let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, errno)) => return Err(fail("flock", errno.into())),
            };
            let identity = Identity::of(&locked.metadata().map_err(|err| fail("fstat", err))?);
            match Identity::at(&path).map_err(|err| fail("stat", err))? {
                Some(current) if current == identity => {}
                // The holder we waited behind deleted it; what we locked is
                // no longer the lock. Drop it and start over.
                _ => continue,
            }
            let fencing_token = self
                .next_fencing_token()
                .map_err(|err| fail("fencing counter", err))?;
            // For operators: who holds it. Not needed for correctness.
            let note = format!("pid={} fencing_token={fencing_token}\n", std::process::id());
            let written = locked
                .set_len(0)
                .and_then(|()| locked.seek(SeekFrom::Start(0)))
                .and_then(|_| locked.write_all(note.as_bytes()));
            if let Err(err) = written {
                tracing::debug!(error = %err, "could not note the holder in the lock file");
            }
            return Ok(Some((locked, identity, fencing_token)));
        }
    }

    /// Increments the directory's counter under its own lock.
    fn next_fencing_token(&self) -> std::io::Result<u64> {
        let counter = self
            .inner
            .counter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A duplicate descriptor of the same open file description: the
        // `Flock` unlocks it when dropped.
        let locked = Flock::lock(counter.try_clone()?, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let mut text = String::new();
        (&*locked).seek(SeekFrom::Start(0))?;
        (&*locked).read_to_string(&mut text)?;
        let last: u64 = match text.trim() {
            "" => 0,
            digits => digits.parse().map_err(|_| {
                std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("the fencing counter file holds {digits:?}, not a number"),
                )
            })?,
        };
        let next = last.checked_add(1).ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidData, "the fencing counter overflowed")
        })?;
        // Fixed width: the new value overwrites the old in one write.
        let line = format!("{next:0width$}\n", width = COUNTER_WIDTH);
        (&*locked).seek(SeekFrom::Start(0))?;
        (&*locked).write_all(line.as_bytes())?;
        drop(locked);
        Ok(next)
    }
}

/// Connects to the service named by `url` (`file:///some/dir`).
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(FileLock::from_url(url)?))
}

#[async_trait]
impl LockBackend for FileLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fair: false,
            session_based: true,
            ttl_expiry: false,
            strict_fencing: true,
            cross_process: true,
        }
    }

    async fn try_acquire(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.attempt(key, options).await
    }

    async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        // Watch for the lock file's deletion (a release) before the first
        // attempt, so a release between attempt and wait is not missed. A
        // holder that dies leaves its file: the backoff timer covers that.
        let name = format!("{}.lock", encode_component(key, MAX_NAME));
        let mut watch = match DeleteWatch::new(&self.inner.dir, &name) {
            Ok(watch) => Some(watch),
            Err(err) => {
                tracing::debug!(error = %err, "no inotify watch; polling only");
                None
            }
        };
        let mut delays = options.backoff.delays();
        // Each attempt is self-contained and the watch is closed on drop,
        // so dropping this future leaves no lock and no waiter record.
        loop {
            if let Some(guard) = self.attempt(key, options).await? {
                return Ok(guard);
            }
            let delay = delays.next().unwrap_or(Duration::from_millis(100));
            match &mut watch {
                Some(active) => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        deleted = active.deleted() => if let Err(err) = deleted {
                            tracing::debug!(error = %err, "inotify watch failed; polling only");
                            watch = None;
                        }
                    }
                }
                None => tokio::time::sleep(delay).await,
            }
        }
    }
}

/// Wakes a waiter when a lock file is deleted, i.e. released (Linux
/// inotify on the directory).
struct DeleteWatch {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
    name: std::ffi::OsString,
}

struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl DeleteWatch {
    fn new(dir: &Path, name: &str) -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(dir, AddWatchFlags::IN_DELETE)?;
        // SAFETY: the `Inotify` owns its descriptor, which stays open and
        // the same until the `AsyncFd` (and the `Inotify` in it) is dropped.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(inotify)) }
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        Ok(DeleteWatch {
            fd,
            name: name.into(),
        })
    }

    /// Resolves when our lock file was deleted (or events were dropped).
    async fn deleted(&mut self) -> std::io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => {
                    if events.iter().any(|event| {
                        event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                            || event.name.as_deref() == Some(self.name.as_os_str())
                    }) {
                        return Ok(());
                    }
                }
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
    }
}

/// Which file a path names: device and inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(metadata: &fs::Metadata) -> Self {
        Identity {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }

    /// The file `path` names now, `None` if it is gone.
    fn at(path: &Path) -> std::io::Result<Option<Self>> {
        match fs::metadata(path) {
            Ok(metadata) => Ok(Some(Identity::of(&metadata))),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// One held lock: the locked file and the identity the path must keep.
struct HeldFile {
    key: String,
    path: PathBuf,
    identity: Identity,
    endpoint: String,
    file: Mutex<Option<Flock<File>>>,
}

impl HeldFile {
    fn still_ours(&self) -> Result<bool> {
        Identity::at(&self.path)
            .map(|current| current == Some(self.identity))
            .map_err(|err| Error::backend(BACKEND, &self.endpoint, "stat", &self.key, err))
    }
}

#[async_trait]
impl HeldLock for HeldFile {
    async fn release(&self) -> Result<()> {
        let Some(file) = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        else {
            return Err(Error::not_held(&self.key));
        };
        // Only the holder of the flock on the inode the path names deletes
        // the path, so this never deletes another holder's file (unless
        // someone outside dlock replaces files under us).
        let ours = self.still_ours();
        let outcome = match ours {
            Ok(true) => match fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == ErrorKind::NotFound => Err(Error::not_held(&self.key)),
                Err(err) => {
                    // Left in place it is harmless: the next holder locks it.
                    tracing::debug!(error = %err, "could not delete the lock file");
                    Ok(())
                }
            },
            Ok(false) => Err(Error::not_held(&self.key)),
            Err(err) => Err(err),
        };
        // Closing unlocks; waiters that opened the deleted inode notice and
        // start over.
        drop(file);
        outcome
    }

    async fn extend(&self, _ttl: Duration) -> Result<()> {
        // Nothing expires; check that the lock file is still the one we
        // locked (an operator or a fault may have deleted it).
        let held = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some();
        if held && self.still_ours()? {
            Ok(())
        } else {
            Err(Error::not_held(&self.key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_local_directory() {
        let dir = std::env::temp_dir().join(format!("dlock-file-url-{}", fastrand::u64(..)));
        let url = format!("file://{}", dir.display());
        let locks = FileLock::from_url(&url).expect("file URL");
        assert_eq!(locks.dir(), dir);
        assert!(dir.join(COUNTER_FILE).exists());
        for bad in ["file://otherhost/tmp/x", "file:///", "redis://x", "file:"] {
            let err = FileLock::from_url(bad).expect_err(bad);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err}");
        }
        fs::remove_dir_all(dir).unwrap();
    }
}
