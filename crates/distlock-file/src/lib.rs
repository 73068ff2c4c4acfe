//! Local-file backend of distlock (`file:///some/dir`): locks shared by the
//! processes of one host, held with OS advisory locks (`flock(2)`).
//!
//! - One lock file per key in the directory, named with
//!   [`distlock_core::backend::key::encode_component`] (any key is safe, long keys are
//!   hashed) plus `.lock`. Holding the lock means holding an exclusive
//!   `flock` on that file; the OS drops it when the holder's process dies,
//!   so a crashed holder frees the lock at once. The file stays empty;
//!   `lslocks` names the holder's process.
//! - Release deletes the lock file, so nothing is left behind. A waiter that
//!   locked a file just before it was deleted would hold a lock on a
//!   nameless inode; after locking, every acquirer checks that the inode
//!   it locked still has a link (a release unlinks only while it still
//!   holds the flock, so a linked, locked inode is the one the path
//!   names), else it starts over. The directory belongs to distlock: a lock
//!   file deleted or replaced by hand is noticed by the holder's renewal
//!   (`lost()`), but acquirers assume nobody renames lock files.
//! - Fencing tokens come from one counter file for the whole directory
//!   (`.fencing_token`), incremented under its own `flock` while the key's
//!   lock is held: tokens are strictly increasing per key (and across keys)
//!   and survive the lock files' deletion. A token is the larger of the
//!   last one plus one and the system clock in microseconds since the
//!   epoch. The counter is not synced to disk (a process crash loses
//!   nothing; an `fsync` per cycle would cost milliseconds): a host crash
//!   may lose its last increments, and the clock is what keeps tokens after
//!   the reboot above those of the holders that died with the host, so a
//!   resource that kept the highest token it saw does not refuse the new
//!   holders. That takes a clock that does not go back across the reboot;
//!   a resource that must never see a token twice whatever the clock does
//!   needs a backend with durable state.
//! - An attempt is a handful of non-blocking system calls (open, `flock`,
//!   an `fstat`, the counter's read and write), run on the calling task;
//!   only a wait for the counter's lock, held by another client, moves to
//!   a blocking thread.
//! - Waiting: `flock` has no asynchronous wait (and a blocking `flock` on a
//!   helper thread could not be cancelled), so a waiter retries when the
//!   lock file is deleted (a release), and otherwise with the options'
//!   backoff (a holder that died leaves its file behind, unlocked). The
//!   first waiter starts one inotify watch on the directory per process,
//!   read by a thread of its own and kept while any client of that
//!   directory lives (closing an inotify descriptor takes milliseconds).
//! - Not fair: every waiter retries on a release and any may win. Waiters
//!   in one process share one wake-up and, measured, get near-equal
//!   shares; across processes nothing orders them, and under steady
//!   contention some may get much less than their share.
//! - Like the network backends, it needs a tokio runtime with
//!   I/O and time enabled.
//! - An OS lock has no TTL: the lock lives as long as the holder's process
//!   (capability `ttl_expiry = false`, `session_based = true`). With
//!   `auto_renew`, the core checks every `ttl / 3` that the lock file is
//!   still the one this holder locked; if someone deleted or replaced it,
//!   `lost()` fires. The client's [`RenewalScheduler`] starts those checks
//!   only for locks still held at their first `ttl / 3`.
//! - Each [`FileLock`] opens its own file descriptions, so two `FileLock`s
//!   in one process exclude each other like two processes do.
//!
//! ```no_run
//! use std::time::Duration;
//! use distlock_core::{DistributedLock, LockOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> distlock_core::Result<()> {
//! let locks = distlock_file::FileLock::open("/var/lock/myapp")?;
//! let options = LockOptions::new().wait(Duration::from_secs(5));
//! let guard = locks.lock("nightly-report", &options).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::key::encode_component;
use distlock_core::backend::{self, scheduled_guard, HeldLock, Lease, RenewalScheduler};
use distlock_core::{Capabilities, DistributedLock, Error, LockGuard, LockOptions, Result};
use nix::errno::Errno;
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
    /// Starts a held lock's ownership check once it is due (most locks
    /// are released sooner).
    renewals: RenewalScheduler,
    /// The directory as errors name it.
    endpoint: Arc<str>,
    /// The fencing counter. The mutex orders this client's own tasks (they
    /// share one file description, which `flock` does not exclude from
    /// itself); the `flock` orders clients and processes.
    counter: Mutex<File>,
    /// The process's inotify watch on the directory, shared with the
    /// process's other clients of it, taken by the first acquire that has
    /// to wait (waiters poll when inotify is unavailable).
    watcher: Mutex<WatcherState>,
}

