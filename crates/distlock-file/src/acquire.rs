//! Attempts and waiting.
//!
//! - One lock file per key in the directory, named with
//!   [`encode_component`] (any key is safe, long keys are hashed) plus
//!   `.lock`. The file stays empty: `lslocks` (or `/proc/locks`) names the
//!   holder's process, and writing a note in it cost a data block per
//!   cycle.
//! - An attempt is a handful of non-blocking system calls (open, `flock`,
//!   an `fstat`, the counter's read and write), run on the calling task:
//!   a hop to a blocking thread would cost more than the whole attempt.
//!   Only a wait for the fencing counter's lock, held by another client,
//!   moves to a blocking thread.
//! - Release deletes the lock file. A waiter that locked a file just
//!   before it was deleted would hold a lock on a nameless inode; after
//!   locking, every acquirer checks that the inode it locked still has a
//!   link (a release unlinks only while it still holds the `flock`, so a
//!   linked, locked inode is the one the path names), else it starts
//!   over. Acquirers assume nobody but distlock renames lock files.
//! - Waiting retries the attempt when the key's lock file is deleted (see
//!   the `watch` module) and otherwise after the options' [`Backoff`]
//!   delay, which also covers a holder that died and left its file.
//! - Not fair: every waiter retries on a release and any may win. Waiters
//!   in one process share one wake-up; across processes nothing orders
//!   them, and under steady contention some may get much less than their
//!   share.
//!
//! [`Backoff`]: distlock_core::Backoff

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use distlock_core::backend::key::encode_component;
use distlock_core::backend::{scheduled_guard, Lease};
use distlock_core::{Error, LockGuard, LockOptions, Result};

use crate::held::{HeldFile, Identity};
use crate::{FileLock, BACKEND};

/// Longest encoded key used as a file name (plus `.lock`), well under the
/// usual 255-byte limit.
const MAX_NAME: usize = 200;

/// The name of `key`'s lock file in the directory.
pub(crate) fn lock_file_name(key: &str) -> String {
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

impl FileLock {
    /// One attempt, on the calling task. The one step that can block,
    /// waiting for the fencing counter while another client increments
    /// it, moves to a blocking thread; if the future is dropped then, the
    /// thread still finishes and drops its result, the locked file, which
    /// unlocks it: nothing is left behind.
    pub(crate) async fn attempt(
        &self,
        key: &str,
        options: &LockOptions,
    ) -> Result<Option<LockGuard>> {
        let fail = |operation: &'static str, err: std::io::Error| {
            Error::backend(BACKEND, &*self.inner.endpoint, operation, key, err)
        };
        let path = self.lock_path(key);
        let Some((locked, metadata)) = lock_file(&path).map_err(|(op, err)| fail(op, err))? else {
            return Ok(None);
        };
        let fencing_token = match self.inner.counter.try_next() {
            Some(next) => next.map_err(|err| fail("fencing counter", err))?,
            None => {
                let inner = self.inner.clone();
                tokio::task::spawn_blocking(move || inner.counter.next())
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
            endpoint: self.inner.endpoint.clone(),
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

    /// Waits until acquired: attempts on each deletion of the key's lock
    /// file and on the options' backoff. Each attempt is self-contained
    /// and the watch interest is withdrawn on drop, so dropping this
    /// future leaves no lock and no waiter record.
    pub(crate) async fn acquire(&self, key: &str, options: &LockOptions) -> Result<LockGuard> {
        // The fast path: a free lock needs no watch.
        if let Some(guard) = self.attempt(key, options).await? {
            return Ok(guard);
        }
        // Register for the lock file's deletion (a release) before the
        // next attempt, so a release between attempt and wait is not
        // missed. A holder that dies leaves its file: the backoff timer
        // covers that.
        let interest = self
            .inner
            .watch
            .watcher(&self.inner.dir)
            .map(|watcher| watcher.register(lock_file_name(key).into()));
        let mut retry = 0u32;
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
            let delay = options.backoff.delay(retry);
            retry = retry.saturating_add(1);
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
