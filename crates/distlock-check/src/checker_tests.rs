//! The checker on hand-built histories. Times are milliseconds after an
//! origin of 1000 s, so every finding can be read off the test.

use super::*;
use crate::history::{Event, WorkerExit};

fn at(ms: u64) -> Timestamp {
    Timestamp::from_nanos(1_000_000_000_000 + ms * 1_000_000)
}

/// A history builder: one call per step.
struct Build {
    history: History,
}

impl Build {
    fn new(workers: usize, end_ms: u64) -> Self {
        let exits = (0..workers)
            .map(|worker| WorkerExit {
                worker,
                at: at(end_ms),
                code: Some(0),
                signal: None,
                killed_at_stop: false,
                stderr_tail: Vec::new(),
            })
            .collect();
        let mut build = Build {
            history: History {
                started: at(0),
                ended: at(end_ms),
                exits,
                ..History::default()
            },
        };
        for worker in 0..workers {
            build.step(worker, 0, 0, Step::Started);
        }
        build
    }

    fn step(&mut self, worker: usize, cycle: u64, ms: u64, step: Step) -> &mut Self {
        self.history.events.push(Event {
            worker,
            cycle,
            at: at(ms),
            step,
        });
        self
    }

    /// A complete, well-behaved cycle: acquire at `from`, read, check,
    /// write register and counter, release at `to`.
    fn cycle(&mut self, worker: usize, cycle: u64, token: u64, from: u64, to: u64) -> &mut Self {
        let middle = (from + to) / 2;
        self.step(worker, cycle, from - 1, Step::LockStarted)
            .step(worker, cycle, from, Step::Acquired { token })
            .step(worker, cycle, from, Step::RegisterRead { token, value: 0 })
            .step(worker, cycle, middle, Step::HeldChecked { held: true });
        self.write(worker, cycle, token, middle, true);
        self.increment(worker, cycle, middle);
        self.release(worker, cycle, to, true)
    }

    fn write(
        &mut self,
        worker: usize,
        cycle: u64,
        token: u64,
        ms: u64,
        accepted: bool,
    ) -> &mut Self {
        let step = Step::RegisterWritten {
            token,
            sent_at: at(ms),
            accepted,
        };
        self.step(worker, cycle, ms, step)
    }

    fn increment(&mut self, worker: usize, cycle: u64, ms: u64) -> &mut Self {
        self.history.counter_value += 1;
        let value = self.history.counter_value;
        self.step(worker, cycle, ms, Step::CounterRead { value: value - 1 })
            .step(
                worker,
                cycle,
                ms,
                Step::CounterWritten {
                    value,
                    sent_at: at(ms),
                },
            )
    }

    fn release(&mut self, worker: usize, cycle: u64, ms: u64, ok: bool) -> &mut Self {
        self.step(worker, cycle, ms, Step::ReleaseStarted);
        let end = if ok {
            Step::Released
        } else {
            Step::ReleaseFailed {
                kind: "not_held".into(),
                error: "lock is not held".into(),
            }
        };
        self.step(worker, cycle, ms + 1, end).step(
            worker,
            cycle,
            ms + 1,
            Step::Lost {
                reason: "the lock was released".into(),
                released: true,
            },
        )
    }

    fn pause(&mut self, worker: usize, from: u64, to: u64) -> &mut Self {
        self.history.faults.push(Fault {
            kind: PAUSE.into(),
            worker: Some(worker),
            started: at(from),
            ended: at(to),
        });
        self
    }

    fn report(&self, workers: usize) -> Report {
        let mut config = CheckConfig::new("redis://127.0.0.1:6379", vec!["worker".into()]);
        config.workers = workers;
        config.ttl = Duration::from_millis(100);
        config.wait = Duration::from_millis(1000);
        check(&self.history, &config)
    }
}

#[test]
fn a_clean_history_has_no_violations() {
    let mut build = Build::new(2, 500);
    build
        .cycle(0, 1, 10, 10, 50)
        .cycle(1, 1, 11, 60, 100)
        .cycle(0, 2, 12, 110, 150);
    build.step(1, 2, 55, Step::LockStarted); // waiting during worker 0's hold
    build.step(
        1,
        2,
        250,
        Step::LockFailed {
            kind: "timeout".into(),
            error: "timed out".into(),
        },
    );
    let report = build.report(2);
    assert!(report.violations().is_empty(), "{report}");
    assert_eq!(report.cycles, 3);
    assert_eq!(report.cycles_per_worker, vec![2, 1]);
    assert_eq!(report.writes_accepted, 3);
    assert_eq!(report.errors.get("lock timeout"), Some(&1));
    assert_eq!(report.lost_updates.lost, 0);
    assert!(
        report.to_string().ends_with("OK: no violations"),
        "{report}"
    );
}

#[test]
fn overlapping_beliefs_are_a_double_grant() {
    let mut build = Build::new(2, 500);
    build.cycle(0, 1, 10, 10, 100).cycle(1, 1, 11, 40, 120);
    let report = build.report(2);
    assert_eq!(report.double_grants.len(), 1, "{report}");
    let grant = &report.double_grants[0];
    assert_eq!((grant.first.worker, grant.second.worker), (0, 1));
    // Worker 0 believed until its write at 55, worker 1 from 40.
    assert_eq!(grant.overlap, Duration::from_millis(15));
    assert!(report
        .violations()
        .iter()
        .any(|v| v.contains("double grant")));
}

