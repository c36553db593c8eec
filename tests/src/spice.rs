//! A real Spice server and a real Spice client for the end-to-end test:
//! QEMU with a Spice display on a loopback port (queried over QMP),
//! an Xvfb X server, and `remote-viewer` started inside a test cgroup as a
//! test user. Every process and file sits in a guard whose `Drop` stops or
//! removes it without panicking.
//!
//! Longer than 600 lines: QMP, Xvfb and remote-viewer each need their own
//! start, readiness check and guard.
//!
//! The packages come from `cargo xtask setup`: `qemu-system-x86` (its
//! `qemu-system-common` carries the Spice UI module), `virt-viewer` and
//! `xvfb`, all with `--no-install-recommends`.

use std::{
    fmt, fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::TcpListener,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use nix::unistd::{Gid, Uid, chown};
pub use spicegate_testkit::TempDir;
use spicegate_testkit::proc::{self as kit, LineLog};

use crate::{TestCgroup, TestUser};

// ------------------------------------------------------------ processes

/// A child process whose stdout and stderr lines are collected (and echoed
/// to the test's stderr with a prefix). Drop (the kit's [`kit::Proc`])
/// sends SIGTERM, then SIGKILL after 5 s, and reaps it.
struct Proc {
    proc: kit::Proc,
    log: LineLog,
}

impl Proc {
    fn spawn(mut cmd: Command, what: &str) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = kit::Proc::spawn(&mut cmd, what).unwrap_or_else(|e| panic!("{e}"));
        let what = format!("{what} {}", proc.pid());
        eprintln!("[spice] started {what}: {cmd:?}");
        let echo = Some(format!("[{what}]"));
        let log = LineLog::of_child(proc.child(), echo.clone(), echo);
        Self { proc, log }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn lines(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The exit status, once it has exited (reaping it).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    fn reap(&mut self, timeout: Duration) -> bool {
        self.proc.wait_exit(timeout).is_some()
    }

    fn stop(&mut self) {
        if !self.proc.stop() {
            eprintln!(
                "[spice] LEFTOVER process {} {}",
                self.proc.what(),
                self.pid()
            );
        }
        // Readers end when the last holder of the pipes is gone.
        self.log.join(Duration::from_secs(2));
    }
}

/// A directory `spicegate-test-<tag>-<pid>-<n>` under the temp dir,
/// removed (with its contents) on Drop.
fn temp_dir(tag: &str) -> TempDir {
    TempDir::unique(&format!("spicegate-test-{tag}")).unwrap_or_else(|e| panic!("{e}"))
}

// ------------------------------------------------------------------ QEMU

/// One channel of `query-spice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiceChannel {
    /// `main`, `display`, `inputs`, `cursor`, ... (or the number).
    pub kind: String,
    pub connection_id: i64,
    /// The client's address and source port, as the server sees them.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for SpiceChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} from {}:{} (connection {})",
            self.kind, self.host, self.port, self.connection_id
        )
    }
}

/// SPICE_CHANNEL_* of spice-protocol's `enums.h`.
fn channel_name(t: i64) -> String {
    match t {
        1 => "main".into(),
        2 => "display".into(),
        3 => "inputs".into(),
        4 => "cursor".into(),
        5 => "playback".into(),
        6 => "record".into(),
        8 => "smartcard".into(),
        9 => "usbredir".into(),
        10 => "port".into(),
        11 => "webdav".into(),
        n => n.to_string(),
    }
}

/// A QMP connection: one JSON object per line.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> std::io::Result<Self> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut q = Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(std::io::Error::other(format!(
                "no QMP greeting: {greeting}"
            )));
        }
        q.execute("qmp_capabilities")?;
        Ok(q)
    }

    fn read(&mut self) -> std::io::Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("QMP closed"));
        }
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// Sends a command and returns its `return` value (events are skipped).
    fn execute(&mut self, cmd: &str) -> std::io::Result<serde_json::Value> {
        writeln!(self.writer, "{}", serde_json::json!({ "execute": cmd }))?;
        loop {
            let mut v = self.read()?;
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("QMP {cmd}: {e}")));
            }
        }
    }
}