#[derive(Debug, Default)]
enum WatcherState {
    #[default]
    NotStarted,
    Running(Arc<WatchHandle>),
    Unavailable,
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
                renewals: RenewalScheduler::new(),
                endpoint: endpoint.into(),
                dir,
                counter: Mutex::new(counter),
                watcher: Mutex::default(),
            }),
        })
    }

    /// Parses `file:///some/dir` (an empty host or `localhost`) and opens
    /// that directory.
    pub fn from_url(url: &str) -> Result<Self> {
        let redacted = distlock_core::error::redact_url(url);
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
                "name a directory for the lock files, e.g. file:///tmp/distlock",
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
        let name = lock_file_name(key);
        let mut path = PathBuf::with_capacity(self.inner.dir.as_os_str().len() + 1 + name.len());
        path.push(&self.inner.dir);
        path.push(name);
        path
    }

    fn endpoint(&self) -> Arc<str> {
        self.inner.endpoint.clone()
    }

    /// One attempt. Every step is a non-blocking system call on a local
    /// directory (a few microseconds), so it runs on the calling task: a
    /// hop to a blocking thread would cost more than the whole attempt.
    /// The one step that can block, waiting for the fencing counter while
    /// another client increments it, moves to a blocking thread; if the
    /// future is dropped then, the thread still finishes and drops its
    /// result, the locked file, which unlocks it: nothing is left behind.
    async fn attempt(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        let fail = |operation: &'static str, err: std::io::Error| {
            Error::backend(BACKEND, &*self.endpoint(), operation, key, err)
        };
        let path = self.lock_path(key);
        // The file stays empty: `lslocks` (or /proc/locks) shows who holds
        // it. Writing a note in it cost a data block per cycle.
        let Some((locked, metadata)) = lock_file(&path).map_err(|(op, err)| fail(op, err))? else {
            return Ok(None);
        };
        let fencing_token = match self.inner.try_next_fencing_token() {
            Some(next) => next.map_err(|err| fail("fencing counter", err))?,
            None => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.inner.next_fencing_token())
                    .await
                    .map_err(|err| fail("fencing counter", std::io::Error::other(err)))?
                    .map_err(|err| fail("fencing counter", err))?
            }
        };
        tracing::debug!(fencing_token, "acquired");
        let lease = Lease::new(key, fencing_token, options.ttl, None);
        let held = Arc::new(HeldFile {
            key: key.to_owned(),
            path,
            identity: Identity::of(&metadata),
            endpoint: self.endpoint(),
            file: Mutex::new(Some(locked)),
        });
        Ok(Some(scheduled_guard(
            BACKEND,
            lease,
            held,
            &self.inner.renewals,
            options.auto_renew,
        )))
    }

    /// The client's directory watch, started on first use; `None` when
    /// inotify is unavailable (waiters poll).
    fn watcher(&self) -> Option<Arc<Watcher>> {
        let mut state = self
            .inner
            .watcher
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*state {
            WatcherState::Running(handle) if !handle.0.failed() => return Some(handle.0.clone()),
            WatcherState::Unavailable => return None,
            _ => {}
        }
        match WatchHandle::shared(&self.inner.dir) {
            Ok(handle) => {
                let watcher = handle.0.clone();
                *state = WatcherState::Running(handle);
                Some(watcher)
            }
            Err(err) => {
                tracing::debug!(error = %err, "no inotify watch; polling only");
                *state = WatcherState::Unavailable;
                None
            }
        }
    }
}

