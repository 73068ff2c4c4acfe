//! The memory floor: a keyed lease table (token counter + insert-if-free
//! of owner and expiry + owner-checked remove, under a std `Mutex`); no
//! server, so no round trips.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use distlock::BoxError;

use super::{FloorInfo, RawClient};

pub(super) const INFO: FloorInfo = FloorInfo {
    cycle: "a keyed lease table: token counter + insert-if-free (owner, expiry) + owner-checked remove, under a std Mutex",
    round_trip: None,
    write_round_trip: None,
};

/// The memory floor's lease time (the lock's default TTL).
const MEMORY_FLOOR_TTL: Duration = Duration::from_secs(30);

/// The in-process analogue of `SET NX PX` + compare-and-delete: what any
/// keyed lock with expiry and fencing tokens must do at the least (the
/// key is copied into the table, as a lock service must).
#[derive(Default)]
pub(crate) struct LeaseTable {
    /// Holder and expiry per key.
    held: Mutex<HashMap<String, (u64, Instant)>>,
    next_token: AtomicU64,
}

pub(super) struct MemoryRaw {
    table: Arc<LeaseTable>,
    key: String,
    owner: u64,
}

impl MemoryRaw {
    /// A client of `table` for `key`, with an owner id of its own.
    pub(super) fn new(table: &Arc<LeaseTable>, key: &str) -> Self {
        MemoryRaw {
            table: table.clone(),
            key: key.to_owned(),
            owner: table.next_token.fetch_add(1, Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl RawClient for MemoryRaw {
    async fn cycle(&mut self) -> Result<(), BoxError> {
        let table = &self.table;
        let _fencing_token = table.next_token.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        {
            let mut held = table.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.get(&self.key) {
                Some((_, expiry)) if *expiry > now => {
                    return Err(format!("raw lease on {} already held", self.key).into())
                }
                _ => {
                    held.insert(self.key.clone(), (self.owner, now + MEMORY_FLOOR_TTL));
                }
            }
        }
        let mut held = table.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(&self.key).map(|(owner, _)| *owner) == Some(self.owner) {
            held.remove(&self.key);
            Ok(())
        } else {
            Err(format!("raw lease on {} was not ours to remove", self.key).into())
        }
    }

    async fn round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }

    async fn write_round_trip(&mut self) -> Result<bool, BoxError> {
        Ok(false)
    }
}
