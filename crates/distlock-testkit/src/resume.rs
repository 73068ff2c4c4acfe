//! The conformance case of [`DistributedLock::resume`].

use std::time::Duration;

use distlock_core::LockOptions;

use crate::{unique_key, Harness};

/// Another client resumes a lock from its holder's resume token and then
/// controls the same lease: the lock stays exclusive, the resumed guard
/// extends and releases it, and a made-up or spent token is `NotHeld`.
/// A backend that cannot resume says so with `Unsupported`, and
/// `capabilities().resumable` agrees with what it does.
pub async fn resume_from_token(harness: &Harness) {
    let name = harness.name();
    let (holder, other) = (harness.client().await, harness.client().await);
    let key = unique_key("resume");
    let options = LockOptions::new()
        .ttl(Duration::from_secs(5))
        .auto_renew(false);
    let guard = super::cases::must_try_lock(harness, &*holder, &key, &options).await;
    let token = guard.fencing_token();
    let Some(resume_token) = guard.resume_token() else {
        assert!(
            !holder.capabilities().resumable,
            "{name}: claims resumable but its guard has no resume token"
        );
        let err = other
            .resume(&key, token, &"0".repeat(32), &options)
            .await
            .expect_err("resume on a backend that cannot");
        assert!(
            err.is_unsupported(),
            "{name}: resume gave {err}, not Unsupported"
        );
        guard.release().await.expect("release");
        return;
    };
    assert!(
        holder.capabilities().resumable,
        "{name}: gives resume tokens but does not claim resumable"
    );
    assert!(
        resume_token.len() >= 32,
        "{name}: a resume token of {} chars cannot hold 128 random bits",
        resume_token.len()
    );
    assert!(
        !format!("{guard:?}").contains(&resume_token),
        "{name}: the guard's Debug output shows its resume token"
    );

    let resumed = other
        .resume(&key, token, &resume_token, &options)
        .await
        .unwrap_or_else(|err| panic!("{name}: resume of a held lock failed: {err}"));
    assert_eq!(resumed.fencing_token(), token);
    assert_eq!(resumed.key(), key);
    let remaining = resumed.remaining().unwrap_or_default();
    assert!(
        resumed.is_held() && remaining > Duration::ZERO && remaining <= Duration::from_secs(5),
        "{name}: a resumed guard vouches for {remaining:?} of a 5s lease"
    );
    super::cases::must_be_busy(harness, &*other, &key).await;
    resumed
        .extend(Duration::from_secs(10))
        .await
        .unwrap_or_else(|err| panic!("{name}: extend through the resumed guard failed: {err}"));

    let mut forged = resume_token.clone();
    let last = forged.pop().expect("non-empty token");
    forged.push(if last == '0' { '1' } else { '0' });
    let err = other
        .resume(&key, token, &forged, &options)
        .await
        .expect_err("resume with a made-up token");
    assert!(
        err.is_not_held(),
        "{name}: a made-up token gave {err}, not NotHeld"
    );

    resumed
        .release()
        .await
        .expect("release through the resumed guard");
    let err = guard
        .release()
        .await
        .expect_err("release of a lease already released");
    assert!(err.is_not_held(), "{name}: {err}");
    let err = other
        .resume(&key, token, &resume_token, &options)
        .await
        .expect_err("resume of a released lock");
    assert!(
        err.is_not_held(),
        "{name}: a spent token gave {err}, not NotHeld"
    );
    let next = super::cases::must_try_lock(harness, &*other, &key, &options).await;
    assert!(
        next.fencing_token() > token,
        "{name}: fencing token went back"
    );
    next.release().await.expect("release");
}
