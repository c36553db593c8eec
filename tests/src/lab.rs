//! The fixture of the root integration tests: one enforcing daemon on its
//! own child cgroup, pin dir (with its control socket and state dir) and
//! policy (a [`PolicyFile`], or a [`PolicyDir`] with `policy.d` and a test
//! clock), plus the probes, CLI calls and checks the tests make against it.
//!
//! ```ignore
//! const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");
//! let lab = Lab::start(PROBE, &vm("v", port, &[&alice.name]));
//! lab.expect(&alice, port, Allowed);
//! let lab = Lab::builder(PROBE).arg("--logind-bus").arg(addr).start(&policy);
//! let lab = Lab::builder(PROBE).test_clock().start_dir(PolicyDir::new(&policy));
//! ```
//!
//! The probe binary is passed in because only integration tests know it
//! (`CARGO_BIN_EXE_sg-probe`). Users and listeners are made by the tests
//! before the lab, so they outlive it.

use std::{
    ffi::{OsStr, OsString},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    CliOutput, Daemon, HeldConnection, Listener, Outcome, PinDir, PolicyDir, PolicyFile, Probe,
    TestCgroup, TestUser, ctl_as, require_root, wait_until,
};

/// Where a lab's policy lives: the file `spicegate run --policy` reads.
pub trait PolicySource {
    /// The main policy file.
    fn main_path(&self) -> PathBuf;

    /// Replaces the main policy file's contents.
    fn rewrite(&self, contents: &str) {
        let p = self.main_path();
        std::fs::write(&p, contents)
            .unwrap_or_else(|e| panic!("rewriting policy {}: {e}", p.display()));
    }
}

impl PolicySource for PolicyFile {
    fn main_path(&self) -> PathBuf {
        self.path().to_owned()
    }

    fn rewrite(&self, contents: &str) {
        PolicyFile::rewrite(self, contents);
    }
}

impl PolicySource for PolicyDir {
    fn main_path(&self) -> PathBuf {
        self.main()
    }
}

/// How a [`Lab`] starts its daemon: extra `spicegate run` arguments, the
/// test clock, a network namespace.
#[derive(Debug, Clone)]
#[must_use]
pub struct LabBuilder {
    probe: PathBuf,
    args: Vec<OsString>,
    test_clock: bool,
    netns: Option<String>,
    no_daemon: bool,
}

impl LabBuilder {
    /// One more `spicegate run` argument (`--logind-bus`, `--addr-interval`...).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// `--clock-offset-file` of the [`PolicyDir`] (only with [`Self::start_dir`]).
    pub fn test_clock(mut self) -> Self {
        self.test_clock = true;
        self
    }

    /// The daemon runs in network namespace `ns` (`nsenter --net`).
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// Makes the cgroup, pin dir and policy but starts no daemon, for a
    /// test that prepares the state dir first: it calls
    /// [`Lab::start_daemon`].
    pub fn without_daemon(mut self) -> Self {
        self.no_daemon = true;
        self
    }

    /// Writes `policy` to a [`PolicyFile`] and starts the daemon on it
    /// (unless [`Self::without_daemon`]).
    pub fn start(self, policy: &str) -> Lab<PolicyFile> {
        require_root();
        assert!(!self.test_clock, "the test clock needs a PolicyDir");
        eprintln!("[test] policy:\n{}", abbreviate(policy));
        self.start_on(PolicyFile::new(policy))
    }

    /// Starts the daemon on the main file of `dir` (unless
    /// [`Self::without_daemon`]).
    pub fn start_dir(mut self, dir: PolicyDir) -> Lab<PolicyDir> {
        require_root();
        if self.test_clock {
            let clock = dir.clock();
            self.args
                .splice(0..0, [OsString::from("--clock-offset-file"), clock.into()]);
        }
        self.start_on(dir)
    }

    fn start_on<P: PolicySource>(self, policy: P) -> Lab<P> {
        let cg = TestCgroup::new();
        let pin = PinDir::new();
        let start = !self.no_daemon;
        let mut lab = Lab {
            daemon: None,
            pin,
            cg,
            policy,
            opts: self,
        };
        if start {
            lab.start_daemon();
        }
        lab
    }
}

/// One enforcing daemon and what it owns. Field order is drop order: the
/// daemon stops, then the pins are unloaded (and the socket and state dir
/// removed), then the cgroup is emptied and removed, then the policy goes.
pub struct Lab<P: PolicySource = PolicyFile> {
    pub daemon: Option<Daemon>,
    pub pin: PinDir,
    pub cg: TestCgroup,
    pub policy: P,
    opts: LabBuilder,
}