#[test]
fn a_pause_is_cut_out_of_the_paused_workers_belief() {
    // Worker 0 holds from 10, is paused 20..300, and after the pause
    // observes holding at 310 (an is_held() that lies). Worker 1 holds
    // 150..200, entirely inside worker 0's pause: no overlap.
    let mut build = Build::new(2, 500);
    build
        .step(0, 1, 10, Step::Acquired { token: 10 })
        .pause(0, 20, 300)
        .cycle(1, 1, 11, 150, 200)
        .step(0, 1, 310, Step::HeldChecked { held: false })
        .release(0, 1, 320, false);
    let report = build.report(2);
    assert!(report.double_grants.is_empty(), "{report}");
    assert!(report.hangs.is_empty(), "the pause is not a hang: {report}");
    // No grant after the pause's end (300): the stretch from worker 1's
    // grant at 150 to the end of the run (500) counts, and the fault never
    // recovered.
    let unavailable = &report.unavailability[PAUSE];
    assert_eq!(unavailable.max, Duration::from_millis(350));
    assert_eq!(unavailable.never_recovered, 1);
    assert!(report.violations().is_empty(), "{report}");

    // Without the pause window, the same belief (to 310) overlaps.
    build.history.faults.clear();
    build.step(0, 1, 310, Step::HeldChecked { held: true });
    assert_eq!(build.report(2).double_grants.len(), 1);
}

#[test]
fn an_accepted_write_after_a_later_grant_is_stale() {
    // Worker 0 acquires at 10 (token 10); worker 1 acquires at 100
    // (token 11) but has not read the register yet when worker 0's
    // write arrives at 120: the register cannot know, and accepts it.
    let mut build = Build::new(2, 500);
    build
        .step(0, 1, 10, Step::Acquired { token: 10 })
        .pause(0, 20, 110)
        .step(1, 1, 100, Step::Acquired { token: 11 })
        .write(0, 1, 10, 120, true)
        .release(0, 1, 130, false)
        .step(1, 1, 140, Step::HeldChecked { held: true })
        .release(1, 1, 150, true);
    let report = build.report(2);
    assert_eq!(report.stale_writes_accepted.len(), 1, "{report}");
    let stale = &report.stale_writes_accepted[0];
    assert_eq!((stale.writer.token, stale.superseded_by.token), (10, 11));
    assert_eq!(stale.arrived, at(120));

    // The same write refused by the register is fencing at work.
    let mut refused = Build::new(2, 500);
    refused
        .step(0, 1, 10, Step::Acquired { token: 10 })
        .pause(0, 20, 110)
        .step(1, 1, 100, Step::Acquired { token: 11 })
        .write(0, 1, 10, 120, false)
        .release(0, 1, 130, false)
        .release(1, 1, 150, true);
    let report = refused.report(2);
    assert!(report.stale_writes_accepted.is_empty(), "{report}");
    assert_eq!(report.writes_refused, 1);
}

#[test]
fn a_lock_taken_without_lost_and_released_ok_is_an_unsignalled_loss() {
    let mut build = Build::new(2, 500);
    build
        .step(0, 1, 10, Step::Acquired { token: 10 })
        .pause(0, 20, 200)
        .cycle(1, 1, 11, 100, 150)
        .release(0, 1, 210, true);
    let report = build.report(2);
    assert_eq!(report.unsignalled_losses.len(), 1, "{report}");
    let loss = &report.unsignalled_losses[0];
    assert_eq!((loss.holder.worker, loss.taken_by.worker), (0, 1));

    // The same, but lost() fired: signalled.
    build.step(
        0,
        1,
        205,
        Step::Lost {
            reason: "the lease expired".into(),
            released: false,
        },
    );
    assert!(build.report(2).unsignalled_losses.is_empty());
}

#[test]
fn crashes_hangs_and_lost_updates_are_violations() {
    let mut build = Build::new(2, 10_000);
    build.cycle(0, 1, 10, 10, 50);
    // Worker 1 says nothing after its start for 10 s (bound 3.1 s) and
    // then dies.
    build.history.exits[1].code = Some(101);
    build.history.exits[1].stderr_tail = vec!["panicked at 'boom'".into()];
    build.history.counter_value = 0;
    let report = build.report(2);
    assert_eq!(report.hangs.len(), 2, "{report}");
    assert_eq!(report.lost_updates.lost, 1);
    assert_eq!(report.worker_failures.len(), 1);
    let text = report.to_string();
    assert!(text.contains("crashed: exit status 101"), "{text}");
    assert!(text.contains("panicked at 'boom'"), "{text}");
    assert_eq!(report.violations().len(), 3, "{:?}", report.violations());
}

#[test]
fn a_grant_just_after_a_fault_does_not_hide_the_stall_behind_it() {
    // A leader dies at 100 (fault until 400). A grant committed before it
    // answers at 102; then nothing until the new leader grants at 1100,
    // and grants follow at 1110 (after the fault's end: the recovery).
    let mut build = Build::new(2, 2000);
    build
        .cycle(0, 1, 10, 90, 101)
        .cycle(1, 1, 11, 102, 105)
        .cycle(0, 2, 12, 1100, 1105)
        .cycle(1, 2, 13, 1110, 1115);
    build.history.faults.push(Fault {
        kind: "leader-kill".to_owned(),
        worker: None,
        started: at(100),
        ended: at(400),
    });
    let report = build.report(2);
    let unavailable = &report.unavailability["leader-kill"];
    assert_eq!(unavailable.max, Duration::from_millis(998), "{report}");
    assert_eq!(unavailable.never_recovered, 0);
}
