//! The worker process: the lock loop, talking to the hub over stdin and
//! stdout. Every step is reported with the shared clock's time as it
//! happens, so the hub's history is the worker's own view.

use std::time::Duration;

use distlock::{LockGuard, LockOptions, LostReason};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::history::Step;
use crate::protocol::{ToHub, ToWorker, WorkerSettings};
use crate::{describe, error_kind, now, CheckError};

/// Runs one worker: reads its settings from stdin, then takes, uses and
/// releases the lock in a loop until the hub says stop (or closes stdin),
/// and returns once the lock in hand is released. Call it from the
/// program named by [`CheckConfig::worker_command`](crate::CheckConfig),
/// on a tokio runtime; its stdin and stdout belong to the hub.
pub async fn run_worker() -> Result<(), CheckError> {
    let started = now();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .map_err(|source| CheckError::Io {
            context: "reading the worker's settings from stdin".into(),
            source,
        })?
        .ok_or_else(|| CheckError::Protocol("stdin closed before the worker's settings".into()))?;
    let settings = match serde_json::from_str(&first) {
        Ok(ToWorker::Settings(settings)) => settings,
        Ok(other) => {
            return Err(CheckError::Protocol(format!(
                "expected the worker's settings first, got {other:?}"
            )))
        }
        Err(err) => {
            return Err(CheckError::Protocol(format!(
                "the worker's settings are not valid: {err}: {first}"
            )))
        }
    };

    let (to_hub, outgoing) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_lines(outgoing));
    let (stop_sender, stop) = watch::channel(false);
    let (reply_sender, replies) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_lines(lines, stop_sender, reply_sender));

    let mut worker = Worker {
        settings,
        to_hub,
        replies,
        stop,
        cycle: 0,
    };
    worker.report_at(started, Step::Started);
    worker.run().await;
    drop(worker);
    reader.abort();
    // The writer ends once every sender is gone, after the last line.
    writer.await.map_err(|err| CheckError::Io {
        context: "writing to the hub".into(),
        source: std::io::Error::other(err),
    })?
}

/// Writes each message as one JSON line on stdout.
async fn write_lines(mut outgoing: mpsc::UnboundedReceiver<ToHub>) -> Result<(), CheckError> {
    let mut stdout = tokio::io::stdout();
    while let Some(message) = outgoing.recv().await {
        let mut line = serde_json::to_string(&message)
            .map_err(|err| CheckError::Protocol(format!("cannot encode {message:?}: {err}")))?;
        line.push('\n');
        let written = async {
            stdout.write_all(line.as_bytes()).await?;
            stdout.flush().await
        };
        written.await.map_err(|source| CheckError::Io {
            context: "writing to the hub (stdout)".into(),
            source,
        })?;
    }
    Ok(())
}

/// Routes the hub's lines: `Stop` (or the end of stdin: the hub is gone)
/// raises the stop flag, the rest are replies.
async fn read_lines(
    mut lines: tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    stop: watch::Sender<bool>,
    replies: mpsc::UnboundedSender<ToWorker>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str(&line) {
            Ok(ToWorker::Stop) => {
                let _ = stop.send(true);
            }
            Ok(reply) => {
                let _ = replies.send(reply);
            }
            Err(err) => {
                tracing::error!(%err, %line, "distlock-check worker: not a hub message");
            }
        }
    }
    let _ = stop.send(true);
}

struct Worker {
    settings: WorkerSettings,
    to_hub: mpsc::UnboundedSender<ToHub>,
    replies: mpsc::UnboundedReceiver<ToWorker>,
    stop: watch::Receiver<bool>,
    cycle: u64,
}

/// The hub stopped answering (it exited): leave the cycle and stop.
struct HubGone;

impl Worker {
    fn report(&self, step: Step) {
        self.report_at(now(), step);
    }

    fn report_at(&self, at: crate::Timestamp, step: Step) {
        let _ = self.to_hub.send(ToHub::Step {
            cycle: self.cycle,
            at,
            step,
        });
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once the hub says stop.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut stop = self.stop.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }

    async fn run(&mut self) {
        let Some(locks) = self.connect().await else {
            self.report(Step::Stopping);
            return;
        };
        let options = LockOptions::new()
            .ttl(Duration::from_millis(self.settings.ttl_ms))
            .wait(Duration::from_millis(self.settings.wait_ms));
        while !self.stopping() {
            self.cycle += 1;
            self.report(Step::LockStarted);
            let attempt = tokio::select! {
                biased;
                _ = self.stopped() => break,
                attempt = locks.lock(&self.settings.key, &options) => attempt,
            };
            match attempt {
                Ok(guard) => {
                    if self.hold(guard).await.is_err() {
                        break;
                    }
                }
                Err(err) => {
                    self.report(Step::LockFailed {
                        kind: error_kind(&err).into(),
                        error: describe(&err),
                    });
                    if !err.is_timeout() {
                        // Don't spin on a failing service.
                        self.pause_before_retry().await;
                    }
                }
            }
        }
        self.report(Step::Stopping);
    }

    /// Connects, retrying until it works or the hub says stop.
    async fn connect(&mut self) -> Option<distlock::Locker> {
        loop {
            let attempt = tokio::select! {
                biased;
                _ = self.stopped() => return None,
                attempt = distlock::connect(&self.settings.url) => attempt,
            };
            match attempt {
                Ok(locks) => {
                    self.report(Step::Connected);
                    return Some(locks);
                }
                Err(err) => {
                    self.report(Step::ConnectFailed {
                        error: describe(&err),
                    });
                    self.pause_before_retry().await;
                }
            }
        }
    }

    async fn pause_before_retry(&self) {
        let delay = Duration::from_millis(self.settings.ttl_ms.min(1000));
        tokio::select! {
            _ = self.stopped() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// One cycle with the lock in hand: read the register, ask
    /// `is_held()`, write the register and bump the counter if still held,
    /// release. A hub that went away still gets the lock released.
    async fn hold(&mut self, guard: LockGuard) -> Result<(), HubGone> {
        let token = guard.fencing_token();
        self.report(Step::Acquired { token });
        let lost_watch = {
            let lost = guard.lost();
            let to_hub = self.to_hub.clone();
            let cycle = self.cycle;
            tokio::spawn(async move {
                let reason = lost.await;
                let _ = to_hub.send(ToHub::Step {
                    cycle,
                    at: now(),
                    step: Step::Lost {
                        released: reason == LostReason::Released,
                        reason: reason.to_string(),
                    },
                });
            })
        };
        let used = self.use_register_and_counter(&guard, token).await;
        self.report(Step::ReleaseStarted);
        match guard.release().await {
            Ok(()) => self.report(Step::Released),
            Err(err) => self.report(Step::ReleaseFailed {
                kind: error_kind(&err).into(),
                error: describe(&err),
            }),
        }
        // Released guards fire lost() at once: wait for its line so that
        // it precedes the next cycle's.
        let _ = lost_watch.await;
        used
    }

    async fn use_register_and_counter(
        &mut self,
        guard: &LockGuard,
        token: u64,
    ) -> Result<(), HubGone> {
        let cycle = self.cycle;
        let ToWorker::RegisterValue { value } =
            self.request(ToHub::ReadRegister { cycle, token }).await?
        else {
            return Err(HubGone);
        };
        let held = guard.is_held();
        self.report(Step::HeldChecked { held });
        if !held {
            return Ok(());
        }
        let write = ToHub::WriteRegister {
            cycle,
            sent_at: now(),
            token,
            value: value + 1,
        };
        self.request(write).await?;
        // The counter is not fenced: a read, then a separate write.
        let ToWorker::CounterValue { value } = self.request(ToHub::ReadCounter { cycle }).await?
        else {
            return Err(HubGone);
        };
        let write = ToHub::WriteCounter {
            cycle,
            sent_at: now(),
            value: value + 1,
        };
        self.request(write).await?;
        Ok(())
    }

    async fn request(&mut self, message: ToHub) -> Result<ToWorker, HubGone> {
        self.to_hub.send(message).map_err(|_| HubGone)?;
        self.replies.recv().await.ok_or(HubGone)
    }
}
