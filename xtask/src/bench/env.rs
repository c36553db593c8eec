//! What the benchmark changes on the machine, each in a guard whose `Drop`
//! undoes it, also when the benchmark fails or is interrupted: child
//! cgroups, two throw-away users, the helper processes, the spicegate
//! daemon and its pin directory, a scratch directory.
//!
//! Drops never panic; a cleanup that fails is reported as LEFTOVER with
//! what to remove by hand.
//!
//! Longer than 600 lines: every guard the benchmark needs (cgroups, users,
//! helpers, daemon, pins); issue 14 replaces them with the test-kit the
//! integration tests use.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

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
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action is zero-initialised, then filled in; the handler
        // only stores to an atomic.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing the Ctrl-C handler");
        }
    }
    Ok(())
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

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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

/// The cgroup2 mount point, from /proc/self/mountinfo (a hybrid host mounts
/// it at /sys/fs/cgroup/unified).
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split_whitespace().collect();
            if right.split_whitespace().next() != Some("cgroup2") || fields.get(3) != Some(&"/") {
                return None;
            }
            Some(PathBuf::from(fields.get(4)?.replace("\\040", " ")))
        })
        .ok_or_else(|| {
            anyhow!("no cgroup2 mount in /proc/self/mountinfo: spicegate needs cgroup v2")
        })
}

/// `<cgroup2>/spicegate-bench-<pid>/` with the leaves the benchmark's
/// processes live in: `base` (nothing attached: "no filter"), `guarded`
/// (spicegate attaches here) and `listen`. Drop kills what is left in
/// them and removes them.
pub struct BenchCgroups {
    pub parent: PathBuf,
}

pub const LEAVES: [&str; 3] = ["base", "guarded", "listen"];

impl BenchCgroups {
    pub fn new() -> anyhow::Result<Self> {
        let parent = cgroup2_root()?.join(format!("spicegate-bench-{}", std::process::id()));
        fs::create_dir(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let me = Self { parent };
        for leaf in LEAVES {
            let p = me.leaf(leaf);
            fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        Ok(me)
    }

    pub fn leaf(&self, name: &str) -> PathBuf {
        self.parent.join(name)
    }
}

fn procs(cg: &Path) -> Vec<String> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        for leaf in LEAVES
            .iter()
            .map(|l| self.leaf(l))
            .chain([self.parent.clone()])
        {
            if !leaf.exists() {
                continue;
            }
            if !procs(&leaf).is_empty() {
                let _ = fs::write(leaf.join("cgroup.kill"), "1");
                wait_until(Duration::from_secs(5), || procs(&leaf).is_empty());
            }
            // A killed task leaves the cgroup a moment after it leaves
            // cgroup.procs: rmdir says EBUSY until then.
            let mut last = None;
            let gone = wait_until(Duration::from_secs(5), || match fs::remove_dir(&leaf) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => {
                    last = Some(e);
                    false
                }
            });
            if !gone {
                eprintln!(
                    "xtask: LEFTOVER cgroup {}: {last:?}; remove it with rmdir",
                    leaf.display()
                );
            }
        }
    }
}

/// A system user without home or shell, with its own group; Drop removes
/// both.
pub struct BenchUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl BenchUser {
    pub fn new(suffix: char) -> anyhow::Result<Self> {
        let name = format!("sgb{:05}{suffix}", std::process::id() % 100_000);
        sh(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            &name,
        ]))?;
        let mut user = Self {
            name,
            uid: 0,
            gid: 0,
        };
        let line = sh(Command::new("getent").args(["passwd", &user.name]))?;
        let fields: Vec<&str> = line.trim().split(':').collect();
        user.uid = fields
            .get(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no uid in `{line}`"))?;
        user.gid = fields
            .get(3)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no gid in `{line}`"))?;
        Ok(user)
    }
}

impl Drop for BenchUser {
    fn drop(&mut self) {
        if let Err(e) = sh(Command::new("userdel").arg(&self.name)) {
            eprintln!("xtask: LEFTOVER user {}: {e:#}", self.name);
        }
        // userdel removes the personal group only with USERGROUPS_ENAB yes.
        if sh(Command::new("getent").args(["group", &self.name])).is_ok()
            && let Err(e) = sh(Command::new("groupdel").arg(&self.name))
        {
            eprintln!("xtask: LEFTOVER group {}: {e:#}", self.name);
        }
    }
}

