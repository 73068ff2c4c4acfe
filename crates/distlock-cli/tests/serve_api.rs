//! Black-box tests of `distlock serve`'s HTTP API: a real process on a
//! free loopback port, over the in-process backend, spoken to with plain
//! HTTP as a non-Rust client would.

mod support;

use std::time::{Duration, Instant};

use distlock::{DistributedLock, LockOptions, LostReason};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::serve::ServeProcess;

struct Api {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Api {
    fn new(server: &ServeProcess) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api {
            http: reqwest::Client::new(),
            url: server.url.clone(),
            token: None,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.expect("the service answers");
        let status = response.status();
        let body = response.bytes().await.expect("a body");
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", String::from_utf8_lossy(&body)));
        (status, value)
    }

    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.url))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_raw(path, body.to_string()).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(format!("{}{path}", self.url)))
            .await
    }
}

fn assert_error(answer: &(StatusCode, Value), status: StatusCode, kind: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"], kind, "{}", answer.1);
    assert!(
        answer.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        answer.1
    );
}

#[tokio::test]
async fn bad_input_gets_a_4xx_json_error_naming_the_problem() {
    let server = ServeProcess::start("memory://", &["--max-wait", "5s"]);
    let api = Api::new(&server);
    assert_error(
        &api.post_raw("/v1/acquire", "{\"key\":").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    let unknown = api
        .post("/v1/acquire", json!({"key": "k", "color": "red"}))
        .await;
    assert_error(&unknown, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        unknown.1["message"].as_str().unwrap().contains("color"),
        "{}",
        unknown.1
    );
    assert_error(
        &api.post("/v1/acquire", json!({"ttl": "1s"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": ""})).await,
        StatusCode::BAD_REQUEST,
        "invalid_key",
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k".repeat(4097)}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_key",
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k", "ttl": "2h"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_ttl",
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k", "ttl": "1ms"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_ttl",
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k", "ttl": "soon"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k", "wait": "6s"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_wait",
    );
    let big = format!("{{\"key\": \"{}\"}}", "k".repeat(20_000));
    assert_error(
        &api.post_raw("/v1/acquire", big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    assert_error(
        &api.post("/v1/refresh", json!({"handle": "h1.0000"})).await,
        StatusCode::NOT_FOUND,
        "unknown_handle",
    );
    assert_error(
        &api.post("/v1/release", json!({"handle": 42})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &api.get("/v2/acquire").await,
        StatusCode::NOT_FOUND,
        "unknown_route",
    );
    assert_error(
        &api.get("/v1/acquire").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // Nothing of that hurt the service.
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn one_client_cannot_refresh_or_release_anothers_lease() {
    let server = ServeProcess::start("memory://", &[]);
    let api = Api::new(&server);
    let first = api
        .post("/v1/acquire", json!({"key": "orders/7", "ttl": "300ms"}))
        .await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    let handle = first.1["handle"].as_str().unwrap().to_owned();
    assert!(
        handle.len() >= 32,
        "a handle of at least 128 bits: {handle}"
    );
    assert_error(
        &api.post("/v1/acquire", json!({"key": "orders/7"})).await,
        StatusCode::CONFLICT,
        "busy",
    );
    // The status never shows the handle.
    let status = api.get("/v1/locks/orders/7").await;
    assert_eq!(status.1["held"], true, "{}", status.1);
    assert_eq!(status.1["fencing_token"], first.1["fencing_token"]);
    assert!(!status.1.to_string().contains(&handle));
    // A guessed handle is refused.
    let last = if handle.ends_with('0') { '1' } else { '0' };
    let guessed = format!("{}{last}", &handle[..handle.len() - 1]);
    assert_ne!(guessed, handle);
    assert_error(
        &api.post("/v1/release", json!({"handle": guessed})).await,
        StatusCode::NOT_FOUND,
        "unknown_handle",
    );
    // The first lease runs out unrefreshed; a second client takes the lock.
    let second = api
        .post(
            "/v1/acquire",
            json!({"key": "orders/7", "ttl": "30s", "wait": "3s"}),
        )
        .await;
    assert_eq!(second.0, StatusCode::OK, "{}", second.1);
    assert!(second.1["fencing_token"].as_u64() > first.1["fencing_token"].as_u64());
    // The stale handle neither refreshes nor releases the new holder's lock.
    let stale_refresh = api
        .post("/v1/refresh", json!({"handle": handle, "ttl": "30s"}))
        .await;
    assert!(
        matches!(
            stale_refresh.0,
            StatusCode::CONFLICT | StatusCode::NOT_FOUND
        ),
        "{}",
        stale_refresh.1
    );
    let stale_release = api.post("/v1/release", json!({"handle": handle})).await;
    assert!(
        matches!(
            stale_release.0,
            StatusCode::CONFLICT | StatusCode::NOT_FOUND
        ),
        "{}",
        stale_release.1
    );
    let status = api.get("/v1/locks/orders%2F7").await;
    assert_eq!(
        status.1["fencing_token"], second.1["fencing_token"],
        "{}",
        status.1
    );
    let handle = second.1["handle"].as_str().unwrap();
    let refreshed = api
        .post("/v1/refresh", json!({"handle": handle, "ttl": "10s"}))
        .await;
    assert_eq!(refreshed.0, StatusCode::OK, "{}", refreshed.1);
    assert_eq!(refreshed.1["ttl_ms"], 10_000);
    let released = api.post("/v1/release", json!({"handle": handle})).await;
    assert_eq!(released.0, StatusCode::OK, "{}", released.1);
    assert_error(
        &api.post("/v1/release", json!({"handle": handle})).await,
        StatusCode::NOT_FOUND,
        "unknown_handle",
    );
    assert_eq!(api.get("/v1/locks/orders/7").await.1["held"], false);
}

#[tokio::test]
async fn a_refresh_after_the_ttl_is_refused_as_expired() {
    let server = ServeProcess::start("memory://", &[]);
    let api = Api::new(&server);
    let granted = api
        .post("/v1/acquire", json!({"key": "k", "ttl": "200ms"}))
        .await;
    let handle = granted.1["handle"].as_str().unwrap().to_owned();
    // The passing of the TTL is what is tested.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refresh = api.post("/v1/refresh", json!({"handle": handle})).await;
    assert!(
        (refresh.0 == StatusCode::CONFLICT && refresh.1["error"] == "expired")
            || (refresh.0 == StatusCode::NOT_FOUND && refresh.1["error"] == "unknown_handle"),
        "{} {}",
        refresh.0,
        refresh.1
    );
}

#[tokio::test]
async fn a_long_poll_is_granted_when_the_holder_releases() {
    let server = ServeProcess::start("memory://", &[]);
    let api = std::sync::Arc::new(Api::new(&server));
    let holder = api.post("/v1/acquire", json!({"key": "k"})).await;
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k"})).await,
        StatusCode::CONFLICT,
        "busy",
    );
    let waiter = tokio::spawn({
        let api = api.clone();
        async move {
            let answer = api
                .post("/v1/acquire", json!({"key": "k", "wait": "10s"}))
                .await;
            (answer, Instant::now())
        }
    });
    distlock_testkit::eventually("the waiter is queued", Duration::from_secs(5), || async {
        api.get("/v1/locks/k").await.1["waiters"] == 1
    })
    .await;
    let released = api
        .post("/v1/release", json!({"handle": holder.1["handle"]}))
        .await;
    let released_at = Instant::now();
    assert_eq!(released.0, StatusCode::OK);
    let (granted, granted_at) = waiter.await.unwrap();
    assert_eq!(granted.0, StatusCode::OK, "{}", granted.1);
    assert!(granted.1["fencing_token"].as_u64() > holder.1["fencing_token"].as_u64());
    let handoff = granted_at.saturating_duration_since(released_at);
    assert!(
        handoff < Duration::from_millis(500),
        "granted {handoff:?} after the release"
    );
    let metrics = api
        .http
        .get(format!("{}/metrics", api.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "distlock_serve_acquire_seconds_bucket",
        "distlock_serve_held_leases",
        "distlock_serve_waits_total 1",
        "distlock_serve_errors_total{kind=\"busy\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn with_a_token_file_requests_need_the_bearer_token() {
    let dir = support::TempDir::new("serve-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "correct-horse\n").unwrap();
    let server = ServeProcess::start("memory://", &["--token-file", token_file.to_str().unwrap()]);
    let mut api = Api::new(&server);
    assert_error(
        &api.post("/v1/acquire", json!({"key": "k"})).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_eq!(
        api.get("/healthz").await.0,
        StatusCode::OK,
        "health checks stay open"
    );
    api.token = Some("correct-hors".into());
    assert_error(
        &api.get("/v1/locks/k").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    api.token = Some("correct-horse".into());
    assert_eq!(api.get("/v1/locks/k").await.0, StatusCode::OK);
    // The Rust client reads the token from the file its URL names.
    let url = format!("{}?token_file={}", server.url, token_file.display());
    let locks = distlock::connect(&url).await.unwrap();
    assert!(!format!("{locks:?}").contains("correct-horse"));
    let guard = locks
        .try_lock("k", &LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
    let without = distlock::connect(&server.url).await.unwrap();
    let err = without
        .try_lock("k", &LockOptions::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("acquire"), "{err}");
    assert!(!err.to_string().contains("correct-horse"));
}

#[tokio::test]
async fn lost_fires_when_a_restarted_service_no_longer_knows_the_lease() {
    let server = ServeProcess::start("memory://", &[]);
    let locks = distlock_http::HttpLock::connect(&server.url).await.unwrap();
    let ttl = Duration::from_millis(600);
    let guard = locks
        .try_lock("k", &LockOptions::new().ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let address = server.url.trim_start_matches("http://").to_owned();
    drop(server);
    // The same address, a new process that knows nothing of the lease.
    let restarted = ServeProcess::start("memory://", &["--listen", &address]);
    assert_eq!(restarted.url, format!("http://{address}"));
    let reason = tokio::time::timeout(ttl * 2, guard.lost())
        .await
        .expect("lost() fired within the TTL");
    // The new process cannot tell a restart from another instance: it
    // answers 421, which the client retries until the TTL runs out (a
    // refusal, 409, would be NotHeld at once).
    assert!(
        matches!(
            reason,
            LostReason::Expired | LostReason::NotHeld | LostReason::RenewalFailed(_)
        ),
        "{reason:?}"
    );
    assert!(!guard.is_held());
}

/// Two instances over one Redis: a lease granted by one is refreshed and
/// released through the other, and the granting instance forgetting it
/// (its own view of the TTL passed) does not release it.
#[tokio::test]
async fn a_lease_moves_between_instances_over_redis() {
    if !distlock_testkit::service_ready("redis", "127.0.0.1:6379").await {
        return;
    }
    lease_moves_between_instances("redis://127.0.0.1:6379").await;
}

/// The same over etcd, where the lease is an etcd lease of the lock's own.
#[tokio::test]
async fn a_lease_moves_between_instances_over_etcd() {
    if !distlock_testkit::service_ready("etcd", "127.0.0.1:2379").await {
        return;
    }
    lease_moves_between_instances("etcd://127.0.0.1:2379/distlock-serve-test").await;
}

async fn lease_moves_between_instances(backend: &str) {
    let (one, two) = (
        ServeProcess::start(backend, &[]),
        ServeProcess::start(backend, &[]),
    );
    let (api_one, api_two) = (Api::new(&one), Api::new(&two));
    let key = support::unique_key("two-instances");
    let granted = api_one
        .post("/v1/acquire", json!({"key": key, "ttl": "2s"}))
        .await;
    assert_eq!(granted.0, StatusCode::OK, "{}", granted.1);
    let (handle, token) = (&granted.1["handle"], &granted.1["fencing_token"]);
    assert!(handle.as_str().unwrap().starts_with("h2."), "{handle}");
    assert_error(
        &api_two.post("/v1/acquire", json!({"key": key})).await,
        StatusCode::CONFLICT,
        "busy",
    );

    // The client refreshes through instance two only, while instance
    // one's own view of the TTL passes and it forgets the lease; the lock
    // must stay.
    let refresh = || async {
        let refreshed = api_two
            .post("/v1/refresh", json!({"handle": handle, "ttl": "2s"}))
            .await;
        assert_eq!(refreshed.0, StatusCode::OK, "{}", refreshed.1);
        assert_eq!(&refreshed.1["fencing_token"], token);
    };
    distlock_testkit::eventually(
        "instance one forgets the lease",
        Duration::from_secs(15),
        || async {
            refresh().await;
            api_one.get("/healthz").await.1["leases"] == 0
        },
    )
    .await;
    assert_error(
        &api_one.post("/v1/acquire", json!({"key": key})).await,
        StatusCode::CONFLICT,
        "busy",
    );
    refresh().await;

    // A made-up handle for the same lease is refused without touching it.
    let forged = api_one
        .post(
            "/v1/release",
            json!({"handle": forge(handle.as_str().unwrap())}),
        )
        .await;
    assert_error(&forged, StatusCode::CONFLICT, "not_held");

    let released = api_one.post("/v1/release", json!({"handle": handle})).await;
    assert_eq!(released.0, StatusCode::OK, "{}", released.1);
    assert_error(
        &api_two.post("/v1/refresh", json!({"handle": handle})).await,
        StatusCode::CONFLICT,
        "not_held",
    );
    let next = api_two.post("/v1/acquire", json!({"key": key})).await;
    assert_eq!(next.0, StatusCode::OK, "{}", next.1);
    assert!(next.1["fencing_token"].as_u64() > token.as_u64());
    let done = api_two
        .post("/v1/release", json!({"handle": next.1["handle"]}))
        .await;
    assert_eq!(done.0, StatusCode::OK, "{}", done.1);
}

/// `handle` with one character of its secret part changed, re-encoded so
/// that it still parses.
fn forge(handle: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let encoded = handle.strip_prefix("h2.").expect("a resumable handle");
    let mut content: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(encoded).unwrap()).unwrap();
    // The secret is the owner's tail on Redis, the middle part on etcd
    // (`<lease>.<secret>.<key>`): flip a character of it in both.
    let resume = content["r"].as_str().unwrap().to_owned();
    let at = match resume.split('.').collect::<Vec<_>>().as_slice() {
        [lease, _secret, ..] if resume.matches('.').count() >= 2 => lease.len() + 1,
        _ => resume.len() - 1,
    };
    let mut bytes = resume.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    content["r"] = Value::String(String::from_utf8(bytes).unwrap());
    format!("h2.{}", URL_SAFE_NO_PAD.encode(content.to_string()))
}

/// Two instances over a backend whose locks live in the instance's
/// session (files here): the other instance says the service is sticky.
#[tokio::test]
async fn a_lease_reaching_another_instance_of_a_sticky_backend_gets_a_clear_status() {
    let dir = support::TempDir::new("sticky");
    let url = format!("file://{}", dir.path().display());
    let (one, two) = (
        ServeProcess::start(&url, &[]),
        ServeProcess::start(&url, &[]),
    );
    let (api_one, api_two) = (Api::new(&one), Api::new(&two));
    let granted = api_one
        .post("/v1/acquire", json!({"key": "k", "ttl": "10s"}))
        .await;
    assert_eq!(granted.0, StatusCode::OK, "{}", granted.1);
    assert_error(
        &api_two.post("/v1/acquire", json!({"key": "k"})).await,
        StatusCode::CONFLICT,
        "busy",
    );
    let handle = &granted.1["handle"];
    let elsewhere = api_two.post("/v1/refresh", json!({"handle": handle})).await;
    assert_error(
        &elsewhere,
        StatusCode::MISDIRECTED_REQUEST,
        "other_instance",
    );
    assert!(
        elsewhere.1["message"].as_str().unwrap().contains("sticky"),
        "{}",
        elsewhere.1
    );
    assert_error(
        &api_two.post("/v1/release", json!({"handle": handle})).await,
        StatusCode::MISDIRECTED_REQUEST,
        "other_instance",
    );
    let released = api_one.post("/v1/release", json!({"handle": handle})).await;
    assert_eq!(released.0, StatusCode::OK, "{}", released.1);
}

/// The Python client function of docs/lock-service.md, run as written
/// against a live service: it gets the lock and a fencing token, releases
/// it, and reports a busy lock as `False` when its wait elapses.
#[tokio::test]
async fn the_python_client_in_the_docs_works() {
    let server = ServeProcess::start("memory://", &[]);
    let api = Api::new(&server);
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/lock-service.md"
    ))
    .expect("docs/lock-service.md");
    let section = doc
        .split_once("## From Python")
        .expect("the Python section")
        .1;
    let code = section
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("a python block")
        .0;
    let holder = api.post("/v1/acquire", json!({"key": "py-busy"})).await;
    assert_eq!(holder.0, StatusCode::OK, "{}", holder.1);
    let script = format!(
        "{code}\n\nimport sys\nbase = sys.argv[1]\ntokens = []\n\
         free = with_lock(base, 'py-free', tokens.append)\n\
         busy = with_lock(base, 'py-busy', tokens.append, wait='200ms')\n\
         print(json.dumps({{'free': free, 'busy': busy, 'tokens': tokens}}))\n"
    );
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&server.url)
        .output()
        .expect("python3 runs (CI installs it)");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("the script's JSON");
    assert_eq!(result["free"], true, "{result}");
    assert_eq!(result["busy"], false, "{result}");
    assert_eq!(
        result["tokens"].as_array().map(Vec::len),
        Some(1),
        "{result}"
    );
    assert!(result["tokens"][0].as_u64().is_some_and(|token| token > 0));
    assert_eq!(api.get("/v1/locks/py-free").await.1["held"], false);
}

/// An acquire dropped after the server granted it but before the client
/// read the answer (a task cancelled, a caller's own timeout, racing the
/// grant) leaves no lease behind: the client reads the grant in the
/// background and releases it, rather than leaving it held until its TTL.
#[tokio::test]
async fn a_grant_to_a_dropped_acquire_is_released() {
    let server = ServeProcess::start("memory://", &[]);
    let api = Api::new(&server);
    let holder = api
        .post("/v1/acquire", json!({"key": "k", "ttl": "30s"}))
        .await;
    assert_eq!(holder.0, StatusCode::OK, "{}", holder.1);

    // The waiter runs on a runtime of its own, on one thread, which the
    // test can stop: the grant then reaches a client that cannot read it.
    let (runtime_tx, runtime_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let client_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime_tx.send(runtime.handle().clone()).unwrap();
        runtime.block_on(async { stop_rx.await.ok() });
    });
    let client_runtime = runtime_rx.recv().unwrap();
    let url = server.url.clone();
    let waiter = client_runtime.spawn(async move {
        let locks = distlock::connect(&url).await.unwrap();
        let options = LockOptions::new()
            .ttl(Duration::from_secs(30))
            .wait(Duration::from_secs(20));
        let _guard = locks.lock("k", &options).await;
        std::future::pending::<()>().await;
    });
    distlock_testkit::eventually(
        "the waiter queues at the server",
        Duration::from_secs(5),
        || async { api.get("/v1/locks/k").await.1["waiters"] == 1 },
    )
    .await;
    // Stop the client's thread: block it until told otherwise.
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    client_runtime.spawn(async move {
        blocked_tx.send(()).unwrap();
        resume_rx.recv().ok();
    });
    blocked_rx.recv().unwrap();

    let released = api
        .post("/v1/release", json!({"handle": holder.1["handle"]}))
        .await;
    assert_eq!(released.0, StatusCode::OK, "{}", released.1);
    distlock_testkit::eventually(
        "the server grants the waiter",
        Duration::from_secs(5),
        || async { api.get("/v1/locks/k").await.1["held"] == true },
    )
    .await;
    // The waiter is cancelled before it can read the grant.
    waiter.abort();
    resume_tx.send(()).unwrap();

    distlock_testkit::eventually(
        "the grant to the dropped acquire is released",
        Duration::from_secs(5),
        || async { api.get("/v1/locks/k").await.1["held"] == false },
    )
    .await;
    let next = api.post("/v1/acquire", json!({"key": "k"})).await;
    assert_eq!(next.0, StatusCode::OK, "{}", next.1);
    stop_tx.send(()).unwrap();
    client_thread.join().unwrap();
}
