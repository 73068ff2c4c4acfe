//! Black-box tests of the `distlock` binary: `exec` on every backend whose
//! server answers (the local-file backend always), bad input, and `demo`.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use support::{
    backend, code, distlock, process_gone_within, run_within, stderr, take_away, unique_key,
    wait_for_file, Backend, Running, TempDir,
};

const LIMIT: Duration = Duration::from_secs(30);

/// `distlock exec --url <backend> <extra...> KEY -- sh -c SCRIPT`.
fn exec(backend: &Backend, extra: &[&str], key: &str, script: &str) -> std::process::Command {
    let mut command = distlock();
    command
        .args(["exec", "--url", &backend.url])
        .args(extra)
        .args([key, "--", "sh", "-c", script]);
    command
}

fn no_wait_code(backend: &Backend, key: &str) -> i32 {
    code(&run_within(
        &mut exec(backend, &["--no-wait"], key, "true"),
        LIMIT,
    ))
}

/// Two or more `distlock exec` on one key never overlap: each appends start
/// and end markers to a log, which must alternate.
fn never_overlap(backend: &Backend) {
    const PROCESSES: usize = 4;
    const ROUNDS: usize = 2;
    let work = TempDir::new("overlap");
    let log = work.join("log");
    let key = unique_key("overlap");
    let script = format!(
        "echo \"start $$\" >> {log}; sleep 0.05; echo \"end $$\" >> {log}",
        log = log.display()
    );
    let threads: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let mut command = exec(backend, &["--wait", "30s"], &key, &script);
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    let output = run_within(&mut command, LIMIT);
                    assert_eq!(code(&output), 0, "stderr: {}", stderr(&output));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("runner panicked");
    }
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 * PROCESSES * ROUNDS, "{text}");
    for pair in lines.chunks(2) {
        let start = pair[0].strip_prefix("start ");
        let end = pair[1].strip_prefix("end ");
        assert!(
            start.is_some() && start == end,
            "{}: critical sections overlapped:\n{text}",
            backend.name
        );
    }
}

/// Starts a holder of `key` whose command writes its pid to `ready` and
/// then sleeps; returns once it runs under the lock.
fn start_holder(
    backend: &Backend,
    key: &str,
    extra: &[&str],
    ready: &std::path::Path,
) -> (Running, i32) {
    let script = format!("echo $$ > {}; exec sleep 60", ready.display());
    let holder = Running::spawn(&mut exec(backend, extra, key, &script));
    let pid = wait_for_file(ready, LIMIT).trim().parse().expect("pid");
    (holder, pid)
}

/// `--no-wait` gives 75 while the lock is held, `--wait` gives 75 once it
/// elapses, and the lock is free again after the holder ends.
fn busy_gives_75(backend: &Backend) {
    let work = TempDir::new("busy");
    let key = unique_key("busy");
    let (mut holder, _) = start_holder(backend, &key, &[], &work.join("ready"));

    let output = run_within(&mut exec(backend, &["--no-wait"], &key, "true"), LIMIT);
    assert_eq!(code(&output), 75, "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("held by another owner"),
        "{}",
        stderr(&output)
    );

    let started = Instant::now();
    let output = run_within(
        &mut exec(backend, &["--wait", "300ms"], &key, "true"),
        LIMIT,
    );
    assert_eq!(code(&output), 75, "stderr: {}", stderr(&output));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(stderr(&output).contains("timed out"), "{}", stderr(&output));

    holder.signal(Signal::SIGTERM);
    let status = holder.wait_within(LIMIT);
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the command died of the forwarded SIGTERM"
    );
    assert_eq!(
        no_wait_code(backend, &key),
        0,
        "{}: not released",
        backend.name
    );
}

