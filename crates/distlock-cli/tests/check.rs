//! Black-box tests of `distlock check` on the real servers: a clean run
//! on each backend whose server answers, pauses on Redis, the refusal of
//! the in-process backend, and bad arguments.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{backend, code, distlock, run_within, stderr, TempDir};

/// A check of a few seconds must end well within this (stop bound
/// included).
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `distlock check --json --url URL ARGS...`; returns the exit code,
/// the report and stderr.
fn check_json(url: &str, args: &[&str]) -> (i32, Value, String) {
    let mut command = distlock();
    command.args(["check", "--json", "--url", url]).args(args);
    let output = run_within(&mut command, LIMIT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "not one JSON report ({err}): {stdout}\nstderr: {}",
            stderr(&output)
        )
    });
    (code(&output), report, stderr(&output))
}

/// The assertions every clean run must pass.
fn assert_clean(code: i32, report: &Value, stderr: &str) {
    assert_eq!(code, 0, "{report:#}\nstderr: {stderr}");
    assert!(report["cycles"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["violations"], Value::Array(Vec::new()), "{report:#}");
    for finding in [
        "double_grants",
        "stale_writes_accepted",
        "unsignalled_losses",
        "hangs",
        "worker_failures",
    ] {
        assert_eq!(
            report[finding].as_array().unwrap().len(),
            0,
            "{finding}: {report:#}"
        );
    }
    assert_eq!(report["lost_updates"]["lost"], 0, "{report:#}");
    let per_worker = report["cycles_per_worker"].as_array().unwrap();
    assert!(
        per_worker.iter().all(|n| n.as_u64().unwrap() > 0),
        "every worker ran: {report:#}"
    );
}

#[test]
fn redis_check_is_clean() {
    let Some(redis) = backend("redis") else {
        return;
    };
    let (code, report, stderr) = check_json(&redis.url, &["--workers", "3", "--duration", "4s"]);
    assert_clean(code, &report, &stderr);
    assert_eq!(report["workers"], 3);
    assert!(report["key"]
        .as_str()
        .unwrap()
        .starts_with("distlock-check/"));
    assert_eq!(report["faults"].as_array().unwrap().len(), 0);
}

#[test]
fn redis_pauses_are_recorded_and_break_nothing() {
    let Some(redis) = backend("redis") else {
        return;
    };
    let (code, report, stderr) = check_json(
        &redis.url,
        &[
            "--workers",
            "3",
            "--duration",
            "4s",
            "--ttl",
            "500ms",
            "--pause-workers",
        ],
    );
    // Redis expires the paused holder's lease by its own clock, the next
    // worker gets the lock, and the paused one finds is_held() false when
    // it wakes: no double grant, no stale write.
    assert_clean(code, &report, &stderr);
    let faults = report["faults"].as_array().unwrap();
    assert!(!faults.is_empty(), "no pause: {report:#}");
    for fault in faults {
        assert_eq!(fault["kind"], "pause", "{fault}");
        let length = fault["ended"].as_u64().unwrap() - fault["started"].as_u64().unwrap();
        // The default pause is 2 x ttl = 1 s.
        assert!(length >= 1_000_000_000, "{fault}");
    }
    let pause = &report["unavailability"]["pause"];
    assert_eq!(
        pause["faults"].as_u64().unwrap() as usize,
        faults.len(),
        "{report:#}"
    );
    // The lock comes back once the TTL has run out, and not before.
    let max = pause["max_ms"].as_f64().unwrap();
    assert!((400.0..3000.0).contains(&max), "{report:#}");
}

#[test]
fn zookeeper_check_is_clean() {
    let Some(zookeeper) = backend("zookeeper") else {
        return;
    };
    let (code, report, stderr) =
        check_json(&zookeeper.url, &["--workers", "3", "--duration", "3s"]);
    assert_clean(code, &report, &stderr);
}

#[test]
fn etcd_check_is_clean() {
    let Some(etcd) = backend("etcd") else { return };
    let (code, report, stderr) = check_json(&etcd.url, &["--workers", "3", "--duration", "3s"]);
    assert_clean(code, &report, &stderr);
}

#[test]
fn file_check_is_clean_and_memory_is_refused() {
    let dir = TempDir::new("check");
    let url = format!("file://{}", dir.path().display());
    let (status, report, stderr) = check_json(&url, &["--workers", "2", "--duration", "2s"]);
    assert_clean(status, &report, &stderr);

    // Workers are processes: an in-process lock would not exclude them.
    let mut command = distlock();
    command.args(["check", "--url", "memory://", "--duration", "1s"]);
    let output = run_within(&mut command, LIMIT);
    assert_eq!(code(&output), 64, "{output:?}");
    let message = support::stderr(&output);
    assert!(
        message.contains("memory://") && message.contains("in-process"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "{message}");
}

#[test]
fn bad_arguments_exit_64_naming_the_problem() {
    let cases: &[(&[&str], &str)] = &[
        (&["--url", "nope://x"], "unknown scheme `nope`"),
        (
            &["--url", "redis://127.0.0.1:6379", "--workers", "0"],
            "--workers",
        ),
        (
            &["--url", "redis://127.0.0.1:6379", "--duration", "soon"],
            "soon",
        ),
        (
            &["--url", "redis://127.0.0.1:6379", "--pause", "1s"],
            "--pause-workers",
        ),
        (
            &[
                "--url",
                "redis://127.0.0.1:6379",
                "--duration",
                "1s",
                "--pause-workers",
            ],
            "too short to pause",
        ),
    ];
    for (args, named) in cases {
        let mut command = distlock();
        command.arg("check").args(*args);
        let output = run_within(&mut command, LIMIT);
        let message = support::stderr(&output);
        assert_eq!(code(&output), 64, "{args:?}: {message}");
        assert!(
            message.contains(named),
            "{args:?} should name {named}: {message}"
        );
        assert!(output.stdout.is_empty(), "{args:?}: {output:?}");
    }
}
