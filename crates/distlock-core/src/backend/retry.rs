//! Retrying, in the background, the removal of an entry a lock left on the
//! server.
//!
//! A session-based backend's lock entry (a ZooKeeper node, an etcd key on
//! the session lease) lives as long as the session that made it. If its
//! release, or the cleanup of an abandoned attempt, fails during a fault
//! (a request timed out, a member was down) and nobody tries again, the
//! entry stays behind a healthy session and everyone waits behind it until
//! the session ends. [`retry_in_background`] tries again, with backoff,
//! until the attempt says it is done: it succeeded, found the entry gone,
//! or found the session (or the client) gone, which takes the entry with
//! it.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{Backoff, BoxError};

/// How long a background retry may keep failing before it warns (once).
const RETRY_WARN_AFTER: Duration = Duration::from_secs(5);

/// What one attempt of [`retry_in_background`] found.
#[derive(Debug)]
pub enum Retry {
    /// Nothing is left to do: the entry was removed, was already gone, or
    /// went with its session (or client), which has ended.
    Done,
    /// The attempt failed and may succeed later: try again after the next
    /// backoff delay. Says why, for the log.
    Again(BoxError),
}

/// The delays between background retries of a removal: 50 ms doubling up
/// to 2 s, each with up to half of it random, so that the clients of one
/// recovering server do not retry in lockstep.
pub fn removal_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
}

/// Spawns a task that calls `attempt` after each delay of `backoff` until
/// it returns [`Retry::Done`]. `what` names the entry in the logs (e.g.
/// "a released zookeeper lock node"): every failed attempt is logged at
/// debug, and a retry still failing 5 s after it started is warned about
/// once.
///
/// Call it after the first removal failed; the first retry runs after
/// `backoff.delay(0)`. `attempt` must not keep the client or its session
/// alive between calls: hold a `Weak` reference, upgrade it in each
/// attempt, and return [`Retry::Done`] once it is gone (dropping the client
/// ends its session, and the entry with it) or the session has ended.
///
/// The task runs on the current tokio runtime. Outside one, nothing is
/// spawned: a warning names `what`, which stays until its session ends,
/// and the result is `None`.
pub fn retry_in_background<F, Fut>(
    what: &'static str,
    backoff: Backoff,
    attempt: F,
) -> Option<JoinHandle<()>>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Retry> + Send + 'static,
{
    let Ok(runtime) = Handle::try_current() else {
        tracing::warn!(
            what,
            "distlock: no runtime to retry a failed removal; it stays until its session ends"
        );
        return None;
    };
    let span = tracing::debug_span!("distlock.retry", what);
    Some(runtime.spawn(retry_until_done(what, backoff, attempt).instrument(span)))
}

async fn retry_until_done<F, Fut>(what: &'static str, backoff: Backoff, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Retry>,
{
    let started = Instant::now();
    let mut warned = false;
    let mut retry = 0u32;
    loop {
        tokio::time::sleep(backoff.delay(retry)).await;
        retry = retry.saturating_add(1);
        match attempt().await {
            Retry::Done if warned => {
                tracing::info!(
                    what,
                    retries = retry,
                    "distlock: a failed removal succeeded on retry"
                );
                return;
            }
            Retry::Done => {
                tracing::debug!(what, retries = retry, "distlock: a failed removal is done");
                return;
            }
            Retry::Again(error) => {
                tracing::debug!(what, retry, %error, "distlock: retrying a failed removal");
                if !warned && started.elapsed() >= RETRY_WARN_AFTER {
                    warned = true;
                    tracing::warn!(
                        what,
                        retries = retry,
                        %error,
                        "distlock: a failed removal keeps failing; retrying until it succeeds or its session ends"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Weak};

    use super::*;

    fn no_jitter() -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).jitter(0.0)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_until_the_attempt_is_done() {
        let attempts = Arc::new(AtomicU32::new(0));
        let counter = attempts.clone();
        let started = Instant::now();
        let task = retry_in_background("a test entry", no_jitter(), move || {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) < 6 {
                    Retry::Again("refused".into())
                } else {
                    Retry::Done
                }
            }
        })
        .expect("spawned");
        task.await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 7);
        // 50 + 100 + 200 + 400 + 800 + 1600 + 2000 (capped) ms.
        assert_eq!(started.elapsed(), Duration::from_millis(5150));
    }

    #[tokio::test(start_paused = true)]
    async fn holding_a_weak_reference_it_stops_once_the_client_is_gone() {
        let client = Arc::new(());
        let weak: Weak<()> = Arc::downgrade(&client);
        let attempts = Arc::new(AtomicU32::new(0));
        let counter = attempts.clone();
        let task = retry_in_background("a test entry", no_jitter(), move || {
            let (weak, counter) = (weak.clone(), counter.clone());
            async move {
                let Some(_client) = weak.upgrade() else {
                    return Retry::Done;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                Retry::Again("no answer".into())
            }
        })
        .expect("spawned");
        // It keeps failing while the client lives, without keeping it.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished());
        assert!(attempts.load(Ordering::SeqCst) > 10);
        assert_eq!(Arc::strong_count(&client), 1);
        drop(client);
        task.await.unwrap();
    }

    /// Counts the events logged at each level.
    #[derive(Default)]
    struct CountLevels {
        warn: AtomicU32,
        debug: AtomicU32,
        spans: AtomicU32,
    }

    impl tracing::Subscriber for CountLevels {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(u64::from(self.spans.fetch_add(1, Ordering::SeqCst)) + 1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            match *event.metadata().level() {
                tracing::Level::WARN => self.warn.fetch_add(1, Ordering::SeqCst),
                tracing::Level::DEBUG => self.debug.fetch_add(1, Ordering::SeqCst),
                _ => 0,
            };
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn each_retry_is_logged_at_debug_and_one_that_keeps_failing_warned_about_once() {
        let levels = Arc::new(CountLevels::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        tracing::subscriber::with_default(levels.clone(), || {
            runtime.block_on(async {
                let attempts = Arc::new(AtomicU32::new(0));
                let task = retry_in_background("a test entry", no_jitter(), move || {
                    let attempts = attempts.clone();
                    // About 20 s of failures, then success.
                    async move {
                        if attempts.fetch_add(1, Ordering::SeqCst) < 15 {
                            Retry::Again("no answer".into())
                        } else {
                            Retry::Done
                        }
                    }
                })
                .expect("spawned");
                task.await.unwrap();
            })
        });
        assert_eq!(levels.warn.load(Ordering::SeqCst), 1);
        // One per failed attempt, none for the success (an info, after a
        // warning).
        assert_eq!(levels.debug.load(Ordering::SeqCst), 15);
    }

    #[test]
    fn outside_a_runtime_nothing_is_spawned() {
        let spawned = retry_in_background("a test entry", no_jitter(), || async { Retry::Done });
        assert!(spawned.is_none());
    }
}
