//! Harness for the security tests: the `sg-bypass` helper, a result matrix,
//! raw bpf(2) calls (a foreign cgroup program, program queries, detaching a
//! pinned link), network namespaces with a veth pair, a tmpfs mount, copies
//! of a binary (setuid or world-executable) and nested cgroups. Every change
//! to the machine sits in a guard whose `Drop` undoes it without panicking.
//!
//! Longer than 600 lines: each guard is small, but the security tests need
//! many of them, and they talk to the kernel directly (raw bpf(2) calls)
//! rather than through spicegate's code.

use std::{
    ffi::CString,
    fmt, fs,
    io::{self, Read as _},
    net::IpAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use spicegate_testkit::{TempDir, cgroup::Cgroup};

pub use crate::netif::link_local_addrs;
use crate::{Listener, Outcome, PinDir, TestCgroup, TestUser, probe::Failures};

// ---------------------------------------------------------------- sg-bypass

/// An sg-bypass command line (see `src/bin/sg-bypass.rs`).
#[derive(Debug, Clone)]
pub struct Bypass {
    bin: PathBuf,
    pre: Vec<String>,
    post: Vec<String>,
    exec: Vec<String>,
    who: String,
    what: String,
}

impl Bypass {
    /// `bin` is sg-bypass; tests pass `env!("CARGO_BIN_EXE_sg-bypass")`.
    pub fn new(bin: impl AsRef<Path>) -> Self {
        Self {
            bin: bin.as_ref().to_owned(),
            pre: Vec::new(),
            post: Vec::new(),
            exec: Vec::new(),
            who: "root".into(),
            what: String::new(),
        }
    }

    fn pre(mut self, a: impl Into<String>) -> Self {
        self.pre.push(a.into());
        self
    }

    fn post(mut self, a: impl Into<String>) -> Self {
        self.post.push(a.into());
        self
    }

    /// Enter this network namespace first (as root).
    pub fn netns(self, ns: &NetNs) -> Self {
        self.pre("--netns").pre(ns.path().display().to_string())
    }

    /// Join `cg` (as root, before dropping privileges).
    pub fn cgroup(self, cg: &TestCgroup) -> Self {
        self.cgroup_path(cg.path())
    }

    pub fn cgroup_path(self, p: &Path) -> Self {
        self.pre("--cgroup").pre(p.display().to_string())
    }

    pub fn as_user(self, u: &TestUser) -> Self {
        let mut s = self
            .pre("--uid")
            .pre(u.uid.to_string())
            .pre("--gid")
            .pre(u.gid.to_string());
        s.who = u.name.clone();
        s
    }

    /// As that user, try to write our pid into `dir/cgroup.procs`.
    pub fn move_to_cgroup(self, dir: &Path) -> Self {
        self.pre("--move-to-cgroup").pre(dir.display().to_string())
    }

    pub fn lo_up(self) -> Self {
        self.pre("--lo-up")
    }

    pub fn ids(self) -> Self {
        self.pre("--ids")
    }

    /// After the setup, exec `argv` instead of connecting.
    pub fn exec(mut self, argv: &[&str]) -> Self {
        self.exec = argv.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// `a.b.c.d:port` or `[v6%scope]:port`.
    pub fn connect(mut self, dst: impl fmt::Display) -> Self {
        let d = dst.to_string();
        self.what = format!("{} {}", self.what, d).trim().to_owned();
        self.post("--connect").post(d)
    }

    /// connect, nonblock, fastopen, fastopen-connect, uring, uring-async,
    /// uring-sqpoll, uring-socket.
    pub fn via(mut self, mode: &str) -> Self {
        self.what = format!("{} via {mode}", self.what);
        self.post("--via").post(mode)
    }

    pub fn v6_socket(mut self) -> Self {
        self.what = format!("{} (AF_INET6 socket)", self.what);
        self.post("--v6-socket")
    }

    pub fn proto(mut self, p: &str) -> Self {
        self.what = format!("{} proto {p}", self.what);
        self.post("--proto").post(p)
    }

    pub fn seqpacket(mut self) -> Self {
        self.what = format!("{} SOCK_SEQPACKET", self.what);
        self.post("--type").post("seqpacket")
    }

    /// An AF_SMC socket (SMCPROTO_SMC or SMCPROTO_SMC6 by the address).
    pub fn af_smc(mut self) -> Self {
        self.what = format!("{} AF_SMC", self.what);
        self.post("--af-smc")
    }

    pub fn bind(mut self, local: impl fmt::Display) -> Self {
        self.what = format!("{} bound to {local}", self.what);
        self.post("--bind").post(local.to_string())
    }

    /// An earlier connect on the same socket (`unspec`: AF_UNSPEC).
    pub fn first(mut self, dst: impl fmt::Display) -> Self {
        self.what = format!("{} after {dst}", self.what);
        self.post("--first").post(dst.to_string())
    }

    pub fn describe(&self) -> String {
        if self.exec.is_empty() {
            format!("{}: {}", self.who, self.what)
        } else {
            format!("{}: exec {}", self.who, self.exec.join(" "))
        }
    }

    pub fn who(&self) -> &str {
        &self.who
    }

    /// The full argument vector (for running it through another program).
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![self.bin.display().to_string()];
        v.extend(self.pre.iter().cloned());
        if self.exec.is_empty() {
            v.extend(self.post.iter().cloned());
        } else {
            v.push("--exec".into());
            v.extend(self.exec.iter().cloned());
        }
        v
    }

    /// Runs it (at most 30 s) and collects its lines.
    pub fn run(&self) -> BypassRun {
        let argv = self.argv();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let out = run_to_exit(cmd, Duration::from_secs(30));
        if out.timed_out {
            panic!("sg-bypass {} ran for 30 s: {out}", self.describe());
        }
        BypassRun {
            what: self.describe(),
            lines: out.stdout.lines().map(str::to_owned).collect(),
            stderr: out.stderr,
            status: out.status,
        }
    }
}

/// What one sg-bypass run printed.
#[derive(Debug, Clone)]
pub struct BypassRun {
    pub what: String,
    pub lines: Vec<String>,
    pub stderr: String,
    pub status: Option<ExitStatus>,
}

impl BypassRun {
    /// The rest of the first line starting with `name `.
    pub fn step(&self, name: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    }

    /// Every line starting with `name `.
    pub fn steps(&self, name: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .collect()
    }

    /// `ok` / `err N NAME` as an [`Outcome`].
    pub fn parse_outcome(text: &str) -> Option<Outcome> {
        Outcome::parse(text)
    }

    /// The final connect's outcome; panics when the helper made none.
    pub fn outcome(&self) -> Outcome {
        self.step("result")
            .and_then(Self::parse_outcome)
            .unwrap_or_else(|| panic!("sg-bypass {} made no connect: {self}", self.what))
    }

    pub fn summary(&self) -> String {
        self.lines.join("; ")
    }
}

impl fmt::Display for BypassRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {:?}; stdout: [{}]; stderr: {}",
            self.status,
            self.summary(),
            self.stderr.trim()
        )
    }
}

