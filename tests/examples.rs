//! Every example in examples/ runs to success on `memory://` with no server
//! and `DISTLOCK_URL` unset, as `cargo run -p distlock-examples --example NAME` does on a fresh
//! machine, and prints what it claims to show.
//!
//! The example binaries are the ones cargo built for this test run
//! (`cargo test` and `cargo nextest run` build the examples; with a
//! `--test` filter, build them first with `cargo build --examples`).

use std::path::PathBuf;
use std::process::Command;

fn example_path(name: &str) -> PathBuf {
    // This test binary lives in target/<profile>/deps/; the examples in
    // target/<profile>/examples/.
    let test_binary = std::env::current_exe().expect("current exe");
    let profile_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --examples` (cargo test builds them unless filtered by --test)",
        path.display()
    );
    path
}

/// Runs an example on memory:// and returns its stdout.
fn run_on_memory(name: &str) -> String {
    let output = Command::new(example_path(name))
        .env_remove("DISTLOCK_URL")
        .env_remove("JOB_SECS")
        .output()
        .unwrap_or_else(|err| panic!("run example {name}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn quickstart_runs_on_memory() {
    let stdout = run_on_memory("quickstart");
    assert!(stdout.contains("memory:// holds"), "{stdout}");
    assert!(stdout.contains("released"), "{stdout}");
}

#[test]
fn config_swap_runs_on_memory() {
    let stdout = run_on_memory("config_swap");
    assert!(stdout.contains("backend `memory`"), "{stdout}");
    assert!(stdout.contains("round 2: holding"), "{stdout}");
}

#[test]
fn fencing_refuses_the_stale_write() {
    let stdout = run_on_memory("fencing");
    assert!(stdout.contains("A's late write was refused"), "{stdout}");
    assert!(
        stdout.contains(r#"the store holds "written by B""#),
        "{stdout}"
    );
}

#[test]
fn renewal_outlives_the_ttl_and_stops_on_loss() {
    let stdout = run_on_memory("renewal");
    assert!(
        stdout.contains("job 1: finished all 12 steps, lock still held: true"),
        "{stdout}"
    );
    assert!(stdout.contains("job 2: lock lost at step"), "{stdout}");
    assert!(stdout.contains("the lock was revoked"), "{stdout}");
}

#[test]
fn leader_has_one_leader_at_a_time() {
    let stdout = run_on_memory("leader");
    assert!(stdout.contains("never two leaders at once"), "{stdout}");
    // Leaders step down after a term, so leadership changes hands.
    let terms = stdout.matches(": leader (fencing token").count();
    assert!(terms >= 2, "{stdout}");
}
