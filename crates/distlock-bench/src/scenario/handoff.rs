//! The contended run's handoffs. A handoff is the time from the moment a
//! holder starts its release to the moment a *different* worker's `lock`
//! returns (a shared monotonic clock; the release round trip is
//! included). A handoff splits at the moment that release *returns* (the
//! releaser learned its write committed): the rest, grant minus that
//! return (0 when the grant came first), is the notification delay beyond
//! the release write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Mutex;

use tokio::time::Instant;

use crate::stats::Samples;

/// What the contended workers share: the exclusion check and the event
/// log (all on one thread, so the log's order is the clock's order).
#[derive(Default)]
pub(super) struct Shared {
    pub(super) inside: AtomicUsize,
    pub(super) violations: AtomicU64,
    events: Mutex<Vec<Event>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum EventKind {
    /// `lock` returned.
    Grant,
    /// The holder is about to call `release`.
    ReleaseStart,
    /// `release` returned: the releaser learned its release committed.
    ReleaseReturn,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Event {
    at: Instant,
    worker: usize,
    kind: EventKind,
}

impl Shared {
    /// Logs `kind` for `worker`, now.
    pub(super) fn record(&self, worker: usize, kind: EventKind) {
        let event = Event {
            at: Instant::now(),
            worker,
            kind,
        };
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// The log so far, emptying it.
    pub(super) fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The contended run's handoffs, decomposed.
#[derive(Debug, Default)]
pub(crate) struct Handoffs {
    /// From the start of a release by one worker to the next grant, when
    /// that grant went to a different worker.
    pub(crate) samples: Samples,
    /// For each of those: the grant minus the return of that same release,
    /// 0 when the grant came first (the notification delay beyond the
    /// release write).
    pub(crate) after_release: Samples,
    /// The handoffs whose grant came before the releaser saw its reply.
    pub(crate) grants_before_release_reply: u64,
    /// Grants that went back to the worker that had just released.
    pub(crate) regrants: u64,
}

/// Decomposes the event log into handoffs.
pub(super) fn handoffs(events: &[Event]) -> Handoffs {
    let mut events = events.to_vec();
    // Stable: equal instants keep the order they were recorded in.
    events.sort_by_key(|event| event.at);
    // A worker's own events alternate grant, release start, release
    // return: pair each release start with its worker's next return.
    let mut returned_at: Vec<Option<Instant>> = vec![None; events.len()];
    let mut unanswered: HashMap<usize, usize> = HashMap::new();
    for (index, event) in events.iter().enumerate() {
        match event.kind {
            EventKind::ReleaseStart => {
                unanswered.insert(event.worker, index);
            }
            EventKind::ReleaseReturn => {
                if let Some(start) = unanswered.remove(&event.worker) {
                    returned_at[start] = Some(event.at);
                }
            }
            EventKind::Grant => {}
        }
    }
    let mut handoffs = Handoffs::default();
    let mut last_release: Option<usize> = None;
    for (index, event) in events.iter().enumerate() {
        match event.kind {
            EventKind::ReleaseStart => last_release = Some(index),
            EventKind::ReleaseReturn => {}
            EventKind::Grant => {
                let Some(start) = last_release.take() else {
                    continue;
                };
                let release = &events[start];
                if release.worker == event.worker {
                    handoffs.regrants += 1;
                    continue;
                }
                handoffs.samples.push(event.at - release.at);
                // Every release of a finished run returned (a failed one
                // fails the bench), so `None` does not occur.
                if let Some(returned) = returned_at[start] {
                    let after = event.at.saturating_duration_since(returned);
                    if event.at < returned {
                        handoffs.grants_before_release_reply += 1;
                    }
                    handoffs.after_release.push(after);
                }
            }
        }
    }
    handoffs
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Events `(micros, worker, kind)`, each `micros` after one origin.
    fn timeline(events: &[(u64, usize, EventKind)]) -> Vec<Event> {
        let origin = Instant::now();
        events
            .iter()
            .map(|&(micros, worker, kind)| Event {
                at: origin + Duration::from_micros(micros),
                worker,
                kind,
            })
            .collect()
    }

    #[test]
    fn a_handoff_splits_at_the_return_of_its_release() {
        use EventKind::{Grant, ReleaseReturn, ReleaseStart};
        let mut events = timeline(&[
            // Worker 0 releases (300 µs); worker 1's grant comes 200 µs
            // after that release returned.
            (0, 0, Grant),
            (1_000, 0, ReleaseStart),
            (1_300, 0, ReleaseReturn),
            (1_500, 1, Grant),
            // Worker 2 is granted before worker 1 sees its release's
            // reply: the part after the release saturates at 0 and counts.
            (2_500, 1, ReleaseStart),
            (2_700, 2, Grant),
            (2_900, 1, ReleaseReturn),
            // Worker 2 takes its own lock again: a regrant, no handoff.
            (3_700, 2, ReleaseStart),
            (3_900, 2, ReleaseReturn),
            (4_000, 2, Grant),
        ]);
        // The log's order is not the clock's under a multi-thread runtime.
        events.reverse();

        let mut handoffs = handoffs(&events);
        assert_eq!(handoffs.samples.len(), 2);
        assert_eq!(handoffs.samples.quantile_us(0.0), Some(200.0));
        assert_eq!(handoffs.samples.quantile_us(1.0), Some(500.0));
        assert_eq!(handoffs.after_release.len(), 2);
        assert_eq!(handoffs.after_release.quantile_us(0.0), Some(0.0));
        assert_eq!(handoffs.after_release.quantile_us(1.0), Some(200.0));
        assert_eq!(handoffs.grants_before_release_reply, 1);
        assert_eq!(handoffs.regrants, 1);
    }

    #[test]
    fn overlapping_releases_pair_with_their_own_worker() {
        use EventKind::{Grant, ReleaseReturn, ReleaseStart};
        // Worker 1 is granted and starts its own release before worker 0's
        // release returns: each handoff measures against its own release.
        let events = timeline(&[
            (0, 0, ReleaseStart),
            (100, 1, Grant),
            (150, 1, ReleaseStart),
            (400, 2, Grant),
            (500, 0, ReleaseReturn),
            (600, 1, ReleaseReturn),
        ]);
        let mut handoffs = handoffs(&events);
        // 0 -> 1: 100 µs, 1 -> 2: 250 µs; both grants precede the reply.
        assert_eq!(handoffs.samples.quantile_us(0.0), Some(100.0));
        assert_eq!(handoffs.samples.quantile_us(1.0), Some(250.0));
        assert_eq!(handoffs.after_release.quantile_us(1.0), Some(0.0));
        assert_eq!(handoffs.grants_before_release_reply, 2);
        assert_eq!(handoffs.regrants, 0);
    }
}