impl Lab<PolicyFile> {
    /// A lab on `policy` with the default daemon options.
    pub fn start(probe: &str, policy: &str) -> Self {
        Self::builder(probe).start(policy)
    }

    /// Options first; `probe` is `env!("CARGO_BIN_EXE_sg-probe")`.
    pub fn builder(probe: &str) -> LabBuilder {
        LabBuilder {
            probe: probe.into(),
            args: Vec::new(),
            test_clock: false,
            netns: None,
            no_daemon: false,
        }
    }
}

impl<P: PolicySource> Lab<P> {
    // ---- the daemon ------------------------------------------------------

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the lab's daemon is running")
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the lab's daemon is running")
    }

    /// SIGTERM and wait; the daemon must exit cleanly.
    pub fn stop(&mut self) {
        let mut d = self.daemon.take().expect("the lab's daemon is running");
        let st = d.stop();
        assert!(st.success(), "spicegate run exited with {st} on SIGTERM");
    }

    /// SIGKILL and reap: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        let mut d = self.daemon.take().expect("the lab's daemon is running");
        d.kill9();
    }

    /// Starts a daemon (the builder's options) on the lab's policy, cgroup,
    /// pin dir and state dir, and waits until it enforces; none may be
    /// running.
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "stop the daemon first");
        let policy = self.policy.main_path();
        let args: Vec<&OsStr> = self.opts.args.iter().map(OsString::as_os_str).collect();
        let cg = Some(self.cg.path());
        self.daemon = Some(match &self.opts.netns {
            Some(ns) => Daemon::start_in_netns(&policy, cg, &self.pin, ns, &args),
            None => Daemon::start_with(&policy, cg, &self.pin, &args),
        });
    }

    /// [`Self::stop`], then [`Self::start_daemon`]: the same pins and state.
    pub fn restart(&mut self) {
        self.stop();
        self.start_daemon();
    }

    /// The main policy file's path, as the daemon prints it.
    pub fn path(&self) -> String {
        self.policy.main_path().display().to_string()
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        self.daemon().lines().join("\n")
    }

    /// The daemon's log lines that `pred` accepts.
    pub fn log_lines(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.daemon()
            .lines()
            .into_iter()
            .filter(|l| pred(l))
            .collect()
    }

    pub fn has_log(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.daemon().lines().iter().any(|l| pred(l))
    }

    /// Waits for a log line `pred` accepts; panics with the log after
    /// `timeout`. `what` names the line for the message.
    pub fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        let ok = wait_until(timeout, || {
            found = self.daemon().lines().into_iter().find(|l| pred(l));
            found.is_some()
        });
        match found {
            Some(l) if ok => l,
            _ => panic!(
                "the daemon logged no line with {what} within {timeout:?}; its log:\n{}",
                self.log()
            ),
        }
    }

    // ---- the CLI ---------------------------------------------------------

    /// `spicegate --socket <ours> <args>` as root.
    pub fn ctl(&self, args: &[&str]) -> CliOutput {
        CliOutput::new(self.pin.ctl(args), args)
    }

    /// Like [`Self::ctl`], panicking unless it exits 0.
    pub fn ctl_ok(&self, args: &[&str]) -> CliOutput {
        let out = self.ctl(args);
        assert_eq!(out.code, Some(0), "spicegate {args:?} failed:\n{out}");
        out
    }

    /// `spicegate --socket <ours> <args>` as `user` (no supplementary groups).
    pub fn ctl_as(&self, user: &TestUser, args: &[&str]) -> CliOutput {
        ctl_as(&self.pin, user, args)
    }

    /// Like [`Self::ctl_as`], panicking unless it exits 0.
    pub fn ctl_ok_as(&self, user: &TestUser, args: &[&str]) -> CliOutput {
        let out = self.ctl_as(user, args);
        assert_eq!(out.code, Some(0), "as {}: {out}", user.name);
        out
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.ctl_ok(&["status", "--json"]);
        parse_json(&out, "status --json")
    }

    /// `list --json` as `user`, parsed.
    pub fn list_json(&self, user: &TestUser) -> Value {
        let out = self.ctl_ok_as(user, &["list", "--json"]);
        parse_json(&out, &format!("`list --json` as {}", user.name))
    }

    /// `spicegate why USER DST` as root: whether it allows, and the answer.
    pub fn why(&self, who: &TestUser, dst: &str) -> (bool, String) {
        let out = self.ctl(&["why", who.name.as_str(), dst]);
        (out.code == Some(0), out.stdout.trim().to_owned())
    }

    /// Rewrites the main policy file and reloads it, which must succeed.
    pub fn reload_to(&self, policy: &str) -> CliOutput {
        eprintln!("[test] new policy:\n{}", abbreviate(policy));
        self.policy.rewrite(policy);
        self.ctl_ok(&["reload"])
    }

    // ---- connects --------------------------------------------------------

    /// A probe inside this lab's cgroup.
    pub fn probe(&self) -> Probe {
        Probe::new(&self.opts.probe).cgroup(&self.cg)
    }

    pub fn outcome_at(&self, who: &TestUser, dst: &str) -> Outcome {
        self.probe().as_user(who).connect(dst).outcome()
    }

    /// `who`'s connect to 127.0.0.1:`port`.
    pub fn outcome(&self, who: &TestUser, port: u16) -> Outcome {
        self.outcome_at(who, &v4(port))
    }

    /// Panics (with the daemon's log) unless `who` gets `want` at `dst`.
    pub fn expect_at(&self, who: &TestUser, dst: &str, want: Outcome) {
        let got = self.outcome_at(who, dst);
        assert_eq!(
            got,
            want,
            "{} (uid {}) -> {dst}: expected {want}, got {got}; daemon log:\n{}",
            who.name,
            who.uid,
            self.log()
        );
    }

    /// [`Self::expect_at`] 127.0.0.1:`port`.
    pub fn expect(&self, who: &TestUser, port: u16, want: Outcome) {
        self.expect_at(who, &v4(port), want);
    }

    /// Panics unless every (user, outcome) holds on 127.0.0.1:`port`,
    /// naming all that do not; `when` says at which point of the test.
    pub fn expect_all(&self, port: u16, want: &[(&TestUser, Outcome)], when: &str) {
        let wrong: Vec<String> = want
            .iter()
            .filter_map(|(u, w)| {
                let got = self.outcome(u, port);
                (got != *w).then(|| format!("{} (uid {}): expected {w}, got {got}", u.name, u.uid))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{when}: wrong decisions on 127.0.0.1:{port}:\n  {}",
            wrong.join("\n  ")
        );
    }

    /// `n` connects of `who` to 127.0.0.1:`port`, 30 ms apart, each of
    /// which must be refused; returns once the daemon has logged the first.
    pub fn deny(&self, who: &TestUser, port: u16, n: u32) -> Instant {
        let r = self
            .probe()
            .as_user(who)
            .connect(v4(port))
            .count(n)
            .interval_ms(30)
            .run();
        assert!(
            r.outcomes.len() == n as usize && r.outcomes.iter().all(|o| *o == Outcome::Denied),
            "{} -> 127.0.0.1:{port} x{n}: expected all denied, got {:?}",
            who.name,
            r.outcomes
        );
        let pid = r.pid;
        self.daemon().wait_for_deny(
            &format!("{}'s DENY line on port {port}", who.name),
            |d| d.uid == who.uid && d.pid == pid,
            Duration::from_secs(5),
        );
        Instant::now()
    }

    /// Holds an established connection of `who` to 127.0.0.1:`port`.
    pub fn hold(&self, who: &TestUser, port: u16) -> HeldConnection {
        self.probe().as_user(who).connect(v4(port)).hold(60)
    }

    /// Probes `who` again and again across `edge`: every attempt that ended
    /// before it must get `before` (and there must be some), and `after`
    /// must come within `limit` of it. Returns how long after the edge.
    pub fn across_edge(
        &self,
        who: &TestUser,
        port: u16,
        edge: Instant,
        (before, after): (Outcome, Outcome),
        limit: Duration,
    ) -> Duration {
        let mut seen_before = 0;
        loop {
            let got = self.outcome(who, port);
            let ended = Instant::now();
            if ended < edge {
                assert_eq!(
                    got,
                    before,
                    "{} -> port {port}: {got} {:?} BEFORE the edge; daemon log:\n{}",
                    who.name,
                    edge - ended,
                    self.log()
                );
                seen_before += 1;
            } else if got == after {
                let late = ended - edge;
                assert!(
                    seen_before > 0,
                    "{}: no attempt ended before the edge (the test set the clock too late)",
                    who.name
                );
                eprintln!(
                    "[test] {} -> port {port}: {before} before the edge ({seen_before} attempts), {after} {late:?} after it",
                    who.name
                );
                assert!(
                    late <= limit,
                    "{} -> port {port}: {after} only {late:?} after the edge (limit {limit:?}); daemon log:\n{}",
                    who.name,
                    self.log()
                );
                return late;
            } else {
                assert!(
                    ended - edge <= limit,
                    "{} -> port {port}: still {got} {:?} after the edge (expected {after} within {limit:?}); daemon log:\n{}",
                    who.name,
                    ended - edge,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `who` gets `want` at `dst`; returns how long that took.
    pub fn becomes_at(
        &self,
        who: &TestUser,
        dst: &str,
        want: Outcome,
        within: Duration,
    ) -> Duration {
        let start = Instant::now();
        let mut last = None;
        let held = wait_until(within, || {
            let got = self.outcome_at(who, dst);
            last = Some(got);
            got == want
        });
        assert!(
            held,
            "{} (uid {}) -> {dst} did not become {want} within {within:?} (last: {last:?}); daemon log:\n{}",
            who.name,
            who.uid,
            self.log()
        );
        let took = start.elapsed();
        eprintln!("[test] {} -> {dst}: {want} after {took:?}", who.name);
        took
    }

    /// [`Self::becomes_at`] 127.0.0.1:`port`.
    pub fn becomes(&self, who: &TestUser, port: u16, want: Outcome, within: Duration) -> Duration {
        self.becomes_at(who, &v4(port), want, within)
    }
}

/// The common scene: a granted user (alice), an ungranted one (dave), a
/// dual-stack listener and a lab that grants alice its port as the
/// localhost VM `winlab`. Bind them in this order so the lab goes first.
pub fn winlab(probe: &str) -> (TestUser, TestUser, Listener, Lab) {
    winlab_granting(probe, &[])
}

/// [`winlab`], with `also` (say `"root"`) granted besides alice.
pub fn winlab_granting(probe: &str, also: &[&str]) -> (TestUser, TestUser, Listener, Lab) {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::dual_stack();
    let mut allow = vec![alice.name.as_str()];
    allow.extend_from_slice(also);
    let lab = Lab::start(probe, &vm("winlab", l.port(), &allow));
    (alice, dave, l, lab)
}

fn parse_json(out: &CliOutput, what: &str) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} is not JSON ({e}):\n{}", out.stdout))
}

// ---- policy text ------------------------------------------------------------

/// `127.0.0.1:port`.
pub fn v4(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// `[::1]:port`.
pub fn v6(port: u16) -> String {
    format!("[::1]:{port}")
}

/// `["a", "b"]`.
pub fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// `[vms.<name>]` on localhost guarding `port`, granting `allow`.
pub fn vm(name: &str, port: u16, allow: &[&str]) -> String {
    format!(
        "[vms.{name}]\nserver = \"localhost\"\nports = [{port}]\nallow = {}\n",
        toml_list(allow)
    )
}

/// Long generated policies are shown by their head only, and long lines
/// (allow lists of thousands) by their start.
pub fn abbreviate(policy: &str) -> String {
    let lines: Vec<String> = policy
        .lines()
        .map(|l| match l.char_indices().nth(200) {
            Some((cut, _)) => format!("{}... ({} more bytes)", &l[..cut], l.len() - cut),
            None => l.to_owned(),
        })
        .collect();
    if lines.len() <= 40 {
        return lines.join("\n");
    }
    format!(
        "{}\n... ({} more lines)",
        lines[..30].join("\n"),
        lines.len() - 30
    )
}

/// Whether `text` holds `FILE:LINE:COL` for `file` and `line` (any column).
pub fn has_file_line_col(text: &str, file: &str, line: usize) -> bool {
    let prefix = format!("{file}:{line}:");
    text.match_indices(&prefix).any(|(at, _)| {
        let rest = &text[at + prefix.len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    })
}

/// Lossy UTF-8 of a process's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn abbreviate_keeps_short_policies_and_cuts_long_ones() {
        assert_eq!(
            super::abbreviate("[vms.v]\nports = [1]\n"),
            "[vms.v]\nports = [1]"
        );
        let long = "x".repeat(500);
        assert_eq!(
            super::abbreviate(&long),
            format!("{}... (300 more bytes)", "x".repeat(200))
        );
        let many = "a\n".repeat(50);
        assert!(super::abbreviate(&many).ends_with("... (20 more lines)"));
    }
}
