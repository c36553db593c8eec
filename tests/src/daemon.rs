//! The `spicegate` binary under test: one-shot commands, the `run` daemon
//! and its pin directory.

use std::{
    ffi::OsStr,
    ops::Deref,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use spicegate_testkit::{
    pins,
    proc::{LineLog, Proc},
};

/// How long the daemon may take to load, attach and say so.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The binary under test: `$SPICEGATE_BIN`, else `spicegate` in the cargo
/// target dir (`$CARGO_TARGET_DIR` or `<workspace>/target`), debug profile.
pub fn spicegate_bin() -> PathBuf {
    find_bin().unwrap_or_else(|e| panic!("{e}"))
}

fn find_bin() -> Result<PathBuf, String> {
    let path = match std::env::var_os("SPICEGATE_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_dir().join("target"))
            .join("debug/spicegate"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "spicegate binary {} not found: build it with `cargo build -p spicegate` or set SPICEGATE_BIN",
            path.display()
        ))
    }
}

/// Runs `spicegate <args>` to completion and echoes its output to the test's
/// stderr (shown when the test fails).
pub fn spicegate<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    try_spicegate(args).unwrap_or_else(|e| panic!("{e}"))
}

/// [`spicegate`] without panicking, for `Drop`.
fn try_spicegate<I, S>(args: I) -> Result<Output, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(find_bin()?);
    cmd.args(args)
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null());
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    spicegate_testkit::pins::echo_output(&cmd, &out);
    Ok(out)
}

/// A unique pin directory `/sys/fs/bpf/spicegate-test-<pid>-<n>` (not
/// created: the daemon makes it), with its own control socket and state
/// directory under `/tmp/spicegate-test-<pid>-<n>/`, so no test touches
/// `/run/spicegate` or `/var/lib/spicegate`. Drop runs `spicegate unload`
/// on it and removes whatever is still there (the test kit's
/// [`pins::PinDir`], which it dereferences to for `path()`, `socket()`,
/// `state_dir()` and `exists()`).
#[derive(Debug)]
pub struct PinDir(pins::PinDir);

impl PinDir {
    pub fn new() -> Self {
        let name = spicegate_testkit::unique_name("spicegate-test");
        let run_dir = std::env::temp_dir().join(&name);
        Self(pins::PinDir::new(&name, run_dir, &spicegate_bin()))
    }

    /// `spicegate --socket <this test's socket> <args>`.
    pub fn ctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> =
            vec!["--socket".into(), self.socket().into_os_string()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        spicegate(all)
    }

    /// `spicegate unload --pin-dir <this>`.
    pub fn unload(&self) -> Output {
        self.0.unload().unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for PinDir {
    type Target = pins::PinDir;

    fn deref(&self) -> &pins::PinDir {
        &self.0
    }
}

/// One `DENY ...` line of the daemon, split into its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyLine {
    pub uid: u32,
    pub user: String,
    pub pid: u32,
    pub comm: String,
    pub dst: String,
    pub vm: String,
    pub suppressed: u32,
    pub line: String,
}

impl DenyLine {
    /// Parses the `DENY k=v ...` part of a log line (any prefix allowed).
    pub fn parse(line: &str) -> Option<Self> {
        let at = line.find("DENY ")?;
        let mut d = DenyLine {
            uid: u32::MAX,
            user: String::new(),
            pid: 0,
            comm: String::new(),
            dst: String::new(),
            vm: String::new(),
            suppressed: u32::MAX,
            line: line.to_owned(),
        };
        for field in line[at + 5..].split_whitespace() {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            match k {
                "uid" => d.uid = v.parse().ok()?,
                "user" => d.user = v.to_owned(),
                "pid" => d.pid = v.parse().ok()?,
                "comm" => d.comm = v.to_owned(),
                "dst" => d.dst = v.to_owned(),
                "vm" => d.vm = v.to_owned(),
                "suppressed" => d.suppressed = v.parse().ok()?,
                _ => {}
            }
        }
        (d.uid != u32::MAX).then_some(d)
    }
}

/// `spicegate run` in the background. Its stdout and stderr are collected
/// line by line (and echoed to the test's stderr with a prefix). Drop sends
/// SIGTERM (SIGKILL after 10 s) and reaps it; enforcement stays pinned, so
/// a [`PinDir`] must outlive it to remove that.
pub struct Daemon {
    proc: Proc,
    log: LineLog,
}

impl Daemon {
    /// Starts `spicegate run --policy P [--cgroup C] --pin-dir D` and waits
    /// until it says `enforcing policy`.
    pub fn start(policy: &Path, cgroup: Option<&Path>, pin: &PinDir) -> Self {
        let d = Self::spawn(policy, cgroup, pin);
        d.wait_for_line("enforcing policy", START_TIMEOUT);
        d
    }

    /// Like [`Daemon::start`], with more `run` arguments (test hooks such
    /// as `--clock-offset-file`).
    pub fn start_with(
        policy: &Path,
        cgroup: Option<&Path>,
        pin: &PinDir,
        extra: &[&OsStr],
    ) -> Self {
        let d = Self::spawn_with(policy, cgroup, pin, extra);
        d.wait_for_line("enforcing policy", START_TIMEOUT);
        d
    }

