//! The fencing counter: one file per directory (`.fencing_token`), shared
//! by every key.
//!
//! A grant increments it under its own `flock` while it holds the key's
//! lock, so tokens are strictly increasing per key (and across keys) and
//! survive the lock files' deletion. The new token is the larger of the
//! last one plus one and the system clock in microseconds since the epoch.
//!
//! The counter is not synced to disk: a process crash loses nothing (the
//! page cache keeps the write), and an `fsync` per grant would cost far
//! more than the rest of the cycle. A host crash may lose the last
//! increments; the clock is what keeps tokens after the reboot above those
//! of the holders that died with the host, so a resource that kept the
//! highest token it saw does not refuse the new holders. That takes a
//! clock that does not go back across the reboot; a resource that must
//! never see a token twice whatever the clock does needs a backend with
//! durable state.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

/// The counter file's name: encoded keys never start with a dot.
pub(crate) const COUNTER_FILE: &str = ".fencing_token";

/// Width of the zero-padded decimal counter, so each update overwrites the
/// same bytes in one write.
const COUNTER_WIDTH: usize = 20;

/// A client's handle on its directory's counter file.
#[derive(Debug)]
pub(crate) struct FencingCounter {
    /// The mutex orders this client's own tasks (they share one file
    /// description, which `flock` does not exclude from itself); the
    /// `flock` orders clients and processes.
    file: Mutex<File>,
}

impl FencingCounter {
    /// Opens (creating) the counter of `dir`.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(dir.join(COUNTER_FILE))?;
        Ok(FencingCounter {
            file: Mutex::new(file),
        })
    }

    /// Increments the counter if neither this client's other tasks nor
    /// another client hold it now; `None` if that would block.
    pub(crate) fn try_next(&self) -> Option<std::io::Result<u64>> {
        let counter = match self.file.try_lock() {
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

    /// Increments the counter, waiting for its lock (blocks the thread).
    pub(crate) fn next(&self) -> std::io::Result<u64> {
        let counter = self
            .file
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
/// a new value overwrites the old in one write. Built on the stack rather
/// than with `format!`, which cost a noticeable share of the cycle.
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
}
