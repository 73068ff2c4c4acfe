//! The hub: the parent process's side of a check. It starts the workers,
//! serves their register and counter requests in one task (so both are
//! linearizable: one request at a time, in arrival order), records every
//! line, pauses workers, and at the end stops them and hands the history
//! to the checker.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::history::{Event, Fault, History, Step, WorkerExit, PAUSE};
use crate::protocol::{ToHub, ToWorker, WorkerSettings};
use crate::{check, now, CheckConfig, CheckError, Report, Timestamp};

/// How many of a worker's last stderr lines a crash report quotes.
const STDERR_TAIL: usize = 20;

/// A check in progress. Dropping it kills the workers (SIGKILL): call
/// [`finish`](RunningCheck::finish) for a clean end.
pub struct RunningCheck {
    config: CheckConfig,
    /// When the workers were started, on both clocks.
    started: Timestamp,
    started_instant: Instant,
    children: Vec<Child>,
    stderr_tails: Vec<JoinHandle<Vec<String>>>,
    hub_inputs: mpsc::UnboundedSender<HubInput>,
    hub: Option<JoinHandle<Hub>>,
    outside_faults: Arc<Mutex<Vec<Fault>>>,
    progress: Option<(ProgressBar, JoinHandle<()>)>,
}

/// Starts a check: validates `config`, makes sure the lock service
/// answers and is shared across processes, starts the workers and the hub.
/// The workload runs until [`RunningCheck::finish`].
pub async fn start(config: CheckConfig) -> Result<RunningCheck, CheckError> {
    config.validate()?;
    probe_service(&config).await?;

    let started = now();
    let started_instant = Instant::now();
    let (hub_inputs, inputs) = mpsc::unbounded_channel();
    let cycles = Arc::new(AtomicU64::new(0));
    let mut children = Vec::with_capacity(config.workers);
    let mut stderr_tails = Vec::with_capacity(config.workers);
    let mut links = Vec::with_capacity(config.workers);
    for worker in 0..config.workers {
        let mut child = spawn_worker(&config, worker)?;
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(stdin), Some(stdout), Some(stderr)) => (stdin, stdout, stderr),
                _ => unreachable!("every stdio of the worker is piped"),
            };
        let replies = spawn_stdin_writer(worker, stdin);
        let _ = replies.send(ToWorker::Settings(WorkerSettings {
            worker,
            url: config.url.clone(),
            key: config.key.clone(),
            ttl_ms: millis(config.ttl),
            wait_ms: millis(config.wait),
        }));
        spawn_stdout_reader(worker, stdout, hub_inputs.clone());
        stderr_tails.push(tokio::spawn(stderr_tail(stderr)));
        let pid = child.id().map(|pid| Pid::from_raw(pid as i32));
        links.push(WorkerLink {
            pid,
            replies: Some(replies),
            open: true,
            closed_at: None,
        });
        children.push(child);
    }

    let run_end = started_instant + config.duration;
    let hub = Hub {
        history: History {
            started,
            ..History::default()
        },
        workers: links,
        register_value: 0,
        highest_token: 0,
        pause: config.pause_workers.map(|length| PausePlan {
            length,
            gap: config.ttl,
            run_end,
            armed: false,
            next_arm: Some(started_instant + config.ttl),
            current: None,
            repeat: true,
            over: None,
        }),
        stopping: false,
        cycles: cycles.clone(),
    };
    let hub = tokio::spawn(hub.serve(inputs, hub_inputs.clone()));
    let progress = (config.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| show_progress(config.duration, started_instant, cycles));
    Ok(RunningCheck {
        config,
        started,
        started_instant,
        children,
        stderr_tails,
        hub_inputs,
        hub: Some(hub),
        outside_faults: Arc::new(Mutex::new(Vec::new())),
        progress,
    })
}

