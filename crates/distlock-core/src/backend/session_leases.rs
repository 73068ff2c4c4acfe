//! The registry of the leases a session vouches for.
//!
//! A session-based backend (ZooKeeper's session, etcd's session lease)
//! grants many locks through one session, and learns of the session's
//! changes in one place: a suspension or a keep-alive moves every lock's
//! deadline, the session's end loses them all. [`SessionLeases`] keeps a
//! [`WeakLease`] per lock granted through the session and applies those
//! changes to the ones still held.

use tokio::time::Instant;

use crate::lease::{Lease, WeakLease};
use crate::LostReason;

/// Length below which [`SessionLeases::register`] never prunes.
const MIN_PRUNE_AT: usize = 64;

/// The leases a session vouches for: each lock granted through the
/// session is [`register`](Self::register)ed, then follows the session's
/// validity ([`set_valid_until`](Self::set_valid_until)) until the session
/// [`end`](Self::end)s, which marks every one of them lost with
/// [`LostReason::SessionLost`].
///
/// It holds [`WeakLease`]s, so a released or dropped guard is not kept
/// alive; finished entries are pruned on every broadcast and, amortised,
/// on registration (whenever the registry has doubled since the last
/// prune), so a session that grants many locks and never changes state
/// does not grow without bound.
///
/// Not synchronised: keep it under the session's lock, beside the state
/// that goes with it (a suspension deadline, the last keep-alive's
/// deadline), so that a lease registered concurrently with a change gets
/// the change too. [`Lease`]'s methods never call back into the session,
/// so calling them under that lock cannot deadlock.
#[derive(Debug)]
pub struct SessionLeases {
    leases: Vec<WeakLease>,
    /// Length at which `register` prunes next.
    prune_at: usize,
    /// Why the session ended, once it has: the reason of every loss.
    ended: Option<String>,
}

impl Default for SessionLeases {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionLeases {
    /// An empty registry of a live session.
    pub fn new() -> Self {
        SessionLeases {
            leases: Vec::new(),
            prune_at: MIN_PRUNE_AT,
            ended: None,
        }
    }

    /// Registers `lease`, granted through this session, so that the
    /// session's changes reach it. Returns `false` when the session has
    /// already ended: the lease is then marked lost at once with
    /// [`LostReason::SessionLost`] and the session's reason, and is not
    /// kept. A backend that must not hand out such a lease checks
    /// [`ended`](Self::ended) before it makes one.
    pub fn register(&mut self, lease: &Lease) -> bool {
        if let Some(why) = &self.ended {
            lease.mark_lost(LostReason::SessionLost(why.clone()));
            return false;
        }
        if self.leases.len() >= self.prune_at {
            self.prune();
            self.prune_at = (self.leases.len() * 2).max(MIN_PRUNE_AT);
        }
        self.leases.push(lease.downgrade());
        true
    }

    /// Sets every held lease's validity: `Some(deadline)` after a
    /// keep-alive or on a suspension, `None` when the session vouches
    /// again. A lease whose own deadline has already passed is marked
    /// [`LostReason::Expired`] instead and stays lost (see
    /// [`Lease::set_valid_until`]). Finished entries are dropped on the
    /// way.
    pub fn set_valid_until(&mut self, valid_until: Option<Instant>) {
        self.leases.retain(|weak| match weak.upgrade() {
            Some(lease) => {
                lease.set_valid_until(valid_until);
                lease.is_held()
            }
            None => false,
        });
    }

    /// Ends the session: marks every held lease lost with
    /// [`LostReason::SessionLost`]`(why)`, forgets them, and makes every
    /// later [`register`](Self::register) mark its lease lost too. Returns
    /// how many held leases it marked lost. The first end wins: once ended,
    /// this does nothing and returns 0, and [`ended`](Self::ended) keeps
    /// the first reason.
    pub fn end(&mut self, why: &str) -> usize {
        if self.ended.is_some() {
            return 0;
        }
        self.ended = Some(why.to_owned());
        let mut marked = 0;
        for lease in std::mem::take(&mut self.leases)
            .iter()
            .filter_map(WeakLease::upgrade)
            .filter(Lease::is_held)
        {
            lease.mark_lost(LostReason::SessionLost(why.to_owned()));
            marked += 1;
        }
        marked
    }

    /// Why the session ended, once [`end`](Self::end) was called.
    pub fn ended(&self) -> Option<&str> {
        self.ended.as_deref()
    }

