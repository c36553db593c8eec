//! Running sg-probe: one process per scenario, inside a test cgroup and as a
//! given real uid.

use std::{
    fmt,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{TestCgroup, TestUser, bypass::wait_collecting};

/// What one connect attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connect succeeded.
    Allowed,
    /// EPERM: refused by the cgroup hook.
    Denied,
    /// Any other errno (e.g. ECONNREFUSED: nothing listens there).
    OtherErr(i32),
}

impl Outcome {
    /// A helper's `ok` or `err <errno> [NAME]`.
    pub(crate) fn parse(line: &str) -> Option<Self> {
        if line == "ok" {
            return Some(Self::Allowed);
        }
        let errno: i32 = line
            .strip_prefix("err ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(if errno == libc::EPERM {
            Self::Denied
        } else {
            Self::OtherErr(errno)
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allowed => f.write_str("allowed"),
            Self::Denied => f.write_str("denied (EPERM)"),
            Self::OtherErr(e) => write!(f, "error {e} ({})", std::io::Error::from_raw_os_error(*e)),
        }
    }
}

/// An sg-probe command line, built up step by step.
#[derive(Debug, Clone)]
pub struct Probe {
    bin: PathBuf,
    args: Vec<String>,
    who: String,
    dst: String,
}

impl Probe {
    /// `bin` is sg-probe; integration tests pass `env!("CARGO_BIN_EXE_sg-probe")`.
    pub fn new(bin: impl AsRef<Path>) -> Self {
        Self {
            bin: bin.as_ref().to_owned(),
            args: Vec::new(),
            who: "root".into(),
            dst: String::new(),
        }
    }

    fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Join `cg` before doing anything else.
    pub fn cgroup(self, cg: &TestCgroup) -> Self {
        let p = cg.path().display().to_string();
        self.arg("--cgroup").arg(p)
    }

    /// Join the cgroup directory `dir` (a child of a test cgroup).
    pub fn cgroup_dir(self, dir: &std::path::Path) -> Self {
        let p = dir.display().to_string();
        self.arg("--cgroup").arg(p)
    }

    pub fn as_user(self, u: &TestUser) -> Self {
        let mut s = self.as_ids(u.uid, u.gid);
        s.who = format!("{} (uid {})", u.name, u.uid);
        s
    }

    pub fn as_ids(mut self, uid: u32, gid: u32) -> Self {
        self.who = format!("uid {uid}");
        self.arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(gid.to_string())
    }

    /// `a.b.c.d:port` or `[v6]:port`.
    pub fn connect(mut self, dst: impl fmt::Display) -> Self {
        self.dst = dst.to_string();
        let d = self.dst.clone();
        self.arg("--connect").arg(d)
    }

    pub fn v6_socket(self) -> Self {
        self.arg("--v6-socket")
    }

    pub fn fastopen(self) -> Self {
        self.arg("--fastopen")
    }

    pub fn count(self, n: u32) -> Self {
        self.arg("--count").arg(n.to_string())
    }

    pub fn interval_ms(self, ms: u64) -> Self {
        self.arg("--interval-ms").arg(ms.to_string())
    }

    /// Connects once and holds the connection open, at most `secs`
    /// seconds, reporting when it ends; run it with [`Probe::hold`].
    fn hold_for(self, secs: u64) -> Self {
        self.arg("--hold").arg(secs.to_string())
    }

    /// Starts it with `--hold SECS` and waits for the connect. Panics unless
    /// the connect succeeds: a held connection needs a granted user.
    pub fn hold(self, secs: u64) -> HeldConnection {
        let what = self.describe();
        let mut child = self.hold_for(secs).spawn();
        let mut c = child.child.take().expect("freshly spawned");
        let out = c.stdout.take().expect("probe stdout is piped");
        let err = c.stderr.take().expect("probe stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                let Ok(line) = line else { break };
                if tx.send((line, Instant::now())).is_err() {
                    break;
                }
            }
        });
        let mut held = HeldConnection {
            child: Some(c),
            pid: child.pid,
            what,
            lines: rx,
            err: Some(err),
            _reader: reader,
        };
        match held.next_line(Duration::from_secs(10)) {
            Some((l, _)) if l == "ok" => held,
            other => {
                let stderr = held.stderr();
                panic!(
                    "sg-probe --hold {}: expected `ok`, got {other:?}; stderr: {stderr}",
                    held.what
                )
            }
        }
    }

    /// "alice (uid 1001) -> 127.0.0.1:4000 [--v6-socket]"
    pub fn describe(&self) -> String {
        let flags: Vec<&str> = self
            .args
            .iter()
            .map(String::as_str)
            .filter(|a| *a == "--v6-socket" || *a == "--fastopen")
            .collect();
        format!("{} -> {} {}", self.who, self.dst, flags.join(" "))
            .trim_end()
            .to_owned()
    }

    /// Runs to completion.
    pub fn run(&self) -> ProbeResult {
        self.spawn().wait()
    }

    /// Runs a single attempt and returns its outcome.
    pub fn outcome(&self) -> Outcome {
        let r = self.run();
        match r.outcomes.as_slice() {
            [one] => *one,
            other => panic!(
                "sg-probe {}: expected one attempt, got {other:?}; stderr: {}",
                self.describe(),
                r.stderr
            ),
        }
    }

    /// Starts it in the background.
    pub fn spawn(&self) -> ProbeChild {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        ProbeChild {
            pid: child.id(),
            child: Some(child),
            what: self.describe(),
        }
    }
}

/// A running sg-probe. Drop kills and reaps it if it is still running.
#[derive(Debug)]
pub struct ProbeChild {
    child: Option<Child>,
    pub pid: u32,
    what: String,
}

