//! A holder whose process is paused past its session TTL, against the
//! shared ZooKeeper on 127.0.0.1:2181.
//!
//! The holder's client runs on a current-thread runtime of its own, which
//! runs only inside `block_on`: between two calls nothing of the holder
//! runs (not its client's I/O, heartbeat or state watcher, nor its guard's
//! renewal), as under SIGSTOP. On resuming it has seen no disconnect.

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions, LostReason};
use distlock_zookeeper::ZooKeeperLock;

const URL: &str = "zk://127.0.0.1:2181/distlock-pause?session_ttl=2s";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Found by issue 12's fault run: `is_held()` returned true right after
/// SIGCONT while another worker held the lock. Validity must follow the
/// clock (the last answer from the server plus the session TTL), not only
/// the connection state.
#[test]
fn a_holder_paused_past_its_session_does_not_believe_it_holds() {
    let others = runtime();
    if !others.block_on(distlock_testkit::service_ready(
        "zookeeper",
        "127.0.0.1:2181",
    )) {
        return;
    }
    let key = distlock_testkit::unique_key("paused-holder");
    let holder = runtime();
    let (client, guard) = holder.block_on(async {
        let client = ZooKeeperLock::connect(URL).await.expect("connect");
        let guard = client
            .try_lock(&key, &LockOptions::new())
            .await
            .expect("try_lock")
            .expect("free");
        (client, guard)
    });
    assert!(guard.is_held());

    // The holder is paused from here. The server expires its session one
    // TTL after it last heard from it, deletes its node, and the waiter
    // is granted the lock.
    let (other, granted) = others.block_on(async {
        let other = ZooKeeperLock::connect(URL).await.expect("connect");
        let wait = LockOptions::new().wait(Duration::from_secs(30));
        let granted = other
            .lock(&key, &wait)
            .await
            .expect("granted after the expiry");
        (other, granted)
    });

    // Resumed: the first thing it asks, before anything of it has run.
    holder.block_on(async {
        assert!(
            !guard.is_held(),
            "the paused holder believes it holds while another does: {guard:?}"
        );
        assert_eq!(guard.lost_reason(), Some(LostReason::Expired));
        let lost = tokio::time::timeout(Duration::ZERO, guard.lost()).await;
        assert_eq!(lost.ok(), Some(LostReason::Expired), "lost() fires at once");
        assert!(guard.release().await.unwrap_err().is_not_held());
        drop(client);
    });
    others.block_on(async {
        assert!(granted.is_held());
        granted.release().await.expect("the waiter's release");
        drop(other);
    });
}
