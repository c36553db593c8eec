//! A desktop session for one test user, as far as desktop notifications
//! need one: an X server (Xvfb), a session D-Bus daemon and a real
//! notification daemon (dunst), each running as that user, the way a
//! logged-in user's session runs them. Notifications are read back from
//! dunst itself (`dunstctl history`), not observed on the bus.
//!
//! The bus has its own configuration: only this user may connect and
//! nothing is activated on demand, so no process outside these guards is
//! ever started. Drop stops dunst, the bus and the X server, and removes
//! the session directory.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::unistd::{Gid, Uid, chown};
use spicegate_testkit::{TempDir, proc::Proc};

use crate::TestUser;

/// How long each piece may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A background process started by a test. Drop (the kit's [`Proc`])
/// sends SIGTERM (SIGKILL after 5 s) and reaps it; it never panics.
#[derive(Debug)]
pub struct Background(Proc);

impl Background {
    pub fn spawn(mut cmd: Command, what: &str) -> Self {
        let proc = Proc::spawn(&mut cmd, what).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("[harness] started {what} as pid {}: {cmd:?}", proc.pid());
        Self(proc)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Its exit status, if it has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.0.exited()
    }

    /// Panics unless it still runs.
    pub fn expect_running(&mut self) {
        if let Some(st) = self.exited() {
            panic!("{} (pid {}) exited with {st}", self.0.what(), self.pid());
        }
    }

    fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.child().stdout.take()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: i64,
    pub app: String,
    pub summary: String,
    pub body: String,
}

/// Xvfb, a session bus and dunst, all running as one user. Fields drop in
/// order: dunst first, then the bus, the X server, the directory.
#[derive(Debug)]
pub struct DesktopSession {
    dunst: Background,
    bus: Background,
    x: Background,
    address: String,
    display: String,
    uid: u32,
    gid: u32,
    dir: TempDir,
}

const BUS_CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=@DIR@/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#;

/// Every notification stays until it is closed (then it goes to the
/// history, where the test reads it), none is merged with an identical one,
/// and none waits for a free slot on screen.
const DUNSTRC: &str = "[global]
    stack_duplicates = false
    history_length = 200
    notification_limit = 0
    idle_threshold = 0
[urgency_low]
    timeout = 0
[urgency_normal]
    timeout = 0
[urgency_critical]
    timeout = 0
";

