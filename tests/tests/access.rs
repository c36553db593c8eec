//! Root integration tests of access over time and identity: schedules (with
//! a controllable clock), audit mode, policy.d, hostnames and group
//! membership that change under a running daemon.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use spicegate_tests::{
    Daemon, Listener, Outcome, PinDir, Probe, TestCgroup, TestGroup, TestUser, require_root,
    wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");
use Outcome::{Allowed, Denied};

/// A directory of its own for the policy (and its policy.d), removed on drop.
struct PolicyDir {
    dir: PathBuf,
}

impl PolicyDir {
    fn new(main: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sg-access-{}-{}",
            std::process::id(),
            spicegate_tests::next_id()
        ));
        std::fs::create_dir_all(dir.join("policy.d")).expect("policy dir");
        let d = Self { dir };
        d.write(main);
        d
    }
    fn main(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }
    fn write(&self, text: &str) {
        std::fs::write(self.main(), text).expect("writing the policy");
    }
    fn dropin(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join("policy.d").join(name), text).expect("writing a drop-in");
    }
    fn clock(&self) -> PathBuf {
        self.dir.join("clock-offset")
    }
    /// Makes the daemon's clock read `unix` now.
    fn set_clock(&self, unix: i64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        std::fs::write(self.clock(), (unix - now).to_string()).expect("clock offset");
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("[test] LEFTOVER {}: {e}", self.dir.display());
        }
    }
}

struct Lab {
    daemon: Option<Daemon>,
    pin: PinDir,
    cg: TestCgroup,
    policy: PolicyDir,
}