/// What a case must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Connected.
    Allowed,
    /// EPERM from the connect hook.
    Denied,
    /// Anything but a connection (refused, unreachable...).
    NotConnected,
    /// Passed the hook (not EPERM) but found no listener: ECONNREFUSED.
    PassedHookNoListener,
}

impl Expect {
    fn matches(self, got: Outcome) -> bool {
        match self {
            Self::Allowed => got == Outcome::Allowed,
            Self::Denied => got == Outcome::Denied,
            Self::NotConnected => got != Outcome::Allowed,
            Self::PassedHookNoListener => got == Outcome::OtherErr(libc::ECONNREFUSED),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allowed => "allowed",
            Self::Denied => "refused (EPERM)",
            Self::NotConnected => "not connected",
            Self::PassedHookNoListener => "past the hook, nobody listening (ECONNREFUSED)",
        })
    }
}

/// Collects the results of a test's cases, prints them as one table and
/// panics listing every case that did not get what it had to.
/// Dropped with failures it never reported (a forgotten
/// [`Matrix::finish`]), it panics.
#[derive(Debug, Default)]
#[must_use = "call finish() to report the failures"]
pub struct Matrix {
    rows: Vec<String>,
    failures: Failures,
}

impl Matrix {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `b` and records whether it got `expect`.
    pub fn check(&mut self, case: &str, b: &Bypass, expect: Expect) -> BypassRun {
        let run = b.run();
        self.record(case, expect, &run);
        run
    }

