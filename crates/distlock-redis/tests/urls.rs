//! URL features against private servers: password and database, key
//! prefix, and TLS (`rediss://`) with a test CA made by `openssl`.

use std::process::Command;
use std::time::Duration;

use distlock_core::{DistributedLock, Error, LockOptions};
use distlock_redis::RedisLock;
use distlock_testkit::servers::PrivateRedis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_database_and_prefix_come_from_the_url() {
    let Some(server) =
        PrivateRedis::start_with(|_, _| vec!["--requirepass".into(), "s3cret pass".into()]).await
    else {
        return;
    };
    let url = format!(
        "redis://:s3cret%20pass@127.0.0.1:{}/3?prefix=myapp",
        server.port()
    );
    let locks = RedisLock::connect(&url).await.expect("authenticated");
    let guard = locks
        .try_lock("jobs/nightly", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let name = locks.redis_key("jobs/nightly");
    assert_eq!(name, "myapp:{jobs%2Fnightly}:lock");

    let mut conn = redis::Client::open(format!(
        "redis://:s3cret%20pass@127.0.0.1:{}/3",
        server.port()
    ))
    .unwrap()
    .get_connection()
    .unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&name).query(&mut conn).unwrap();
    assert_eq!(exists, 1, "the lock lives in db 3 under the prefix");
    let in_db0: i64 = redis::cmd("DBSIZE")
        .query(&mut {
            let mut c = redis::Client::open(format!(
                "redis://:s3cret%20pass@127.0.0.1:{}/0",
                server.port()
            ))
            .unwrap()
            .get_connection()
            .unwrap();
            let _: () = redis::cmd("PING").query(&mut c).unwrap();
            c
        })
        .unwrap();
    assert_eq!(in_db0, 0, "nothing written to db 0");
    guard.release().await.unwrap();

    let wrong = format!("redis://:wrong@127.0.0.1:{}/3", server.port());
    let err = RedisLock::connect(&wrong)
        .await
        .expect_err("wrong password");
    assert!(matches!(err, Error::Connection { .. }), "{err}");
    assert!(
        !format!("{err} {err:?}").contains("wrong@"),
        "password leaked: {err:?}"
    );
}

/// `rediss://` against a TLS-only server whose certificate is signed by a
/// CA the test makes; the CA is trusted through `SSL_CERT_FILE`, which the
/// system-roots loader reads (this test file has one test, so setting the
/// variable affects nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_connects_over_tls() {
    let Some(server) = PrivateRedis::start_with(|port, dir| {
        make_certificates(dir);
        let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            file("server.crt"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    })
    .await
    else {
        return;
    };
    std::env::set_var("SSL_CERT_FILE", server.dir().join("ca.crt"));
    let plain = tokio::time::timeout(
        Duration::from_secs(10),
        RedisLock::connect(&format!("redis://127.0.0.1:{}", server.port())),
    )
    .await
    .expect("no hang");
    assert!(plain.is_err(), "a plain connection to a TLS port must fail");
    let locks = RedisLock::connect(&format!("rediss://127.0.0.1:{}?prefix=tls", server.port()))
        .await
        .expect("TLS connection");
    let options = LockOptions::new().wait(Duration::from_secs(3));
    let guard = locks.lock("over-tls", &options).await.unwrap();
    assert!(locks
        .try_lock("over-tls", &options)
        .await
        .unwrap()
        .is_none());
    guard.release().await.unwrap();
}

fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl must be installed to make the test CA");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=distlock test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}
