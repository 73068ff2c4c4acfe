//! A held lock: release, the ownership check renewal runs, and why an
//! abandoned attempt needs no cleanup.
//!
//! - Holding the lock is holding the `flock` on the inode the key's path
//!   names. Release deletes the path while still holding the `flock`, then
//!   closes the file (which unlocks it); waiters that opened the deleted
//!   inode see it has no link left and start over (see the `acquire`
//!   module).
//! - An OS lock has no TTL: it lives as long as the holder's process. With
//!   `auto_renew`, the core calls [`HeldLock::extend`] every `ttl / 3`,
//!   which checks that the path still names the inode this holder locked;
//!   if someone deleted or replaced the file, the lock is reported lost.
//! - An abandoned attempt leaves nothing to clean up: what it holds is an
//!   open, locked file, and dropping it (on the task, or on the blocking
//!   thread that waited for the counter) closes it, which unlocks it. The
//!   file itself stays, empty and unlocked; the next holder locks it.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::backend::HeldLock;
use distlock_core::{Error, Result};

use crate::BACKEND;

/// Which file a path names: device and inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    pub(crate) fn of(metadata: &fs::Metadata) -> Self {
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
pub(crate) struct HeldFile {
    pub(crate) key: String,
    pub(crate) path: PathBuf,
    pub(crate) identity: Identity,
    pub(crate) endpoint: Arc<str>,
    pub(crate) file: Mutex<Option<File>>,
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