impl DesktopSession {
    /// Starts Xvfb, the session bus and dunst as `user`, and waits until
    /// dunst owns org.freedesktop.Notifications.
    pub fn start(user: &TestUser) -> Self {
        let dir =
            TempDir::unique("spicegate-desktop").unwrap_or_else(|e| panic!("the session dir: {e}"));
        let path = dir.path().to_owned();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        chown(
            &path,
            Some(Uid::from_raw(user.uid)),
            Some(Gid::from_raw(user.gid)),
        )
        .unwrap_or_else(|e| panic!("chown {} to {}: {e}", path.display(), user.name));
        let bus_conf = path.join("bus.conf");
        fs::write(
            &bus_conf,
            BUS_CONFIG.replace("@DIR@", &path.display().to_string()),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", bus_conf.display()));
        let dunstrc = path.join("dunstrc");
        fs::write(&dunstrc, DUNSTRC)
            .unwrap_or_else(|e| panic!("writing {}: {e}", dunstrc.display()));
        let log = |name: &str| {
            let p = path.join(name);
            let f =
                fs::File::create(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
            let _ = chown(
                &p,
                Some(Uid::from_raw(user.uid)),
                Some(Gid::from_raw(user.gid)),
            );
            Stdio::from(f)
        };
        let base = |program: &str| {
            let mut c = as_user(user.uid, user.gid, program);
            c.env("HOME", &path)
                .env_remove("XDG_RUNTIME_DIR")
                .env_remove("DISPLAY")
                .env_remove("DBUS_SESSION_BUS_ADDRESS")
                .stdin(Stdio::null());
            c
        };

        // -displayfd: Xvfb picks a free display and says which.
        let mut cmd = base("Xvfb");
        cmd.args([
            "-displayfd",
            "1",
            "-nolisten",
            "tcp",
            "-screen",
            "0",
            "800x600x24",
        ])
        .stdout(Stdio::piped())
        .stderr(log("xvfb.log"));
        let mut x = Background::spawn(cmd, "Xvfb");
        let display = format!(":{}", first_line(&mut x, "Xvfb -displayfd"));

        let mut cmd = base("dbus-daemon");
        cmd.arg(format!("--config-file={}", bus_conf.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(log("dbus.log"));
        let mut bus = Background::spawn(cmd, "dbus-daemon (session bus)");
        let address = first_line(&mut bus, "dbus-daemon --print-address");

        let mut cmd = base("dunst");
        cmd.arg("-config")
            .arg(&dunstrc)
            .env("DISPLAY", &display)
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .stdout(log("dunst.log"))
            .stderr(log("dunst.err"));
        let dunst = Background::spawn(cmd, "dunst");

        let mut s = Self {
            dunst,
            bus,
            x,
            address,
            display,
            uid: user.uid,
            gid: user.gid,
            dir,
        };
        let up = crate::wait_until(START_TIMEOUT, || {
            s.command("busctl")
                .args([
                    "--user",
                    "call",
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "GetNameOwner",
                    "s",
                    "org.freedesktop.Notifications",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !up {
            s.dunst.expect_running();
            panic!(
                "dunst did not take org.freedesktop.Notifications within {START_TIMEOUT:?}; its log: {}",
                s.log("dunst.err")
            );
        }
        eprintln!(
            "[harness] desktop session of {}: DISPLAY={} DBUS_SESSION_BUS_ADDRESS={}",
            user.name, s.display, s.address
        );
        s
    }

    /// DBUS_SESSION_BUS_ADDRESS of this session.
    pub fn bus_address(&self) -> &str {
        &self.address
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    /// `program` as this session's user, with the session's environment.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut c = as_user(self.uid, self.gid, program);
        c.env("HOME", self.dir.path())
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::null());
        c
    }

    /// Adds this session's environment to a command that already runs as
    /// the user (such as one from [`crate::spicegate_cmd`]).
    pub fn enter(&self, cmd: &mut Command) {
        cmd.env("HOME", self.dir.path())
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env_remove("XDG_RUNTIME_DIR");
    }

    /// Every notification dunst received so far, oldest first. Closes the
    /// ones on screen first, which moves them to dunst's history.
    pub fn notifications(&mut self) -> Vec<Notification> {
        self.dunst.expect_running();
        self.dunstctl(&["close-all"]);
        let text = self.dunstctl(&["history"]);
        let doc: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("`dunstctl history` is not JSON ({e}): {text}"));
        let field = |n: &serde_json::Value, k: &str| n[k]["data"].clone();
        let mut out: Vec<Notification> = doc["data"][0]
            .as_array()
            .unwrap_or_else(|| panic!("`dunstctl history` has no list: {text}"))
            .iter()
            .map(|n| Notification {
                id: field(n, "id").as_i64().unwrap_or(-1),
                app: field(n, "appname").as_str().unwrap_or_default().to_owned(),
                summary: field(n, "summary").as_str().unwrap_or_default().to_owned(),
                body: field(n, "body").as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        out.sort_by_key(|n| n.id);
        out
    }

    fn dunstctl(&self, args: &[&str]) -> String {
        let out = self
            .command("dunstctl")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running dunstctl {args:?}: {e}"));
        assert!(
            out.status.success(),
            "dunstctl {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One of the session's log files (for failure messages).
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The pids of the session's processes.
    pub fn pids(&self) -> [u32; 3] {
        [self.x.pid(), self.bus.pid(), self.dunst.pid()]
    }
}

/// `setpriv` to `uid`/`gid` with no supplementary groups, then `program`.
fn as_user(uid: u32, gid: u32, program: impl AsRef<Path>) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &uid.to_string(),
        "--regid",
        &gid.to_string(),
        "--clear-groups",
        "--",
    ])
    .arg(program.as_ref());
    c
}

/// The first line a freshly started process prints on stdout; the rest is
/// drained on a thread so the process never blocks on a full pipe.
fn first_line(p: &mut Background, what: &str) -> String {
    let out = p.take_stdout().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(l) if !l.trim().is_empty() => l.trim().to_owned(),
        other => {
            let status = p.exited();
            panic!(
                "{what}: no first line within {START_TIMEOUT:?} (got {other:?}, exit {status:?})"
            )
        }
    }
}