/// The name of `key`'s lock file in the directory.
fn lock_file_name(key: &str) -> String {
    let mut name = encode_component(key, MAX_NAME);
    name.push_str(".lock");
    name
}

/// A failed system call: which step, and why.
type FailedStep = (&'static str, std::io::Error);

/// Opens (creating) and locks `path` without blocking: `None` if another
/// holds it. Retries when what it locked is no longer the file `path`
/// names (the holder it raced released and deleted it). Returns the
/// locked file and its metadata.
///
/// The lock is `flock(2)` through std's `File::try_lock`: closing the file
/// (its only descriptor) releases it, so a release needs no unlock call.
fn lock_file(path: &Path) -> std::result::Result<Option<(File, fs::Metadata)>, FailedStep> {
    // A few rounds at most: each retry means a holder released (and
    // deleted the file) between our open and our lock.
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|err| ("open lock file", err))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(err)) => return Err(("flock", err)),
        }
        let locked = file;
        let metadata = locked.metadata().map_err(|err| ("fstat", err))?;
        // Only a release unlinks a lock file, and it does so while still
        // holding the flock; so a locked inode with a link left is the one
        // the path names (one fstat instead of a second path lookup).
        if metadata.nlink() > 0 {
            return Ok(Some((locked, metadata)));
        }
        // The holder we waited behind deleted it; what we locked is no
        // longer the lock. Drop it and start over.
    }
}

impl Inner {
    /// Increments the directory's counter if neither this client's other
    /// tasks nor another client hold it now; `None` if that would block.
    fn try_next_fencing_token(&self) -> Option<std::io::Result<u64>> {
        let counter = match self.counter.try_lock() {
            Ok(counter) => counter,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        match File::try_lock(&counter) {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return None,
            Err(std::fs::TryLockError::Error(err)) => return Some(Err(err)),
        }
        Some(increment_locked(&counter))
    }

    /// Increments the directory's counter, waiting for its lock.
    fn next_fencing_token(&self) -> std::io::Result<u64> {
        let counter = self
            .counter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        File::lock(&counter)?;
        increment_locked(&counter)
    }
}

/// Reads, increments and writes back the counter, whose `flock` the
/// caller took (this client's mutex orders its own tasks, which share one
/// file description); unlocks it. The new token is `max(last + 1, the
/// clock in µs)`.
///
/// Not synced to disk: a process crash loses nothing (the page cache keeps
/// the write), and an fsync per acquisition would cost milliseconds, a
/// thousand times the rest of the cycle. A host crash that loses the last
/// increments is what the clock is for: tokens after the reboot still
/// exceed those of the holders that died in it.
fn increment_locked(counter: &File) -> std::io::Result<u64> {
    let incremented = (|| -> std::io::Result<u64> {
        let mut buf = [0u8; 64];
        let mut len = 0;
        loop {
            let wanted = buf.len() - len;
            let read = counter.read_at(&mut buf[len..], len as u64)?;
            len += read;
            // A regular file reads short only at its end: no second call
            // to find it (one syscall per grant saved).
            if read == 0 || read < wanted {
                break;
            }
        }
        let text = std::str::from_utf8(&buf[..len]).unwrap_or("?");
        let last: u64 = match text.trim() {
            "" => 0,
            digits => digits.parse().map_err(|_| {
                std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("the fencing counter file holds {digits:?}, not a number"),
                )
            })?,
        };
        let next = last
            .checked_add(1)
            .ok_or_else(|| {
                std::io::Error::new(ErrorKind::InvalidData, "the fencing counter overflowed")
            })?
            .max(clock_micros());
        counter.write_all_at(&counter_line(next), 0)?;
        Ok(next)
    })();
    let unlocked = File::unlock(counter);
    let next = incremented?;
    unlocked?;
    Ok(next)
}

