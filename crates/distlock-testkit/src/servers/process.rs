//! [`ServerProcess`]: one server process a test owns, on ports chosen by
//! [`free_port`](super::free_port), with its own directory and log, killed
//! (and its directory removed) when dropped.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{free_port, READY_WITHIN};

/// How many starts on new ports a server gets when its ports were taken
/// between [`free_port`](super::free_port) and its bind.
const START_ATTEMPTS: u32 = 5;

/// How long one readiness probe may take before it counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The last lines of the log quoted in a failure message.
const LOG_TAIL_LINES: usize = 40;

/// The program, arguments and environment of a server, fixed once its
/// ports and directory are known, and reused as they are by
/// [`ServerProcess::restart`].
#[derive(Clone, Debug)]
pub struct Launch {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl Launch {
    /// Runs `program` (looked up on `PATH` like [`Command::new`]).
    pub fn new(program: impl Into<OsString>) -> Self {
        Launch {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of the server.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((name.into(), value.into()));
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        command.envs(self.envs.iter().map(|(name, value)| (name, value)));
        command
    }
}

/// What a readiness probe is given: the server's ports (the first is the
/// one clients use) and its directory.
#[derive(Clone, Debug)]
pub struct Target {
    /// The server's ports, in the order its [`ServerSpec`] numbers them.
    pub ports: Vec<u16>,
    /// The server's directory (data, configuration, log).
    pub dir: PathBuf,
}

type LaunchFn = Box<dyn Fn(&[u16], &Path) -> Launch + Send + Sync>;
type ProbeFn = Arc<dyn Fn(Target) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// How to start one kind of server: its name in messages, how many ports
/// it needs, how to launch it on given ports and directory, and the
/// protocol-level probe that says it serves.
pub struct ServerSpec {
    name: String,
    port_count: usize,
    launch: LaunchFn,
    probe: ProbeFn,
}

impl ServerSpec {
    /// A server called `name` that needs `port_count` ports (at least one;
    /// the first is the one clients use). `launch` is called once per start
    /// attempt with the chosen ports and a fresh, empty directory; it may
    /// write files there (configuration, certificates) and returns how to
    /// run the server. `probe` succeeds once the server serves requests; it
    /// is retried until then, each try bounded by a few seconds.
    pub fn new<L, P, Fut>(name: impl Into<String>, port_count: usize, launch: L, probe: P) -> Self
    where
        L: Fn(&[u16], &Path) -> Launch + Send + Sync + 'static,
        P: Fn(Target) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        assert!(port_count > 0, "a server needs at least one port");
        ServerSpec {
            name: name.into(),
            port_count,
            launch: Box::new(launch),
            probe: Arc::new(move |target| Box::pin(probe(target))),
        }
    }
}

/// Why a start attempt did not end with a ready server.
enum NotReady {
    /// The server could not bind a port: someone took it after
    /// [`free_port`](super::free_port) had found it free.
    PortTaken(String),
    /// Anything else: a real failure, reported as it is.
    Failed(String),
}

/// One server process owned by a test.
///
/// Started by [`ServerProcess::start`] on free ports with a directory of
/// its own; its stdout and stderr go to `server.log` in that directory.
/// Dropping it (also while a panicking test unwinds) resumes it if paused,
/// kills it, waits for it and removes its directory.
pub struct ServerProcess {
    name: String,
    ports: Vec<u16>,
    dir: PathBuf,
    launch: Launch,
    probe: ProbeFn,
    child: Option<Child>,
    /// Where this run's output starts in the log (the log is appended to
    /// across restarts).
    log_start: u64,
}

impl ServerProcess {
    /// Starts the server of `spec` and waits until its probe succeeds.
    ///
    /// If the server exits because a port was already in use (it was taken
    /// between choosing and binding it), the attempt is logged on stderr
    /// and the server starts again on new ports, up to 5 times. Any other
    /// failure panics at once, naming the server, its port and the tail of
    /// its log; so does a server that is not ready within 60 s.
    pub async fn start(spec: ServerSpec) -> ServerProcess {
        let ServerSpec {
            name,
            port_count,
            launch,
            probe,
        } = spec;
        let mut attempt = 1;
        loop {
            let ports: Vec<u16> = (0..port_count).map(|_| free_port()).collect();
            let dir = new_dir(&name);
            let mut server = ServerProcess {
                name: name.clone(),
                launch: launch(&ports, &dir),
                ports,
                dir,
                probe: probe.clone(),
                child: None,
                log_start: 0,
            };
            match server.launch_and_wait().await {
                Ok(()) => return server,
                Err(NotReady::PortTaken(why)) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    eprintln!(
                        "distlock-testkit: private {name} on ports {:?} lost a port race ({why}); \
                         starting it again on new ports (attempt {attempt} of {START_ATTEMPTS})",
                        server.ports,
                    );
                }
                Err(NotReady::PortTaken(why)) => panic!(
                    "private {name}: a port was taken before it could bind it, \
                     {START_ATTEMPTS} times in a row; last: {why}\n{}",
                    server.log_tail()
                ),
                Err(NotReady::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// The server's name in messages (`redis`, `zookeeper`, `etcd`...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port clients use.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// Every port of the server; the first is [`port`](Self::port).
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The server's directory: its data, configuration and `server.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id of the running server.
    ///
    /// # Panics
    ///
    /// If the server was killed and not started again.
    pub fn pid(&self) -> Pid {
        let child = self.child.as_ref().unwrap_or_else(|| {
            panic!(
                "private {} on port {} is not running",
                self.name,
                self.port()
            )
        });
        Pid::from_raw(child.id() as i32)
    }

    /// Freezes the server (SIGSTOP): it keeps its sockets and connections
    /// but answers nothing until [`resume`](Self::resume). Returns once
    /// every thread of it is stopped: `kill` only queues the signal, and a
    /// thread busy on the other core could otherwise still answer a
    /// request sent right after this returns.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        let pid = self.pid();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "private {} (pid {pid}) did not stop within 10 s of SIGSTOP",
                self.name
            );
            // No event tells when a signal took effect; /proc is polled.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        let pid = self.pid();
        kill(pid, signal).unwrap_or_else(|err| {
            panic!(
                "{signal} to private {} (pid {pid}) failed: {err}",
                self.name
            )
        });
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it
    /// is gone; its directory and data stay for
    /// [`start_again`](Self::start_again). Does nothing if it is not
    /// running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process dies of SIGKILL too; SIGCONT first lets it
            // go at once whatever state it was stopped in.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on the same ports and data, and waits
    /// until its probe succeeds.
    ///
    /// # Panics
    ///
    /// If the server is running; if it does not become ready within 60 s
    /// or exits first (also when someone else took one of its ports in the
    /// meantime: clients expect it on these ports, so there is no moving
    /// it), with the tail of its log.
    pub async fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "private {} on port {} is running: kill it first",
            self.name,
            self.port()
        );
        match self.launch_and_wait().await {
            Ok(()) => {}
            Err(NotReady::PortTaken(why) | NotReady::Failed(why)) => {
                panic!("restarting on the same ports: {why}")
            }
        }
    }

