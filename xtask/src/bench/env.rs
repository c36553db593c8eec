//! What the benchmark changes on the machine, each in a guard whose `Drop`
//! undoes it, also when the benchmark fails or is interrupted: child
//! cgroups, two throw-away users, the helper processes, the spicegate
//! daemon and its pin directory, a scratch directory. The guards are the
//! test kit's (`testkit/`, shared with the integration tests); this module
//! names and arranges them for the benchmark.
//!
//! Drops never panic; a cleanup that fails is reported as LEFTOVER with
//! what to remove by hand.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
pub use spicegate_testkit::{
    TempDir, cgroup::Cgroup, pins::PinDir, proc::LineLog, proc::Proc, users::SystemUser,
};

/// Set by SIGINT/SIGTERM; the measuring loops stop at the next batch and
/// the guards clean up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C must not kill xtask before its guards ran: it only sets a flag.
/// The helpers run in their own process groups, so the terminal's SIGINT
/// does not reach them either.
pub fn catch_interrupts() -> anyhow::Result<()> {
    spicegate_testkit::set_log_prefix("xtask:");
    crate::util::on_interrupt(on_signal)
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// The CPUs this process may run on.
pub fn cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// CPU time (user + system) of every child reaped so far: the delta
/// around one command is that command's CPU, whatever else the machine does.
pub fn children_cpu() -> Duration {
    // SAFETY: a zeroed rusage is valid; getrusage fills it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Clock ticks per second, the unit of /proc/PID/stat times.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Runs a command, capturing its output; fails with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let line = crate::util::shown(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `<cgroup2>/spicegate-bench-<pid>/` with the leaves the benchmark's
/// processes live in: `base` (nothing attached: "no filter"), `guarded`
/// (spicegate attaches here) and `listen`. Drop kills what is left in
/// them and removes them, the leaves first.
pub struct BenchCgroups {
    leaves: Vec<(&'static str, Cgroup)>,
    _parent: Cgroup,
}

pub const LEAVES: [&str; 3] = ["base", "guarded", "listen"];

impl BenchCgroups {
    pub fn new() -> anyhow::Result<Self> {
        let parent = Cgroup::top_level(&format!("spicegate-bench-{}", std::process::id()))?;
        let leaves = LEAVES
            .iter()
            .map(|&name| Ok((name, parent.child(name)?)))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            leaves,
            _parent: parent,
        })
    }

    pub fn leaf(&self, name: &str) -> PathBuf {
        self.leaves
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, cg)| cg.path().to_owned())
            .unwrap_or_else(|| panic!("no bench cgroup {name}"))
    }
}

/// A system user `sgb<pid><suffix>` without home or shell, with its own
/// group; Drop removes both.
pub fn bench_user(suffix: char) -> anyhow::Result<SystemUser> {
    let name = format!("sgb{:05}{suffix}", std::process::id() % 100_000);
    Ok(SystemUser::create(&name, None, None)?)
}

/// A scratch directory under /tmp for policies, rule files, the control
/// socket and the daemon's state.
pub fn scratch() -> anyhow::Result<TempDir> {
    Ok(TempDir::new(&format!(
        "spicegate-bench-{}",
        std::process::id()
    ))?)
}

/// Spawns a helper in its own process group (out of reach of the
/// terminal's Ctrl-C, which xtask handles). Drop sends SIGTERM and waits
/// `grace` before SIGKILL (zero: SIGKILL at once).
pub fn spawn(cmd: &mut Command, what: &str, grace: Duration) -> anyhow::Result<Proc> {
    Ok(Proc::spawn(cmd.process_group(0), what)?.with_grace(grace))
}

/// `sg-bench worker`: a process in one cgroup with one real uid that makes
/// the connects and streams on command.
pub struct Worker {
    proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub what: String,
}