    /// The registered leases still held.
    pub fn live(&self) -> impl Iterator<Item = Lease> + '_ {
        self.leases
            .iter()
            .filter_map(WeakLease::upgrade)
            .filter(Lease::is_held)
    }

    /// How many entries the registry keeps, counting finished leases not
    /// yet pruned; [`live`](Self::live) counts the held ones.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when the registry keeps no entry.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Drops the entries of leases gone or lost.
    fn prune(&mut self) {
        self.leases
            .retain(|weak| weak.upgrade().is_some_and(|lease| lease.is_held()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn session_lease(token: u64) -> Lease {
        Lease::new("k", token, Duration::from_secs(1), None)
    }

    #[tokio::test(start_paused = true)]
    async fn the_validity_reaches_every_held_lease_and_a_passed_deadline_stays_final() {
        let mut leases = SessionLeases::new();
        let (a, b) = (session_lease(1), session_lease(2));
        assert!(leases.register(&a) && leases.register(&b));
        let suspended_until = Instant::now() + Duration::from_secs(2);
        leases.set_valid_until(Some(suspended_until));
        assert_eq!(a.valid_until(), Some(suspended_until));
        assert_eq!(b.valid_until(), Some(suspended_until));
        leases.set_valid_until(None);
        assert_eq!(a.valid_until(), None);

        leases.set_valid_until(Some(Instant::now() + Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The session comes back too late: nobody looked at the leases in
        // time, but their loss is final and they are dropped.
        leases.set_valid_until(None);
        assert_eq!(a.lost_reason(), Some(LostReason::Expired));
        assert_eq!(b.lost_reason(), Some(LostReason::Expired));
        assert!(leases.is_empty());
    }

    #[test]
    fn a_broadcast_drops_released_and_lost_leases() {
        let mut leases = SessionLeases::new();
        let (kept, lost) = (session_lease(1), session_lease(2));
        assert!(leases.register(&kept) && leases.register(&lost));
        assert!(leases.register(&session_lease(3)), "dropped at once");
        lost.mark_lost(LostReason::NotHeld);
        assert_eq!(leases.len(), 3);
        assert_eq!(leases.live().count(), 1);
        leases.set_valid_until(None);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases.live().next().unwrap().fencing_token(), 1);
    }

    #[test]
    fn registration_prunes_when_the_registry_has_doubled() {
        let mut leases = SessionLeases::new();
        let held: Vec<_> = (0..40).map(session_lease).collect();
        for lease in &held {
            assert!(leases.register(lease));
        }
        // Finished at once, as released guards are: pruned only once the
        // registry reaches its threshold, not on every registration.
        for token in 40..64 {
            assert!(leases.register(&session_lease(token)));
        }
        assert_eq!(leases.len(), 64);
        assert!(leases.register(&session_lease(64)));
        assert_eq!(leases.len(), 41, "the 40 held ones and the new one");
        // The next prune waits until the registry has doubled since the
        // last one: 40 entries were left, so at 80.
        for token in 65..104 {
            assert!(leases.register(&session_lease(token)));
        }
        assert_eq!(leases.len(), 80);
        assert!(leases.register(&session_lease(104)));
        assert_eq!(leases.len(), 41);
        assert_eq!(leases.live().count(), 40);
    }

    #[tokio::test]
    async fn the_end_marks_every_held_lease_lost_and_refuses_later_ones() {
        let mut leases = SessionLeases::new();
        let (a, b, released) = (session_lease(1), session_lease(2), session_lease(3));
        for lease in [&a, &b, &released] {
            assert!(leases.register(lease));
        }
        released.mark_lost(LostReason::Released);
        let lost = tokio::spawn(a.lost());
        assert_eq!(leases.end("the session expired"), 2);
        let expired = LostReason::SessionLost("the session expired".into());
        assert_eq!(lost.await.unwrap(), expired);
        assert_eq!(b.lost_reason(), Some(expired.clone()));
        assert_eq!(released.lost_reason(), Some(LostReason::Released));
        assert!(leases.is_empty());

        // The first reason wins.
        assert_eq!(leases.end("the session was closed"), 0);
        assert_eq!(leases.ended(), Some("the session expired"));

        // A lease granted as the session ended is lost at once, not kept.
        let late = session_lease(4);
        assert!(!leases.register(&late));
        assert_eq!(late.lost_reason(), Some(expired));
        assert!(leases.is_empty());
        leases.set_valid_until(None);
        assert!(!late.is_held());
    }
}