/// A holder killed with SIGKILL frees a file lock at once, and a TTL
/// lock after its TTL; its command dies with it.
fn killed_holder_frees_lock(backend: &Backend) {
    let work = TempDir::new("killed");
    let key = unique_key("killed");
    let ttl = Duration::from_secs(2);
    let (mut holder, child_pid) =
        start_holder(backend, &key, &["--ttl", "2s"], &work.join("ready"));
    holder.signal(Signal::SIGKILL);
    holder.wait_within(LIMIT);
    let killed_at = Instant::now();
    assert!(
        process_gone_within(child_pid, Duration::from_secs(5)),
        "the command outlived the killed distlock"
    );
    if backend.name == "file" {
        assert_eq!(
            no_wait_code(backend, &key),
            0,
            "file lock not freed at once"
        );
        return;
    }
    // Session and TTL backends keep the lock until the TTL or the session
    // timeout runs out.
    assert_eq!(
        no_wait_code(backend, &key),
        75,
        "{}: freed before its TTL",
        backend.name
    );
    let output = run_within(&mut exec(backend, &["--wait", "30s"], &key, "true"), LIMIT);
    assert_eq!(
        code(&output),
        0,
        "{}: stderr: {}",
        backend.name,
        stderr(&output)
    );
    if backend.ttl_expiry {
        let waited = killed_at.elapsed();
        assert!(
            waited < ttl + Duration::from_secs(5),
            "{}: took {waited:?} with a {ttl:?} TTL",
            backend.name
        );
    }
}

/// A lock taken away while the command runs: the command gets SIGTERM and
/// distlock exits 76.
fn lost_gives_76(backend: &Backend) {
    let work = TempDir::new("lost");
    let key = unique_key("lost");
    let ready = work.join("ready");
    let marker = work.join("marker");
    let script = format!(
        "trap 'echo term > {marker}; exit 0' TERM; echo $$ > {ready}; while :; do sleep 0.05; done",
        marker = marker.display(),
        ready = ready.display()
    );
    let mut holder = Running::spawn(&mut exec(backend, &["--ttl", "600ms"], &key, &script));
    wait_for_file(&ready, LIMIT);
    if !take_away(backend, &key) {
        return;
    }
    let status = holder.wait_within(LIMIT);
    assert_eq!(
        status.code(),
        Some(76),
        "{}: exit status after the lock was lost",
        backend.name
    );
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default().trim(),
        "term",
        "the command did not get SIGTERM"
    );
}

