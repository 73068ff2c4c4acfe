//! One task per client that starts each lock's renewal when it falls due.
//!
//! The core renews a lock with a task of its own, every `ttl / 3`. Most
//! locks are released long before their first renewal, and for a backend
//! whose whole cycle takes microseconds (in-process, local files) spawning
//! and aborting that task was a large part of the cycle. A
//! [`RenewalScheduler`] keeps the locks it was given in a table instead and
//! starts a lock's renewal task only when its first renewal is due; a lock
//! released before then costs one insert and one remove.
//!
//! The scheduler's own task runs on the runtime of the lock that started
//! it and ends when nothing is pending; a lock's renewal task runs on the
//! runtime that granted the lock. If the scheduler's runtime shuts down,
//! the next lock scheduled starts a new one (and with it every lock still
//! pending).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::backend::HeldLock;
use crate::guard::renew_until_lost;
use crate::lease::Lease;

/// Starts the renewal of a client's locks when each falls due. Backends
/// keep one per client and pass it to [`scheduled_guard`](crate::backend::scheduled_guard).
#[derive(Default)]
pub struct RenewalScheduler {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RenewalScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("RenewalScheduler")
            .field("pending", &state.pending.len())
            .field("renewing", &state.renewing.len())
            .finish()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the scheduler's task when a lock falls due before its plan.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Locks whose first renewal is not due yet.
    pending: HashMap<u64, Pending, IdHash>,
    /// Locks whose renewal task runs.
    renewing: HashMap<u64, AbortHandle, IdHash>,
    /// The generation of the scheduler task that runs, if one does.
    running: Option<u64>,
    generations: u64,
    /// When that task plans to wake.
    target: Option<Instant>,
}

/// Hashes the scheduler's ids, which it makes itself (sequential, never
/// chosen by a caller), with one multiplication: SipHash's resistance to
/// chosen keys buys nothing here and cost two hashes per lock.
type IdHash = BuildHasherDefault<IdHasher>;

#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(self.0 ^ u64::from(*byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing spreads sequential ids over both the low bits
        // (the bucket) and the high bits (the control byte).
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Pending {
    due: Instant,
    backend: &'static str,
    lease: Lease,
    held: Arc<dyn HeldLock>,
    runtime: Handle,
}

/// A lock's place in the scheduler; [`cancel`](Self::cancel) (or drop)
/// takes it out and stops its renewal.
pub(crate) struct Scheduled {
    shared: Arc<Shared>,
    id: u64,
}

impl Scheduled {
    pub(crate) fn cancel(self) {}
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state.pending.remove(&self.id).is_none() {
            if let Some(task) = state.renewing.remove(&self.id) {
                task.abort();
            }
        }
    }
}

impl RenewalScheduler {
    /// A scheduler with nothing to renew yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Renews `lease` through `held` from `ttl / 3` on, on `runtime`.
    pub(crate) fn schedule(
        &self,
        backend: &'static str,
        lease: &Lease,
        held: Arc<dyn HeldLock>,
        runtime: &Handle,
    ) -> Scheduled {
        let due = Instant::now() + lease.ttl() / 3;
        let mut state = self.shared.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.pending.insert(
            id,
            Pending {
                due,
                backend,
                lease: lease.clone(),
                held,
                runtime: runtime.clone(),
            },
        );
        if state.running.is_none() {
            state.generations += 1;
            let generation = state.generations;
            state.running = Some(generation);
            state.target = Some(due);
            runtime.spawn(drive(Arc::downgrade(&self.shared), generation));
        } else if state.target.is_none_or(|target| due < target) {
            state.target = Some(due);
            self.shared.wake.notify_one();
        }
        Scheduled {
            shared: self.shared.clone(),
            id,
        }
    }
}

/// Marks the scheduler task gone however it ends (its runtime may shut
/// down while it sleeps), unless a newer one took over.
struct Running {
    shared: Weak<Shared>,
    generation: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut state = shared.lock();
            if state.running == Some(self.generation) {
                state.running = None;
                state.target = None;
            }
        }
    }
}

