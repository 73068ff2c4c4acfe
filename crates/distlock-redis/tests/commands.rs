//! Counts the commands a private Redis executed (MONITOR) to prove the
//! round-trip claims: try_lock + release is 2 commands, a waiter does not
//! poll while nothing happens, renewal is one pipeline per tick.

use std::time::Duration;

use distlock_core::{DistributedLock, LockOptions};
use distlock_redis::RedisLock;
use distlock_testkit::servers::PrivateRedis;
use futures::StreamExt;

/// The commands clients sent between two markers, without those scripts
/// ran themselves (MONITOR shows those as `[0 lua]`).
struct Monitor {
    lines: std::pin::Pin<Box<dyn futures::Stream<Item = String> + Send>>,
    marker_conn: redis::aio::MultiplexedConnection,
}

impl Monitor {
    async fn start(server: &PrivateRedis) -> Monitor {
        let client = redis::Client::open(server.url()).unwrap();
        let monitor = client.get_async_monitor().await.unwrap();
        let mut this = Monitor {
            lines: Box::pin(monitor.into_on_message::<String>()),
            marker_conn: client.get_multiplexed_async_connection().await.unwrap(),
        };
        // MONITOR is live once it shows a command sent after it.
        this.section("ready").await;
        this
    }

    /// Sends a marker and returns every client command seen before it.
    async fn section(&mut self, name: &str) -> Vec<String> {
        let marker = format!("distlock-marker-{name}-{}", fastrand::u64(..));
        let _: String = redis::cmd("ECHO")
            .arg(&marker)
            .query_async(&mut self.marker_conn)
            .await
            .unwrap();
        let mut seen = Vec::new();
        loop {
            let line = self.next_line().await;
            if line.contains(&marker) {
                return seen;
            }
            if is_client_command(&line) {
                seen.push(line);
            }
        }
    }

    /// Client commands from now until (and with) the first that `stop`
    /// accepts.
    async fn until(&mut self, mut stop: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self.next_line().await;
            if !is_client_command(&line) {
                continue;
            }
            let done = stop(&line);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    /// The next line MONITOR shows.
    async fn next_line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), self.lines.next())
            .await
            .expect("MONITOR went quiet")
            .expect("MONITOR ended")
    }

    /// The names of the commands of [`section`](Self::section).
    async fn section_names(&mut self, name: &str) -> Vec<String> {
        self.section(name)
            .await
            .iter()
            .map(|l| command_name(l))
            .collect()
    }
}

/// A command a client sent: not one a script ran (`[0 lua]`), nor a
/// section marker.
/// A plain synchronous connection to `server`, for checks.
fn conn(server: &PrivateRedis) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn is_client_command(line: &str) -> bool {
    !line.contains(" lua]") && !line.contains("distlock-marker-")
}

