//! `hold`: one client takes `locks` locks on distinct keys, one after
//! another, holds them all for the scenario's duration, then releases them
//! one after another. It measures what holding many locks costs:
//!
//! - the client's resident memory per held lock (the growth of `VmRSS`
//!   over the acquisitions, divided by their number);
//! - the requests the server receives per second while the locks are
//!   held (from a third of the TTL plus 500 ms after the last grant, so
//!   that work done once per lock after its grant is not counted), less what it received per second over an idle stretch just
//!   before, with the same client connected and nothing held (the
//!   counters are the whole server's; see the `server_load` module);
//! - the client's CPU time per second while holding, less its idle rate;
//! - the time to take them, the mean time of the first and of the last
//!   tenth of the acquisitions (the last should cost what the first did),
//!   and the time to release them.

use std::time::Duration;

use tokio::time::Instant;

use super::Scenario;
use crate::process;
use crate::report::{HoldFigures, Report};
use crate::runner::Bench;

/// Time after the acquisitions, beyond a third of the TTL, before the hold
/// is measured.
const SETTLE: Duration = Duration::from_millis(500);

/// Per second of `elapsed`.
fn rate(count: f64, elapsed: Duration) -> f64 {
    count / elapsed.as_secs_f64().max(1e-9)
}

impl Bench {
    pub(super) async fn hold(&mut self) -> Result<Report, String> {
        let report = Report {
            scenario: Scenario::Hold.name(),
            workers: 1,
            ..Report::default()
        };
        if self.floor_only {
            return Ok(report);
        }
        let locker = self.lock_client().await?;
        let options = self.options.clone();
        let key = |index: usize| format!("{}/hold/{index}", self.key_prefix);
        // Whatever the first lock sets up (lock directories, scripts).
        locker
            .lock(&key(0), &options)
            .await
            .map_err(|err| format!("hold: lock {}: {err}", key(0)))?
            .release()
            .await
            .map_err(|err| format!("hold: release {}: {err}", key(0)))?;
        let server_error = |err| format!("hold: server counters of {}: {err}", self.redacted());

        // The idle rates: the client connected, nothing held.
        self.progress.set_message("hold: idle");
        let idle_for = (self.duration / 2).max(Duration::from_secs(1));
        let idle_requests = self.raw.requests_received().await.map_err(server_error)?;
        let idle_cpu = process::cpu_time();
        let idle_started = Instant::now();
        tokio::time::sleep(idle_for).await;
        let idle_elapsed = idle_started.elapsed();
        let idle_cpu = process::cpu_time().zip(idle_cpu).map(|(b, a)| b - a);
        let idle_requests = self
            .raw
            .requests_received()
            .await
            .map_err(server_error)?
            .zip(idle_requests)
            .map(|(b, a)| b.saturating_sub(a));

        self.progress.set_message("hold: acquire");
        let mut guards = Vec::with_capacity(self.locks);
        let mut acquires = Vec::with_capacity(self.locks);
        let resident_before = process::resident_bytes();
        let started = Instant::now();
        for index in 0..self.locks {
            let key = key(index);
            let start = Instant::now();
            let guard = locker
                .lock(&key, &options)
                .await
                .map_err(|err| format!("hold: lock {key}: {err}"))?;
            acquires.push(start.elapsed());
            guards.push(guard);
        }
        let acquire = started.elapsed();
        let resident_after = process::resident_bytes();

        // What a backend does once per lock a while after its grant (a
        // watch set up at ttl / 3) is not the steady cost of holding.
        self.progress.set_message("hold: settle");
        tokio::time::sleep(options.ttl / 3 + SETTLE).await;
        self.progress.set_message("hold: holding");
        let requests_before = self.raw.requests_received().await.map_err(server_error)?;
        let cpu_before = process::cpu_time();
        let holding_started = Instant::now();
        tokio::time::sleep(self.duration).await;
        let holding = holding_started.elapsed();
        let cpu = process::cpu_time().zip(cpu_before).map(|(b, a)| b - a);
        let requests = self
            .raw
            .requests_received()
            .await
            .map_err(server_error)?
            .zip(requests_before)
            .map(|(b, a)| b.saturating_sub(a));
        let lost = guards.iter().filter(|guard| !guard.is_held()).count();

        self.progress.set_message("hold: release");
        let started = Instant::now();
        let mut release_errors = 0;
        for guard in guards {
            if guard.release().await.is_err() {
                release_errors += 1;
            }
        }
        let release = started.elapsed();

        let tenth = (self.locks / 10).max(1);
        let mean_us = |part: &[Duration]| {
            (!part.is_empty())
                .then(|| part.iter().sum::<Duration>().as_secs_f64() * 1e6 / part.len() as f64)
        };
        let idle_request_rate = idle_requests.map(|n| rate(n as f64, idle_elapsed));
        let idle_cpu_rate = idle_cpu.map(|cpu| rate(cpu.as_secs_f64() * 1e3, idle_elapsed));
        Ok(Report {
            hold: Some(HoldFigures {
                locks: self.locks,
                ttl: options.ttl,
                acquire,
                first_tenth_acquire_us: mean_us(&acquires[..tenth.min(acquires.len())]),
                last_tenth_acquire_us: mean_us(&acquires[acquires.len().saturating_sub(tenth)..]),
                release,
                bytes_per_lock: resident_before
                    .zip(resident_after)
                    .map(|(before, after)| after.saturating_sub(before) as f64 / self.locks as f64),
                holding,
                idle_requests_per_sec: idle_request_rate,
                requests_per_sec: requests.map(|n| rate(n as f64, holding)),
                idle_cpu_ms_per_sec: idle_cpu_rate,
                cpu_ms_per_sec: cpu.map(|cpu| rate(cpu.as_secs_f64() * 1e3, holding)),
                lost,
                release_errors,
            }),
            ..report
        })
    }
}
