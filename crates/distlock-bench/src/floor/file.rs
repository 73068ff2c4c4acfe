//! The file floor: open + `flock` + a link check (`fstat`) + a fencing
//! counter increment (`flock` + read + write) + unlink + close; no server,
//! so no round trips.

use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use distlock::BoxError;

use super::{FloorInfo, RawClient};

pub(super) const INFO: FloorInfo = FloorInfo {
    cycle: "open + flock(LOCK_EX|LOCK_NB) + fstat (link check) + counter (flock + pread + pwrite + unlock) + unlink + close",
    round_trip: None,
    write_round_trip: None,
};

/// The file floor's fencing counter (the backend's is `.fencing_token`).
const FILE_FLOOR_COUNTER: &str = ".distlock-bench-floor-counter";

/// The floor's file for `key` (keys are the bench's own, so a plain
/// character mapping is unique enough).
fn file_floor_path(dir: &Path, key: &str) -> PathBuf {
    let name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!(".distlock-bench-floor-{name}"))
}

/// Removes the floor's files and its counter (best effort).
pub(super) fn cleanup(dir: &Path, keys: &[String]) {
    for key in keys {
        let _ = std::fs::remove_file(file_floor_path(dir, key));
    }
    let _ = std::fs::remove_file(dir.join(FILE_FLOOR_COUNTER));
}

/// The smallest correct flock protocol: lock the key's file, check that
/// the locked inode still has a link (a release deletes the file, and
/// whoever locks the deleted inode it had opened must not think it holds
/// the lock: without this check the protocol double-grants under
/// contention), increment the directory's counter under its own `flock`,
/// then delete and close the file. The backend adds to it a check that
/// the path still names its file before deleting, and the lease.
pub(super) struct FileRaw {
    path: PathBuf,
    counter: File,
}

impl FileRaw {
    /// A client for `key` in `dir`, which it creates if need be.
    pub(super) fn open(dir: &Path, key: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // One counter for the directory, as the backend's; opened once per
        // client, as the backend does.
        let counter = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(FILE_FLOOR_COUNTER))?;
        Ok(FileRaw {
            path: file_floor_path(dir, key),
            counter,
        })
    }

    fn increment(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        self.counter.lock()?;
        let mut buf = [0u8; 32];
        let read = self.counter.read_at(&mut buf, 0);
        let next = read.and_then(|len| {
            let last = std::str::from_utf8(&buf[..len])
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(0);
            self.counter
                .write_all_at(format!("{:020}\n", last + 1).as_bytes(), 0)?;
            Ok(last + 1)
        });
        self.counter.unlock()?;
        next
    }
}

#[async_trait]
impl RawClient for FileRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.path)?;
        file.try_lock()
            .map_err(|err| format!("flock {}: {err}", self.path.display()))?;
        if std::os::unix::fs::MetadataExt::nlink(&file.metadata()?) == 0 {
            return Err(format!("{} was deleted under the floor", self.path.display()).into());
        }
        self.increment()?;
        std::fs::remove_file(&self.path)?;
        drop(file);
        Ok(())
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }

    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }
}