/// Refuses in-process backends and unreachable services before any worker
/// starts, so that a typo is one clear error instead of N crashed workers.
async fn probe_service(config: &CheckConfig) -> Result<(), CheckError> {
    let url = distlock::error::redact_url(&config.url);
    let connect_error = |source: distlock::Error| CheckError::Connect {
        url: url.clone(),
        source: Box::new(source),
    };
    if distlock::Service::of_url(&config.url).map_err(connect_error)? == distlock::Service::Memory {
        return Err(CheckError::NotCrossProcess { url });
    }
    let bound = config.stop_timeout.max(Duration::from_secs(5));
    let locks = match tokio::time::timeout(bound, distlock::connect(&config.url)).await {
        Ok(connected) => connected.map_err(connect_error)?,
        Err(_) => {
            return Err(CheckError::Connect {
                url: url.clone(),
                source: Box::new(distlock::Error::InvalidConfig(format!(
                    "no connection within {bound:?}"
                ))),
            })
        }
    };
    if !locks.capabilities().cross_process {
        return Err(CheckError::NotCrossProcess { url });
    }
    Ok(())
}

fn spawn_worker(config: &CheckConfig, worker: usize) -> Result<Child, CheckError> {
    let program = &config.worker_command[0];
    let mut command = Command::new(program);
    command
        .args(&config.worker_command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own: a terminal's Ctrl-C reaches only
        // the parent, which then kills the workers itself.
        .process_group(0)
        .kill_on_drop(true);
    command.spawn().map_err(|source| CheckError::Spawn {
        worker,
        program: program.to_string_lossy().into_owned(),
        source,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A writer task per worker, so a paused worker (not reading its stdin)
/// never blocks the hub.
fn spawn_stdin_writer(worker: usize, mut stdin: ChildStdin) -> mpsc::UnboundedSender<ToWorker> {
    let (sender, mut messages) = mpsc::unbounded_channel::<ToWorker>();
    tokio::spawn(async move {
        while let Some(message) = messages.recv().await {
            let Ok(mut line) = serde_json::to_string(&message) else {
                continue;
            };
            line.push('\n');
            if let Err(err) = stdin.write_all(line.as_bytes()).await {
                // The worker exited; its exit status tells why.
                tracing::debug!(worker, %err, "worker's stdin closed");
                return;
            }
        }
    });
    sender
}

fn spawn_stdout_reader(
    worker: usize,
    stdout: tokio::process::ChildStdout,
    hub: mpsc::UnboundedSender<HubInput>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = hub.send(HubInput::Line { worker, line });
        }
        let _ = hub.send(HubInput::Closed { worker });
    });
}

async fn stderr_tail(stderr: tokio::process::ChildStderr) -> Vec<String> {
    let mut tail = std::collections::VecDeque::with_capacity(STDERR_TAIL);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail.into()
}

fn show_progress(
    duration: Duration,
    started: Instant,
    cycles: Arc<AtomicU64>,
) -> (ProgressBar, JoinHandle<()>) {
    let bar = ProgressBar::new(millis(duration));
    if let Ok(style) = ProgressStyle::with_template("{spinner} check [{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let ticking = bar.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let elapsed = started.elapsed().min(duration);
            ticking.set_position(millis(elapsed));
            ticking.set_message(format!(
                "{:.1}s / {:.1}s, {} cycles",
                elapsed.as_secs_f64(),
                duration.as_secs_f64(),
                cycles.load(Ordering::Relaxed)
            ));
        }
    });
    (bar, task)
}

impl RunningCheck {
    /// Records a fault injected from outside (a killed leader, a
    /// partition...), for the report's fault list and the unavailability
    /// that followed it. Times are [`now`] readings.
    pub fn record_fault(&self, kind: &str, started: Timestamp, ended: Timestamp) {
        let fault = Fault {
            kind: kind.to_owned(),
            worker: None,
            started,
            ended,
        };
        self.outside_faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(fault);
    }

    /// SIGSTOPs the next worker that holds the lock (when it reads the
    /// register) for `length`, then SIGCONTs it; the hub records it as a
    /// `pause` fault. Returns once the pause is over: `false` if it could
    /// not be armed (`pause_workers` is on, another pause is armed or on,
    /// or the run is stopping) or no worker held the lock before the end.
    /// For fault suites that schedule worker pauses among faults of
    /// their own, so that they do not overlap.
    pub async fn pause_holder(&self, length: Duration) -> bool {
        let (over, is_over) = oneshot::channel();
        if self
            .hub_inputs
            .send(HubInput::PauseOnce { length, over })
            .is_err()
        {
            return false;
        }
        is_over.await.is_ok()
    }