impl ProbeChild {
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for it (at most 60 s) and collects what it printed.
    pub fn wait(mut self) -> ProbeResult {
        let child = self.child.take().expect("probe already reaped");
        let exited = wait_collecting(child, Duration::from_secs(60), self.what.clone());
        let (stdout, stderr) = (exited.stdout, exited.stderr);
        let status = match exited.status {
            Some(st) if !exited.timed_out => st,
            _ => panic!(
                "sg-probe {} (pid {}) still running after 60 s",
                self.what, self.pid
            ),
        };
        if status.code() == Some(3) || status.code().is_none() {
            panic!(
                "sg-probe {} could not run: {status}; stderr: {stderr}",
                self.what
            );
        }
        let outcomes = stdout
            .lines()
            .map(|l| {
                Outcome::parse(l).unwrap_or_else(|| panic!("sg-probe {} printed {l:?}", self.what))
            })
            .collect();
        ProbeResult {
            pid: self.pid,
            status,
            outcomes,
            stderr,
            what: self.what.clone(),
        }
    }
}

impl Drop for ProbeChild {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// SIGKILL and wait, when there is still a child.
fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// An established connection held by `sg-probe --hold` (see
/// [`Probe::hold`]). Drop kills and reaps the probe.
#[derive(Debug)]
pub struct HeldConnection {
    child: Option<Child>,
    pub pid: u32,
    what: String,
    lines: std::sync::mpsc::Receiver<(String, Instant)>,
    err: Option<std::process::ChildStderr>,
    _reader: std::thread::JoinHandle<()>,
}

impl HeldConnection {
    fn next_line(&mut self, timeout: Duration) -> Option<(String, Instant)> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits at most `timeout` for the connection to end; returns the
    /// probe's line (`closed eof after MS`, `closed ERRNO NAME after MS`)
    /// and when it was read, or `None` while it is still open.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<(String, Instant)> {
        let got = self.next_line(timeout)?;
        if !got.0.starts_with("closed ") {
            panic!("sg-probe --hold {}: unexpected line {:?}", self.what, got.0);
        }
        Some(got)
    }

    /// The probe's stderr after killing it (for failure messages).
    fn stderr(&mut self) -> String {
        kill_and_reap(&mut self.child);
        let mut s = String::new();
        if let Some(mut e) = self.err.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

#[derive(Debug)]
pub struct ProbeResult {
    pub pid: u32,
    pub status: ExitStatus,
    pub outcomes: Vec<Outcome>,
    pub stderr: String,
    pub what: String,
}

impl ProbeResult {
    /// Indices and outcomes of attempts that did not get `expected`.
    pub fn mismatches(&self, expected: Outcome) -> Vec<(usize, Outcome)> {
        self.outcomes
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, o)| *o != expected)
            .collect()
    }
}

/// A probe run again and again, in batches on its own thread, until
/// [`ProbeLoop::finish`]: load that runs for as long as something else
/// (reloads) takes. Drop stops it.
#[derive(Debug)]
pub struct ProbeLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Batch>>>,
}

/// One run of a [`ProbeLoop`]: when it started and ended, what it got.
#[derive(Debug)]
pub struct Batch {
    pub started: Instant,
    pub ended: Instant,
    pub result: ProbeResult,
}

impl ProbeLoop {
    pub fn start(probe: Probe) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut batches = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = probe.run();
                batches.push(Batch {
                    started,
                    ended: Instant::now(),
                    result,
                });
            }
            batches
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Lets the running batch end and returns every batch.
    pub fn finish(mut self) -> Vec<Batch> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let t = self.thread.take().expect("finished once");
        t.join()
            .unwrap_or_else(|_| panic!("a probe loop panicked (see its message above)"))
    }
}

impl Drop for ProbeLoop {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("[harness] a probe loop panicked");
        }
    }
}

/// Collects expectation mismatches so one test reports all of them at once.
/// Dropped with failures it never reported (a forgotten
/// [`Checks::finish`]), it panics: no failure goes unnoticed.
#[derive(Debug, Default)]
#[must_use = "call finish() to report the failures"]
pub struct Checks {
    failures: Failures,
    passed: usize,
}

impl Checks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `probe` once and records whether it got `expected`.
    pub fn expect(&mut self, probe: &Probe, expected: Outcome) {
        let got = probe.outcome();
        if got == expected {
            eprintln!("[check] ok: {} is {got}", probe.describe());
            self.passed += 1;
        } else {
            let msg = format!("{}: expected {expected}, got {got}", probe.describe());
            eprintln!("[check] FAIL: {msg}");
            self.failures.push(msg);
        }
    }

    /// Panics listing every mismatch.
    pub fn finish(mut self) {
        let failures = self.failures.take();
        if !failures.is_empty() {
            panic!(
                "{} of {} checks failed:\n  {}",
                failures.len(),
                failures.len() + self.passed,
                failures.join("\n  ")
            );
        }
    }
}

/// The failures a [`Checks`] or a [`crate::bypass::Matrix`] collected.
/// Dropped while it still holds some (its owner's `finish()` was never
/// called), it panics: no failure goes unnoticed.
#[derive(Debug, Default)]
pub(crate) struct Failures(Vec<String>);

impl Failures {
    pub(crate) fn push(&mut self, failure: String) {
        self.0.push(failure);
    }

    /// Every failure, which counts as reported from now on.
    pub(crate) fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Failures {
    fn drop(&mut self) {
        if !self.0.is_empty() && !std::thread::panicking() {
            panic!(
                "dropped without finish(), with {} failure(s):\n  {}",
                self.0.len(),
                self.0.join("\n  ")
            );
        }
    }
}