/// The counter file's text for `value`: zero-padded to a fixed width, so
/// a new value overwrites the old in one write. Built on the stack: a
/// `format!` was a tenth of the cycle's user time.
fn counter_line(mut value: u64) -> [u8; COUNTER_WIDTH + 1] {
    let mut line = [b'0'; COUNTER_WIDTH + 1];
    line[COUNTER_WIDTH] = b'\n';
    for digit in line[..COUNTER_WIDTH].iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    line
}

/// The system clock in microseconds since the epoch (0 before it).
fn clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

/// Connects to the service named by `url` (`file:///some/dir`).
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    Ok(Arc::new(FileLock::from_url(url)?))
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
        }
    }

    async fn try_lock(&self, key: &str, options: &LockOptions) -> Result<Option<LockGuard>> {
        self.attempt(key, options).await
    }

    async fn lock(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        // The fast path: a free lock needs no watch.
        if let Some(guard) = self.attempt(key, options).await? {
            return Ok(guard);
        }
        // Register for the lock file's deletion (a release) before the
        // next attempt, so a release between attempt and wait is not
        // missed. A holder that dies leaves its file: the backoff timer
        // covers that.
        let name = lock_file_name(key);
        let interest = self.watcher().map(|watcher| watcher.register(name.into()));
        let mut delays = options.backoff.delays();
        // Each attempt is self-contained and the interest is withdrawn on
        // drop, so dropping this future leaves no lock and no waiter
        // record.
        loop {
            let deleted = interest.as_ref().map(|interest| interest.notify.notified());
            tokio::pin!(deleted);
            if let Some(deleted) = deleted.as_mut().as_pin_mut() {
                // From here on a deletion wakes this waiter, even one that
                // happens before it starts waiting.
                deleted.enable();
            }
            if let Some(guard) = self.attempt(key, options).await? {
                return Ok(guard);
            }
            let delay = delays.next().unwrap_or(Duration::from_millis(100));
            match deleted.as_mut().as_pin_mut() {
                Some(deleted) => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = deleted => {}
                    }
                }
                None => tokio::time::sleep(delay).await,
            }
        }
    }
}

/// The watch thread's name: at most 15 bytes, which is all Linux keeps
/// of a thread's name (`/proc/self/task/*/comm`).
const WATCH_THREAD_NAME: &str = "distlock-watch";

/// A watch on a lock directory: one inotify instance read by a thread of
/// its own, which wakes the waiters of each deleted lock file.
///
/// Kept while any client of the directory in this process lives, because
/// closing an inotify descriptor waits for an RCU grace period (~10 ms
/// here): a watch per acquire put that wait on every contended cycle, on
/// the runtime's thread. A thread (not the runtime's reactor) reads it so
/// clients work from any runtime.
#[derive(Debug)]
struct Watcher {
    inotify: Inotify,
    watch: nix::sys::inotify::WatchDescriptor,
    /// Waiters per lock file name, with how many share the entry.
    waiters: Mutex<HashMap<OsString, (Arc<tokio::sync::Notify>, usize)>>,
    /// Set when the client is dropped (the thread exits) or reading
    /// failed (waiters poll).
    stopped: AtomicBool,
}

