//! Waiting in the queue: watches on the key just older than ours.
//!
//! - A waiter watches the next-older key only (its predecessor), so a
//!   release wakes exactly one waiter. When that key is deleted: if it was
//!   the oldest key when last read, the lock is ours at once (no key older
//!   than ours can appear, as a new key gets a newer revision); if it was
//!   a waiter (it may have given up while an older key still holds), one
//!   read tells.
//! - While the predecessor waits too, the waiter also watches the key
//!   older than it and reads again when that one goes, while the
//!   predecessor, now usually the owner, holds: so down a queue each
//!   handoff is the release and its event, with the read done beforehand.
//!
//! Two etcd pitfalls shape how a watch is opened:
//!
//! - **Open the watch at the current revision, then read.** A watch opened
//!   at a past revision (say, the revision of the read that found the
//!   predecessor) joins etcd's "unsynced" watcher group, which etcd 3.4
//!   catches up only every 100 ms. So the watch starts at the current
//!   revision (no start revision), and only once etcd confirmed it is the
//!   queue read again: a predecessor deleted before the watch started
//!   shows in the read, any later delete in the watch.
//! - **etcd 3.4's unsynced watchers.** etcd reads the current revision
//!   before it registers a watcher, and a write that lands in between
//!   leaves even a watcher opened at the current revision unsynced, served
//!   by that 100 ms catch-up loop instead of at once. Hence two watchers
//!   per watch stream, registered back to back: the first to report the
//!   delete wins, and both are unlikely to lose that race.

use etcd_client::{EventType, WatchStream};

use crate::acquire::{Position, Predecessor, Slot};
use crate::health::Disruptions;
use crate::rpc::Failure;
use crate::session::Binding;
use crate::EtcdLock;

impl EtcdLock {
    /// Waits until `predecessor` is deleted and returns our new position;
    /// `None` when our lease is lost meanwhile.
    pub(crate) async fn wait_for(
        &self,
        slot: Slot<'_>,
        my_revision: i64,
        predecessor: &Predecessor,
        binding: &Binding,
    ) -> Result<Option<Position>, Failure> {
        let key = slot.key;
        // A watch on a member that leaves the balancer would wait on it:
        // on a removal the wait is abandoned and starts over (a new watch,
        // then a read), on the members that answer.
        let mut disruptions = self.inner.health.disruptions();
        // Watch from the current revision, then read: the predecessor
        // deleted before the watch started shows in the read, any later
        // delete in the watch.
        let mut watch = self
            .until_disrupted(&mut disruptions, key, self.watch_key(key, &predecessor.key))
            .await?;
        // While the predecessor waits too, also watch the key older than
        // it: when that one goes, read again while the predecessor (now
        // perhaps the owner) holds, so that its release hands the lock
        // over on the event alone, without a read after it.
        let mut older_watch = match (&predecessor.older, predecessor.owner) {
            (Some(older), false) => Some((
                older.clone(),
                self.until_disrupted(&mut disruptions, key, self.watch_key(key, older))
                    .await?,
            )),
            _ => None,
        };
        // The read may have found it the owner by now.
        let mut predecessor = match self
            .until_disrupted(
                &mut disruptions,
                key,
                self.still_behind(slot, my_revision, predecessor),
            )
            .await?
        {
            Ok(now) => now,
            Err(moved) => return Ok(Some(moved)),
        };
        let deleted = loop {
            let older = match &predecessor.older {
                Some(older) if !predecessor.owner => older.clone(),
                _ => {
                    older_watch = None;
                    break tokio::select! {
                        deleted = wait_for_delete(&mut watch, &predecessor.key, predecessor.create_revision) => deleted,
                        () = binding.lost(self) => return Ok(None),
                        () = disruptions.next() => return Err(self.disrupted(key)),
                    };
                }
            };
            if older_watch.as_ref().map(|(watched, _)| watched) != Some(&older) {
                // A new older key: watch it, then read again (it may have
                // gone before the watch started).
                older_watch = Some((
                    older.clone(),
                    self.until_disrupted(&mut disruptions, key, self.watch_key(key, &older))
                        .await?,
                ));
                predecessor = match self
                    .until_disrupted(
                        &mut disruptions,
                        key,
                        self.still_behind(slot, my_revision, &predecessor),
                    )
                    .await?
                {
                    Ok(now) => now,
                    Err(moved) => return Ok(Some(moved)),
                };
                continue;
            }
            let (_, older_stream) = older_watch.as_mut().expect("watching the older key");
            tokio::select! {
                deleted = wait_for_delete(&mut watch, &predecessor.key, predecessor.create_revision) => break deleted,
                // Any delete of that name will do: it only makes us read again.
                older_deleted = wait_for_delete(older_stream, &older, 0) => {
                    older_deleted.map_err(|why| self.watch_broke(key, why))?;
                    older_watch = None;
                    predecessor = match self
                        .still_behind(slot, my_revision, &predecessor)
                        .await?
                    {
                        Ok(now) => now,
                        Err(moved) => return Ok(Some(moved)),
                    };
                }
                () = binding.lost(self) => return Ok(None),
                () = disruptions.next() => return Err(self.disrupted(key)),
            }
        };
        drop(older_watch);
        drop(watch);
        let deleted_at = deleted.map_err(|why| self.watch_broke(key, why))?;
        // The owner is gone and nothing older than our key can appear:
        // the lock is ours without another read. Our key is still there
        // unless our lease ended, which the grant checks (the session's
        // state; a lock's own lease is refreshed before the grant), just
        // as for a held lock. A predecessor on our own lease is read
        // again: revoking that lease deletes both keys in one go.
        // The delete's revision is the fencing token: every earlier
        // holder's key was gone by then.
        if predecessor.owner && predecessor.lease != binding.lease_id() {
            return Ok(Some(Position::Ours(deleted_at)));
        }
        // The predecessor was a waiter that may have given up: an older
        // key may still hold the lock.
        Ok(Some(self.position(slot, my_revision).await?))
    }