/// The scheduler's task: starts the renewal of each lock that falls due,
/// sleeps until the next, and ends when nothing is pending.
async fn drive(shared: Weak<Shared>, generation: u64) {
    let _running = Running {
        shared: shared.clone(),
        generation,
    };
    let Some(shared) = shared.upgrade() else {
        return;
    };
    loop {
        // Registered before the table is read: a lock scheduled after the
        // read leaves a permit, so its wake-up is not lost.
        let notified = shared.wake.notified();
        let next = {
            let mut state = shared.lock();
            let now = Instant::now();
            let due: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, pending)| pending.due <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                let Some(pending) = state.pending.remove(&id) else {
                    continue;
                };
                let task = pending.runtime.spawn(renew_until_lost(
                    pending.backend,
                    pending.lease,
                    pending.held,
                    Duration::ZERO,
                ));
                state.renewing.insert(id, task.abort_handle());
            }
            // Renewal tasks end when their lock is lost.
            state.renewing.retain(|_, task| !task.is_finished());
            let next = state.pending.values().map(|pending| pending.due).min();
            state.target = next;
            match next {
                Some(next) => next,
                None => {
                    state.running = None;
                    return;
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = notified => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::lease::validity_deadline;
    use crate::Result;

    /// Counts renewals and keeps the lease valid, like a backend's extend.
    struct Counting {
        lease: Lease,
        extends: AtomicUsize,
    }

    #[async_trait]
    impl HeldLock for Counting {
        async fn release(&self) -> Result<()> {
            Ok(())
        }

        async fn extend(&self, ttl: Duration) -> Result<()> {
            self.extends.fetch_add(1, Ordering::SeqCst);
            self.lease
                .set_valid_until(Some(validity_deadline(Instant::now(), ttl)));
            Ok(())
        }
    }

    fn lock(ttl: Duration) -> (Lease, Arc<Counting>) {
        let lease = Lease::new("k", 1, ttl, Some(validity_deadline(Instant::now(), ttl)));
        let held = Arc::new(Counting {
            lease: lease.clone(),
            extends: AtomicUsize::new(0),
        });
        (lease, held)
    }

    fn table(scheduler: &RenewalScheduler) -> (usize, usize) {
        let state = scheduler.shared.lock();
        (state.pending.len(), state.renewing.len())
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_released_before_it_is_due_is_never_renewed() {
        let scheduler = RenewalScheduler::new();
        let (lease, held) = lock(Duration::from_millis(300));
        let scheduled = scheduler.schedule("test", &lease, held.clone(), &Handle::current());
        assert_eq!(table(&scheduler), (1, 0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        scheduled.cancel();
        assert_eq!(table(&scheduler), (0, 0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(held.extends.load(Ordering::SeqCst), 0);
        assert!(!lease.is_held(), "nothing renewed it past its deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lock_is_renewed_every_third_of_its_ttl_from_its_due_time() {
        let scheduler = RenewalScheduler::new();
        let (lease, held) = lock(Duration::from_millis(300));
        let scheduled = scheduler.schedule("test", &lease, held.clone(), &Handle::current());
        tokio::time::sleep(Duration::from_millis(90)).await;
        assert_eq!(held.extends.load(Ordering::SeqCst), 0, "not due yet");
        // Renewals at 100, 200, ... 1,000 ms.
        tokio::time::sleep(Duration::from_millis(960)).await;
        let extends = held.extends.load(Ordering::SeqCst);
        assert!((9..=11).contains(&extends), "{extends} renewals");
        assert!(lease.is_held());
        assert_eq!(table(&scheduler), (0, 1));
        scheduled.cancel();
        assert_eq!(table(&scheduler), (0, 0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(held.extends.load(Ordering::SeqCst), extends, "stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_due_lock_wakes_the_scheduler() {
        let scheduler = RenewalScheduler::new();
        let (long, long_held) = lock(Duration::from_secs(30));
        let _long = scheduler.schedule("test", &long, long_held.clone(), &Handle::current());
        // The scheduler's task now sleeps until 10 s.
        tokio::task::yield_now().await;
        let (short, short_held) = lock(Duration::from_millis(300));
        let _short = scheduler.schedule("test", &short, short_held.clone(), &Handle::current());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(short_held.extends.load(Ordering::SeqCst) >= 3);
        assert!(short.is_held());
        assert_eq!(long_held.extends.load(Ordering::SeqCst), 0);
    }

    /// The scheduler's task runs on the runtime of the lock that started
    /// it; when that runtime is gone, the next lock starts a new task, on
    /// its own runtime.
    #[test]
    fn a_scheduler_outlives_the_runtime_that_started_it() {
        let scheduler = RenewalScheduler::new();
        let runtime = |paused| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(paused)
                .build()
                .unwrap()
        };
        let first = runtime(true);
        let (lease, held) = first.block_on(async { lock(Duration::from_millis(300)) });
        let scheduled = first.block_on(async {
            let scheduled = scheduler.schedule("test", &lease, held.clone(), &Handle::current());
            tokio::task::yield_now().await;
            scheduled
        });
        drop(first);
        // The first task was dropped with its runtime: the lock is still
        // pending, and the next lock starts a task that serves both.
        assert_eq!(table(&scheduler), (1, 0));
        let second = runtime(true);
        second.block_on(async {
            let (other, other_held) = lock(Duration::from_millis(300));
            let _other = scheduler.schedule("test", &other, other_held.clone(), &Handle::current());
            tokio::time::sleep(Duration::from_millis(350)).await;
            assert!(other_held.extends.load(Ordering::SeqCst) >= 3);
        });
        // The first lock's renewal was started too, on the runtime that
        // granted it, which is gone: it never ran there.
        drop(scheduled);
        assert_eq!(table(&scheduler).0, 0);
    }
}
