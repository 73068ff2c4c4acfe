//! Waking waiters when a lock file is deleted (a release): inotify.
//!
//! - `flock` has no asynchronous wait, and a blocking `flock` on a helper
//!   thread could not be cancelled, so a waiter retries its attempt when
//!   the key's lock file is deleted, and otherwise on its backoff (a
//!   holder that died leaves its file behind, unlocked, and no deletion
//!   comes).
//! - A waiter registers its [`Interest`] before its next attempt, so a
//!   release between that attempt and the wait still wakes it.
//! - One inotify watch per directory and process, not per client or per
//!   waiter: a release wakes one thread of this process, which wakes the
//!   waiters of that name. It is started by the first waiter and kept
//!   while any client of the directory lives, because closing an inotify
//!   descriptor waits for an RCU grace period: a watch per acquire put
//!   that wait on every contended cycle, on the runtime's thread.
//! - A thread of its own (not the runtime's reactor) reads it, so clients
//!   work from any runtime. Removing the watch queues `IN_IGNORED`, which
//!   ends the thread's blocking read; the thread then closes the
//!   descriptor, off the runtime.
//! - `IN_Q_OVERFLOW` (events lost) wakes every waiter; `IN_IGNORED` (the
//!   directory went away) or a failed read stops the watch: waiters fall
//!   back to polling and the next one to wait starts a new watch.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// The watch thread's name: at most 15 bytes, which is all Linux keeps
/// of a thread's name (`/proc/self/task/*/comm`).
const WATCH_THREAD_NAME: &str = "distlock-watch";

/// A client's access to the process's watch on its directory, started by
/// the first acquire that has to wait.
#[derive(Debug, Default)]
pub(crate) struct DirWatch(Mutex<WatcherState>);

#[derive(Debug, Default)]
enum WatcherState {
    #[default]
    NotStarted,
    Running(Arc<WatchHandle>),
    Unavailable,
}

impl DirWatch {
    /// The watch on `dir`, started on first use; `None` when inotify is
    /// unavailable (waiters poll).
    pub(crate) fn watcher(&self, dir: &Path) -> Option<Arc<Watcher>> {
        let mut state = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*state {
            WatcherState::Running(handle) if !handle.0.failed() => return Some(handle.0.clone()),
            WatcherState::Unavailable => return None,
            _ => {}
        }
        match WatchHandle::shared(dir) {
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

/// A watch on a lock directory: one inotify instance read by a thread of
/// its own, which wakes the waiters of each deleted lock file.
#[derive(Debug)]
pub(crate) struct Watcher {
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

    /// Registers a waiter for the deletion of the lock file `name`.
    pub(crate) fn register(self: Arc<Self>, name: OsString) -> Interest {
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
/// drop, so a dropped waiter leaves no record.
pub(crate) struct Interest {
    watcher: Arc<Watcher>,
    name: OsString,
    /// Notified when the file is deleted (or the watch stops).
    pub(crate) notify: Arc<tokio::sync::Notify>,
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