    /// The key the workers lock.
    pub fn key(&self) -> &str {
        &self.config.key
    }

    /// When the workers were started.
    pub fn started(&self) -> Timestamp {
        self.started
    }

    /// Waits until the configured duration has passed since the start,
    /// stops the workers (each releases the lock it holds and exits; those
    /// that do not within `stop_timeout` are killed, and reported), and
    /// checks the history.
    pub async fn finish(self) -> Result<Report, CheckError> {
        tokio::time::sleep_until(self.started_instant + self.config.duration).await;
        self.finish_now().await
    }

    /// Like [`finish`](Self::finish), but stops the workers now, before
    /// the configured duration is over (a fault suite whose schedule
    /// ends first); the report's duration is the time the run took.
    pub async fn finish_now(self) -> Result<Report, CheckError> {
        Ok(self.finish_with_history().await?.0)
    }

    /// Like [`finish_now`](Self::finish_now), and also returns the history
    /// the report was checked from, every step of every worker: for
    /// finding out how a violation came about.
    pub async fn finish_with_history(mut self) -> Result<(Report, History), CheckError> {
        let elapsed = self.started_instant.elapsed();
        self.config.duration = self.config.duration.min(elapsed);
        let _ = self.hub_inputs.send(HubInput::Stop);
        let deadline = Instant::now() + self.config.stop_timeout;
        let mut exits = Vec::with_capacity(self.children.len());
        for (worker, child) in self.children.iter_mut().enumerate() {
            let (status, killed_at_stop) =
                match tokio::time::timeout_at(deadline, child.wait()).await {
                    Ok(status) => (status, false),
                    Err(_) => {
                        // Also ends a pause the hub could not end.
                        let _ = child.start_kill();
                        (child.wait().await, true)
                    }
                };
            let status = status.map_err(|source| CheckError::Io {
                context: format!("waiting for worker {worker}"),
                source,
            })?;
            exits.push(WorkerExit {
                worker,
                at: now(),
                code: status.code(),
                signal: status.signal(),
                killed_at_stop,
                stderr_tail: Vec::new(),
            });
        }
        for (exit, tail) in exits.iter_mut().zip(self.stderr_tails.drain(..)) {
            exit.stderr_tail = tail.await.unwrap_or_default();
        }
        let hub = self.hub.take().expect("finish runs once");
        let hub = hub.await.map_err(|err| CheckError::Io {
            context: "the hub task failed".into(),
            source: std::io::Error::other(err),
        })?;
        if let Some((bar, ticking)) = self.progress.take() {
            ticking.abort();
            bar.finish_and_clear();
        }
        for (exit, link) in exits.iter_mut().zip(&hub.workers) {
            exit.at = link.closed_at.map_or(exit.at, |closed| closed.min(exit.at));
        }
        let mut history = hub.history;
        history.ended = now();
        history.exits = exits;
        history.faults.extend(
            self.outside_faults
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .drain(..),
        );
        history.faults.sort_by_key(|fault| fault.started);
        Ok((check(&history, &self.config), history))
    }
}

impl Drop for RunningCheck {
    fn drop(&mut self) {
        // The children are killed by kill_on_drop.
        if let Some(hub) = self.hub.take() {
            hub.abort();
        }
        if let Some((bar, ticking)) = self.progress.take() {
            ticking.abort();
            bar.finish_and_clear();
        }
    }
}

/// What the hub task reacts to.
enum HubInput {
    /// A line from a worker's stdout.
    Line { worker: usize, line: String },
    /// A worker's stdout ended (it exited).
    Closed { worker: usize },
    /// A pause's length has passed.
    PauseDue { worker: usize },
    /// Pause the next holder once, for `length`; say when it is over.
    PauseOnce {
        length: Duration,
        over: oneshot::Sender<()>,
    },
    /// The run's duration has passed: stop every worker.
    Stop,
}

