//! Black-box tests of `distlock load`: the real binary against memory://,
//! the shared Redis, and a live `distlock serve` process.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use support::serve::ServeProcess;
use support::{code, distlock, run_within, stderr, unique_key, TempDir};

/// What one run left: its exit code, its JSON summary, its log lines.
struct LoadRun {
    code: i32,
    summary: Value,
    log: Vec<Value>,
    stderr: String,
}

/// Runs `distlock load --json --log` on `url` with `extra` arguments.
fn load(url: &str, extra: &[&str]) -> LoadRun {
    let dir = TempDir::new("load");
    let log_path = dir.join("requests.jsonl");
    let prefix = unique_key("load");
    let output = run_within(
        distlock()
            .args(["load", "--url", url, "--json", "--prefix", &prefix, "--log"])
            .arg(&log_path)
            .args(extra),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "the summary is not one JSON object ({err}): {stdout}\nstderr: {}",
            stderr(&output)
        )
    });
    let text = std::fs::read_to_string(&log_path).expect("the log file");
    let log = text
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("a log line is not JSON ({err}): {line}"))
        })
        .collect();
    LoadRun {
        code: code(&output),
        summary,
        log,
        stderr: stderr(&output),
    }
}

fn count(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {field} in {value}"))
}

/// Checks a run that should have gone through cleanly: the counts add up,
/// one valid log line per request, no violation, and fencing tokens that
/// grow per key in the order the requests were granted.
fn assert_clean(run: &LoadRun, requests: u64, keys: usize) {
    let summary = &run.summary;
    assert_eq!(run.code, 0, "{summary}\nstderr: {}", run.stderr);
    assert_eq!(count(summary, "completed"), requests, "{summary}");
    assert_eq!(count(summary, "successful"), requests, "{summary}");
    assert_eq!(count(summary, "failed"), 0, "{summary}");
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    assert_eq!(count(&summary["violations"], "total"), 0, "{summary}");
    assert_eq!(summary["violations"]["tokens_checked"], true, "{summary}");
    assert_eq!(
        count(&summary["latency_us"]["acquire"], "count"),
        requests,
        "{summary}"
    );
    assert!(
        summary["requests_per_s"]
            .as_f64()
            .is_some_and(|rate| rate > 0.0),
        "{summary}"
    );
    // Stderr is a pipe here: no progress bar.
    assert!(!run.stderr.contains("Successful:"), "{}", run.stderr);

    assert_eq!(run.log.len() as u64, requests, "one log line per request");
    let seqs: BTreeSet<u64> = run.log.iter().map(|line| count(line, "seq")).collect();
    assert_eq!(seqs, (0..requests).collect(), "each request once");
    let mut tokens_by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for line in &run.log {
        assert_eq!(line["outcome"], "ok", "{line}");
        assert!(line["error_kind"].is_null(), "{line}");
        assert!(
            line["start"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{line}"
        );
        let latency = count(line, "latency_us");
        assert!(
            latency >= count(line, "acquire_us") + count(line, "release_us"),
            "{line}"
        );
        assert_eq!(line["violations"], serde_json::json!([]), "{line}");
        let key = line["key"].as_str().expect("a key").to_owned();
        // When its acquire returned: on one key, a grant returns only after
        // the previous holder's hold (at least 1 ms) and release, so these
        // instants order the grants.
        let granted_at = count(line, "start_offset_us") + count(line, "acquire_us");
        tokens_by_key
            .entry(key)
            .or_default()
            .push((granted_at, count(line, "fencing_token")));
    }
    assert_eq!(tokens_by_key.len(), keys, "{:?}", tokens_by_key.keys());
    for (key, mut grants) in tokens_by_key {
        grants.sort();
        let tokens: Vec<u64> = grants.iter().map(|(_, token)| *token).collect();
        let mut sorted = tokens.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(tokens, sorted, "{key}: tokens in grant order grow strictly");
    }
}

#[test]
fn memory_runs_every_request_and_logs_each() {
    let run = load(
        "memory://",
        &[
            "--requests",
            "300",
            "--concurrency",
            "16",
            "--keys",
            "4",
            "--hold",
            "1ms",
        ],
    );
    assert_clean(&run, 300, 4);
    assert_eq!(run.summary["backend"], "memory");
}

#[test]
fn redis_runs_every_request_without_violation() {
    let Some(redis) = support::backend("redis") else {
        return;
    };
    let run = load(
        &redis.url,
        &[
            "--requests",
            "300",
            "--concurrency",
            "16",
            "--keys",
            "4",
            "--hold",
            "1ms",
        ],
    );
    assert_clean(&run, 300, 4);
    assert_eq!(run.summary["backend"], "redis");
}

#[test]
fn the_lock_service_runs_every_request_without_violation() {
    let server = ServeProcess::start("memory://", &[]);
    let run = load(
        &server.url,
        &[
            "--requests",
            "200",
            "--concurrency",
            "16",
            "--keys",
            "4",
            "--hold",
            "1ms",
        ],
    );
    assert_clean(&run, 200, 4);
    assert_eq!(run.summary["backend"], "http");
}

#[test]
fn the_lock_service_over_redis_runs_every_request_without_violation() {
    let Some(redis) = support::backend("redis") else {
        return;
    };
    let server = ServeProcess::start(&redis.url, &[]);
    let run = load(
        &server.url,
        &[
            "--requests",
            "200",
            "--concurrency",
            "16",
            "--keys",
            "4",
            "--hold",
            "1ms",
        ],
    );
    assert_clean(&run, 200, 4);
}

#[test]
fn busy_keys_fail_their_requests_and_the_counts_still_add_up() {
    // One attempt per request, 8 at a time on one key held for 20 ms: all
    // but a few find it busy.
    let run = load(
        "memory://",
        &[
            "--requests",
            "40",
            "--concurrency",
            "8",
            "--keys",
            "1",
            "--hold",
            "20ms",
            "--wait",
            "0s",
        ],
    );
    let summary = &run.summary;
    assert_eq!(run.code, 2, "some requests failed: {summary}");
    let (successful, failed) = (count(summary, "successful"), count(summary, "failed"));
    assert!(successful >= 1 && failed >= 1, "{summary}");
    assert_eq!(successful + failed, 40, "{summary}");
    assert_eq!(count(summary, "completed"), 40, "{summary}");
    assert_eq!(
        count(&summary["errors"], "acquire busy"),
        failed,
        "{summary}"
    );
    assert_eq!(count(&summary["violations"], "total"), 0, "{summary}");
    assert_eq!(run.log.len(), 40);
    let busy = run
        .log
        .iter()
        .filter(|line| {
            line["outcome"] == "failed"
                && line["error_kind"] == "busy"
                && line["phase"] == "acquire"
        })
        .count() as u64;
    assert_eq!(busy, failed);
}

#[test]
fn bad_input_is_named_and_exits_64() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--url", "memory://", "--concurrency", "0"],
            "--concurrency",
        ),
        (&["--url", "memory://", "--keys", "0"], "--keys"),
        (&["--url", "memory://", "--requests", "0"], "--requests"),
        (&["--url", "memory://", "--hold", "soon"], "soon"),
        (&["--url", "memory://", "--ttl", "1ms"], "ttl"),
        (&["--url", "nope://x"], "unknown scheme `nope`"),
        (&["--url", "redis://127.0.0.1:6379?bogus=1"], "bogus"),
    ];
    for (args, named) in cases {
        let output = run_within(distlock().arg("load").args(*args), Duration::from_secs(20));
        let message = stderr(&output);
        assert_eq!(code(&output), 64, "{args:?}: {message}");
        assert!(
            message.contains(named),
            "{args:?} should name {named}: {message}"
        );
        assert!(
            output.stdout.is_empty(),
            "{args:?}: no summary for bad input"
        );
    }
}

#[test]
fn an_unreachable_service_exits_69() {
    let output = run_within(
        distlock().args(["load", "--url", "http://127.0.0.1:1", "--requests", "1"]),
        Duration::from_secs(30),
    );
    assert_eq!(code(&output), 69, "{}", stderr(&output));
}

#[test]
fn the_human_summary_names_its_parts() {
    let output = run_within(
        distlock().args([
            "load",
            "--url",
            "memory://",
            "--requests",
            "20",
            "--keys",
            "2",
        ]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(code(&output), 0, "{text}{}", stderr(&output));
    for part in [
        "20 completed (20 successful, 0 failed)",
        "requests/s",
        "p50",
        "p99",
        "acquire",
        "errors      none",
        "violations  0",
        "OK: no mutual-exclusion violation",
    ] {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
}
