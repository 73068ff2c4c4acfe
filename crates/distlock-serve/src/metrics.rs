//! The service's Prometheus metrics, through the `metrics` facade.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `distlock_serve_acquire_seconds` | histogram, label `outcome` | time from an acquire request to its answer (long polls included) |
//! | `distlock_serve_held_leases` | gauge | leases this instance holds for its clients |
//! | `distlock_serve_waits` | gauge | acquire requests waiting (long polls) now |
//! | `distlock_serve_waits_total` | counter | acquire requests that waited |
//! | `distlock_serve_errors_total` | counter, label `kind` | error answers by kind (`busy`, `expired`, ...) |

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Acquire latency, seconds.
pub const ACQUIRE_SECONDS: &str = "distlock_serve_acquire_seconds";
/// Leases held for clients.
pub const HELD_LEASES: &str = "distlock_serve_held_leases";
/// Long polls in progress.
pub const WAITS: &str = "distlock_serve_waits";
/// Long polls started.
pub const WAITS_TOTAL: &str = "distlock_serve_waits_total";
/// Error answers by kind.
pub const ERRORS_TOTAL: &str = "distlock_serve_errors_total";

/// Buckets of the acquire histogram: 100 µs to 60 s (long polls).
const ACQUIRE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. Metrics are
/// process-wide (the `metrics` facade has one global recorder), so
/// several servers in one process share them.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(ACQUIRE_SECONDS.into()), ACQUIRE_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            // Another recorder came first (an embedding program's own):
            // our metrics go there, and /metrics renders an empty page.
            tracing::warn!(
                "distlock serve: a metrics recorder was already installed; /metrics will be empty"
            );
        }
        metrics::describe_histogram!(
            ACQUIRE_SECONDS,
            metrics::Unit::Seconds,
            "Time from an acquire request to its answer, long polls included"
        );
        metrics::describe_gauge!(HELD_LEASES, "Leases this instance holds for its clients");
        metrics::describe_gauge!(WAITS, "Acquire requests waiting for a lock now");
        metrics::describe_counter!(WAITS_TOTAL, "Acquire requests that waited for a lock");
        metrics::describe_counter!(ERRORS_TOTAL, "Error answers, by kind");
        handle
    })
}

/// Records one acquire's latency and outcome (`granted`, `busy`, ...).
pub fn acquire(elapsed: Duration, outcome: &'static str) {
    metrics::histogram!(ACQUIRE_SECONDS, "outcome" => outcome).record(elapsed.as_secs_f64());
}

/// Records an error answer.
pub fn error(kind: &'static str) {
    metrics::counter!(ERRORS_TOTAL, "kind" => kind).increment(1);
}

/// Sets the number of held leases.
pub fn held_leases(count: usize) {
    metrics::gauge!(HELD_LEASES).set(count as f64);
}

/// A long poll in progress; counted down when dropped (answered or
/// abandoned by its client).
pub struct Waiting(());

impl Waiting {
    /// Counts a long poll.
    pub fn start() -> Self {
        metrics::counter!(WAITS_TOTAL).increment(1);
        metrics::gauge!(WAITS).increment(1.0);
        Waiting(())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!(WAITS).decrement(1.0);
    }
}