    /// Reads our position again: `Ok(now)` (its fresh view) while
    /// `predecessor` is still the key just older than ours, `Err` with the
    /// new position once that changed.
    async fn still_behind(
        &self,
        slot: Slot<'_>,
        my_revision: i64,
        predecessor: &Predecessor,
    ) -> Result<std::result::Result<Predecessor, Position>, Failure> {
        Ok(match self.position(slot, my_revision).await? {
            Position::Behind(now) if now.same_key(predecessor) => Ok(now),
            moved => Err(moved),
        })
    }

    /// `request`'s outcome, or the disrupted failure (retried) if a member
    /// leaves the balancer or the leader changes first: a request stuck on
    /// a member that stopped answering would otherwise wait out the whole
    /// timeout, and the lock with it.
    async fn until_disrupted<T>(
        &self,
        disruptions: &mut Disruptions,
        key: &str,
        request: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        tokio::select! {
            outcome = request => outcome,
            () = disruptions.next() => Err(self.disrupted(key)),
        }
    }

    /// A watch that ended or was cancelled while waiting: retried.
    fn watch_broke(&self, key: &str, why: String) -> Failure {
        Failure {
            error: self.error("wait", key, why),
            retry: true,
        }
    }

    /// A wait abandoned because a member left the balancer: retried.
    fn disrupted(&self, key: &str) -> Failure {
        Failure {
            error: self.error("wait", key, crate::rpc::interrupted()),
            retry: true,
        }
    }

    /// Opens a watch on `watched` at the current revision and waits until
    /// etcd confirms it, so that nothing after that point is missed. Two
    /// watchers on one stream, created back to back (see the module docs).
    async fn watch_key(&self, key: &str, watched: &[u8]) -> Result<WatchStream, Failure> {
        let watched = watched.to_vec();
        self.call("wait", key, async {
            let mut stream = self
                .inner
                .client
                .watch_client()
                .watch(watched.clone(), None)
                .await?;
            // Sent before the first is confirmed: no extra round trip. Its
            // own confirmation is skipped by `wait_for_delete`.
            stream.watch(watched, None).await?;
            match stream.message().await? {
                Some(response) if response.created() && !response.canceled() => Ok(stream),
                _ => Err(etcd_client::Error::WatchError(
                    "etcd did not create the watch".into(),
                )),
            }
        })
        .await
    }
}

/// Resolves when the watch reports a delete of `watched` made after
/// revision `created` (`Ok`, with the delete's revision), or breaks
/// (`Err`). Progress notifications and other events are skipped.
///
/// The revision matters: a client gives a released key's name to its next
/// attempt, and a watch opened on a member that lags (one that just came
/// back from a pause or a partition) starts at that member's older
/// revision and replays the delete of the name's previous key. Taken for
/// the delete of the predecessor that holds now, it granted the lock to a
/// second holder (found by the fault suite after a leader's pause).
async fn wait_for_delete(
    watch: &mut WatchStream,
    watched: &[u8],
    created: i64,
) -> Result<i64, String> {
    loop {
        match watch.message().await {
            Ok(Some(response)) => {
                if response.canceled() {
                    return Err(format!("watch canceled: {}", response.cancel_reason()));
                }
                let delete = response.events().iter().find_map(|event| {
                    let kv = event.kv()?;
                    (event.event_type() == EventType::Delete
                        && kv.key() == watched
                        && kv.mod_revision() > created)
                        .then(|| kv.mod_revision())
                });
                if let Some(revision) = delete {
                    return Ok(revision);
                }
            }
            Ok(None) => return Err("the watch stream ended".into()),
            Err(err) => return Err(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use etcd_client::{Client, WatchOptions};

    use super::wait_for_delete;

    /// A watch that replays the delete of an earlier key of the same name
    /// (as one opened on a lagging member does) must not take it for the
    /// delete of the key that exists now; the real delete still counts.
    #[tokio::test]
    async fn an_earlier_key_of_the_same_name_does_not_count_as_deleted() {
        if !distlock_testkit::service_ready("etcd", "127.0.0.1:2379").await {
            return;
        }
        let mut client = Client::connect(["127.0.0.1:2379"], None).await.unwrap();
        let name = format!("distlock-test/reused-name-{:016x}", fastrand::u64(..));
        let first = client.put(name.as_str(), "", None).await.unwrap();
        let first_revision = first.header().unwrap().revision();
        client.delete(name.as_str(), None).await.unwrap();
        let second = client.put(name.as_str(), "", None).await.unwrap();
        let second_revision = second.header().unwrap().revision();

        // Opened where a member 2 revisions behind would start it.
        let options = WatchOptions::new().with_start_revision(first_revision);
        let mut watch = client.watch(name.as_str(), Some(options)).await.unwrap();
        let replayed = tokio::time::timeout(
            Duration::from_millis(500),
            wait_for_delete(&mut watch, name.as_bytes(), second_revision),
        )
        .await;
        assert!(
            replayed.is_err(),
            "the replayed delete of the first key was taken for the second's: {replayed:?}"
        );

        client.delete(name.as_str(), None).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            wait_for_delete(&mut watch, name.as_bytes(), second_revision),
        )
        .await
        .expect("the second key's delete was not reported")
        .unwrap();
    }
}