/// SIGHUP, SIGINT and SIGTERM sent to distlock reach the command; distlock
/// exits with the command's status and releases the lock.
fn signals_reach_the_command(backend: &Backend) {
    let work = TempDir::new("signals");
    let key = unique_key("signals");
    let ready = work.join("ready");
    let got = work.join("got");
    let script = format!(
        "trap 'echo hup >> {got}' HUP; trap 'echo int >> {got}' INT; trap 'echo term >> {got}; exit 5' TERM; \
         echo $$ > {ready}; while :; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let mut holder = Running::spawn(&mut exec(backend, &[], &key, &script));
    wait_for_file(&ready, LIMIT);
    holder.signal(Signal::SIGHUP);
    assert_eq!(wait_for_file(&got, LIMIT), "hup\n");
    holder.signal(Signal::SIGINT);
    let started = Instant::now();
    while std::fs::read_to_string(&got).unwrap_or_default() != "hup\nint\n" {
        assert!(
            started.elapsed() < LIMIT,
            "SIGINT did not reach the command"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    holder.signal(Signal::SIGTERM);
    let status = holder.wait_within(LIMIT);
    assert_eq!(
        status.code(),
        Some(5),
        "distlock exits with the command's status"
    );
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "hup\nint\nterm\n");
    assert_eq!(
        no_wait_code(backend, &key),
        0,
        "{}: not released",
        backend.name
    );
}

/// The command sees DISTLOCK_KEY and a growing DISTLOCK_FENCING_TOKEN, and
/// distlock passes its exit status on (128+N for a signal).
fn environment_and_status(backend: &Backend) {
    let key = unique_key("env");
    let script = "echo \"$DISTLOCK_KEY $DISTLOCK_FENCING_TOKEN\"; exit 7";
    let first = run_within(&mut exec(backend, &[], &key, script), LIMIT);
    assert_eq!(code(&first), 7, "stderr: {}", stderr(&first));
    let second = run_within(&mut exec(backend, &[], &key, script), LIMIT);
    let parse = |output: &std::process::Output| -> (String, u64) {
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let (key, token) = text.rsplit_once(' ').expect("key and token");
        (key.to_owned(), token.parse().expect("numeric token"))
    };
    let (first_key, first_token) = parse(&first);
    let (_, second_token) = parse(&second);
    assert_eq!(first_key, key);
    assert!(
        second_token > first_token,
        "tokens {first_token} then {second_token}"
    );
    let killed = run_within(&mut exec(backend, &[], &key, "kill -KILL $$"), LIMIT);
    assert_eq!(code(&killed), 128 + 9);
}

macro_rules! backend_tests {
    ($($module:ident => $name:literal),* $(,)?) => {
        $(
            mod $module {
                use super::*;

                #[test]
                fn exec_never_overlaps() {
                    if let Some(backend) = backend($name) { never_overlap(&backend) }
                }

                #[test]
                fn busy_lock_gives_75() {
                    if let Some(backend) = backend($name) { busy_gives_75(&backend) }
                }

                #[test]
                fn killed_holder_frees_the_lock() {
                    if let Some(backend) = backend($name) { killed_holder_frees_lock(&backend) }
                }

                #[test]
                fn lost_lock_gives_76() {
                    if let Some(backend) = backend($name) { lost_gives_76(&backend) }
                }

                #[test]
                fn signals_reach_the_child() {
                    if let Some(backend) = backend($name) { signals_reach_the_command(&backend) }
                }

                #[test]
                fn child_gets_key_token_and_status() {
                    if let Some(backend) = backend($name) { environment_and_status(&backend) }
                }
            }
        )*
    };
}

backend_tests!(
    file => "file",
    redis => "redis",
    zookeeper => "zookeeper",
    etcd => "etcd",
);

/// Runs `distlock <args>` expecting a usage or service error: exit `expected`,
/// one line on stderr containing `needle`, no panic.
fn bad_input(args: &[&str], expected: i32, needle: &str) {
    let started = Instant::now();
    let output = run_within(distlock().args(args), Duration::from_secs(15));
    let text = stderr(&output);
    assert_eq!(code(&output), expected, "distlock {args:?}: {text}");
    assert_eq!(
        text.trim().lines().count(),
        1,
        "distlock {args:?}: not one line: {text}"
    );
    assert!(
        text.contains(needle),
        "distlock {args:?}: {text:?} does not name {needle:?}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "distlock {args:?} took {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_input_gives_one_line_and_a_documented_status() {
    bad_input(
        &["exec", "--url", "nope://x", "k", "--", "true"],
        64,
        "unknown scheme `nope`",
    );
    bad_input(
        &["exec", "--ttl", "5 parsecs", "k", "--", "true"],
        64,
        "--ttl",
    );
    bad_input(&["exec", "--wait", "soon", "k", "--", "true"], 64, "--wait");
    bad_input(&["exec", "k"], 64, "<CMD>");
    bad_input(
        &["exec", "--no-wait", "--wait", "1s", "k", "--", "true"],
        64,
        "--no-wait",
    );
    bad_input(
        &["exec", "--url", "file:///", "k", "--", "true"],
        64,
        "file:///",
    );
    bad_input(&["exec", "", "--", "true"], 64, "key");
    bad_input(&["demo", "--workers", "0"], 64, "--workers");
    bad_input(&["frobnicate"], 64, "frobnicate");
}

#[test]
fn unreachable_servers_fail_fast_with_69() {
    for url in [
        "redis://127.0.0.1:1",
        "zk://127.0.0.1:1",
        "etcd://127.0.0.1:1",
    ] {
        bad_input(
            &[
                "exec",
                "--url",
                url,
                "--connect-timeout",
                "3s",
                "k",
                "--",
                "true",
            ],
            69,
            "127.0.0.1:1",
        );
    }
}

#[test]
fn missing_command_gives_127() {
    let dir = TempDir::new("missing");
    let url = format!("file://{}", dir.path().display());
    let output = run_within(
        distlock().args(["exec", "--url", &url, "k", "--", "/nonexistent/command"]),
        LIMIT,
    );
    assert_eq!(code(&output), 127, "{}", stderr(&output));
    assert!(stderr(&output).contains("/nonexistent/command"));
    // The lock was released.
    let output = run_within(
        distlock().args(["exec", "--url", &url, "--no-wait", "k", "--", "true"]),
        LIMIT,
    );
    assert_eq!(code(&output), 0, "{}", stderr(&output));
}

/// The table's numbers for `strategy`: mutations, lost updates,
/// errors/conflicts.
fn demo_row(stdout: &str, strategy: &str) -> (u64, u64, u64) {
    let line = stdout
        .lines()
        .find(|line| {
            line.strip_prefix(strategy).is_some_and(|rest| {
                rest.starts_with("  ")
                    && rest.trim_start().starts_with(|c: char| c.is_ascii_digit())
            })
        })
        .unwrap_or_else(|| panic!("no row {strategy:?} in:\n{stdout}"));
    let numbers: Vec<u64> = line[strategy.len()..]
        .split_whitespace()
        .take(3)
        .map(|number| number.parse().expect("number"))
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

/// `distlock demo` on the embedded default (no URL, no server): the locked
/// strategies and optimistic versioning lose no update; no lock does.
#[test]
fn demo_on_the_default_backend() {
    let tmp = TempDir::new("demo-tmp");
    let started = Instant::now();
    let output = run_within(distlock().arg("demo").env("TMPDIR", tmp.path()), LIMIT);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("file backend"), "{stdout}");
    let (mutations, lost, _) = demo_row(&stdout, "no lock");
    assert!(mutations > 0 && lost > 0, "no lock lost nothing?\n{stdout}");
    for strategy in ["lock", "lock + fencing", "optimistic (CAS)"] {
        let (mutations, lost, _) = demo_row(&stdout, strategy);
        assert!(mutations > 0, "{strategy}: no mutations\n{stdout}");
        assert_eq!(lost, 0, "{strategy} lost updates\n{stdout}");
    }
}

/// On a backend whose locks expire (memory), the paused worker's stale
/// write gets through the plain lock but the fencing check refuses it.
#[test]
fn demo_fencing_refuses_the_stale_writer() {
    let output = run_within(
        distlock().args(["demo", "--url", "memory://", "--duration", "700ms"]),
        LIMIT,
    );
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (_, lost, _) = demo_row(&stdout, "lock + fencing");
    assert_eq!(lost, 0, "{stdout}");
    let (_, _, refused) = demo_row(&stdout, "lock + fencing");
    assert!(refused >= 1, "the fencing check refused nothing\n{stdout}");
    assert!(stdout.contains("paused worker's lock expired"), "{stdout}");
}

/// A command that ignores SIGTERM after the lock is lost gets SIGKILL
/// after `--kill-after`; distlock still exits 76.
#[test]
fn lost_lock_escalates_to_sigkill() {
    let backend = backend("file").expect("the file backend is always there");
    let work = TempDir::new("escalate");
    let key = unique_key("escalate");
    let ready = work.join("ready");
    let script = format!(
        "trap '' TERM; echo $$ > {ready}; while :; do sleep 0.05; done",
        ready = ready.display()
    );
    let mut holder = Running::spawn(&mut exec(
        &backend,
        &["--ttl", "600ms", "--kill-after", "300ms"],
        &key,
        &script,
    ));
    let child_pid: i32 = wait_for_file(&ready, LIMIT).trim().parse().expect("pid");
    assert!(take_away(&backend, &key));
    let status = holder.wait_within(LIMIT);
    assert_eq!(status.code(), Some(76));
    assert!(
        process_gone_within(child_pid, Duration::from_secs(5)),
        "the command survived SIGKILL"
    );
}