fn command_name(line: &str) -> String {
    line.split("] \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
        .to_uppercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_try_lock_and_release_are_two_round_trips() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut monitor = Monitor::start(&server).await;
    for fair in ["true", "false"] {
        let client = RedisLock::connect(&format!("{}?fair={fair}", server.url()))
            .await
            .unwrap();
        // Warm up: the first call loads the scripts into the server.
        let warm = client
            .try_lock("warm-up", &LockOptions::new())
            .await
            .unwrap()
            .unwrap();
        warm.release().await.unwrap();
        monitor.section("after-warm-up").await;
        for round in 0..3 {
            let guard = client
                .try_lock("counted", &LockOptions::new())
                .await
                .unwrap()
                .expect("free");
            guard.release().await.unwrap();
            let commands = monitor.section("try-lock-release").await;
            let names: Vec<String> = commands.iter().map(|l| command_name(l)).collect();
            assert_eq!(
                names,
                ["EVALSHA", "EVALSHA"],
                "fair={fair} round {round}: {commands:#?}"
            );
        }
        // lock() on a free key is one round trip too.
        let guard = client.lock("counted", &LockOptions::new()).await.unwrap();
        guard.release().await.unwrap();
        let commands = monitor.section("lock-release").await;
        assert_eq!(commands.len(), 2, "fair={fair}: {commands:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_does_not_poll_while_nothing_is_released() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut monitor = Monitor::start(&server).await;
    for fair in ["true", "false"] {
        let holder = RedisLock::connect(&format!("{}?fair={fair}", server.url()))
            .await
            .unwrap();
        let waiter = RedisLock::connect(&format!("{}?fair={fair}", server.url()))
            .await
            .unwrap();
        let guard = holder
            .try_lock("held", &LockOptions::new().ttl(Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
        monitor.section("held").await;
        let wait = Duration::from_secs(2);
        let options = LockOptions::new().wait(wait);
        let err = waiter
            .lock("held", &options)
            .await
            .expect_err("held for 30s");
        assert!(err.is_timeout(), "{err}");
        // Let the dropped waiter's background cleanup reach the server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let commands = monitor.section("waited").await;
        let attempts = commands
            .iter()
            .filter(|l| command_name(l) == "EVALSHA" && l.contains("\"4\""))
            .count();
        // With the default backoff (5 ms doubling to 500 ms) a polling
        // waiter would have tried about 10 times in 2 s. This one tries,
        // subscribes, tries again, then sleeps until a release or the
        // holder's TTL; a fair waiter refreshes its queue entry each second.
        let allowed = if fair == "true" { 2 + 2 } else { 2 };
        assert!(
            (2..=allowed).contains(&attempts),
            "fair={fair}: {attempts} attempts in {wait:?}: {commands:#?}"
        );
        let subscribes = commands
            .iter()
            .filter(|l| command_name(l) == "SUBSCRIBE")
            .count();
        assert_eq!(subscribes, 1, "fair={fair}: {commands:#?}");
        guard.release().await.unwrap();
        monitor.section("released").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_of_many_locks_is_one_pipeline_per_tick() {
    const LOCKS: usize = 40;
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let client = RedisLock::connect(&server.url()).await.unwrap();
    let ttl = Duration::from_millis(900);
    let mut guards = Vec::new();
    for i in 0..LOCKS {
        let guard = client
            .try_lock(&format!("renewed/{i}"), &LockOptions::new().ttl(ttl))
            .await
            .unwrap()
            .unwrap();
        guards.push(guard);
    }
    let mut monitor = Monitor::start(&server).await;
    monitor.section("start").await;
    // Several renewal ticks (ttl / 3 = 300 ms) pass.
    let watched = Duration::from_millis(1500);
    tokio::time::sleep(watched).await;
    let commands = monitor.section("renewed").await;
    assert!(
        guards.iter().all(|g| g.is_held()),
        "renewal kept every lock"
    );
    let scripts = commands
        .iter()
        .filter(|l| command_name(l) == "SCRIPT")
        .count();
    let extends = commands
        .iter()
        .filter(|l| command_name(l) == "EVALSHA")
        .count();
    // Each tick is one pipeline of one EVALSHA per lock, and no SCRIPT
    // LOAD: the script is loaded only when a server says it lacks it (on
    // this fresh server, at the first tick, whose pipeline is then sent
    // again).
    assert!(scripts <= 1, "{commands:#?}");
    assert_eq!(extends % LOCKS, 0, "{extends} extends of {LOCKS} locks");
    let ticks = extends / LOCKS - scripts;
    assert!((2..=8).contains(&ticks), "{ticks} ticks in {watched:?}");

    // A server that lost its scripts (a restart without persistence, a
    // failover, SCRIPT FLUSH) answers the next tick's pipeline NOSCRIPT:
    // the script is loaded and the pipeline sent again, and every lock
    // stays held.
    let mut admin = conn(&server);
    let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut admin).unwrap();
    monitor.section("flushed").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let commands = monitor.section("renewed-after-flush").await;
    assert!(
        guards.iter().all(|g| g.is_held()),
        "renewal kept every lock through the flush"
    );
    let loads = commands
        .iter()
        .filter(|l| command_name(l) == "SCRIPT")
        .count();
    assert_eq!(loads, 1, "the script is loaded once: {commands:#?}");
    for guard in guards {
        guard.release().await.unwrap();
    }
}

/// A dropped client leaves no connection behind: neither its command
/// connection nor the pub/sub connection its waiters shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connections() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut check = conn(&server);
    let connected = |check: &mut redis::Connection| -> usize {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(check).unwrap();
        list.lines().count()
    };
    let baseline = connected(&mut check);
    {
        let holder = RedisLock::connect(&server.url()).await.unwrap();
        let waiter = RedisLock::connect(&server.url()).await.unwrap();
        let guard = holder
            .try_lock("k", &LockOptions::new())
            .await
            .unwrap()
            .unwrap();
        let options = LockOptions::new().wait(Duration::from_millis(300));
        assert!(waiter.lock("k", &options).await.unwrap_err().is_timeout());
        assert_eq!(
            connected(&mut check),
            baseline + 3,
            "2 command + 1 pub/sub connections"
        );
        guard.release().await.unwrap();
    }
    // Closing happens in background tasks; no event reaches the test.
    let started = std::time::Instant::now();
    while connected(&mut check) > baseline {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "connections left open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fair mode hands the lock over inside the release: the queued waiter
/// holds it when the grant message arrives, without another attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_release_hands_the_lock_to_the_queued_waiter_directly() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut monitor = Monitor::start(&server).await;
    let holder = RedisLock::connect(&server.url()).await.unwrap();
    let waiter = RedisLock::connect(&server.url()).await.unwrap();
    let key = "handed-over";
    // Warm up: the first calls load the scripts into the server.
    let warm = holder
        .try_lock("warm-up", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    warm.release().await.unwrap();
    let guard = holder
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let waiting = tokio::spawn(async move {
        let options = LockOptions::new().wait(Duration::from_secs(10));
        let guard = waiter.lock(key, &options).await.unwrap();
        (waiter, guard)
    });
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let queue = holder.redis_key(key).replace(":lock", ":queue");
    // Release only once the waiter is settled: queued, subscribed, and its
    // attempt after subscribing executed (MONITOR shows each as the server
    // runs it). Releasing earlier is legal, but the waiter then learns of
    // its grant from that attempt ("already yours") instead of the message.
    let mut before = Vec::new();
    let started = std::time::Instant::now();
    loop {
        before.extend(monitor.section("waiting").await);
        let settled = before
            .iter()
            .position(|l| command_name(l) == "SUBSCRIBE")
            .is_some_and(|at| {
                before[at..]
                    .iter()
                    .any(|l| command_name(l) == "EVALSHA" && !l.contains(":released\""))
            });
        if settled {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the waiter never settled: {before:#?}"
        );
    }
    let holder_token = guard.fencing_token();
    guard.release().await.unwrap();
    let (waiter, handed) = waiting.await.unwrap();
    let commands = monitor.section("handed-over").await;
    // The waiter may still have been between its first attempt and its
    // subscription (attempt, subscribe, attempt again) when the queue
    // showed it; after the release script it sent no attempt (a background
    // UNSUBSCRIBE, and the extension of the lock from the claim window to
    // its TTL, may follow). An attempt names the queue; an extension only
    // the lock.
    let is_attempt = |l: &String| {
        command_name(l) == "EVALSHA" && !l.contains(":released\"") && l.contains(":queue\"")
    };
    let is_release = |l: &String| command_name(l) == "EVALSHA" && l.contains(":released\"");
    let release_at = commands
        .iter()
        .position(is_release)
        .unwrap_or_else(|| panic!("no release: {commands:#?}"));
    assert!(
        !commands[release_at..].iter().any(is_attempt),
        "the waiter tried again after the handoff: {commands:#?}"
    );
    assert_eq!(
        commands.iter().filter(|l| is_release(l)).count(),
        1,
        "{commands:#?}"
    );
    assert!(handed.is_held());
    assert!(handed.fencing_token() > holder_token);
    // The server agrees: the waiter's owner value is on the lock, and the
    // queue is empty.
    let len: i64 = redis::cmd("LLEN")
        .arg(&queue)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0);
    assert!(holder
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    handed.release().await.unwrap();
    assert!(holder
        .try_lock(key, &LockOptions::new())
        .await
        .unwrap()
        .is_some());
    drop(waiter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_the_server_lost_are_loaded_again() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut admin = conn(&server);
    let mut monitor = Monitor::start(&server).await;
    for fair in ["true", "false"] {
        let client = RedisLock::connect(&format!("{}?fair={fair}", server.url()))
            .await
            .unwrap();
        // What a restart without persistence or a failover does to the
        // script cache.
        let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut admin).unwrap();
        monitor.section("flushed").await;
        let guard = client
            .try_lock("flushed", &LockOptions::new())
            .await
            .unwrap()
            .expect("free");
        let names = monitor.section_names("acquired").await;
        assert_eq!(names, ["EVALSHA", "SCRIPT", "EVALSHA"], "fair={fair}");
        let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut admin).unwrap();
        monitor.section("flushed-again").await;
        guard.release().await.unwrap();
        let names = monitor.section_names("released").await;
        assert_eq!(names, ["EVALSHA", "SCRIPT", "EVALSHA"], "fair={fair}");
        let holder: Option<String> = redis::cmd("KEYS")
            .arg("*flushed*:lock")
            .query::<Vec<String>>(&mut admin)
            .unwrap()
            .pop();
        assert_eq!(holder, None, "fair={fair}: the release deleted the lock");
    }
}

/// A client that waits on a lock again soon (a contended lock taken in a
/// loop) finds its subscription still on: its wait starts with one attempt,
/// without SUBSCRIBE and a second attempt. Unused, the subscription ends
/// after the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_wait_soon_after_reuses_the_subscription() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let mut monitor = Monitor::start(&server).await;
    let mut admin = conn(&server);
    for fair in ["true", "false"] {
        let url = format!("{}?fair={fair}", server.url());
        let holder = RedisLock::connect(&url).await.unwrap();
        let waiter = RedisLock::connect(&url).await.unwrap();
        let key = format!("linger-{fair}");
        let channel = holder.redis_key(&key).replace(":lock", ":released");
        let mut waits = Vec::new();
        for round in 0..2 {
            let guard = holder
                .try_lock(&key, &LockOptions::new())
                .await
                .unwrap()
                .expect("free");
            monitor.section("held").await;
            let task = tokio::spawn({
                let (waiter, key) = (waiter.clone(), key.clone());
                async move { waiter.lock(&key, &LockOptions::new()).await }
            });
            // Waiting once it sent an attempt after its subscription was
            // confirmed: SUBSCRIBE then EVALSHA, or (lingering) EVALSHA.
            let mut subscribed = round == 1;
            let commands = monitor
                .until(|line| {
                    let name = command_name(line);
                    subscribed |= name == "SUBSCRIBE";
                    subscribed && name == "EVALSHA"
                })
                .await;
            let mut names: Vec<String> = commands.iter().map(|l| command_name(l)).collect();
            guard.release().await.unwrap();
            let granted = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("handed over")
                .unwrap()
                .unwrap();
            granted.release().await.unwrap();
            // The rest of the round: the releases (and, had the waiter
            // subscribed again, its SUBSCRIBE).
            names.extend(monitor.section_names("round-end").await);
            waits.push(names);
        }
        assert_eq!(
            waits[0][..3],
            ["EVALSHA", "SUBSCRIBE", "EVALSHA"],
            "fair={fair}: first wait: {:?}",
            waits[0]
        );
        assert!(
            !waits[1].iter().any(|name| name == "SUBSCRIBE"),
            "fair={fair}: the second wait subscribed again: {:?}",
            waits[1]
        );
        // Nobody waits any more: the subscription ends after the linger
        // (2 s); nothing tells from outside, so the server is asked.
        let started = std::time::Instant::now();
        loop {
            let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query(&mut admin)
                .unwrap();
            if subscribers == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "fair={fair}: still subscribed after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