struct WorkerLink {
    pid: Option<Pid>,
    /// `None` once the worker said it is stopping: that closes its stdin,
    /// which ends the worker's blocking stdin read so its runtime can
    /// shut down.
    replies: Option<mpsc::UnboundedSender<ToWorker>>,
    open: bool,
    /// When its stdout closed: its exit time for the hang check (finish
    /// sees a crashed worker's exit only at the end of the run).
    closed_at: Option<Timestamp>,
}

/// When and whom to pause.
struct PausePlan {
    length: Duration,
    /// Time between the end of a pause and arming the next one, so the
    /// service recovers in between.
    gap: Duration,
    run_end: Instant,
    /// The next worker to read the register is paused.
    armed: bool,
    next_arm: Option<Instant>,
    /// The worker paused now, and since when.
    current: Option<(usize, Timestamp)>,
    /// Arm again after each pause (`--pause-workers`), or only when
    /// [`RunningCheck::pause_holder`] asks.
    repeat: bool,
    /// Told when the current pause is over (a `pause_holder` call).
    over: Option<oneshot::Sender<()>>,
}

impl PausePlan {
    /// Arms at `at` if a whole pause and its recovery fit before the end.
    fn schedule(&mut self, at: Instant) {
        self.next_arm = (at + self.length + self.gap <= self.run_end).then_some(at);
    }
}

struct Hub {
    history: History,
    workers: Vec<WorkerLink>,
    register_value: u64,
    highest_token: u64,
    pause: Option<PausePlan>,
    stopping: bool,
    cycles: Arc<AtomicU64>,
}

impl Hub {
    /// Serves until every worker's stdout has closed.
    async fn serve(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<HubInput>,
        to_self: mpsc::UnboundedSender<HubInput>,
    ) -> Hub {
        while self.workers.iter().any(|link| link.open) {
            let arm_at = self.pause.as_ref().and_then(|plan| plan.next_arm);
            let input = tokio::select! {
                input = inputs.recv() => input,
                _ = sleep_until_opt(arm_at) => {
                    if let Some(plan) = &mut self.pause {
                        plan.armed = true;
                        plan.next_arm = None;
                    }
                    continue;
                }
            };
            match input {
                None => break,
                Some(HubInput::Line { worker, line }) => self.on_line(worker, &line, &to_self),
                Some(HubInput::Closed { worker }) => {
                    self.workers[worker].open = false;
                    self.workers[worker].closed_at = Some(now());
                }
                Some(HubInput::PauseDue { worker }) => self.end_pause(worker),
                Some(HubInput::PauseOnce { length, over }) => self.pause_once(length, over),
                Some(HubInput::Stop) => self.stop_all(),
            }
        }
        self
    }

    fn on_line(&mut self, worker: usize, line: &str, to_self: &mpsc::UnboundedSender<HubInput>) {
        let message: ToHub = match serde_json::from_str(line) {
            Ok(message) => message,
            Err(err) => {
                // Not fatal: the report counts it as an error of kind
                // `protocol` and the run goes on.
                let error = format!("{err}: {line}");
                self.record(worker, 0, now(), Step::Unreadable { error });
                return;
            }
        };
        let at = now();
        match message {
            ToHub::Step { cycle, at, step } => {
                match step {
                    Step::Released | Step::ReleaseFailed { .. } => {
                        self.cycles.fetch_add(1, Ordering::Relaxed);
                    }
                    // Its last line: it needs no more answers.
                    Step::Stopping => self.workers[worker].replies = None,
                    _ => {}
                }
                self.record(worker, cycle, at, step);
            }
            ToHub::ReadRegister { cycle, token } => {
                self.highest_token = self.highest_token.max(token);
                let value = self.register_value;
                self.record(worker, cycle, at, Step::RegisterRead { token, value });
                // The worker holds the lock and waits for this answer:
                // the moment to freeze it.
                self.maybe_pause(worker, to_self);
                self.reply(worker, ToWorker::RegisterValue { value });
            }
            ToHub::WriteRegister {
                cycle,
                sent_at,
                token,
                value,
            } => {
                let accepted = token >= self.highest_token;
                if accepted {
                    self.highest_token = token;
                    self.register_value = value;
                }
                let step = Step::RegisterWritten {
                    token,
                    sent_at,
                    accepted,
                };
                self.record(worker, cycle, at, step);
                self.reply(worker, ToWorker::WriteOutcome { accepted });
            }
            ToHub::ReadCounter { cycle } => {
                let value = self.history.counter_value;
                self.record(worker, cycle, at, Step::CounterRead { value });
                self.reply(worker, ToWorker::CounterValue { value });
            }
            ToHub::WriteCounter {
                cycle,
                sent_at,
                value,
            } => {
                self.history.counter_value = value;
                self.record(worker, cycle, at, Step::CounterWritten { value, sent_at });
                self.reply(worker, ToWorker::WriteOutcome { accepted: true });
            }
        }
    }