/// A scratch directory under /tmp for policies, rule files, the control
/// socket and the daemon's state.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("spicegate-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("xtask: LEFTOVER directory {}: {e}", self.dir.display());
        }
    }
}

/// A helper process; Drop kills and reaps it.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Spawns `cmd` in its own process group (out of reach of the
    /// terminal's Ctrl-C, which xtask handles).
    pub fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Self> {
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self {
            child,
            what: what.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn stop(&mut self, sig: libc::c_int, timeout: Duration) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        wait_until(timeout, || matches!(self.child.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.stop(libc::SIGKILL, Duration::from_secs(5)) {
            eprintln!(
                "xtask: LEFTOVER process {} (pid {})",
                self.what,
                self.child.id()
            );
        }
    }
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
        user: &BenchUser,
        what: &str,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(sg_bench);
        cmd.arg("worker").arg("--cgroup").arg(cgroup);
        if let Some(cpu) = cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        let mut proc = Proc::spawn(
            cmd.args([
                "--uid",
                &user.uid.to_string(),
                "--gid",
                &user.gid.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
            what,
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

/// Lines a process wrote, each with the moment it was read.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// `spicegate run` on the `guarded` cgroup. Its stderr is read line by
/// line with timestamps (for start-to-enforcing and the DENY count); Drop
/// stops it (SIGTERM, SIGKILL after 10 s). Enforcement stays pinned:
/// [`PinDir`] removes it.
pub struct Daemon {
    proc: Proc,
    lines: Lines,
    reader: Option<JoinHandle<()>>,
    pub spawned: Instant,
}

impl PinDir {
    /// The daemon's schedule clock offset (see [`Daemon::spawn`]).
    pub fn clock_offset_file(&self) -> PathBuf {
        self.run_dir.join("clock-offset")
    }
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
            .arg(&pin.path)
            .arg("--state-dir")
            .arg(pin.run_dir.join("state"))
            // Seconds added to the schedule clock (absent: none), so the
            // bench can cross a schedule edge now.
            .arg("--clock-offset-file")
            .arg(pin.clock_offset_file())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut proc = Proc::spawn(&mut cmd, "spicegate run")?;
        let stderr = proc
            .child()
            .stderr
            .take()
            .ok_or_else(|| anyhow!("daemon stderr"))?;
        let lines: Lines = Arc::default();
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((at, line));
            }
        });
        Ok(Self {
            proc,
            lines,
            reader: Some(reader),
            spawned,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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
            let exited = matches!(self.proc.child().try_wait(), Ok(Some(_)));
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
        self.lines().len()
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

    /// SIGTERM and wait; the whole log when it does not stop.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if !self.proc.stop(libc::SIGTERM, Duration::from_secs(10)) {
            bail!("spicegate pid {} ignored SIGTERM for 10 s", self.pid());
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.proc.stop(libc::SIGTERM, Duration::from_secs(10)) {
            eprintln!(
                "xtask: spicegate pid {} ignored SIGTERM; killing it",
                self.pid()
            );
        }
        // Proc's own Drop kills and reaps what is left.
    }
}

/// A pin directory `/sys/fs/bpf/spicegate-bench-<pid>` with its control
/// socket and state under the scratch directory. Drop runs `spicegate
/// unload` on it, and removes the pins by hand if that fails.
pub struct PinDir {
    pub path: PathBuf,
    pub run_dir: PathBuf,
    bin: PathBuf,
}

impl PinDir {
    pub fn new(bin: &Path, scratch: &Scratch) -> Self {
        Self {
            path: PathBuf::from(format!(
                "/sys/fs/bpf/spicegate-bench-{}",
                std::process::id()
            )),
            run_dir: scratch.dir.join("daemon"),
            bin: bin.to_owned(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    /// Removes the enforcement and the daemon's files.
    pub fn unload(&self) -> anyhow::Result<()> {
        if self.path.exists() {
            sh(Command::new(&self.bin)
                .args(["unload", "--pin-dir"])
                .arg(&self.path))?;
        }
        if self.run_dir.exists() {
            fs::remove_dir_all(&self.run_dir)
                .with_context(|| format!("removing {}", self.run_dir.display()))?;
        }
        Ok(())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = self.unload() {
            eprintln!("xtask: {e:#}");
        }
        if self.path.exists() {
            // Unpinning a link nobody else holds detaches it.
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("xtask: LEFTOVER pin directory {}: {e}", self.path.display());
            }
        }
    }
}