    /// Like [`Daemon::start_with`], with the daemon in the named network
    /// namespace (`nsenter --net`, which changes nothing else: the daemon
    /// still sees the host's bpffs and cgroups).
    pub fn start_in_netns(
        policy: &Path,
        cgroup: Option<&Path>,
        pin: &PinDir,
        netns: &str,
        extra: &[&OsStr],
    ) -> Self {
        let d = Self::spawn_cmd(
            {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(spicegate_bin());
                c
            },
            policy,
            cgroup,
            pin,
            extra,
        );
        d.wait_for_line("enforcing policy", START_TIMEOUT);
        d
    }

    /// Like [`Daemon::start`], without waiting.
    pub fn spawn(policy: &Path, cgroup: Option<&Path>, pin: &PinDir) -> Self {
        Self::spawn_with(policy, cgroup, pin, &[])
    }

    fn spawn_with(policy: &Path, cgroup: Option<&Path>, pin: &PinDir, extra: &[&OsStr]) -> Self {
        Self::spawn_cmd(Command::new(spicegate_bin()), policy, cgroup, pin, extra)
    }

    fn spawn_cmd(
        mut cmd: Command,
        policy: &Path,
        cgroup: Option<&Path>,
        pin: &PinDir,
        extra: &[&OsStr],
    ) -> Self {
        cmd.arg("--socket").arg(pin.socket());
        cmd.arg("run").arg("--policy").arg(policy);
        cmd.arg("--state-dir").arg(pin.state_dir());
        if let Some(c) = cgroup {
            cmd.arg("--cgroup").arg(c);
        }
        cmd.arg("--pin-dir").arg(pin.path());
        cmd.args(extra);
        cmd.env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(&mut cmd, "spicegate")
            .unwrap_or_else(|e| panic!("{e}"))
            .with_grace(Duration::from_secs(10));
        let pid = proc.pid();
        eprintln!("[harness] started {cmd:?} as pid {pid}");
        let log = LineLog::of_child(
            proc.child(),
            Some(format!("[spicegate {pid} stdout]")),
            Some(format!("[spicegate {pid}]")),
        );
        Self { proc, log }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lines()
    }

    /// Every DENY line so far.
    pub fn deny_lines(&self) -> Vec<DenyLine> {
        self.lines()
            .iter()
            .filter_map(|l| DenyLine::parse(l))
            .collect()
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// Waits for a line containing `pattern`; panics with the log so far on
    /// timeout or if the daemon exits first.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for(
            |l| l.contains(pattern).then(|| l.to_owned()),
            timeout,
            pattern,
        )
    }

    /// Waits for a DENY line that `pred` accepts.
    pub fn wait_for_deny(
        &self,
        what: &str,
        pred: impl Fn(&DenyLine) -> bool,
        timeout: Duration,
    ) -> DenyLine {
        self.wait_for(|l| DenyLine::parse(l).filter(|d| pred(d)), timeout, what)
    }

    fn wait_for<T>(
        &self,
        mut find: impl FnMut(&str) -> Option<T>,
        timeout: Duration,
        what: &str,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(found) = lines.iter().find_map(|l| find(l)) {
                return found;
            }
            let exited = self.log.closed();
            if exited || Instant::now() >= deadline {
                // Let the readers catch the last lines before giving up.
                if exited && let Some(found) = self.lines().iter().find_map(|l| find(l)) {
                    return found;
                }
                panic!(
                    "spicegate pid {} {} before printing a line with {what:?}; its output:\n{}",
                    self.pid(),
                    if exited {
                        "closed its output (exited?)"
                    } else {
                        "timed out"
                    },
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL and panic after 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.reap(Duration::from_secs(10)) {
            Some(st) => st,
            None => {
                self.signal(Signal::SIGKILL);
                let _ = self.reap(Duration::from_secs(5));
                panic!(
                    "spicegate pid {} ignored SIGTERM for 10 s; log:\n{}",
                    self.pid(),
                    self.lines().join("\n")
                );
            }
        }
    }

    /// SIGKILL and reap: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        if self.reap(Duration::from_secs(5)).is_none() {
            panic!("spicegate pid {} survived SIGKILL for 5 s", self.pid());
        }
    }

    pub fn signal(&self, sig: Signal) {
        self.proc.signal(sig as libc::c_int);
    }

    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = self.proc.wait_exit(timeout)?;
        self.log.join(Duration::from_secs(2));
        eprintln!("[harness] spicegate pid {} exited: {st}", self.pid());
        Some(st)
    }
}

#[cfg(test)]
mod tests {
    use super::DenyLine;

    #[test]
    fn parses_deny_lines() {
        let d = DenyLine::parse(
            "spicegate: DENY uid=1001 user=bob pid=1234 comm=sg-probe dst=[::1]:40001 vm=winlab suppressed=3",
        )
        .expect("parses");
        assert_eq!(
            (d.uid, d.user.as_str(), d.pid, d.comm.as_str()),
            (1001, "bob", 1234, "sg-probe")
        );
        assert_eq!(
            (d.dst.as_str(), d.vm.as_str(), d.suppressed),
            ("[::1]:40001", "winlab", 3)
        );
        assert!(DenyLine::parse("spicegate: enforcing policy").is_none());
    }
}