impl Watcher {
    fn start(dir: &Path) -> std::io::Result<Arc<Self>> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let watch = inotify.add_watch(dir, AddWatchFlags::IN_DELETE)?;
        let watcher = Arc::new(Watcher {
            inotify,
            watch,
            waiters: Mutex::default(),
            stopped: AtomicBool::new(false),
        });
        let reader = watcher.clone();
        std::thread::Builder::new()
            .name(WATCH_THREAD_NAME.into())
            .spawn(move || reader.read_events())?;
        Ok(watcher)
    }

    fn failed(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The thread: wakes the waiters of each deleted name until stopped.
    fn read_events(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    tracing::debug!(error = %errno, "inotify read failed; waiters poll");
                    self.stopped.store(true, Ordering::Release);
                    self.wake_all();
                    return;
                }
            };
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let waiters = self
                .waiters
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for event in &events {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went away: no more events will come.
                    // Waiters poll; the next one to wait starts a watch.
                    self.stopped.store(true, Ordering::Release);
                    waiters
                        .values()
                        .for_each(|(notify, _)| notify.notify_waiters());
                    return;
                } else if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: any waiter may have missed its own.
                    waiters
                        .values()
                        .for_each(|(notify, _)| notify.notify_waiters());
                } else if let Some((notify, _)) =
                    event.name.as_ref().and_then(|name| waiters.get(name))
                {
                    notify.notify_waiters();
                }
            }
        }
    }

    fn wake_all(&self) {
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        waiters
            .values()
            .for_each(|(notify, _)| notify.notify_waiters());
    }

    fn register(self: Arc<Self>, name: OsString) -> Interest {
        let notify = {
            let mut waiters = self
                .waiters
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let entry = waiters.entry(name.clone()).or_default();
            entry.1 += 1;
            entry.0.clone()
        };
        Interest {
            watcher: self,
            name,
            notify,
        }
    }
}

/// A waiter's registration for one lock file's deletion; withdrawn on
/// drop.
struct Interest {
    watcher: Arc<Watcher>,
    name: OsString,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut waiters = self
            .watcher
            .waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = waiters.get_mut(&self.name) {
            entry.1 -= 1;
            if entry.1 == 0 {
                waiters.remove(&self.name);
            }
        }
    }
}

/// A client's share of the process's watch on a directory; the watch
/// ends when the last share is dropped.
#[derive(Debug)]
struct WatchHandle(Arc<Watcher>);

impl WatchHandle {
    /// The process's watch on `dir`, started if there is none (or it
    /// failed). One per directory rather than per client: a release wakes
    /// one thread of this process, not one per client.
    fn shared(dir: &Path) -> std::io::Result<Arc<WatchHandle>> {
        static WATCHES: Mutex<Vec<(PathBuf, Weak<WatchHandle>)>> = Mutex::new(Vec::new());
        let mut watches = WATCHES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        watches.retain(|(_, handle)| handle.strong_count() > 0);
        let running = watches
            .iter()
            .filter(|(watched, _)| watched == dir)
            .find_map(|(_, handle)| handle.upgrade())
            .filter(|handle| !handle.0.failed());
        if let Some(handle) = running {
            return Ok(handle);
        }
        let handle = Arc::new(WatchHandle(Watcher::start(dir)?));
        watches.retain(|(watched, _)| watched != dir);
        watches.push((dir.to_owned(), Arc::downgrade(&handle)));
        Ok(handle)
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        // Stop the thread: removing the watch queues an IN_IGNORED event,
        // which ends its blocking read; it then drops the last reference
        // and closes the descriptor (slowly, on its own thread).
        self.0.stopped.store(true, Ordering::Release);
        let _ = self.0.inotify.rm_watch(self.0.watch);
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
    endpoint: Arc<str>,
    file: Mutex<Option<File>>,
}

impl HeldFile {
    fn still_ours(&self) -> Result<bool> {
        Identity::at(&self.path)
            .map(|current| current == Some(self.identity))
            .map_err(|err| Error::backend(BACKEND, &*self.endpoint, "stat", &self.key, err))
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
        // someone outside distlock replaces files under us).
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
    fn counter_lines_are_zero_padded_decimal() {
        for value in [0, 7, 1_764_000_000_000_000, u64::MAX] {
            let line = counter_line(value);
            assert_eq!(
                std::str::from_utf8(&line).unwrap(),
                format!("{value:0width$}\n", width = COUNTER_WIDTH)
            );
        }
    }

    #[test]
    fn urls_name_a_local_directory() {
        let dir = std::env::temp_dir().join(format!("distlock-file-url-{}", fastrand::u64(..)));
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