/// `qemu-system-x86_64` with no disk (the firmware screen is the display),
/// a QXL card, Spice on a fresh 127.0.0.1 port without a password, and
/// QMP on a Unix socket. Drop stops it and removes its directory.
pub struct Qemu {
    port: u16,
    name: String,
    qmp: Qmp,
    proc: Proc,
    /// Holds the QMP socket; removed after QEMU is gone.
    _dir: TempDir,
}

impl Qemu {
    /// Starts QEMU for the VM `name`. The port is one the kernel just
    /// handed out as free; should another program take it in between,
    /// QEMU fails to listen and a new port is tried.
    pub fn start(name: &str) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(name) {
                Ok(q) => return q,
                Err(e) => {
                    eprintln!("[spice] QEMU did not start: {e}");
                    last = e;
                }
            }
        }
        panic!("QEMU with Spice did not start in 5 tries; last: {last}");
    }

    fn try_start(name: &str) -> Result<Self, String> {
        let port = free_loopback_port();
        let dir = temp_dir("qemu");
        let qmp_path = dir.path().join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", name, "-machine"])
            .arg(format!("accel={}", accel()))
            .args([
                "-m",
                "64",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-vga",
                "qxl",
                "-spice",
            ])
            .arg(format!("port={port},addr=127.0.0.1,disable-ticketing=on"))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        let mut proc = Proc::spawn(cmd, "qemu");
        let mut qmp = None;
        let ready = crate::wait_until(Duration::from_secs(20), || {
            if proc.exited().is_some() {
                return true;
            }
            qmp = Qmp::connect(&qmp_path).ok();
            qmp.is_some()
        });
        let Some(qmp) = qmp else {
            let why = match proc.exited() {
                Some(st) => format!("exited {st}"),
                None if ready => "no QMP".into(),
                None => "no QMP socket within 20 s".into(),
            };
            return Err(format!("{why}; output:\n{}", proc.lines().join("\n")));
        };
        let mut q = Self {
            port,
            name: name.to_owned(),
            qmp,
            proc,
            _dir: dir,
        };
        let info = q
            .qmp
            .execute("query-spice")
            .map_err(|e| format!("query-spice: {e}"))?;
        if info["enabled"] != true || info["port"] != port {
            return Err(format!("Spice is not listening on port {port}: {info}"));
        }
        eprintln!(
            "[spice] QEMU {} (pid {}) serves Spice on 127.0.0.1:{port}, spice-server {}",
            q.name,
            q.proc.pid(),
            info["compiled-version"]
        );
        Ok(q)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn uri(&self) -> String {
        format!("spice://127.0.0.1:{}", self.port)
    }

    /// The channels `query-spice` lists now.
    pub fn channels(&mut self) -> Vec<SpiceChannel> {
        let info = self
            .qmp
            .execute("query-spice")
            .unwrap_or_else(|e| panic!("query-spice on {}: {e}", self.name));
        info["channels"]
            .as_array()
            .unwrap_or_else(|| panic!("query-spice has no channel list: {info}"))
            .iter()
            .map(|c| SpiceChannel {
                kind: channel_name(c["channel-type"].as_i64().unwrap_or(-1)),
                connection_id: c["connection-id"].as_i64().unwrap_or(0),
                host: c["host"].as_str().unwrap_or("?").to_owned(),
                // QMP gives the port as a string.
                port: c["port"]
                    .as_str()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("channel without a port: {c}")),
            })
            .collect()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Asking nicely lets QEMU close its sockets; Proc's Drop kills it
        // if it does not go.
        if self.proc.exited().is_none() {
            let _ = self.qmp.execute("quit");
            self.proc.reap(Duration::from_secs(5));
        }
        self.proc.stop();
    }
}

/// KVM when this machine has it, else the TCG emulator (slower, but the
/// firmware screen needs little).
fn accel() -> &'static str {
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm { "kvm:tcg" } else { "tcg" }
}

fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 for a free port")
}

// ------------------------------------------------------------------- X11

/// `Xvfb` on the first free display, Unix socket only, with an
/// MIT-MAGIC-COOKIE (so only the test's clients may draw), its frame buffer
/// in a file for screenshots (`-fbdir`). Drop stops it, which also removes
/// its socket and lock file.
pub struct Xvfb {
    display: String,
    cookie: Vec<u8>,
    proc: Proc,
    dir: TempDir,
}

