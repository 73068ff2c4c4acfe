//! Faults on a private etcd: lease revoked, server paused past the TTL,
//! server restarted; and connecting to nothing.

mod support;

use std::time::{Duration, Instant};

use distlock_core::{DistributedLock, Error, LockGuard, LockOptions, LostReason};
use distlock_etcd::EtcdLock;
use distlock_testkit::servers::{free_port, PrivateEtcd};
use support::{grown, EtcdTestExt};

/// A private etcd with 3 s sessions and two clients of it, the first holding `key`: `(etcd, a, b, guard)`.
async fn two_clients_first_holding(
    key: &str,
    options: &LockOptions,
) -> Option<(PrivateEtcd, EtcdLock, EtcdLock, LockGuard)> {
    let etcd = PrivateEtcd::start().await?;
    let url = etcd.url("session_ttl=3s");
    let (a, b) = (
        EtcdLock::connect(&url).await.unwrap(),
        EtcdLock::connect(&url).await.unwrap(),
    );
    let guard = a.try_lock(key, options).await.unwrap().unwrap();
    Some((etcd, a, b, guard))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_session_lease_fires_lost() {
    let options = LockOptions::new().ttl(Duration::from_secs(3));
    let Some((etcd, a, b, guard)) = two_clients_first_holding("revoked", &options).await else {
        return;
    };
    let mut raw = etcd.raw_client().await;
    raw.lease_revoke(a.session_lease_id()).await.unwrap();
    // The next keep-alive (every session_ttl / 3) learns it.
    let reason = tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() did not fire after the session lease was revoked");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason}");
    assert!(!guard.is_held());
    let next = b
        .try_lock("revoked", &options)
        .await
        .unwrap()
        .expect("the lock was freed");
    assert!(next.fencing_token() > guard.fencing_token());
    let err = guard.release().await.expect_err("released a revoked lock");
    assert!(err.is_not_held(), "{err}");
    // The client carries on with a new session.
    let old_session = a.session_lease_id();
    let again = a.try_lock("other", &options).await.unwrap().unwrap();
    assert_ne!(a.session_lease_id(), old_session);
    assert!(again.is_held());
    again.release().await.unwrap();
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_makes_the_guard_lost_before_the_lease_can_expire() {
    let Some(etcd) = PrivateEtcd::start().await else {
        return;
    };
    let url = etcd.url("session_ttl=3s&timeout=1s");
    let a = EtcdLock::connect(&url).await.unwrap();
    let options = LockOptions::new().ttl(Duration::from_secs(3));
    let guard = a.try_lock("paused", &options).await.unwrap().unwrap();
    let token = guard.fencing_token();
    // The last keep-alive that can have reached etcd was sent before the
    // pause, so the server may expire the lease from `paused_at + ttl` on.
    let paused_at = Instant::now();
    etcd.pause();
    let reason = tokio::time::timeout(Duration::from_secs(6), guard.lost())
        .await
        .expect("lost() did not fire while etcd was paused");
    let lost_after = paused_at.elapsed();
    etcd.resume();
    assert!(
        lost_after <= Duration::from_secs(3),
        "reported held {lost_after:?} after the last possible keep-alive (TTL 3s)"
    );
    assert!(!guard.is_held(), "{reason}");
    // Once etcd is back, the lock is free for others, with a larger token,
    // and the stale guard cannot release it.
    let b = EtcdLock::connect(&url).await.unwrap();
    let next = b
        .lock("paused", &LockOptions::new().wait(Duration::from_secs(10)))
        .await
        .expect("the lock of the lost session was not freed");
    assert!(next.fencing_token() > token);
    let err = guard.release().await.expect_err("stale release");
    assert!(err.is_not_held(), "{err}");
    assert!(next.is_held());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_survives_a_quick_server_restart() {
    let Some(mut etcd) = PrivateEtcd::start().await else {
        return;
    };
    let url = etcd.url("session_ttl=10s&timeout=1s");
    let a = EtcdLock::connect(&url).await.unwrap();
    let options = LockOptions::new().ttl(Duration::from_secs(10));
    let guard = a.try_lock("restart", &options).await.unwrap().unwrap();
    let token = guard.fencing_token();
    let deadline_before = guard.valid_until().unwrap();
    etcd.restart().await;
    // The keep-alive reconnects and moves the deadline forward; wait for
    // that on the lease itself.
    let renewed = tokio::time::timeout(Duration::from_secs(8), async {
        while guard.valid_until().unwrap() <= deadline_before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        renewed.is_ok(),
        "the session was not kept alive across the restart"
    );
    assert!(guard.is_held());
    let b = EtcdLock::connect(&url).await.unwrap();
    assert!(
        b.try_lock("restart", &options).await.unwrap().is_none(),
        "a second owner after the restart"
    );
    guard.release().await.expect("release after the restart");
    let next = b.try_lock("restart", &options).await.unwrap().unwrap();
    assert!(next.fencing_token() > token, "tokens survive the restart");
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_clear_error_at_once() {
    // A port nobody listens on.
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let err = EtcdLock::connect(&format!("etcd://{endpoint},{endpoint}/x"))
        .await
        .expect_err("connected to nothing");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    let source = std::error::Error::source(&err)
        .expect("source kept")
        .to_string();
    assert!(source.to_lowercase().contains("refused"), "{source}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_session_is_revoked_queues_again() {
    let options = LockOptions::new().ttl(Duration::from_secs(3));
    let Some((etcd, a, b, guard)) = two_clients_first_holding("requeue", &options).await else {
        return;
    };
    let waiting = tokio::spawn({
        let (b, options) = (b.clone(), options.clone());
        async move {
            b.lock("requeue", &options.wait(Duration::from_secs(20)))
                .await
        }
    });
    let mut raw = etcd.raw_client().await;
    let prefix = a.lock_key_prefix("requeue");
    let queue = |raw: &mut etcd_client::Client| {
        let mut raw = raw.clone();
        let prefix = prefix.clone();
        async move {
            let listing = raw
                .get(
                    prefix.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            listing
                .kvs()
                .iter()
                .map(|kv| kv.lease())
                .collect::<Vec<_>>()
        }
    };
    // Wait (polling: no outside event) until the waiter is queued.
    let mut leases = Vec::new();
    for _ in 0..100 {
        leases = queue(&mut raw).await;
        if leases.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(leases.len(), 2, "waiter not queued");
    let old_session = b.session_lease_id();
    raw.lease_revoke(old_session).await.unwrap();
    // The waiter notices at its next keep-alive and queues again on a new
    // session.
    let mut requeued = false;
    for _ in 0..100 {
        let leases = queue(&mut raw).await;
        if leases.len() == 2 && !leases.contains(&old_session) {
            requeued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        requeued,
        "the waiter did not queue again: queue {:?}, old session {old_session}, session now {}",
        queue(&mut raw).await,
        b.session_lease_id()
    );
    assert!(!waiting.is_finished());
    guard.release().await.unwrap();
    let next = waiting
        .await
        .unwrap()
        .expect("the requeued waiter got the lock");
    assert!(next.is_held());
    assert_ne!(b.session_lease_id(), old_session);
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_reach_an_etcd_with_auth_on() {
    let Some(etcd) = PrivateEtcd::start().await else {
        return;
    };
    let mut raw = etcd.raw_client().await;
    raw.user_add("root", "r00t pw", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();

    let url = format!("etcd://root:r00t%20pw@{}/locked", etcd.endpoint());
    let locks = EtcdLock::connect(&url)
        .await
        .expect("connect with credentials");
    let guard = locks
        .try_lock("k", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();

    let wrong = format!("etcd://root:wrong-secret@{}/locked", etcd.endpoint());
    let err = EtcdLock::connect(&wrong)
        .await
        .expect_err("wrong password accepted");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        !format!("{err} {err:?}").contains("wrong-secret"),
        "{err:?}"
    );
}

/// A holder and a waiter on the same session: revoking that lease deletes
/// both keys at one revision. The waiter sees its predecessor's delete, but
/// its own key is gone too: it must not take the lock on the dead session
/// (it reads again, finds its key gone, and queues on a new session).
/// In the distlock layout one lease queues any number of times for a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_its_own_sessions_holder_is_not_granted_when_the_lease_is_revoked() {
    waiter_behind_its_own_session("layout=distlock", "same-session", "same-session").await;
}

/// The same in the mutex layout, where a lease has one key per lock (a
/// second attempt of a client on a held lock takes a lease of its own):
/// the holder's key is under the waiter's prefix because its lock's name
/// extends the waiter's, as `concurrency.Mutex` has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_behind_its_own_sessions_holder_of_a_nested_name_is_not_granted_when_the_lease_is_revoked(
) {
    waiter_behind_its_own_session("layout=mutex", "same-session/inner", "same-session").await;
}

async fn waiter_behind_its_own_session(layout: &str, held: &str, waited: &'static str) {
    let Some(etcd) = PrivateEtcd::start().await else {
        return;
    };
    // A long session TTL: no keep-alive will notice the revoke in time.
    let locks = EtcdLock::connect(&etcd.url(&format!("session_ttl=60s&{layout}")))
        .await
        .unwrap();
    let options = LockOptions::new().ttl(Duration::from_secs(60));
    let holder = locks.try_lock(held, &options).await.unwrap().unwrap();
    let before = etcd.grpc_counters().await;
    let waiting = tokio::spawn({
        let (locks, options) = (locks.clone(), options.clone());
        async move {
            locks
                .lock(waited, &options.wait(Duration::from_secs(20)))
                .await
        }
    });
    // Wait (polling etcd's counters: no outside event) until the waiter
    // watches its predecessor: its txn, watch and one read are done.
    let mut queued = false;
    for _ in 0..300 {
        let seen = grown(&before, &etcd.grpc_counters().await);
        if seen.get("grpc_server_handled_total/Range") == Some(&1.0)
            && seen.get("grpc_server_started_total/Watch") == Some(&1.0)
        {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "the waiter did not queue");
    let mut raw = etcd.raw_client().await;
    let prefix = locks.lock_key_prefix(waited);
    let list = etcd_client::GetOptions::new().with_prefix();
    let old_session = locks.session_lease_id();
    raw.lease_revoke(old_session).await.unwrap();

    let next = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter queued again")
        .unwrap()
        .unwrap();
    // Granted on a new session, with a key that exists; the holder learnt
    // of the loss on the way.
    assert_ne!(locks.session_lease_id(), old_session);
    let queued = raw.get(prefix.as_str(), Some(list)).await.unwrap();
    assert_eq!(queued.kvs().len(), 1);
    assert_eq!(queued.kvs()[0].lease(), locks.session_lease_id());
    assert_eq!(
        queued.kvs()[0].create_revision() as u64,
        next.fencing_token()
    );
    assert!(!holder.is_held());
    assert!(next.is_held());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_locks_key_deleted_by_hand_fires_lost() {
    // Session-bound: the lock's TTL is the session's 3 s.
    let options = LockOptions::new().ttl(Duration::from_secs(3));
    let Some((etcd, a, b, guard)) = two_clients_first_holding("deleted", &options).await else {
        return;
    };
    let mut raw = etcd.raw_client().await;
    let prefix = a.lock_key_prefix("deleted");
    let deleted = raw
        .delete(
            prefix.as_str(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 1, "the holder's key");
    // The session is fine; the check every ttl / 3 finds the key gone.
    let reason = tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() did not fire after the lock's key was deleted");
    // `Expired` here means that neither the keep-alive nor the ownership
    // check got an answer for a whole session TTL: a stalled server, not
    // the deleted key. Its log (slow fdatasync, apply took too long) says.
    assert_eq!(
        reason,
        LostReason::NotHeld,
        "{reason}; the private etcd's log:\n{}",
        etcd.log()
    );
    assert!(!guard.is_held());
    let next = b
        .try_lock("deleted", &options)
        .await
        .unwrap()
        .expect("the key is free");
    assert!(matches!(guard.release().await, Err(Error::NotHeld { .. })));
    next.release().await.unwrap();
}

/// A session-bound holder and the first of its two locks, on a private
/// etcd with a 60 s session, and a raw client: the keep-alive (every 20 s)
/// cannot learn of a revoke before the test is done.
async fn two_locks_on_a_long_session() -> Option<(PrivateEtcd, EtcdLock, LockGuard, LockGuard)> {
    let etcd = PrivateEtcd::start().await?;
    let locks = EtcdLock::connect(&etcd.url("session_ttl=60s"))
        .await
        .unwrap();
    let options = LockOptions::new().ttl(Duration::from_secs(60));
    let checked = locks.try_lock("checked", &options).await.unwrap().unwrap();
    let other = locks.try_lock("other", &options).await.unwrap().unwrap();
    Some((etcd, locks, checked, other))
}

/// The ordering that made `revoking_the_session_lease_fires_lost` flaky,
/// made certain: the session lease is revoked (deleting the lock's key
/// with it) and the lock's ownership check, which the renewal runs every
/// ttl / 3, finds the key gone before the session's keep-alive finds the
/// lease gone. The loss is the session's, on this lock and every other
/// one it carried, not a plain `NotHeld`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_finds_the_key_gone_with_the_session_lease_loses_the_session() {
    let Some((etcd, locks, checked, other)) = two_locks_on_a_long_session().await else {
        return;
    };
    let old_session = locks.session_lease_id();
    let mut raw = etcd.raw_client().await;
    raw.lease_revoke(old_session).await.unwrap();
    // What the renewal does at ttl / 3, now.
    let err = checked
        .extend(Duration::from_secs(60))
        .await
        .expect_err("extended a lock whose key is gone");
    assert!(err.is_not_held(), "{err}");
    let reason = checked.lost_reason().expect("the lock is lost");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason}");
    let reason = other
        .lost_reason()
        .expect("the session's other lock is lost");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason}");
    // The next attempt opens a new session at once.
    let again = locks
        .try_lock("checked", &LockOptions::new().ttl(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the key went with the lease");
    assert_ne!(locks.session_lease_id(), old_session);
    again.release().await.unwrap();
}

/// The same on release: a release that finds the key gone with the
/// session lease ends the session, so its other locks learn of it now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_finds_the_key_gone_with_the_session_lease_loses_the_session() {
    let Some((etcd, locks, released, other)) = two_locks_on_a_long_session().await else {
        return;
    };
    let mut raw = etcd.raw_client().await;
    raw.lease_revoke(locks.session_lease_id()).await.unwrap();
    let lost = released.lost();
    let err = released
        .release()
        .await
        .expect_err("released a lock whose key is gone");
    assert!(err.is_not_held(), "{err}");
    let reason = lost.await;
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason}");
    let reason = other
        .lost_reason()
        .expect("the session's other lock is lost");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason}");
}

/// A key deleted by hand while the session lease lives is `NotHeld`, and
/// the session carries on: only a lease that is gone ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_finds_only_the_key_gone_keeps_the_session() {
    let Some((etcd, locks, checked, other)) = two_locks_on_a_long_session().await else {
        return;
    };
    let session = locks.session_lease_id();
    let mut raw = etcd.raw_client().await;
    let prefix = locks.lock_key_prefix("checked");
    let deleted = raw
        .delete(
            prefix.as_str(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 1, "the holder's key");
    let err = checked
        .extend(Duration::from_secs(60))
        .await
        .expect_err("extended a lock whose key is gone");
    assert!(err.is_not_held(), "{err}");
    assert_eq!(checked.lost_reason(), Some(LostReason::NotHeld));
    assert!(other.is_held());
    assert_eq!(locks.session_lease_id(), session);
    other.release().await.unwrap();
}
