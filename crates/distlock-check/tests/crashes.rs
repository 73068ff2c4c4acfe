//! A worker that crashes is reported, not a panic or an error of the
//! check; the library API is driven as a fault-injection test would.

use std::time::Duration;

use distlock_check::{now, start, CheckConfig};

#[tokio::test]
async fn crashed_workers_are_reported_with_their_stderr() {
    let dir = std::env::temp_dir().join(format!("distlock-check-crash-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    // A "worker" that reads its settings, complains and exits 3.
    let worker = vec![
        "sh".into(),
        "-c".into(),
        "read settings; echo 'worker failed on purpose' >&2; exit 3".into(),
    ];
    let mut config = CheckConfig::new(format!("file://{}", dir.display()), worker);
    config.workers = 2;
    config.duration = Duration::from_millis(500);
    config.progress = false;
    let running = start(config).await.expect("the check starts");
    let outage = now();
    running.record_fault("outside", outage, outage + Duration::from_millis(10));
    let report = running
        .finish()
        .await
        .expect("a crash is a finding, not an error");
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(report.cycles, 0);
    assert_eq!(report.worker_failures.len(), 2, "{report}");
    for failure in &report.worker_failures {
        assert_eq!(failure.outcome, "crashed: exit status 3");
        assert_eq!(failure.stderr_tail, ["worker failed on purpose"]);
    }
    assert_eq!(report.faults.len(), 1);
    assert_eq!(report.unavailability["outside"].never_recovered, 1);
    // The crash happened at once: it is not also a hang.
    assert!(report.hangs.is_empty(), "{report}");
    let violations = report.violations();
    assert!(
        violations.iter().any(|v| v.contains("no lock cycle")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("worker 1 crashed")),
        "{violations:?}"
    );
}