impl Xvfb {
    pub fn start() -> Self {
        let dir = temp_dir("xvfb");
        let cookie = random_bytes(16);
        let auth = dir.path().join("auth");
        fs::write(&auth, xauthority(&cookie)).expect("writing the Xvfb auth file");
        let fb = dir.path().join("fb");
        fs::create_dir(&fb).expect("creating the frame buffer directory");
        let mut cmd = Command::new("Xvfb");
        // -displayfd 1: Xvfb picks a free display and prints its number.
        cmd.args(["-displayfd", "1", "-nolisten", "tcp", "-auth"])
            .arg(&auth)
            .arg("-fbdir")
            .arg(&fb)
            .args(["-screen", "0", "1024x768x24"]);
        let mut proc = Proc::spawn(cmd, "Xvfb");
        let mut display = None;
        crate::wait_until(Duration::from_secs(20), || {
            display = proc
                .lines()
                .iter()
                .find(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
                .cloned();
            display.is_some() || proc.exited().is_some()
        });
        let Some(n) = display else {
            panic!(
                "Xvfb did not report a display (exit {:?}); output:\n{}",
                proc.exited(),
                proc.lines().join("\n")
            );
        };
        eprintln!("[spice] Xvfb pid {} on :{n}", proc.pid());
        Self {
            display: format!(":{n}"),
            cookie,
            proc,
            dir,
        }
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    /// The screen now, as a PNG file at `to`.
    pub fn screenshot(&self, to: &Path) {
        let xwd = fs::read(self.dir.path().join("fb/Xvfb_screen0"))
            .expect("reading Xvfb's frame buffer file");
        let (w, h, rgb) = xwd_to_rgb(&xwd);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        }
        fs::write(to, png(w, h, &rgb)).unwrap_or_else(|e| panic!("writing {}: {e}", to.display()));
        eprintln!("[spice] screenshot {}", to.display());
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        self.proc.stop();
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf
}

/// One Xauthority entry for every display (FamilyWild, no address, no
/// display number), as libXau reads it.
fn xauthority(cookie: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    let mut field = |b: &[u8]| {
        v.extend_from_slice(&(b.len() as u16).to_be_bytes());
        v.extend_from_slice(b);
    };
    field(&[]); // placeholder, replaced by the family below
    field(&[]);
    field(&[]);
    field(b"MIT-MAGIC-COOKIE-1");
    field(cookie);
    // The family is a bare u16, not a counted string.
    v[..2].copy_from_slice(&0xffffu16.to_be_bytes());
    v
}

/// An XWD image (what Xvfb's `-fbdir` file holds) as 8-bit RGB.
fn xwd_to_rgb(x: &[u8]) -> (u32, u32, Vec<u8>) {
    let be = |i: usize| u32::from_be_bytes([x[i * 4], x[i * 4 + 1], x[i * 4 + 2], x[i * 4 + 3]]);
    assert!(x.len() >= 100, "XWD file shorter than its header");
    let (header, version, format) = (be(0) as usize, be(1), be(2));
    assert!(version == 7 && format == 2, "not a ZPixmap XWD v7 file");
    let (w, h) = (be(4), be(5));
    let lsb = be(7) == 0;
    let bpp = be(11);
    let stride = be(12) as usize;
    let masks = [be(14), be(15), be(16)];
    let ncolors = be(19) as usize;
    assert_eq!(bpp, 32, "only 32 bits per pixel frame buffers are read");
    let data = &x[header + ncolors * 12..];
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h as usize {
        for px in 0..w as usize {
            let o = y * stride + px * 4;
            let b = [data[o], data[o + 1], data[o + 2], data[o + 3]];
            let p = if lsb {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            };
            for m in masks {
                let v = (p & m) >> m.trailing_zeros();
                let max = m >> m.trailing_zeros();
                rgb.push((u64::from(v) * 255 / u64::from(max.max(1))) as u8);
            }
        }
    }
    (w, h, rgb)
}

/// A PNG of 8-bit RGB pixels, deflate "stored" blocks (no compression: an
/// artifact needs no encoder crate).
fn png(w: u32, h: u32, rgb: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut raw = Vec::with_capacity(rgb.len() + h as usize);
    for row in rgb.chunks(w as usize * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------- client

/// A home directory (and XDG runtime dir) owned by one test user, with the
/// X cookie, for a GUI program running as that user. Drop removes it.
pub struct UserHome {
    dir: TempDir,
}

impl UserHome {
    pub fn new(user: &TestUser, x: &Xvfb) -> Self {
        let dir = temp_dir(&format!("home-{}", user.name));
        let owner = (Some(Uid::from_raw(user.uid)), Some(Gid::from_raw(user.gid)));
        let auth = dir.path().join(".Xauthority");
        fs::write(&auth, xauthority(&x.cookie)).expect("writing the user's Xauthority");
        for p in [dir.path(), auth.as_path()] {
            chown(p, owner.0, owner.1).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .expect("chmod 700 of the user's home");
        fs::set_permissions(&auth, fs::Permissions::from_mode(0o600))
            .expect("chmod 600 of the user's Xauthority");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// `remote-viewer URI` running as a test user inside a test cgroup, on an
/// Xvfb display. The pid is remote-viewer's own: the wrapper shell joins
/// the cgroup and `exec`s setpriv, which `exec`s the client. Drop stops it.
pub struct SpiceClient {
    proc: Proc,
    pub who: String,
}

impl SpiceClient {
    pub fn start(cg: &TestCgroup, user: &TestUser, home: &UserHome, x: &Xvfb, uri: &str) -> Self {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo $$ > "$1" && shift && exec "$@""#, "sh"])
            .arg(cg.path().join("cgroup.procs"))
            .args(["setpriv", "--reuid"])
            .arg(user.uid.to_string())
            .arg("--regid")
            .arg(user.gid.to_string())
            .args([
                "--clear-groups",
                "--",
                "remote-viewer",
                "--debug",
                "--full-screen",
                uri,
            ])
            // What a desktop session would give it, minus the session bus
            // and accessibility bus (not needed, and not there).
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home.path())
            .env("XDG_RUNTIME_DIR", home.path())
            .env("XAUTHORITY", home.path().join(".Xauthority"))
            .env("DISPLAY", x.display())
            .env("GDK_BACKEND", "x11")
            .env("NO_AT_BRIDGE", "1")
            .env("GSETTINGS_BACKEND", "memory")
            .env("DBUS_SESSION_BUS_ADDRESS", "disabled:")
            .env("LANG", "C.UTF-8");
        let mut proc = Proc::spawn(cmd, &format!("remote-viewer as {}", user.name));
        // A client killed at once (no display, bad cookie) must not be
        // mistaken for a refused one.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(st) = proc.exited() {
            panic!(
                "remote-viewer as {} exited at once ({st}); output:\n{}",
                user.name,
                proc.lines().join("\n")
            );
        }
        Self {
            proc,
            who: user.name.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn output(&self) -> Vec<String> {
        self.proc.lines()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// The names of its threads now (`/proc/PID/task/*/comm`), which is
    /// what the kernel reports as `comm` for a connect made by that thread.
    pub fn thread_names(&self) -> Vec<String> {
        let task = PathBuf::from(format!("/proc/{}/task", self.pid()));
        let mut names: Vec<String> = fs::read_dir(task)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| fs::read_to_string(e.path().join("comm")).ok())
                    .map(|s| s.trim_end().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    }
}

// ------------------------------------------------------------ TCP sockets

/// One TCP socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// `01` is ESTABLISHED.
    pub state: String,
    /// The socket's owner: the uid that created it.
    pub uid: u32,
}

/// Every TCP socket of this network namespace.
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 8 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(l), Some(r), Ok(uid)) = (port(cols[1]), port(cols[2]), cols[7].parse()) {
                out.push(TcpSocket {
                    local_port: l,
                    remote_port: r,
                    state: cols[3].to_owned(),
                    uid,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{crc32, xauthority};

    #[test]
    fn crc32_of_a_known_string() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn xauthority_entry_layout() {
        let v = xauthority(&[7; 16]);
        assert_eq!(&v[..6], &[0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(&v[6..8], &[0, 18]);
        assert_eq!(&v[8..26], b"MIT-MAGIC-COOKIE-1");
        assert_eq!(&v[26..28], &[0, 16]);
        assert_eq!(v.len(), 44);
    }
}