impl Lab {
    fn start(main: &str) -> Self {
        Self::start_with(PolicyDir::new(main))
    }
    fn start_with(policy: PolicyDir) -> Self {
        require_root();
        let cg = TestCgroup::new();
        let pin = PinDir::new();
        let clock = policy.clock();
        if !clock.exists() {
            std::fs::write(&clock, "0").expect("clock offset");
        }
        let extra: [&OsStr; 2] = [OsStr::new("--clock-offset-file"), clock.as_os_str()];
        let daemon = Daemon::start_with(&policy.main(), Some(cg.path()), &pin, &extra);
        Self {
            daemon: Some(daemon),
            pin,
            cg,
            policy,
        }
    }
    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }
    fn outcome(&self, who: &TestUser, port: u16) -> Outcome {
        Probe::new(PROBE)
            .cgroup(&self.cg)
            .as_user(who)
            .connect(format!("127.0.0.1:{port}"))
            .outcome()
    }
    fn expect(&self, who: &TestUser, port: u16, want: Outcome) {
        assert_eq!(
            self.outcome(who, port),
            want,
            "{} -> 127.0.0.1:{port}",
            who.name
        );
    }
    fn becomes(&self, who: &TestUser, port: u16, want: Outcome, within: Duration) {
        assert!(
            wait_until(within, || self.outcome(who, port) == want),
            "{} -> 127.0.0.1:{port} did not become {want:?} within {within:?}",
            who.name
        );
    }
    fn status(&self) -> serde_json::Value {
        let out = self.pin.ctl(["status", "--json"]);
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

/// 2026-11-23 (a Monday) at hh:mm:ss UTC.
fn monday(h: i64, m: i64, s: i64) -> i64 {
    1_795_392_000 + h * 3600 + m * 60 + s
}

#[test]
fn schedule_windows_follow_the_clock() {
    require_root();
    let maggie = TestUser::new();
    let anne = TestUser::new();
    let l = Listener::loopback();
    let p = l.port();
    let policy = PolicyDir::new(&format!(
        "[settings]\ntimezone = \"UTC\"\n[vms.leaptest]\nserver = \"localhost\"\nports = [{p}]\n\
         [[vms.leaptest.schedule]]\nallow = [\"{}\"]\ndays = [\"mon\", \"tue\"]\n\
         [[vms.leaptest.schedule]]\nallow = [\"{}\"]\ndays = [\"mon\"]\nhours = \"10:00-10:01\"\n",
        maggie.name, anne.name
    ));
    // Two seconds before Monday 10:00.
    policy.set_clock(monday(9, 59, 58));
    let lab = Lab::start_with(policy);
    lab.expect(&maggie, p, Allowed);
    lab.expect(&anne, p, Denied);
    let why = lab.pin.ctl(["why", &anne.name, &format!("127.0.0.1:{p}")]);
    let why = String::from_utf8_lossy(&why.stdout).into_owned();
    assert!(
        why.contains("only by schedule") && why.contains("2026-11-23T10:00:00Z"),
        "{why}"
    );
    // The edge passes in real time: within a second of it, anne is in.
    lab.becomes(&anne, p, Allowed, Duration::from_secs(4));
    let s = lab.status();
    let users = &s["vms"][0]["schedule_users"];
    assert!(
        users.as_array().is_some_and(|u| {
            u.iter().any(|x| {
                x["user"] == anne.name.as_str() && x["next_change"] == "2026-11-23T10:01:00Z"
            })
        }),
        "{s}"
    );
    // Jump the clock past the window's end: out at once.
    lab.policy.set_clock(monday(10, 1, 30));
    lab.becomes(&anne, p, Denied, Duration::from_secs(2));
    // A day later (Tuesday) maggie still, anne not; Wednesday neither.
    lab.policy.set_clock(monday(34, 0, 0));
    lab.becomes(&anne, p, Denied, Duration::from_secs(2));
    lab.expect(&maggie, p, Allowed);
    lab.policy.set_clock(monday(58, 0, 0));
    lab.becomes(&maggie, p, Denied, Duration::from_secs(2));
    // And back in time (the clock jumped backwards): Monday again.
    lab.policy.set_clock(monday(10, 0, 20));
    lab.becomes(&maggie, p, Allowed, Duration::from_secs(2));
    lab.expect(&anne, p, Allowed);
    lab.daemon()
        .wait_for_line("schedule: ", Duration::from_secs(1));
}

#[test]
fn a_window_past_midnight_belongs_to_its_day() {
    require_root();
    let boss = TestUser::new();
    let l = Listener::loopback();
    let p = l.port();
    let policy = PolicyDir::new(&format!(
        "[settings]\ntimezone = \"UTC\"\n[vms.v]\nserver = \"localhost\"\nports = [{p}]\n\
         [[vms.v.schedule]]\nallow = [\"{}\"]\ndays = [\"mon\"]\nhours = \"22:00-06:00\"\n",
        boss.name
    ));
    policy.set_clock(monday(23, 0, 0));
    let lab = Lab::start_with(policy);
    lab.expect(&boss, p, Allowed);
    lab.policy.set_clock(monday(29, 59, 0)); // Tuesday 05:59
    lab.becomes(&boss, p, Allowed, Duration::from_secs(2));
    lab.policy.set_clock(monday(30, 0, 5)); // Tuesday 06:00
    lab.becomes(&boss, p, Denied, Duration::from_secs(2));
    lab.policy.set_clock(monday(-1, 0, 0)); // Sunday 23:00
    lab.becomes(&boss, p, Denied, Duration::from_secs(2));
}

#[test]
fn audit_mode_logs_and_refuses_nothing() {
    require_root();
    let u = TestUser::new();
    let a = Listener::loopback();
    let e = Listener::loopback();
    let lab = Lab::start(&format!(
        "[vms.audited]\nserver = \"localhost\"\nports = [{}]\nmode = \"audit\"\n\
         [vms.enforced]\nserver = \"localhost\"\nports = [{}]\n",
        a.port(),
        e.port()
    ));
    lab.expect(&u, a.port(), Allowed);
    lab.expect(&u, e.port(), Denied);
    lab.daemon()
        .wait_for_line(&format!("AUDIT uid={}", u.uid), Duration::from_secs(5));
    lab.daemon()
        .wait_for_line(&format!("DENY uid={}", u.uid), Duration::from_secs(5));
    let s = lab.status();
    assert_eq!(s["mode"], "mixed");
    let audited = s["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == "audited"))
        .cloned();
    assert_eq!(
        audited.as_ref().map(|v| v["audited"].clone()),
        Some(serde_json::json!(1)),
        "{s}"
    );

    lab.policy.write(&format!(
        "[settings]\nmode = \"audit\"\n[vms.enforced]\nserver = \"localhost\"\nports = [{}]\n",
        e.port()
    ));
    assert!(lab.pin.ctl(["reload"]).status.success());
    lab.expect(&u, e.port(), Allowed);
    assert_eq!(lab.status()["mode"], "audit");
}

#[test]
fn policy_d_is_merged_and_a_name_defined_twice_is_refused() {
    require_root();
    let u = TestUser::new();
    let l1 = Listener::loopback();
    let l2 = Listener::loopback();
    let policy = PolicyDir::new(&format!(
        "[vms.one]\nserver = \"localhost\"\nports = [{}]\n",
        l1.port()
    ));
    policy.dropin(
        "20-two.toml",
        &format!(
            "[vms.two]\nserver = \"localhost\"\nports = [{}]\nallow = [\"{}\"]\n",
            l2.port(),
            u.name
        ),
    );
    let lab = Lab::start_with(policy);
    lab.expect(&u, l1.port(), Denied);
    lab.expect(&u, l2.port(), Allowed);
    lab.policy.dropin(
        "30-clash.toml",
        &format!(
            "[vms.one]\nserver = \"localhost\"\nports = [{}]\n",
            l1.port()
        ),
    );
    let out = lab.pin.ctl(["reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("30-clash.toml:1:6: vm `one` is also defined at")
            && err.contains("policy.toml:1:6"),
        "{err}"
    );
    lab.expect(&u, l2.port(), Allowed);
    let check = spicegate_tests::spicegate([OsStr::new("check"), lab.policy.main().as_os_str()]);
    assert!(!check.status.success());
}

/// Adds `name` to /etc/hosts; restores the file exactly on drop.
struct HostsEntry {
    saved: String,
}

impl HostsEntry {
    fn set(name: &str, addr: &str, saved: Option<String>) -> Self {
        let saved = saved
            .unwrap_or_else(|| std::fs::read_to_string("/etc/hosts").expect("reading /etc/hosts"));
        std::fs::write("/etc/hosts", format!("{saved}{addr} {name}\n"))
            .expect("writing /etc/hosts");
        Self { saved }
    }
    fn remove(&self) {
        std::fs::write("/etc/hosts", &self.saved).expect("restoring /etc/hosts");
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write("/etc/hosts", &self.saved) {
            eprintln!("[test] could not restore /etc/hosts: {e}");
        }
    }
}

#[test]
fn hostnames_resolve_and_follow_changes() {
    require_root();
    let u = TestUser::new();
    let l = Listener::bind("0.0.0.0:0");
    let p = l.port();
    let name = format!("sg-test-{}.example.lan", std::process::id());
    let hosts = HostsEntry::set(&name, "127.0.0.7", None);
    // A port guarded only on the named server's addresses.
    let lab = Lab::start(&format!(
        "[settings]\nresolve_interval = \"1s\"\n[servers.kvm]\naddress = \"{name}\"\n\
         [vms.v]\nserver = \"kvm\"\nports = [{p}]\nallow = [\"root\"]\n"
    ));
    let at = |addr: &str| {
        Probe::new(PROBE)
            .cgroup(&lab.cg)
            .as_user(&u)
            .connect(format!("{addr}:{p}"))
            .outcome()
    };
    // 127.0.0.7 is local, so it folds into localhost: guarded everywhere local.
    assert_eq!(at("127.0.0.1"), Denied);
    // Point the name elsewhere (a non-local TEST-NET address): the local
    // spellings are no longer guarded, within a few seconds.
    let saved = hosts.saved.clone();
    drop(hosts);
    let hosts = HostsEntry::set(&name, "192.0.2.55", Some(saved));
    assert!(
        wait_until(Duration::from_secs(6), || at("127.0.0.1") == Allowed),
        "re-resolution not applied"
    );
    // The name stops resolving: the last addresses stay, with a warning.
    hosts.remove();
    lab.daemon()
        .wait_for_line("no longer resolves", Duration::from_secs(6));
    assert_eq!(at("127.0.0.1"), Allowed);
    drop(lab);

    // Unresolvable at start: refused with its position.
    let policy = PolicyDir::new(&format!("[servers.kvm]\naddress = \"nx-{name}\"\n"));
    let out = spicegate_tests::spicegate([OsStr::new("check"), policy.main().as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success()
            && err.contains("policy.toml:2:11")
            && err.contains("does not resolve"),
        "{err}"
    );
}

#[test]
fn group_membership_is_read_again() {
    require_root();
    let g = TestGroup::new();
    let u = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&format!(
        "[settings]\nresolve_interval = \"1s\"\n[vms.v]\nserver = \"localhost\"\nports = [{}]\nallow = [\"@{}\"]\n",
        l.port(),
        g.name
    ));
    lab.expect(&u, l.port(), Denied);
    run(Command::new("gpasswd").args(["-a", &u.name, &g.name]));
    lab.becomes(&u, l.port(), Allowed, Duration::from_secs(6));
    run(Command::new("gpasswd").args(["-d", &u.name, &g.name]));
    lab.becomes(&u, l.port(), Denied, Duration::from_secs(6));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn console_user_follows_logind() {
    require_root();
    let ann = TestUser::new();
    let bob = TestUser::new();
    let l = Listener::loopback();
    let p = l.port();
    let mut logind = spicegate_tests::logind::FakeLogind::start();
    let policy = PolicyDir::new(&format!(
        "[vms.lab]\nserver = \"localhost\"\nports = [{p}]\nallow = [\"@console\"]\n"
    ));
    std::fs::write(policy.clock(), "0").expect("clock");
    let cg = TestCgroup::new();
    let pin = PinDir::new();
    let extra: [&OsStr; 2] = [
        OsStr::new("--logind-bus"),
        OsStr::new(logind.address.as_str()),
    ];
    let daemon = Daemon::start_with(&policy.main(), Some(cg.path()), &pin, &extra);
    let lab = Lab {
        daemon: Some(daemon),
        pin,
        cg,
        policy,
    };
    let within = Duration::from_secs(5);

    // Nobody at the console: nobody gets in.
    lab.expect(&ann, p, Denied);
    logind.activate(ann.uid, false, "user");
    lab.becomes(&ann, p, Allowed, within);
    lab.expect(&bob, p, Denied);
    assert_eq!(lab.status()["console_user"]["uid"], ann.uid);
    // User switch.
    logind.activate(bob.uid, false, "user");
    lab.becomes(&ann, p, Denied, within);
    lab.expect(&bob, p, Allowed);
    // Remote sessions and greeters never count.
    logind.activate(ann.uid, true, "user");
    lab.becomes(&bob, p, Denied, within);
    lab.expect(&ann, p, Denied);
    logind.activate(ann.uid, false, "greeter");
    std::thread::sleep(Duration::from_secs(3));
    lab.expect(&ann, p, Denied);
    // Logout, then logind gone: fail closed.
    logind.activate(ann.uid, false, "user");
    lab.becomes(&ann, p, Allowed, within);
    logind.logout();
    lab.becomes(&ann, p, Denied, within);
    logind.activate(ann.uid, false, "user");
    lab.becomes(&ann, p, Allowed, within);
    logind.vanish();
    lab.becomes(&ann, p, Denied, Duration::from_secs(8));
}
