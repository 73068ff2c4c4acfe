//! The private-server scaffolding itself, on redis-server (the quickest of
//! the three to start): ports, a lost port race, a failed start, and the
//! fault hooks.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock_testkit::servers::{free_port, Launch, PrivateRedis, ServerProcess, ServerSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether redis-server can run here; skips (or fails under
/// DISTLOCK_REQUIRE_SERVICES=1) when it cannot.
fn have_redis() -> bool {
    let ok = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !ok {
        assert!(
            !distlock_testkit::services_required(),
            "redis-server is required (DISTLOCK_REQUIRE_SERVICES=1)"
        );
        eprintln!("skipping: redis-server is not installed");
    }
    ok
}

/// PING on `port` over TCP, given up after `within`.
async fn pong(port: u16, within: Duration) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).await?;
        std::io::Result::Ok(&answer == b"+PONG\r\n")
    };
    matches!(tokio::time::timeout(within, exchange).await, Ok(Ok(true)))
}

/// A plain redis-server on the first port, with `extra` arguments.
fn redis_spec(
    extra: &'static [&'static str],
    on_launch: impl Fn(u16) + Send + Sync + 'static,
) -> ServerSpec {
    ServerSpec::new(
        "redis",
        1,
        move |ports, dir| {
            on_launch(ports[0]);
            Launch::new("redis-server")
                .args(["--port", &ports[0].to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--logfile", ""])
                .args(extra.iter().copied())
                .arg("--dir")
                .arg(dir)
        },
        |target| async move {
            if pong(target.ports[0], Duration::from_secs(1)).await {
                Ok(())
            } else {
                Err("no PONG".to_owned())
            }
        },
    )
}

#[test]
fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    for port in ports {
        if low >= 8192 {
            assert!(port < low, "{port} is in the ephemeral range from {low}");
        }
        TcpListener::bind(("127.0.0.1", port)).expect("a free port binds");
    }
}

/// The port chosen first is taken before the server binds it: the server
/// exits with "Address already in use", and the start moves to new ports.
#[tokio::test]
async fn a_start_that_lost_its_port_moves_to_new_ports() {
    if !have_redis() {
        return;
    }
    let taken: Arc<Mutex<Vec<TcpListener>>> = Arc::default();
    let spec = redis_spec(&[], {
        let taken = taken.clone();
        move |port| {
            let mut taken = taken.lock().unwrap();
            if taken.is_empty() {
                taken.push(TcpListener::bind(("127.0.0.1", port)).unwrap());
            }
        }
    });
    let server = ServerProcess::start(spec).await;
    let lost = taken.lock().unwrap()[0].local_addr().unwrap().port();
    assert_ne!(server.port(), lost);
    assert!(pong(server.port(), Duration::from_secs(5)).await);
}

/// A server that cannot start for another reason is not retried: the
/// start panics at once with its name, port and log.
#[tokio::test]
async fn a_failed_start_panics_with_the_servers_log() {
    if !have_redis() {
        return;
    }
    let launches = Arc::new(Mutex::new(0));
    let spec = redis_spec(&["--no-such-directive", "1"], {
        let launches = launches.clone();
        move |_| *launches.lock().unwrap() += 1
    });
    let started = std::time::Instant::now();
    let panic = tokio::spawn(ServerProcess::start(spec))
        .await
        .expect_err("started with a bad directive")
        .into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("private redis on port"), "{message}");
    assert!(message.contains("exited"), "{message}");
    assert!(
        message.contains("no-such-directive"),
        "the log tail: {message}"
    );
    assert_eq!(*launches.lock().unwrap(), 1, "retried: {message}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn pause_resume_kill_restart_and_drop() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let port = server.port();
    assert!(pong(port, Duration::from_secs(5)).await);

    server.pause();
    assert!(
        !pong(port, Duration::from_millis(300)).await,
        "a paused server answered"
    );
    server.resume();
    assert!(pong(port, Duration::from_secs(5)).await);

    server.kill();
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    server.start_again().await;
    assert!(pong(port, Duration::from_secs(5)).await);

    // Paused while restarted: the old process dies all the same.
    server.pause();
    let old = server.pid();
    server.restart().await;
    assert_ne!(server.pid(), old);
    assert_eq!(server.port(), port);
    assert!(pong(port, Duration::from_secs(5)).await);
    assert!(server.log().contains("Ready to accept connections"));

    let dir: PathBuf = server.dir().to_owned();
    let pid = server.pid();
    server.pause();
    drop(server);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} outlived the drop"
    );
}

/// A test that panics still kills its server and removes its directory.
#[tokio::test]
async fn a_panicking_test_kills_its_server() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let (pid, dir) = (server.pid(), server.dir().to_owned());
    let outcome = tokio::spawn(async move {
        let _server = server;
        panic!("the test failed");
    })
    .await;
    assert!(outcome.unwrap_err().is_panic());
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