impl Worker {
    pub fn start(
        sg_bench: &Path,
        cgroup: &Path,
        cpu: Option<usize>,
        user: &SystemUser,
        what: &str,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(sg_bench);
        cmd.arg("worker").arg("--cgroup").arg(cgroup);
        if let Some(cpu) = cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        let mut proc = spawn(
            cmd.args([
                "--uid",
                &user.uid.to_string(),
                "--gid",
                &user.gid.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
            what,
            Duration::ZERO,
        )?;
        let stdin = proc
            .child()
            .stdin
            .take()
            .ok_or_else(|| anyhow!("worker stdin"))?;
        let stdout = proc
            .child()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker stdout"))?;
        Ok(Self {
            proc,
            stdin,
            stdout: BufReader::new(stdout),
            what: what.to_owned(),
        })
    }

    /// Sends one command and returns the answer's words.
    pub fn ask(&mut self, cmd: &str) -> anyhow::Result<Vec<String>> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("{} (pid {}) is gone", self.what, self.proc.pid()))?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!(
                "{} (pid {}) exited during `{cmd}`",
                self.what,
                self.proc.pid()
            );
        }
        Ok(line.split_whitespace().map(str::to_owned).collect())
    }

    /// One connect: `Ok(())` or the errno.
    pub fn probe(&mut self, addr: &str) -> anyhow::Result<Result<(), i32>> {
        let a = self.ask(&format!("probe {addr}"))?;
        Ok(match a.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            [_, e] => Err(e.parse().unwrap_or(0)),
            _ => bail!("{}: odd answer {a:?}", self.what),
        })
    }
}

/// `spicegate run` on the `guarded` cgroup. Its stderr is read line by
/// line with timestamps (for start-to-enforcing and the DENY count); Drop
/// stops it (SIGTERM, SIGKILL after 10 s). Enforcement stays pinned:
/// [`PinDir`] removes it.
pub struct Daemon {
    proc: Proc,
    log: LineLog,
    pub spawned: Instant,
}

/// The pin directory `/sys/fs/bpf/spicegate-bench-<pid>`, with the control
/// socket and state under the scratch directory.
pub fn pin_dir(bin: &Path, scratch: &TempDir) -> PinDir {
    let name = format!("spicegate-bench-{}", std::process::id());
    PinDir::new(&name, scratch.path().join("daemon"), bin)
}

/// Runs `spicegate reload` against the daemon of `pin`.
pub fn reload(bin: &Path, pin: &PinDir) -> anyhow::Result<()> {
    sh(Command::new(bin)
        .arg("--socket")
        .arg(pin.socket())
        .arg("reload"))
    .map(drop)
}

/// The daemon's schedule clock offset (see [`Daemon::spawn`]).
pub fn clock_offset_file(pin: &PinDir) -> PathBuf {
    pin.run_dir().join("clock-offset")
}

impl Daemon {
    pub fn spawn(bin: &Path, policy: &Path, cgroup: &Path, pin: &PinDir) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(pin.socket())
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--pin-dir")
            .arg(pin.path())
            .arg("--state-dir")
            .arg(pin.state_dir())
            // Seconds added to the schedule clock (absent: none), so the
            // bench can cross a schedule edge now.
            .arg("--clock-offset-file")
            .arg(clock_offset_file(pin))
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut proc = spawn(&mut cmd, "spicegate run", Duration::from_secs(10))?;
        let log = LineLog::of_child(proc.child(), None, None);
        Ok(Self { proc, log, spawned })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.log.timed()
    }

    /// Waits for the `enforcing policy` line; returns when it was read.
    pub fn wait_enforcing(&mut self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self
                .lines()
                .iter()
                .find(|(_, l)| l.contains("enforcing policy"))
            {
                return Ok(*at);
            }
            let exited = self.proc.exited().is_some();
            if exited || Instant::now() >= deadline {
                let log: Vec<String> = self.lines().into_iter().map(|(_, l)| l).collect();
                bail!(
                    "spicegate {} before saying `enforcing policy`; its log:\n{}",
                    if exited { "exited" } else { "timed out" },
                    log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lines written so far.
    pub fn line_count(&self) -> usize {
        self.log.count()
    }

    /// When the first line containing `pattern` was read.
    pub fn line_at(&self, pattern: &str) -> Option<Instant> {
        self.lines()
            .iter()
            .find(|(_, l)| l.contains(pattern))
            .map(|(at, _)| *at)
    }

    /// DENY lines written so far.
    pub fn deny_lines(&self) -> usize {
        self.lines()
            .iter()
            .filter(|(_, l)| l.contains(" DENY "))
            .count()
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS")
    }

    /// A `Vm...:` line of /proc/PID/status, in KiB.
    pub fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("no {field} in /proc/{}/status", self.pid()))
    }

    /// utime + stime in clock ticks.
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name, which may hold spaces: state is
        // field 3, utime 14, stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("odd /proc/PID/stat"))?;
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        Ok(f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0))
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if self
            .proc
            .stop_with(libc::SIGTERM, Duration::from_secs(10))
            .is_none()
        {
            bail!("spicegate pid {} ignored SIGTERM for 10 s", self.pid());
        }
        self.log.join(Duration::from_secs(2));
        Ok(())
    }
}
