//! The daemon's clients as tests run them: the `spicegate` CLI through a
//! test's own control socket, as root or as a test user, to completion or
//! in the background (`events`), and raw clients of the socket.

use std::{
    fmt,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use spicegate_testkit::proc::{LineLog, Proc};

use crate::{PinDir, TestUser, spicegate_bin};

/// A finished CLI run: exit code and text, printable for failure messages.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    args: String,
}

impl CliOutput {
    pub fn new(out: Output, args: &[&str]) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            args: args.join(" "),
        }
    }

    /// Exited with a non-zero code (a signal is not a clean failure).
    pub fn failed(&self) -> bool {
        self.code.is_some_and(|c| c != 0)
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`spicegate {}` -> exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// `spicegate --socket <pin's socket>`, run as `as_user` when given: real
/// and effective ids changed with setpriv, supplementary groups cleared, as
/// a logged-in user would run it. Add the subcommand's arguments.
pub fn spicegate_cmd(pin: &PinDir, as_user: Option<&TestUser>) -> Command {
    let mut cmd = match as_user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &u.uid.to_string(),
                "--regid",
                &u.gid.to_string(),
                "--clear-groups",
            ])
            .arg(spicegate_bin());
            c
        }
        None => Command::new(spicegate_bin()),
    };
    cmd.arg("--socket")
        .arg(pin.socket())
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null());
    cmd
}

/// Runs `spicegate <args>` as `user` through `pin`'s socket, to completion.
pub fn ctl_as(pin: &PinDir, user: &TestUser, args: &[&str]) -> CliOutput {
    let out = spicegate_cmd(pin, Some(user))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running spicegate as {}: {e}", user.name));
    let out = CliOutput::new(out, args);
    eprintln!("[harness] as {}: {out}", user.name);
    out
}

/// A long-running CLI (`events`) whose stdout is collected line by line
/// (and echoed to the test's stderr). Drop kills and reaps it.
#[derive(Debug)]
pub struct CliStream {
    _proc: Proc,
    log: LineLog,
    what: String,
}

impl CliStream {
    pub fn spawn(mut cmd: Command, what: &str) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut proc = Proc::spawn(&mut cmd, what)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_grace(Duration::ZERO);
        let log = LineLog::of_child(proc.child(), Some(format!("[{what}]")), None);
        Self {
            _proc: proc,
            log,
            what: what.to_owned(),
        }
    }

    /// Every line so far, parsed as JSON (a line that is not fails the test).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.log
            .lines()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: line {l:?} is not JSON: {e}", self.what))
            })
            .collect()
    }

    /// Waits for a JSON line `pred` accepts; panics with what came instead.
    pub fn wait_json(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        crate::wait_until(timeout, || {
            found = self.json_lines().into_iter().find(|e| pred(e));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "{}: no line for {what} within {timeout:?}; got {:?}",
                self.what,
                self.json_lines()
            )
        })
    }
}

/// One raw client of a control socket: writes `payload`, half-closes when
/// asked, and returns everything the daemon answers before it closes (or
/// `timeout` passes).
pub fn raw_request(socket: &Path, payload: &[u8], half_close: bool, timeout: Duration) -> String {
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s.set_write_timeout(Some(timeout)).expect("write timeout");
    // The daemon may answer (and close) before taking a huge payload whole.
    let _ = s.write_all(payload);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