    pub fn record(&mut self, case: &str, expect: Expect, run: &BypassRun) {
        let got = run.outcome();
        let ok = expect.matches(got);
        let row = format!(
            "{} {case} | {} | expected {expect} | got {got} | {}",
            if ok { "ok  " } else { "FAIL" },
            run.what,
            run.summary()
        );
        eprintln!("[matrix] {row}");
        if !ok {
            self.failures
                .push(format!("{row}\n      stderr: {}", run.stderr.trim()));
        }
        self.rows.push(row);
    }

    /// A line that is reported but decides nothing.
    pub fn note(&mut self, text: impl Into<String>) {
        let t = text.into();
        eprintln!("[matrix] note {t}");
        self.rows.push(format!("note {t}"));
    }

    /// A failed expectation that is not a probe result.
    pub fn fail(&mut self, text: impl Into<String>) {
        let t = text.into();
        eprintln!("[matrix] FAIL {t}");
        self.rows.push(format!("FAIL {t}"));
        self.failures.push(t);
    }

    pub fn finish(mut self) {
        eprintln!("[matrix] ---- {} rows", self.rows.len());
        for r in &self.rows {
            eprintln!("[matrix] {r}");
        }
        let failures = self.failures.take();
        if !failures.is_empty() {
            panic!(
                "{} case(s) got the wrong answer:\n  {}",
                failures.len(),
                failures.join("\n  ")
            );
        }
    }
}

// ------------------------------------------------------------- processes

/// A finished (or timed out and killed) child.
#[derive(Debug)]
pub struct Exited {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub what: String,
}

