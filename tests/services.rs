//! One smoke test per server of the test setup, speaking each server's own
//! protocol over plain TCP, so a broken setup fails here with a clear
//! message rather than deep inside a backend's suite.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` to `addr` and returns what the server answered before
/// closing or within 5 s.
async fn exchange(addr: &str, request: &[u8], read_until_close: bool) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || (!read_until_close && answer.ends_with(b"\r\n")) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("{addr} did not answer within 5s"));
    String::from_utf8_lossy(&answer).into_owned()
}

async fn redis_answers_ping(port: u16) {
    let addr = format!("127.0.0.1:{port}");
    if !distlock_testkit::service_ready("redis", &addr).await {
        return;
    }
    assert_eq!(exchange(&addr, b"PING\r\n", false).await, "+PONG\r\n");
}

#[tokio::test]
async fn redis_answers() {
    redis_answers_ping(6379).await;
}

#[tokio::test]
async fn redlock_instances_answer() {
    for port in [6380, 6381, 6382] {
        redis_answers_ping(port).await;
    }
}

#[tokio::test]
async fn zookeeper_answers() {
    let addr = "127.0.0.1:2181";
    if !distlock_testkit::service_ready("zookeeper", addr).await {
        return;
    }
    assert_eq!(exchange(addr, b"ruok", true).await, "imok");
    let stats = exchange(addr, b"srvr", true).await;
    assert!(stats.contains("Mode: standalone"), "{stats}");
}

#[tokio::test]
async fn etcd_answers() {
    let addr = "127.0.0.1:2379";
    if !distlock_testkit::service_ready("etcd", addr).await {
        return;
    }
    let request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let answer = exchange(addr, request, true).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""health":"true""#), "{answer}");
}
