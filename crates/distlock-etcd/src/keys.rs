//! Where a lock's keys live in etcd, and the name of each attempt's key.
//!
//! - [`Layout::Mutex`] (the default) is etcd's own recipe, the one of Go's
//!   `concurrency.Mutex` and `etcdctl lock`: lock `name` is the keys under
//!   `name/` (`prefix/name/` with a URL prefix), one per holder or waiter,
//!   each named by its lease id in lowercase hex. So distlock, Go programs
//!   and shell jobs queue in one line and exclude each other.
//! - [`Layout::Distlock`] is distlock's earlier layout: the keys under
//!   `prefix/<encoded name>/`, named `<lease>-<seq>`, so that one lease
//!   can queue any number of times for one lock.
//!
//! In the mutex layout a lease has one name per lock, and a client one
//! session lease: a second attempt of the same client on the same lock,
//! while the first holds or queues, takes a lease of its own (see
//! [`KeyNames::reserve`]). A name is reserved from the attempt's start
//! until etcd confirmed its key deleted: a delete or a create still in
//! flight for an earlier key of that name must not hit a newer one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use distlock_core::backend::key::encode_component;

use crate::config::{Layout, DEFAULT_PREFIX};

/// Longest encoded key component in the distlock layout; longer keys are
/// hashed.
const MAX_KEY_COMPONENT: usize = 200;

/// How an attempt's key name was reserved, to be given back once etcd
/// confirmed the key deleted.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reservation {
    /// The distlock layout's number in the name.
    Seq(u64),
    /// A mutex-layout name on the session lease.
    SessionName,
    /// A name on a lease of the attempt's own: no other attempt can use it.
    OwnLease,
}

/// The key names of a client's attempts.
pub(crate) struct KeyNames {
    layout: Layout,
    prefix: String,
    /// Distlock layout: the next fresh number.
    seq: AtomicU64,
    /// Distlock layout: numbers whose key is known to be deleted, for
    /// reuse. Every new key name under a lock's prefix stays in etcd's
    /// index (as a deleted key) until a compaction, and each acquire's
    /// range walks them all: fresh names per attempt made a much-used lock
    /// slower and slower.
    free_seqs: Mutex<Vec<u64>>,
    /// Mutex layout: the names on the session lease in use by an attempt
    /// or a held lock (or whose deletion is not confirmed).
    session_names: Mutex<HashSet<String>>,
}

impl KeyNames {
    pub(crate) fn new(layout: Layout, prefix: &str) -> Self {
        KeyNames {
            layout,
            prefix: prefix.to_owned(),
            seq: AtomicU64::new(0),
            free_seqs: Mutex::new(Vec::new()),
            session_names: Mutex::new(HashSet::new()),
        }
    }

    /// The prefix under which the keys of `key`'s lock live, ending in `/`.
    pub(crate) fn dir(&self, key: &str) -> String {
        match (self.layout, self.prefix.as_str()) {
            (Layout::Mutex, "") => format!("{key}/"),
            (Layout::Mutex, prefix) => format!("{prefix}/{key}/"),
            (Layout::Distlock, prefix) => format!(
                "{}/{}/",
                if prefix.is_empty() {
                    DEFAULT_PREFIX
                } else {
                    prefix
                },
                encode_component(key, MAX_KEY_COMPONENT)
            ),
        }
    }

    /// A name under `dir` for a key on lease `lease` (the session lease
    /// when `on_session`), reserved until [given back](Self::give_back).
    /// `None` when the mutex layout's one name of the session lease for
    /// this lock is taken by another attempt of this client: that attempt
    /// then needs a lease of its own.
    pub(crate) fn reserve(
        &self,
        dir: &str,
        lease: i64,
        on_session: bool,
    ) -> Option<(String, Reservation)> {
        match self.layout {
            Layout::Distlock => {
                let free = self.free_seqs.lock().unwrap().pop();
                let seq = free.unwrap_or_else(|| self.seq.fetch_add(1, Ordering::Relaxed));
                Some((format!("{dir}{lease:016x}-{seq:x}"), Reservation::Seq(seq)))
            }
            Layout::Mutex => {
                let name = format!("{dir}{lease:x}");
                if !on_session {
                    return Some((name, Reservation::OwnLease));
                }
                let fresh = self.session_names.lock().unwrap().insert(name.clone());
                fresh.then_some((name, Reservation::SessionName))
            }
        }
    }

    /// Only for a key whose deletion etcd confirmed, with no other request
    /// on it left in flight: a later attempt may reuse its name.
    pub(crate) fn give_back(&self, etcd_key: &str, reservation: Reservation) {
        match reservation {
            Reservation::Seq(seq) => self.free_seqs.lock().unwrap().push(seq),
            Reservation::SessionName => {
                self.session_names.lock().unwrap().remove(etcd_key);
            }
            Reservation::OwnLease => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mutex_layout_uses_the_name_as_given_and_the_lease_in_hex() {
        let names = KeyNames::new(Layout::Mutex, "");
        assert_eq!(names.dir("jobs/nightly report"), "jobs/nightly report/");
        let (name, _) = names.reserve("x/", 0x694d_7d3a_12ab, true).unwrap();
        assert_eq!(name, "x/694d7d3a12ab");
        let names = KeyNames::new(Layout::Mutex, "app");
        assert_eq!(names.dir("x"), "app/x/");
    }

    #[test]
    fn the_session_name_of_a_lock_is_reserved_until_given_back() {
        let names = KeyNames::new(Layout::Mutex, "");
        let (name, reservation) = names.reserve("x/", 7, true).unwrap();
        assert!(names.reserve("x/", 7, true).is_none(), "reserved twice");
        assert!(names.reserve("y/", 7, true).is_some(), "another lock");
        assert!(names.reserve("x/", 8, false).is_some(), "an own lease");
        names.give_back(&name, reservation);
        assert!(names.reserve("x/", 7, true).is_some(), "given back");
    }

    #[test]
    fn the_distlock_layout_encodes_the_name_and_numbers_keys() {
        let names = KeyNames::new(Layout::Distlock, "");
        assert!(names.dir("a/b").starts_with("distlock/"));
        assert_ne!(names.dir("a/b"), "distlock/a/b/");
        let (first, reservation) = names.reserve("d/", 1, true).unwrap();
        let (second, _) = names.reserve("d/", 1, true).unwrap();
        assert_eq!(first, "d/0000000000000001-0");
        assert_eq!(second, "d/0000000000000001-1");
        names.give_back(&first, reservation);
        assert_eq!(names.reserve("d/", 1, true).unwrap().0, first);
    }
}