    fn record(&mut self, worker: usize, cycle: u64, at: Timestamp, step: Step) {
        self.history.events.push(Event {
            worker,
            cycle,
            at,
            step,
        });
    }

    fn reply(&self, worker: usize, message: ToWorker) {
        if let Some(replies) = &self.workers[worker].replies {
            let _ = replies.send(message);
        }
    }

    fn maybe_pause(&mut self, worker: usize, to_self: &mpsc::UnboundedSender<HubInput>) {
        let Some(plan) = &mut self.pause else { return };
        if !plan.armed || plan.current.is_some() || self.stopping {
            return;
        }
        let Some(pid) = self.workers[worker].pid else {
            return;
        };
        let started = now();
        if let Err(err) = kill(pid, Signal::SIGSTOP) {
            tracing::warn!(worker, %err, "distlock-check: cannot pause the worker");
            return;
        }
        plan.armed = false;
        plan.current = Some((worker, started));
        let length = plan.length;
        let to_self = to_self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(length).await;
            let _ = to_self.send(HubInput::PauseDue { worker });
        });
    }

    /// Resumes the paused worker (if it is `worker`) and records the
    /// window.
    fn end_pause(&mut self, worker: usize) {
        let Some(plan) = &mut self.pause else { return };
        let Some((paused, started)) = plan.current else {
            return;
        };
        if paused != worker {
            return;
        }
        if let Some(pid) = self.workers[worker].pid {
            // ESRCH: it died meanwhile; its exit is reported.
            let _ = kill(pid, Signal::SIGCONT);
        }
        let ended = now();
        plan.current = None;
        if let Some(over) = plan.over.take() {
            let _ = over.send(());
        }
        if !self.stopping && plan.repeat {
            plan.schedule(Instant::now() + plan.gap);
        }
        self.history.faults.push(Fault {
            kind: PAUSE.to_owned(),
            worker: Some(worker),
            started,
            ended,
        });
    }

    /// Arms one pause of `length` for the next worker that reads the
    /// register (it holds the lock then). Refused (`over` dropped) while a
    /// pause is armed or on, with `--pause-workers` on, or when stopping.
    fn pause_once(&mut self, length: Duration, over: oneshot::Sender<()>) {
        if self.stopping {
            return;
        }
        let plan = self.pause.get_or_insert(PausePlan {
            length,
            gap: Duration::ZERO,
            run_end: Instant::now(),
            armed: false,
            next_arm: None,
            current: None,
            repeat: false,
            over: None,
        });
        if plan.repeat || plan.armed || plan.current.is_some() {
            return;
        }
        plan.length = length;
        plan.armed = true;
        plan.over = Some(over);
    }

    fn stop_all(&mut self) {
        self.stopping = true;
        if let Some(plan) = &mut self.pause {
            plan.armed = false;
            plan.next_arm = None;
            if let Some((worker, _)) = plan.current {
                self.end_pause(worker);
            }
            // A pause armed but never taken: its caller learns it now.
            if let Some(plan) = &mut self.pause {
                plan.over = None;
            }
        }
        for worker in 0..self.workers.len() {
            self.reply(worker, ToWorker::Stop);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