    /// Kills a paused server where it stands: SIGKILL without the SIGCONT
    /// that [`kill`](Self::kill) sends first, so that it never reads the
    /// requests still in its sockets, as a member that crashed or was cut
    /// off would not. Then reaps it; [`start_again`](Self::start_again)
    /// brings it back on the same data.
    pub fn kill_paused(&mut self) {
        self.signal(Signal::SIGKILL);
        self.kill();
    }

    /// [`kill`](Self::kill), then [`start_again`](Self::start_again).
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// The server's log from its first start on (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The last lines of the log, for failure messages.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!(
            "---- last lines of {} ----\n{tail}\n----",
            self.log_path().display()
        )
    }

    /// This run's part of the log.
    fn this_runs_log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            if file.seek(SeekFrom::Start(self.log_start)).is_ok() {
                let _ = file.read_to_string(&mut text);
            }
        }
        text
    }

    /// Spawns the server and waits until it is ready.
    async fn launch_and_wait(&mut self) -> Result<(), NotReady> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|err| panic!("open {}: {err}", self.log_path().display()));
        self.log_start = log.metadata().map(|meta| meta.len()).unwrap_or(0);
        let stderr = log.try_clone().expect("a second handle of the log");
        let child = self
            .launch
            .command()
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run {:?} for a private {}: {err}",
                    self.launch.program, self.name
                )
            });
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Probes until the server answers and holds its ports, it exits, or
    /// [`READY_WITHIN`] passes. A new process has no event to await from
    /// outside: its answer to the probe is the event, and between probes
    /// the wait grows from 10 ms to 200 ms.
    async fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + READY_WITHIN;
        let target = Target {
            ports: self.ports.clone(),
            dir: self.dir.clone(),
        };
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(status) = self.exited() {
                return Err(self.exit_failure(status));
            }
            let last = match tokio::time::timeout(PROBE_TIMEOUT, (self.probe)(target.clone())).await
            {
                Ok(Ok(())) => match self.foreign_port() {
                    None => return Ok(()),
                    // Someone else's server answered on a port ours has
                    // not bound (yet): ours will fail to bind and exit.
                    Some(port) => {
                        format!(
                            "port {port} answered, but pid {} does not hold it",
                            self.pid()
                        )
                    }
                },
                Ok(Err(why)) => why,
                Err(_) => format!("the probe got no answer within {PROBE_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Failed(format!(
                    "private {} on port {} (ports {:?}, pid {}) did not become ready within \
                     {READY_WITHIN:?}; last probe: {last}\n{}",
                    self.name,
                    self.port(),
                    self.ports,
                    self.pid(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Tells a lost port race from a real failure by what the server said.
    fn exit_failure(&self, status: ExitStatus) -> NotReady {
        let output = self.this_runs_log();
        if let Some(line) = output
            .lines()
            .find(|line| line.to_ascii_lowercase().contains("address already in use"))
        {
            return NotReady::PortTaken(line.trim().to_owned());
        }
        NotReady::Failed(format!(
            "private {} on port {} (ports {:?}) exited ({status}) before it was ready\n{}",
            self.name,
            self.port(),
            self.ports,
            self.log_tail()
        ))
    }

    /// A port of ours that a socket of another process listens on, if the
    /// probe could have reached that one instead of ours.
    fn foreign_port(&self) -> Option<u16> {
        let pid = self.pid();
        let ours = socket_inodes(pid)?;
        self.ports.iter().copied().find(|&port| {
            let listening = listening_inodes(port);
            !listening.is_empty() && !listening.iter().any(|inode| ours.contains(inode))
        })
    }
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("name", &self.name)
            .field("ports", &self.ports)
            .field("dir", &self.dir)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory for one server: in memory (`/dev/shm`) where there is
/// one, else under the system's temp dir. The fault tests time leases of a
/// few seconds, and an etcd or ZooKeeper whose fsync waits behind a disk
/// busy with a build stalls every request for as long: on tmpfs a test
/// sees the faults it injects, not the disk's.
fn new_dir(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() && !shm.metadata().is_ok_and(|m| m.permissions().readonly()) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "distlock-{name}-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
    dir
}

/// The inodes of the sockets process `pid` has open; `None` where /proc
/// cannot tell (then nothing is checked).
fn socket_inodes(pid: Pid) -> Option<Vec<u64>> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.filter_map(|fd| {
            let target = std::fs::read_link(fd.ok()?.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect(),
    )
}

/// The inodes of the TCP sockets listening on `port`, IPv4 or IPv6.
fn listening_inodes(port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if *state == LISTEN && local_port == Some(port) {
                if let Ok(inode) = inode.parse() {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// True when every thread of `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`); false while one still runs or cannot be
/// read.
fn all_threads_stopped(pid: Pid) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.into_iter().all(|task| {
        let Ok(task) = task else { return false };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        // The state follows the command name, which is in parentheses and
        // may contain spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    })
}
