//! `distlock bench` as a black box on the in-process backend: every scenario
//! runs, reports its figures as JSON, and sees no mutual-exclusion
//! violation. (Speed is reported, never asserted.)

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distlock"))
        .arg("bench")
        .args(args)
        .env_remove("DISTLOCK_URL")
        .output()
        .expect("run distlock bench")
}

#[test]
fn every_scenario_reports_json_and_no_violation_on_memory() {
    let output = bench(&[
        "--url",
        "memory://",
        "--duration",
        "1s",
        "--workers",
        "4",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "distlock bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect();
    let scenarios: Vec<&str> = lines
        .iter()
        .map(|line| line["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(scenarios, ["uncontended", "contended", "spread"]);

    for line in &lines {
        assert_eq!(line["backend"], "memory", "{line}");
        assert_eq!(line["runtime"], "tokio current_thread", "{line}");
        assert_eq!(line["violations"], 0, "{line}");
        assert!(line["cycles"].as_u64().unwrap() > 0, "{line}");
        for field in ["cycles_per_sec", "p50_us", "p99_us", "floor_p50_us"] {
            assert!(line[field].as_f64().unwrap() > 0.0, "{field}: {line}");
        }
        assert!(line["p50_us"].as_f64() <= line["p99_us"].as_f64(), "{line}");
        // Linux has /proc/stat: the steal share is a percentage.
        let steal = line["host_steal_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&steal), "{line}");
        // No server, so no round trip to measure, read or write.
        for field in ["rtt_us", "write_rtt_op", "write_rtt_us"] {
            assert!(line.get(field).unwrap().is_null(), "{field}: {line}");
        }
    }
    let uncontended = &lines[0];
    assert_eq!(uncontended["workers"], 1);
    assert!(uncontended["floor_ratio"].as_f64().unwrap() > 0.0);

    let contended = &lines[1];
    assert_eq!(contended["workers"], 4);
    let min = contended["per_worker_min"].as_u64().unwrap();
    let max = contended["per_worker_max"].as_u64().unwrap();
    assert!(min > 0 && min <= max, "{contended}");
    // Each worker pauses after its release, so someone else gets the lock
    // and there are handoffs to measure.
    assert!(contended["handoffs"].as_u64().unwrap() > 0, "{contended}");
    let handoff_p50 = contended["handoff_p50_us"].as_f64().unwrap();
    let handoff_p99 = contended["handoff_p99_us"].as_f64().unwrap();
    assert!(
        0.0 < handoff_p50 && handoff_p50 <= handoff_p99,
        "{contended}"
    );
    // Each handoff's part after its release returned is a part of it, so
    // its percentiles cannot exceed the handoff's.
    let after_p50 = contended["handoff_after_release_p50_us"].as_f64().unwrap();
    let after_p99 = contended["handoff_after_release_p99_us"].as_f64().unwrap();
    assert!(0.0 <= after_p50 && after_p50 <= after_p99, "{contended}");
    assert!(
        after_p50 <= handoff_p50 && after_p99 <= handoff_p99,
        "{contended}"
    );
    let early = contended["grants_before_release_reply"].as_u64().unwrap();
    assert!(
        early <= contended["handoffs"].as_u64().unwrap(),
        "{contended}"
    );
    for field in [
        "handoff_write_rtt_ratio",
        "probe_rtt_us",
        "probe_write_rtt_us",
        "handoff_probe_rtt_ratio",
    ] {
        assert!(contended[field].is_null(), "{field}: {contended}");
    }

    let spread = &lines[2];
    assert_eq!(spread["workers"], 4);
    assert!(spread["spread_ratio"].as_f64().unwrap() > 0.0, "{spread}");
}

#[test]
fn one_scenario_prints_a_table() {
    let output = bench(&[
        "--url",
        "memory://",
        "--scenario",
        "contended",
        "--workers",
        "3",
        "--duration",
        "300ms",
    ]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("violations"), "{stdout}");
    assert!(stdout.contains("handoff p50"), "{stdout}");
    assert!(stdout.contains("after the release returned"), "{stdout}");
    assert!(
        !stdout.lines().any(|line| line.starts_with("uncontended")),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_a_one_line_error() {
    let output = bench(&["--url", "nope://x", "--duration", "1s"]);
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nope"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let output = bench(&["--url", "memory://", "--duration", "soon"]);
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("soon"));
}

/// On a server the raw write round trip is measured beside the read one,
/// a probe client takes both during the contended run, and their
/// run-unique keys are gone after the run.
#[test]
fn redis_measures_write_and_in_run_round_trips_and_leaves_no_key_behind() {
    let ready = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(distlock_testkit::service_ready("redis", "127.0.0.1:6379"));
    if !ready {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args([
            "bench",
            "--url",
            "redis://127.0.0.1:6379",
            "--scenario",
            "contended",
            "--workers",
            "2",
            "--duration",
            "300ms",
            "--key-prefix",
            "distlock-cli-bench-test",
            "--json",
        ])
        .env_remove("DISTLOCK_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run distlock bench");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for distlock bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "distlock bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(line["rtt_op"], "PING", "{line}");
    assert_eq!(line["write_rtt_op"], "SET key 1", "{line}");
    assert!(line["rtt_us"].as_f64().unwrap() > 0.0, "{line}");
    assert!(line["write_rtt_us"].as_f64().unwrap() > 0.0, "{line}");
    assert_eq!(line["violations"], 0, "{line}");
    for field in [
        "probe_rtt_us",
        "probe_write_rtt_us",
        "handoff_probe_rtt_ratio",
        "handoff_probe_write_rtt_ratio",
    ] {
        assert!(line[field].as_f64().unwrap() > 0.0, "{field}: {line}");
    }

    // The raw keys of a run are named after its process id.
    let Ok(scan) = Command::new("redis-cli")
        .args(["-p", "6379", "--scan", "--pattern"])
        .arg(format!("distlock-bench-floor*distlock-bench-{pid}-*"))
        .output()
    else {
        eprintln!("skipping the leftover check: redis-cli is not installed");
        return;
    };
    assert!(scan.status.success(), "redis-cli --scan failed");
    let left = String::from_utf8_lossy(&scan.stdout);
    assert!(left.trim().is_empty(), "keys left behind: {left}");
}

/// `--scenario hold` takes, holds and releases `--locks` locks and reports
/// what that cost; memory:// has no server, so no request counter.
#[test]
fn the_hold_scenario_reports_what_holding_costs() {
    let output = bench(&[
        "--url",
        "memory://",
        "--scenario",
        "hold",
        "--locks",
        "200",
        "--ttl",
        "300ms",
        "--duration",
        "200ms",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "distlock bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["scenario"], "hold", "{line}");
    assert_eq!(line["locks"], 200, "{line}");
    assert_eq!(line["ttl_ms"], 300, "{line}");
    assert_eq!(line["lost"], 0, "{line}");
    assert_eq!(line["release_errors"], 0, "{line}");
    for field in [
        "acquire_s",
        "release_s",
        "first_tenth_acquire_us",
        "last_tenth_acquire_us",
    ] {
        assert!(line[field].as_f64().unwrap() > 0.0, "{field}: {line}");
    }
    // Linux has /proc: the client's own figures are there.
    assert!(line["bytes_per_lock"].as_f64().is_some(), "{line}");
    assert!(line["holding_cpu_ms_per_sec"].as_f64().is_some(), "{line}");
    assert!(line["holding_requests_per_sec"].is_null(), "{line}");
}