impl Exited {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
    /// stdout and stderr together, for matching messages.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Exited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> {:?}{}\n--- stdout\n{}--- stderr\n{}",
            self.what,
            self.status,
            if self.timed_out {
                " (timed out, killed)"
            } else {
                ""
            },
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` with piped output; kills it after `timeout`.
pub fn run_to_exit(mut cmd: Command, timeout: Duration) -> Exited {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    wait_collecting(child, timeout, what)
}

/// Reads the piped stdout and stderr of `child` to their ends on threads
/// (a long run could fill a pipe buffer) and waits for it; kills it after
/// `timeout`.
pub(crate) fn wait_collecting(mut child: Child, timeout: Duration, what: String) -> Exited {
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    Exited {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        timed_out,
        what,
    }
}

/// `spicegate --socket S run --policy P --state-dir D [--cgroup C] --pin-dir X`
/// expected to fail: runs it to its exit (at most `timeout`).
pub fn run_daemon_to_exit(
    pin: &PinDir,
    policy: &Path,
    cgroup: Option<&Path>,
    pin_dir: &Path,
    timeout: Duration,
) -> Exited {
    let mut cmd = Command::new(crate::spicegate_bin());
    cmd.arg("--socket").arg(pin.socket());
    cmd.arg("run").arg("--policy").arg(policy);
    cmd.arg("--state-dir").arg(pin.state_dir());
    if let Some(c) = cgroup {
        cmd.arg("--cgroup").arg(c);
    }
    cmd.arg("--pin-dir").arg(pin_dir);
    cmd.env_remove("JOURNAL_STREAM");
    let out = run_to_exit(cmd, timeout);
    eprintln!("[harness] {out}");
    out
}

/// `spicegate status --json` of this pin dir's daemon.
pub fn status_json(pin: &PinDir) -> serde_json::Value {
    let out = pin.ctl(["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): exit {}, stdout {:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Names of the files in a pin directory (empty when it does not exist).
pub fn pin_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The pinned file of `dir` whose name starts with `prefix` and is not a
/// staging name (`..._new`).
pub fn pinned(dir: &Path, prefix: &str) -> Option<PathBuf> {
    pin_files(dir)
        .into_iter()
        .find(|n| n.starts_with(prefix) && !n.ends_with("_new"))
        .map(|n| dir.join(n))
}

/// A tiny xorshift generator: random sleeps that a failure message can
/// reproduce from the printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn from_time() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self::seeded(t ^ u64::from(std::process::id()))
    }

    pub fn seeded(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn seed(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

// ------------------------------------------------------------------- bpf(2)

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `enum bpf_attach_type`.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_F_ALLOW_OVERRIDE: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of
    // size_of::<T>() bytes; the kernel zero-extends shorter ones.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from(r: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

/// One eBPF instruction, as the kernel reads `struct bpf_insn`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// `r0 = 1; exit`: lets every connect proceed.
pub fn allow_all_insns() -> Vec<u64> {
    vec![insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)]
}

/// `ctx->user_port = htons(port); r0 = 1; exit`: redirects every connect
/// to `port` and lets it proceed.
pub fn rewrite_port_insns(port: u16) -> Vec<u64> {
    // offsetof(struct bpf_sock_addr, user_port) == 24.
    vec![
        insn(0xb7, 2, 0, 0, i32::from(port.to_be())), // r2 = port (network order)
        insn(0x63, 1, 2, 24, 0),                      // *(u32 *)(r1 + 24) = r2
        insn(0xb7, 0, 0, 0, 1),                       // r0 = 1
        insn(0x95, 0, 0, 0, 0),                       // exit
    ]
}

/// Loads a cgroup/connect4 or connect6 program with BPF_PROG_LOAD.
pub fn load_connect_prog(attach_type: u32, insns: &[u64]) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        _rest: [u8; 56],
    }
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"sgtest_allow");
    let mut attr = Attr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
        _rest: [0; 56],
    };
    bpf(BPF_PROG_LOAD, &mut attr).map(fd_from).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!(
                "BPF_PROG_LOAD: {e}; verifier log: {}",
                String::from_utf8_lossy(&log[..end])
            ),
        )
    })
}

/// How a foreign program is attached to a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// BPF_PROG_ATTACH, no flags (exclusive, no override below).
    Exclusive,
    /// BPF_PROG_ATTACH with BPF_F_ALLOW_OVERRIDE.
    Override,
    /// BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI.
    Multi,
    /// BPF_LINK_CREATE (a bpf_link, multi-attach semantics).
    Link,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exclusive => "BPF_PROG_ATTACH flags=0",
            Self::Override => "BPF_PROG_ATTACH BPF_F_ALLOW_OVERRIDE",
            Self::Multi => "BPF_PROG_ATTACH BPF_F_ALLOW_MULTI",
            Self::Link => "BPF_LINK_CREATE",
        })
    }
}

/// A program the test attached to a cgroup. Drop detaches it.
#[derive(Debug)]
pub struct CgroupAttachment {
    cg: OwnedFd,
    prog: OwnedFd,
    link: Option<OwnedFd>,
    attach_type: u32,
    mode: AttachMode,
    what: String,
}

#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: [u32; 11],
}

impl CgroupAttachment {
    pub fn attach(
        cgroup: &Path,
        prog: OwnedFd,
        attach_type: u32,
        mode: AttachMode,
    ) -> io::Result<Self> {
        let cg: OwnedFd = fs::File::open(cgroup)?.into();
        let what = format!("{mode} of type {attach_type} on {}", cgroup.display());
        let link = match mode {
            AttachMode::Link => {
                #[repr(C)]
                struct LinkAttr {
                    prog_fd: u32,
                    target_fd: u32,
                    attach_type: u32,
                    flags: u32,
                    _pad: [u32; 12],
                }
                let mut attr = LinkAttr {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_fd: cg.as_raw_fd() as u32,
                    attach_type,
                    flags: 0,
                    _pad: [0; 12],
                };
                Some(fd_from(bpf(BPF_LINK_CREATE, &mut attr)?))
            }
            _ => {
                let flags = match mode {
                    AttachMode::Override => BPF_F_ALLOW_OVERRIDE,
                    AttachMode::Multi => BPF_F_ALLOW_MULTI,
                    _ => 0,
                };
                let mut attr = AttachAttr {
                    target_fd: cg.as_raw_fd() as u32,
                    attach_bpf_fd: prog.as_raw_fd() as u32,
                    attach_type,
                    attach_flags: flags,
                    replace_bpf_fd: 0,
                    _pad: [0; 11],
                };
                bpf(BPF_PROG_ATTACH, &mut attr)?;
                None
            }
        };
        eprintln!("[harness] attached {what}");
        Ok(Self {
            cg,
            prog,
            link,
            attach_type,
            mode,
            what,
        })
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }
}

impl Drop for CgroupAttachment {
    fn drop(&mut self) {
        let r = match &self.link {
            Some(link) => detach_link_fd(link),
            None => {
                let mut attr = AttachAttr {
                    target_fd: self.cg.as_raw_fd() as u32,
                    attach_bpf_fd: self.prog.as_raw_fd() as u32,
                    attach_type: self.attach_type,
                    attach_flags: 0,
                    replace_bpf_fd: 0,
                    _pad: [0; 11],
                };
                bpf(BPF_PROG_DETACH, &mut attr).map(|_| ())
            }
        };
        match r {
            Ok(()) => eprintln!("[harness] detached {}", self.what),
            Err(e) => eprintln!("[harness] LEFTOVER? detaching {}: {e}", self.what),
        }
    }
}

fn detach_link_fd(link: &OwnedFd) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        _pad: [u32; 15],
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        _pad: [0; 15],
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u32; 11],
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: [0; 11],
    };
    bpf(BPF_OBJ_GET, &mut attr).map(fd_from)
}

/// What someone with root could do to spicegate: BPF_LINK_DETACH on the
/// link pinned at `pin` (the pin stays, the link is detached).
pub fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    let fd = obj_get(pin)?;
    detach_link_fd(&fd)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad0: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The inner map id in slot `key` of the array-of-maps pinned at `pin`
/// (None when the slot is empty).
pub fn outer_map_slot(pin: &Path, key: u32) -> io::Result<Option<u32>> {
    let mut id: u32 = 0;
    let read = map_read(
        &obj_get(pin)?,
        std::ptr::from_ref(&key).cast(),
        std::ptr::from_mut(&mut id).cast(),
    );
    match read {
        Ok(()) => Ok(Some(id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Empties slot `key` of the array-of-maps pinned at `pin`.
pub fn clear_outer_map_slot(pin: &Path, key: u32) -> io::Result<()> {
    let fd = obj_get(pin)?;
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad0: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
}

/// How many entries the inner map in slot `key` of the array-of-maps
/// pinned at `pin` holds, counted by walking its keys (None: empty slot).
pub fn inner_map_len(pin: &Path, key: u32, key_size: usize) -> io::Result<Option<usize>> {
    let Some(id) = outer_map_slot(pin, key)? else {
        return Ok(None);
    };
    map_len(&map_by_id(id)?, key_size).map(Some)
}

/// What root could try with `bpftool map update` on an inner map: writes
/// `key` -> `value` into the map in slot `slot` of the array-of-maps
/// pinned at `pin`.
pub fn write_inner_map(pin: &Path, slot: u32, key: &[u8], value: &[u8]) -> io::Result<()> {
    let id = outer_map_slot(pin, slot)?.ok_or_else(|| io::Error::other("empty slot"))?;
    map_write(&map_by_id(id)?, key, value)
}

/// How many entries the map pinned at `pin` holds, counted by walking its
/// keys of `key_size` bytes.
pub fn pinned_map_len(pin: &Path, key_size: usize) -> io::Result<usize> {
    map_len(&obj_get(pin)?, key_size)
}

/// Writes `key` -> `value` into the map pinned at `pin` (what root could
/// do with `bpftool map update pinned`).
pub fn write_pinned_map(pin: &Path, key: &[u8], value: &[u8]) -> io::Result<()> {
    map_write(&obj_get(pin)?, key, value)
}

/// The value of `value_size` bytes at `key` of the map pinned at `pin`.
pub fn read_pinned_map(pin: &Path, key: &[u8], value_size: usize) -> io::Result<Vec<u8>> {
    let mut value = vec![0u8; value_size];
    map_read(&obj_get(pin)?, key.as_ptr(), value.as_mut_ptr())?;
    Ok(value)
}

/// The ports whose bit is set in the port prefilter pinned at `pin` (one
/// value of 1,024 `u64` words, bit `p % 64` of word `p / 64`).
pub fn prefilter_ports(pin: &Path) -> io::Result<Vec<u16>> {
    let bytes = read_pinned_map(pin, &0u32.to_ne_bytes(), 8192)?;
    Ok((0..=u16::MAX)
        .filter(|p| {
            let i = usize::from(*p / 8);
            bytes[i] >> (p % 8) & 1 != 0
        })
        .collect())
}

/// The `u64` values of the array map pinned at `pin`, which has `len`
/// entries (one BPF_MAP_LOOKUP_ELEM each).
pub fn pinned_u64_array(pin: &Path, len: u32) -> io::Result<Vec<u64>> {
    let map = obj_get(pin)?;
    (0..len)
        .map(|i| {
            let mut value = 0u64;
            map_read(
                &map,
                std::ptr::from_ref(&i).cast(),
                std::ptr::from_mut(&mut value).cast(),
            )
            .map(|()| value)
        })
        .collect()
}

/// Writes `values` at their indexes into the `u64` array map pinned at
/// `pin` (what root could do with `bpftool map update pinned`).
pub fn write_pinned_u64_array(
    pin: &Path,
    values: impl IntoIterator<Item = (u32, u64)>,
) -> io::Result<()> {
    let map = obj_get(pin)?;
    values
        .into_iter()
        .try_for_each(|(i, v)| map_write(&map, &i.to_ne_bytes(), &v.to_ne_bytes()))
}

/// How many entries `map` holds, counted by walking its keys of
/// `key_size` bytes (BPF_MAP_GET_NEXT_KEY).
fn map_len(map: &OwnedFd, key_size: usize) -> io::Result<usize> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut n = 0;
    loop {
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad0: 0,
            key: if n == 0 { 0 } else { key.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
        n += 1;
        key.copy_from_slice(&next);
    }
}

/// Reads the value at `key` of `map` into `value` (BPF_MAP_LOOKUP_ELEM);
/// both must point at the map's key and value sizes.
fn map_read(map: &OwnedFd, key: *const u8, value: *mut u8) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad0: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

/// Writes `key` -> `value` into `map` (BPF_MAP_UPDATE_ELEM, any flags).
fn map_write(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad0: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Opens a map by its kernel id (BPF_MAP_GET_FD_BY_ID).
fn map_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr {
        map_id: id,
        next_id: 0,
        open_flags: 0,
    };
    bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).map(fd_from)
}

/// What root could try with `bpftool map update`: copy `from_uid`'s first
/// word of grants in the rule table in force (slot 0 of the array-of-maps
/// pinned at `pin`) to `to_uid`. Rule keys are 24 bytes (kind, pad, port,
/// uid, addr; a word of grants has its block in `port`), values 8. Returns the result of the write, Ok(false) if `from_uid` has
/// no grant to copy.
pub fn copy_grant_in_table(pin: &Path, from_uid: u32, to_uid: u32) -> io::Result<bool> {
    const KIND_GRANT: u8 = 3;
    let id = outer_map_slot(pin, 0)?.ok_or_else(|| io::Error::other("policy slot is empty"))?;
    let table = map_by_id(id)?;
    let mut key = [0u8; 24];
    let mut next = [0u8; 24];
    let mut first = true;
    loop {
        let mut attr = MapElemAttr {
            map_fd: table.as_raw_fd() as u32,
            _pad0: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        }
        first = false;
        key = next;
        let uid = u32::from_ne_bytes([key[4], key[5], key[6], key[7]]);
        if key[0] != KIND_GRANT || uid != from_uid {
            continue;
        }
        let mut value = [0u8; 8];
        map_read(&table, key.as_ptr(), value.as_mut_ptr())?;
        let mut forged = key;
        forged[4..8].copy_from_slice(&to_uid.to_ne_bytes());
        let mut attr = MapElemAttr {
            map_fd: table.as_raw_fd() as u32,
            _pad0: 0,
            key: forged.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        return bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| true);
    }
}

/// Ids of the programs attached to `cgroup` for `attach_type`: those
/// attached to it directly, or (`effective`) those that run for it.
pub fn cgroup_prog_ids(cgroup: &Path, attach_type: u32, effective: bool) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct Attr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let cg = fs::File::open(cgroup)?;
    let mut ids = [0u32; 64];
    let mut attr = Attr {
        target_fd: cg.as_raw_fd() as u32,
        attach_type,
        query_flags: u32::from(effective), // BPF_F_QUERY_EFFECTIVE = 1
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
        prog_attach_flags: 0,
        link_ids: 0,
        link_attach_flags: 0,
        revision: 0,
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(ids[..(attr.prog_cnt as usize).min(ids.len())].to_vec())
}

/// What the kernel says of a loaded program: its name and how many
/// instructions the verifier walked to load it (`bpf_prog_info`'s `name`
/// and `verified_insns`, kernel 5.16 and later).
pub fn prog_name_and_verified_insns(id: u32) -> io::Result<(String, u32)> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct ById {
        id: u32,
        next_id: u32,
        open_flags: u32,
        _pad: [u32; 5],
    }
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = ById {
        id,
        next_id: 0,
        open_flags: 0,
        _pad: [0; 5],
    };
    let prog = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(fd_from)?;
    // struct bpf_prog_info up to attach_btf_id: name at byte 64 (16
    // bytes), verified_insns at byte 216.
    let mut info = [0u8; 232];
    let mut attr = GetInfo {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let name = &info[64..80];
    let name = String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)]);
    let verified = u32::from_ne_bytes([info[216], info[217], info[218], info[219]]);
    Ok((name.into_owned(), verified))
}

/// Programs attached directly to `cgroup` on connect4 and connect6.
pub fn connect_progs(cgroup: &Path) -> (Vec<u32>, Vec<u32>) {
    let q = |t| {
        cgroup_prog_ids(cgroup, t, false)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {} type {t}: {e}", cgroup.display()))
    };
    (q(BPF_CGROUP_INET4_CONNECT), q(BPF_CGROUP_INET6_CONNECT))
}

// ------------------------------------------------------------ namespaces

/// A network namespace `ip netns add sgn-<pid>-<n>` with `lo` up, and
/// optionally a veth pair to the host. Drop deletes both.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: Option<String>,
    host_ip: Option<IpAddr>,
    ns_ip: Option<IpAddr>,
}

fn ip_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    pub fn new() -> Self {
        let id = crate::next_id();
        let name = format!("sgn-{}-{id}", std::process::id());
        ip_cmd(&["netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        let ns = Self {
            name,
            host_if: None,
            host_ip: None,
            ns_ip: None,
        };
        ip_cmd(&["-n", &ns.name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    /// A namespace with a veth pair to the host: the host side gets
    /// 10.213.X.Y+1/30 and the namespace side Y+2, on a /30 no interface
    /// of this machine uses yet.
    pub fn with_veth() -> Self {
        let mut ns = Self::new();
        let pid = std::process::id();
        let used: Vec<String> = crate::interface_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut rng = Rng::seeded(u64::from(pid) << 8 | u64::from(crate::next_id()));
        let (host, peer) = loop {
            let x = 1 + rng.below(250) as u8;
            let y = (rng.below(63) as u8) * 4;
            let host = format!("10.213.{x}.{}", y + 1);
            let peer = format!("10.213.{x}.{}", y + 2);
            if !used.iter().any(|u| u == &host || u == &peer) {
                break (host, peer);
            }
        };
        let n = crate::next_id();
        let host_if = format!("sgh{}x{n}", pid % 100_000);
        let peer_if = format!("sgp{}x{n}", pid % 100_000);
        ip_cmd(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &ns.name,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        ns.host_if = Some(host_if.clone());
        let host_cidr = format!("{host}/30");
        let peer_cidr = format!("{peer}/30");
        for args in [
            vec!["addr", "add", host_cidr.as_str(), "dev", host_if.as_str()],
            vec!["link", "set", host_if.as_str(), "up"],
            vec![
                "-n",
                ns.name.as_str(),
                "addr",
                "add",
                peer_cidr.as_str(),
                "dev",
                peer_if.as_str(),
            ],
            vec![
                "-n",
                ns.name.as_str(),
                "link",
                "set",
                peer_if.as_str(),
                "up",
            ],
        ] {
            ip_cmd(&args).unwrap_or_else(|e| panic!("{e}"));
        }
        ns.host_ip = host.parse().ok();
        ns.ns_ip = peer.parse().ok();
        eprintln!(
            "[harness] netns {} with veth {host_if} {host} <-> {peer_if} {peer}",
            ns.name
        );
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The host side address of the veth pair.
    pub fn host_ip(&self) -> IpAddr {
        self.host_ip.expect("made with_veth")
    }

    /// The namespace side address of the veth pair.
    pub fn ns_ip(&self) -> IpAddr {
        self.ns_ip.expect("made with_veth")
    }

    /// `ip -n <this namespace> ARGS...`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip_cmd(&all).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("{key}={value}"))
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec sysctl: {e}"));
        assert!(
            out.status.success(),
            "sysctl {key}={value} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A [`Listener`] whose socket lives in this namespace.
    pub fn listener(&self, addr: &str) -> Listener {
        let path = self.path();
        let addr = addr.to_owned();
        std::thread::spawn(move || {
            let f =
                fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            // SAFETY: plain syscall on an fd we own; only this thread moves.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns {}: {}", path.display(), io::Error::last_os_error());
            }
            Listener::bind(&addr)
        })
        .join()
        .unwrap_or_else(|_| panic!("making a listener in a network namespace failed (see above)"))
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip_cmd(&["netns", "del", &self.name]) {
            eprintln!("[harness] LEFTOVER netns {}: {e}", self.name);
        }
        // Deleting the namespace deletes the peer and with it the pair; a
        // host side that survived is removed by hand.
        if let Some(h) = &self.host_if
            && Path::new("/sys/class/net").join(h).exists()
            && let Err(e) = ip_cmd(&["link", "del", h])
        {
            eprintln!("[harness] LEFTOVER interface {h}: {e}");
        }
    }
}

// ---------------------------------------------------------- filesystems

/// A tmpfs mounted on `path` (created if missing). Drop unmounts it.
#[derive(Debug)]
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// `options` as for mount -o, e.g. `size=16k,mode=0700`.
    pub fn new(path: &Path, options: &str) -> Self {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options),
        )
        .unwrap_or_else(|e| panic!("mounting tmpfs ({options}) on {}: {e}", path.display()));
        eprintln!("[harness] mounted tmpfs {options} on {}", path.display());
        Self {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes zeros into `name` until the filesystem is full; returns the
    /// bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write as _;
        let p = self.path.join(name);
        let mut f =
            fs::File::create(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        let buf = [0u8; 512];
        let mut n = 0u64;
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
        let _ = f.sync_all();
        n
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::empty()) {
            eprintln!(
                "[harness] umount {}: {e}; detaching it",
                self.path.display()
            );
            if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("[harness] LEFTOVER mount {}: {e}", self.path.display());
            }
        }
    }
}

/// A copy of a binary in its own world-readable directory under /tmp,
/// owned by `uid:gid`, optionally setuid. Drop removes the directory.
#[derive(Debug)]
pub struct BinCopy {
    path: PathBuf,
    dir: TempDir,
}

impl BinCopy {
    pub fn new(src: &Path, uid: u32, gid: u32, setuid: bool) -> Self {
        let dir = TempDir::unique("spicegate-test-bin").unwrap_or_else(|e| panic!("{e}"));
        let guard = Self {
            path: dir.path().join(src.file_name().unwrap_or_default()),
            dir,
        };
        fs::set_permissions(guard.dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", guard.dir.path().display()));
        fs::copy(src, &guard.path).unwrap_or_else(|e| {
            panic!("copying {} to {}: {e}", src.display(), guard.path.display())
        });
        std::os::unix::fs::chown(&guard.path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", guard.path.display()));
        // chmod after chown: chown clears the setuid bit.
        let mode = if setuid { 0o4755 } else { 0o755 };
        fs::set_permissions(&guard.path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", guard.path.display()));
        guard
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> String {
        self.path.display().to_string()
    }
}

/// Whether the filesystem holding `path` honours setuid bits.
pub fn allows_setuid(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path)
        .map(|s| !s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID))
        .unwrap_or(false)
}

/// A cgroup below another one (a test cgroup). Drop kills what is left in
/// it and removes it; drop it before its parent.
#[derive(Debug)]
pub struct ChildCgroup(Cgroup);

impl ChildCgroup {
    pub fn new(parent: &Path, name: &str) -> Self {
        Self(Cgroup::create(parent.join(name)).unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}
