//! Root integration tests for "access over time and identity": schedule
//! windows against a clock the test controls, `@console` against a fake
//! logind, hostnames and group membership that change under a running
//! daemon, `policy.d` drop-ins and audit mode.
//!
//! Each test has its own users, listeners on random high loopback ports,
//! child cgroup (the daemon decides only the probes in it), pin directory,
//! control socket and policy directory, all in `Drop` guards. Run as root,
//! one test at a time: `cargo xtask test`.

use std::{
    ffi::OsStr,
    fs,
    io::Write as _,
    os::unix::fs::FileExt as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use spicegate_tests::{
    Listener, Outcome, PolicyDir, TestGroup, TestUser,
    lab::{Lab as LabBase, PolicySource as _, text},
    logind::{FakeLogind, SessionSpec},
    require_root,
    time::utc,
};

use Outcome::{Allowed, Denied};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

/// "Within a second of the edge": the daemon looks at the clock every
/// 250 ms; the rest is the probe's own start-up, on a busy machine.
const EDGE_LIMIT: Duration = Duration::from_millis(1250);
/// How long a re-resolution (`resolve_interval = "1s"`) may take to show.
const RESOLVE_LIMIT: Duration = Duration::from_secs(5);

// ---- guards and helpers -------------------------------------------------

/// What these tests do with the shared [`PolicyDir`] beyond the lab's
/// `rewrite`: drop-ins, and setting the daemon's clock.
trait PolicyDirExt {
    fn dropin(&self, name: &str, text: &str) -> PathBuf;
    fn remove_dropin(&self, name: &str);
    /// Sets the daemon's clock so that it reads `unix` at the start of the
    /// current real second.
    fn jump_clock(&self, unix: i64) -> DaemonClock;
}

impl PolicyDirExt for PolicyDir {
    fn dropin(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dropins().join(name);
        fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }

    fn remove_dropin(&self, name: &str) {
        let p = self.dropins().join(name);
        fs::remove_file(&p).unwrap_or_else(|e| panic!("removing {}: {e}", p.display()));
    }

    fn jump_clock(&self, unix: i64) -> DaemonClock {
        let (unix, at) = PolicyDir::set_clock(self, unix);
        eprintln!("[test] daemon clock set to {}", utc(unix));
        DaemonClock { unix, at }
    }
}

/// The daemon reads the real clock in whole seconds and adds the offset,
/// so its time `unix` begins exactly at the real instant `at`.
struct DaemonClock {
    unix: i64,
    at: Instant,
}

impl DaemonClock {
    /// The real instant at which the daemon's clock reaches `t`.
    fn when(&self, t: i64) -> Instant {
        let ahead = u64::try_from(t - self.unix).expect("an edge ahead of the clock");
        self.at + Duration::from_secs(ahead)
    }
}

/// 2026-11-23, a Monday, at hh:mm:ss UTC (h may run past 24 or below 0).
fn monday(h: i64, m: i64, s: i64) -> i64 {
    1_795_392_000 + h * 3600 + m * 60 + s
}

/// /etc/hosts with one extra line for a test name; Drop restores the
/// original bytes exactly. Every write keeps the original text as the
/// file's prefix (written over in place, then cut to length), so other
/// readers of the file never see it without its own entries, even for a
/// moment.
struct HostsFile {
    original: Vec<u8>,
}

const HOSTS: &str = "/etc/hosts";

impl HostsFile {
    fn new() -> Self {
        let original = fs::read(HOSTS).expect("reading /etc/hosts");
        Self { original }
    }

    fn put(&self, contents: &[u8]) -> std::io::Result<()> {
        let f = fs::OpenOptions::new().write(true).open(HOSTS)?;
        f.write_all_at(contents, 0)?;
        f.set_len(contents.len() as u64)?;
        f.sync_all()
    }

    /// `name` resolves to `addr` (and nothing else).
    fn point(&self, name: &str, addr: &str) {
        let mut text = self.original.clone();
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        writeln!(text, "{addr} {name}").expect("formatting a hosts line");
        self.put(&text).expect("writing /etc/hosts");
        eprintln!("[test] /etc/hosts: {name} -> {addr}");
    }

    /// `name` no longer resolves (through /etc/hosts).
    fn remove(&self) {
        self.put(&self.original).expect("restoring /etc/hosts");
        eprintln!("[test] /etc/hosts: restored");
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        if fs::read(HOSTS).ok().as_deref() == Some(self.original.as_slice()) {
            return;
        }
        if let Err(e) = self.put(&self.original) {
            eprintln!("[test] LEFTOVER: could not restore /etc/hosts: {e}");
        }
    }
}

/// The lab of these tests: a policy directory, and the daemon on the test
/// clock.
type Lab = spicegate_tests::lab::Lab<PolicyDir>;

fn lab(main: &str) -> Lab {
    lab_on(PolicyDir::new(main))
}

fn lab_on(policy: PolicyDir) -> Lab {
    LabBase::builder(PROBE).test_clock().start_dir(policy)
}

/// `spicegate check MAIN` fails, saying `want`.
fn expect_check_refuses(main: &std::path::Path, want: &str) {
    let out = spicegate_tests::spicegate([OsStr::new("check"), main.as_os_str()]);
    assert!(
        !out.status.success() && text(&out.stderr).contains(want),
        "check: {}: {}\nexpected {want}",
        out.status,
        text(&out.stderr)
    );
}

/// The entry of `vms` named `name` in a status document.
fn vm<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no vm {name} in status: {status:#}"))
}

/// The `schedule_users` entry of `who` in a status vm entry.
fn schedule_user<'a>(vm: &'a Value, who: &TestUser) -> &'a Value {
    vm["schedule_users"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["uid"] == who.uid))
        .unwrap_or_else(|| panic!("{} not in schedule_users: {vm:#}", who.name))
}

/// The `users` entry of `who` (who may open it now), if any.
fn user_now<'a>(vm: &'a Value, who: &TestUser) -> Option<&'a Value> {
    vm["users"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["uid"] == who.uid))
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        text(&out.stderr)
    );
}

// ---- schedules ------------------------------------------------------------

#[test]
fn schedule_window_opens_and_closes_at_its_edges_and_follows_clock_jumps() {
    require_root();
    let anne = TestUser::new(); // Mondays 10:00-10:01
    let tessa = TestUser::new(); // Tuesdays 10:00-10:01
    let nobody = TestUser::new(); // in no window
    let l = Listener::loopback_keeping_connections();
    let p = l.port();
    let policy = PolicyDir::new(&format!(
        "[settings]\ntimezone = \"UTC\"\n\
         [vms.leaptest]\nserver = \"localhost\"\nports = [{p}]\n\
         [[vms.leaptest.schedule]]\nallow = [\"{}\"]\ndays = [\"mon\"]\nhours = \"10:00-10:01\"\n\
         [[vms.leaptest.schedule]]\nallow = [\"{}\"]\ndays = [\"tue\"]\nhours = \"10:00-10:01\"\n",
        anne.name, tessa.name
    ));
    policy.jump_clock(monday(9, 0, 0));
    let lab = lab_on(policy);
    let dst = format!("127.0.0.1:{p}");

    // An hour before: nobody in, and status/why say when that changes.
    for u in [&anne, &tessa, &nobody] {
        lab.expect(u, p, Denied);
    }
    let s = lab.status();
    assert_eq!(s["time_zone"], "UTC", "{s:#}");
    let v = vm(&s, "leaptest");
    assert_eq!(
        v["schedules"],
        serde_json::json!([
            format!("mon 10:00-10:01: {}", anne.name),
            format!("tue 10:00-10:01: {}", tessa.name)
        ]),
        "{v:#}"
    );
    let a = schedule_user(v, &anne);
    assert_eq!(a["open_now"], false, "{a}");
    assert_eq!(a["next_change"], "2026-11-23T10:00:00Z", "{a}");
    assert_eq!(a["next_change_unix"], monday(10, 0, 0), "{a}");
    let t = schedule_user(v, &tessa);
    assert_eq!(t["open_now"], false, "{t}");
    assert_eq!(t["next_change"], "2026-11-24T10:00:00Z", "{t}");
    assert!(
        v["schedule_users"]
            .as_array()
            .is_some_and(|x| x.iter().all(|e| e["uid"] != nobody.uid)),
        "{v:#}"
    );
    let (allow, why) = lab.why(&anne, &dst);
    assert!(
        !allow
            && why.contains("only by schedule (mon 10:00-10:01; tue 10:00-10:01), not now")
            && why.contains("access next begins 2026-11-23T10:00:00Z"),
        "why {}: {why}",
        anne.name
    );

    // Three seconds before 10:00, then the edge passes in real time.
    let clock = lab.policy.jump_clock(monday(9, 59, 57));
    let edge = clock.when(monday(10, 0, 0));
    lab.across_edge(&anne, p, edge, (Denied, Allowed), EDGE_LIMIT);
    // A window on another weekday grants nothing on Monday.
    lab.expect(&tessa, p, Denied);
    lab.expect(&nobody, p, Denied);
    let (allow, why) = lab.why(&anne, &dst);
    assert!(
        allow
            && why.contains("by schedule (mon 10:00-10:01; tue 10:00-10:01)")
            && why.contains("access ends 2026-11-23T10:01:00Z"),
        "why {}: {why}",
        anne.name
    );
    let s = lab.status();
    let v = vm(&s, "leaptest");
    let a = schedule_user(v, &anne);
    assert_eq!(a["open_now"], true, "{a}");
    assert_eq!(a["next_change"], "2026-11-23T10:01:00Z", "{a}");
    assert_eq!(
        user_now(v, &anne).map(|u| u["via"].clone()),
        Some("schedule".into()),
        "{v:#}"
    );
    assert!(user_now(v, &tessa).is_none(), "{v:#}");

    // The window's end, three seconds ahead: an open connection of anne's
    // is closed when it passes, and new connects are refused.
    let clock = lab.policy.jump_clock(monday(10, 0, 57));
    let end = clock.when(monday(10, 1, 0));
    let mut held = lab.hold(&anne, p);
    lab.across_edge(&anne, p, end, (Allowed, Denied), EDGE_LIMIT);
    let (line, at) = held
        .wait_closed(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("anne's connection survived the window's end"));
    assert!(
        at + Duration::from_millis(50) >= end && at <= end + EDGE_LIMIT,
        "anne's connection ended {} the window's end ({line})",
        if at < end {
            format!("{:?} before", end - at)
        } else {
            format!("{:?} after", at - end)
        }
    );
    lab.daemon()
        .wait_for_line(&format!("CLOSED uid={}", anne.uid), Duration::from_secs(2));

    // Wall-clock jumps: a day ahead (Tuesday 10:00:20) and back.
    lab.policy.jump_clock(monday(34, 0, 20));
    lab.becomes(&tessa, p, Allowed, EDGE_LIMIT);
    lab.expect(&anne, p, Denied);
    lab.policy.jump_clock(monday(10, 0, 20));
    lab.becomes(&anne, p, Allowed, EDGE_LIMIT);
    lab.expect(&tessa, p, Denied);
    lab.expect(&nobody, p, Denied);
    lab.daemon().wait_for_line(
        &format!("schedule: + {} may now open leaptest", anne.name),
        Duration::from_secs(1),
    );
}

/// When a window closes, the connections of whoever lost access are closed
/// and nothing else: a user the policy still grants keeps theirs, and
/// nobody else's socket is reported or destroyed.
#[test]
fn a_window_end_closes_only_the_connections_of_whoever_lost_access() {
    require_root();
    let anne = TestUser::new(); // by schedule
    let bob = TestUser::new(); // by the policy, always
    let l = Listener::loopback_keeping_connections();
    let p = l.port();
    let policy = PolicyDir::new(&format!(
        "[settings]\ntimezone = \"UTC\"\n\
         [vms.v]\nserver = \"localhost\"\nports = [{p}]\nallow = [\"{}\"]\n\
         [[vms.v.schedule]]\nallow = [\"{}\"]\ndays = [\"mon\"]\nhours = \"10:00-10:01\"\n",
        bob.name, anne.name
    ));
    policy.jump_clock(monday(10, 0, 30));
    let lab = lab_on(policy);
    let mut held_anne = lab.hold(&anne, p);
    let mut held_bob = lab.hold(&bob, p);
    // Connections the clients end first: the listener keeps its side open,
    // so theirs wait in FIN_WAIT2, like a viewer that just quit.
    for _ in 0..3 {
        lab.expect(&anne, p, Allowed);
        lab.expect(&bob, p, Allowed);
    }
    let ss = Command::new("ss")
        .args(["-tanoe", "state", "all", &format!("( dport = :{p} )")])
        .output();
    if let Ok(out) = ss {
        eprintln!(
            "[test] sockets to port {p} before the window ends:\n{}",
            text(&out.stdout)
        );
    }

    lab.policy.jump_clock(monday(10, 1, 30));
    lab.becomes(&anne, p, Denied, EDGE_LIMIT);
    assert!(
        held_anne.wait_closed(Duration::from_secs(2)).is_some(),
        "anne's connection survived the end of her window"
    );
    lab.expect(&bob, p, Allowed);
    if let Some((line, _)) = held_bob.wait_closed(Duration::from_millis(1500)) {
        panic!(
            "bob (granted by the policy) lost his connection: {line}; daemon log:\n{}",
            lab.log()
        );
    }
    let closed = lab.log_lines(|l| l.contains("CLOSED uid="));
    let want = format!("CLOSED uid={} user={} ", anne.uid, anne.name);
    assert!(
        closed.len() == 1 && closed[0].contains(&want),
        "expected one CLOSED line, for {} (uid {}), got {}:\n{}",
        anne.name,
        anne.uid,
        closed.len(),
        closed.join("\n")
    );
}

#[test]
fn a_window_past_midnight_belongs_to_the_day_it_starts() {
    require_root();
    let boss = TestUser::new(); // Monday 23:59 to Tuesday 00:01
    let sunny = TestUser::new(); // Sunday 23:59 to Monday 00:01
    let l = Listener::loopback();
    let p = l.port();
    let policy = PolicyDir::new(&format!(
        "[settings]\ntimezone = \"UTC\"\n[vms.night]\nserver = \"localhost\"\nports = [{p}]\n\
         [[vms.night.schedule]]\nallow = [\"{}\"]\ndays = [\"mon\"]\nhours = \"23:59-00:01\"\n\
         [[vms.night.schedule]]\nallow = [\"{}\"]\ndays = [\"sun\"]\nhours = \"23:59-00:01\"\n",
        boss.name, sunny.name
    ));
    policy.jump_clock(monday(12, 0, 0));
    let lab = lab_on(policy);
    lab.expect(&boss, p, Denied);
    lab.expect(&sunny, p, Denied);
    let s = lab.status();
    assert_eq!(
        schedule_user(vm(&s, "night"), &boss)["next_change"],
        "2026-11-23T23:59:00Z"
    );

    // Monday 23:59 passes in real time.
    let clock = lab.policy.jump_clock(monday(23, 58, 57));
    lab.across_edge(
        &boss,
        p,
        clock.when(monday(23, 59, 0)),
        (Denied, Allowed),
        EDGE_LIMIT,
    );
    lab.expect(&sunny, p, Denied);
    let s = lab.status();
    assert_eq!(
        schedule_user(vm(&s, "night"), &boss)["next_change"],
        "2026-11-24T00:01:00Z",
        "the window runs into Tuesday"
    );

    // Past midnight, Tuesday 00:00:xx: still Monday's window.
    lab.policy.jump_clock(monday(24, 0, 30));
    std::thread::sleep(Duration::from_millis(600));
    lab.expect(&boss, p, Allowed);
    lab.expect(&sunny, p, Denied);
    let clock = lab.policy.jump_clock(monday(24, 0, 57));
    lab.across_edge(
        &boss,
        p,
        clock.when(monday(24, 1, 0)),
        (Allowed, Denied),
        EDGE_LIMIT,
    );

    // Monday 00:00:30 belongs to Sunday's window, not to Monday's.
    lab.policy.jump_clock(monday(0, 0, 30));
    lab.becomes(&sunny, p, Allowed, EDGE_LIMIT);
    lab.expect(&boss, p, Denied);
    // Sunday 23:59:30.
    lab.policy.jump_clock(monday(0, 0, -30));
    std::thread::sleep(Duration::from_millis(600));
    lab.expect(&sunny, p, Allowed);
    lab.expect(&boss, p, Denied);
    // Tuesday 23:59:30: Tuesday is nobody's day.
    lab.policy.jump_clock(monday(47, 59, 30));
    lab.becomes(&sunny, p, Denied, EDGE_LIMIT);
    lab.expect(&boss, p, Denied);
}

// ---- @console -----------------------------------------------------------

/// The daemon's `@console` watcher against a fake logind that serves
/// logind's D-Bus interface on a private bus (not a real logind).
#[test]
fn console_user_follows_the_active_seat0_session() {
    require_root();
    let ann = TestUser::new();
    let bob = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let p = l.port();
    let mut logind = FakeLogind::start();
    let policy = PolicyDir::new(&format!(
        "[vms.lab]\nserver = \"localhost\"\nports = [{p}]\nallow = [\"@console\"]\n"
    ));
    let lab = LabBase::builder(PROBE)
        .test_clock()
        .arg("--logind-bus")
        .arg(&logind.address)
        .start_dir(policy);
    let dst = format!("127.0.0.1:{p}");
    // Signals make it fast; the 2 s re-check is only a safety net.
    let within = Duration::from_millis(1500);
    let console = |lab: &Lab| lab.status()["console_user"].clone();

    // Nobody logged in: nobody gets in.
    lab.expect(&ann, p, Denied);
    lab.expect(&bob, p, Denied);
    assert_eq!(console(&lab), Value::Null);
    let (allow, why) = lab.why(&ann, &dst);
    assert!(!allow && why.contains("allows only `@console`"), "{why}");

    // ann logs in at the screen.
    logind.activate(SessionSpec::local(ann.uid));
    lab.becomes(&ann, p, Allowed, within);
    lab.expect(&bob, p, Denied);
    let s = lab.status();
    assert_eq!(s["console_user"]["uid"], ann.uid, "{s:#}");
    assert_eq!(s["console_user"]["user"], ann.name.as_str(), "{s:#}");
    assert_eq!(
        user_now(vm(&s, "lab"), &ann).map(|u| u["via"].clone()),
        Some("console".into())
    );
    let (allow, why) = lab.why(&ann, &dst);
    assert!(
        allow && why.contains("holds the active session on seat0"),
        "{why}"
    );

    // User switch to bob: ann's open connection is closed, bob gets in.
    let mut held = lab.hold(&ann, p);
    let switched = Instant::now();
    logind.activate(SessionSpec::local(bob.uid));
    lab.becomes(&bob, p, Allowed, within);
    lab.expect(&ann, p, Denied);
    let (line, at) = held
        .wait_closed(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("ann's connection survived the switch to bob"));
    eprintln!(
        "[test] ann's connection: {line} {:?} after the switch",
        at - switched
    );
    lab.daemon()
        .wait_for_line(&format!("CLOSED uid={}", ann.uid), Duration::from_secs(2));

    // Sessions that never count: remote (SSH), a greeter, an inactive one.
    for (what, spec) in [
        ("a remote session", SessionSpec::remote(ann.uid)),
        ("a greeter session", SessionSpec::class(ann.uid, "greeter")),
        ("an inactive session", SessionSpec::inactive(ann.uid)),
    ] {
        logind.activate(SessionSpec::local(bob.uid));
        lab.becomes(&bob, p, Allowed, within);
        logind.activate(spec);
        lab.becomes(&bob, p, Denied, within);
        lab.expect(&ann, p, Denied);
        assert_eq!(console(&lab), Value::Null, "{what} made a console user");
    }
    // ... also after the watcher's re-check.
    std::thread::sleep(Duration::from_millis(2500));
    lab.expect(&ann, p, Denied);
    lab.expect(&bob, p, Denied);

    // Logout.
    logind.activate(SessionSpec::local(ann.uid));
    lab.becomes(&ann, p, Allowed, within);
    logind.logout();
    lab.becomes(&ann, p, Denied, within);
    assert_eq!(console(&lab), Value::Null);

    // logind goes away while ann is at the screen: fail closed.
    logind.activate(SessionSpec::local(ann.uid));
    lab.becomes(&ann, p, Allowed, within);
    logind.vanish();
    lab.becomes(&ann, p, Denied, Duration::from_secs(5));
    lab.expect(&bob, p, Denied);
    assert_eq!(console(&lab), Value::Null);
    lab.daemon()
        .wait_for_line("logind is not reachable", Duration::from_secs(1));
    // logind restarts: followed again (the watcher reconnects every 2 s).
    logind.come_back();
    logind.activate(SessionSpec::local(bob.uid));
    lab.becomes(&bob, p, Allowed, Duration::from_secs(5));
    lab.expect(&ann, p, Denied);
    assert_eq!(console(&lab)["uid"], bob.uid);
}

// ---- hostnames ----------------------------------------------------------

#[test]
fn a_hostname_is_guarded_like_its_address_and_followed_when_it_changes() {
    require_root();
    let granted = TestUser::new();
    let other = TestUser::new();
    // On 0.0.0.0, so every loopback address reaches them.
    let by_name = Listener::bind("0.0.0.0:0");
    let by_literal = Listener::bind("0.0.0.0:0");
    let (p, q) = (by_name.port(), by_literal.port());
    let hosts = HostsFile::new();
    let name = format!(
        "sg-{}-{}.spicegate-test.invalid",
        std::process::id(),
        spicegate_tests::next_id()
    );
    hosts.point(&name, "127.0.0.7");
    let policy_text = |interval: &str| {
        format!(
            "[settings]\nresolve_interval = \"{interval}\"\n\
             [servers.named]\naddress = \"{name}\"\n\
             [servers.literal]\naddress = \"127.0.0.7\"\n\
             [vms.by-name]\nserver = \"named\"\nports = [{p}]\nallow = [\"{g}\"]\n\
             [vms.by-literal]\nserver = \"literal\"\nports = [{q}]\nallow = [\"{g}\"]\n",
            g = granted.name
        )
    };
    let lab = lab(&policy_text("1s"));
    let endpoints = |lab: &Lab| vm(&lab.status(), "by-name")["endpoints"].clone();

    // Guarded and granted exactly like the literal address.
    for port in [p, q] {
        for addr in ["127.0.0.7", "127.0.0.1"] {
            lab.expect_at(&granted, &format!("{addr}:{port}"), Allowed);
            lab.expect_at(&other, &format!("{addr}:{port}"), Denied);
        }
    }
    assert_eq!(
        endpoints(&lab),
        serde_json::json!([format!("localhost:{p}")])
    );

    // The name moves to a TEST-NET address (not this machine): within a few
    // seconds the local addresses are no longer guarded for it, and the new
    // one is (asked with `why`: no packet leaves loopback).
    hosts.point(&name, "192.0.2.55");
    lab.becomes_at(&other, &format!("127.0.0.7:{p}"), Allowed, RESOLVE_LIMIT);
    assert_eq!(
        endpoints(&lab),
        serde_json::json!([format!("192.0.2.55:{p}")])
    );
    let (allow, why) = lab.why(&other, &format!("192.0.2.55:{p}"));
    assert!(!allow && why.contains("vm `by-name`"), "{why}");
    lab.expect_at(&other, &format!("127.0.0.7:{q}"), Denied);
    lab.daemon()
        .wait_for_line("groups or hostnames changed", Duration::from_secs(1));

    // And back to another loopback address: guarded again.
    hosts.point(&name, "127.0.0.9");
    lab.becomes_at(&other, &format!("127.0.0.9:{p}"), Denied, RESOLVE_LIMIT);
    lab.expect_at(&granted, &format!("127.0.0.9:{p}"), Allowed);
    assert_eq!(
        endpoints(&lab),
        serde_json::json!([format!("localhost:{p}")])
    );

    // With a long interval, only `reload` looks again, and at once.
    lab.policy.rewrite(&policy_text("1h"));
    lab.ctl_ok(&["reload"]);
    hosts.point(&name, "192.0.2.56");
    std::thread::sleep(Duration::from_millis(2500));
    lab.expect_at(&other, &format!("127.0.0.9:{p}"), Denied);
    lab.ctl_ok(&["reload"]);
    lab.expect_at(&other, &format!("127.0.0.9:{p}"), Allowed);
    assert_eq!(
        endpoints(&lab),
        serde_json::json!([format!("192.0.2.56:{p}")])
    );

    // The name stops resolving: the last addresses stay, with a warning.
    lab.policy.rewrite(&policy_text("1s"));
    hosts.point(&name, "127.0.0.7");
    lab.ctl_ok(&["reload"]);
    lab.expect_at(&other, &format!("127.0.0.7:{p}"), Denied);
    hosts.remove();
    let warning = lab.daemon().wait_for_line(
        &format!("hostname {name} no longer resolves"),
        RESOLVE_LIMIT,
    );
    assert!(warning.contains("keeping its last addresses"), "{warning}");
    std::thread::sleep(Duration::from_millis(1500));
    lab.expect_at(&other, &format!("127.0.0.7:{p}"), Denied);
    lab.expect_at(&granted, &format!("127.0.0.7:{p}"), Allowed);
    assert_eq!(
        endpoints(&lab),
        serde_json::json!([format!("localhost:{p}")])
    );
    // A reload keeps them as well rather than failing.
    lab.ctl_ok(&["reload"]);
    lab.expect_at(&other, &format!("127.0.0.7:{p}"), Denied);
    assert_eq!(
        lab.log_lines(|l| l.contains("no longer resolves")).len(),
        1,
        "the warning is said once, not every second"
    );
}

#[test]
fn a_hostname_that_does_not_resolve_is_refused_by_check_and_guarded_everywhere_at_start() {
    require_root();
    let name = format!(
        "nx-{}-{}.spicegate-test.invalid",
        std::process::id(),
        spicegate_tests::next_id()
    );
    let l = Listener::loopback();
    let p = l.port();
    let policy = PolicyDir::new(&format!(
        "[servers.kvm]\naddress = \"{name}\"\n[vms.v]\nserver = \"kvm\"\nports = [{p}]\nallow = [\"root\"]\n"
    ));
    let want = format!("{}:2:11:", policy.main().display());

    let out = spicegate_tests::spicegate([OsStr::new("check"), policy.main().as_os_str()]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&want) && err.contains("does not resolve"),
        "check: {}: {err}",
        out.status
    );

    // At start it enforces anyway: the server's port is guarded on every
    // address, granted to no one (root included), until the name resolves.
    let lab = LabBase::builder(PROBE).start_dir(policy);
    lab.daemon().wait_for_line(
        &format!("UNRESOLVED hostname {name}"),
        Duration::from_secs(2),
    );
    let out = lab.pin.ctl(["status", "--json"]);
    let st: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(st["degraded"], true, "{st:#}");
    let root = lab
        .probe()
        .as_ids(0, 0)
        .connect(format!("127.0.0.1:{p}"))
        .outcome();
    assert_eq!(
        root, Denied,
        "the port of a server that does not resolve is guarded everywhere"
    );
}

// ---- groups ---------------------------------------------------------------

#[test]
fn group_members_are_looked_up_again() {
    require_root();
    let g = TestGroup::new();
    let u = TestUser::new();
    let w = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let p = l.port();
    let lab = lab(&format!(
        "[settings]\nresolve_interval = \"1s\"\n\
         [vms.v]\nserver = \"localhost\"\nports = [{p}]\nallow = [\"@{}\"]\n",
        g.name
    ));
    lab.expect(&u, p, Denied);
    lab.expect(&w, p, Denied);

    // Added to the group, without touching the policy: granted.
    run(Command::new("gpasswd").args(["-a", &u.name, &g.name]));
    lab.becomes(&u, p, Allowed, RESOLVE_LIMIT);
    lab.expect(&w, p, Denied);
    lab.daemon().wait_for_line(
        &format!("groups or hostnames changed: + {} may now open v", u.name),
        Duration::from_secs(1),
    );

    // Removed: revoked, and the open connection is closed.
    let mut held = lab.hold(&u, p);
    run(Command::new("gpasswd").args(["-d", &u.name, &g.name]));
    lab.becomes(&u, p, Denied, RESOLVE_LIMIT);
    assert!(
        held.wait_closed(Duration::from_secs(3)).is_some(),
        "{}'s connection survived leaving the group",
        u.name
    );

    // usermod -aG works the same way.
    run(Command::new("usermod").args(["-aG", &g.name, &w.name]));
    lab.becomes(&w, p, Allowed, RESOLVE_LIMIT);
    lab.expect(&u, p, Denied);

    // So does a change of primary group (members by their passwd entry).
    run(Command::new("usermod").args(["-g", &g.name, &u.name]));
    lab.becomes(&u, p, Allowed, RESOLVE_LIMIT);
    run(Command::new("usermod").args(["-g", &u.name, &u.name]));
    lab.becomes(&u, p, Denied, RESOLVE_LIMIT);
    lab.expect(&w, p, Allowed);
}

// ---- policy.d -------------------------------------------------------------

#[test]
fn policy_d_is_merged_in_name_order_and_a_name_defined_twice_is_refused() {
    require_root();
    let u = TestUser::new();
    let other = TestUser::new();
    let l1 = Listener::loopback();
    let l2 = Listener::loopback();
    let l3 = Listener::loopback();
    let (p1, p2, p3) = (l1.port(), l2.port(), l3.port());
    // [protect] lists of several files add up.
    let la = Listener::loopback();
    let lb = Listener::loopback();
    let (pa, pb) = (la.port(), lb.port());
    let main = |allow: &str| {
        format!(
            "[vms.one]\nserver = \"localhost\"\nports = [{p1}]\nallow = [{allow}]\n\
             [protect]\nports = [{pa}]\n"
        )
    };
    let policy = PolicyDir::new(&main(""));
    // Written in reverse name order, so directory order is not name order.
    let b = policy.dropin(
        "20-b.toml",
        &format!(
            "[vms.three]\nserver = \"localhost\"\nports = [{p3}]\nallow = [\"{}\"]\n\
             [protect]\nports = [{pb}]\n",
            other.name
        ),
    );
    let a = policy.dropin(
        "10-a.toml",
        &format!(
            "[vms.two]\nserver = \"localhost\"\nports = [{p2}]\nallow = [\"{}\"]\n",
            u.name
        ),
    );
    // Only *.toml counts.
    policy.dropin("README", "this is not TOML [");
    policy.dropin("30-off.toml.disabled", "[vms.one]\nbroken");
    let lab = lab_on(policy);
    let main_path = lab.policy.main();

    lab.expect(&u, p1, Denied);
    lab.expect(&u, p2, Allowed);
    lab.expect(&other, p2, Denied);
    lab.expect(&other, p3, Allowed);
    lab.expect(&u, p3, Denied);
    lab.expect(&other, pa, Denied);
    lab.expect(&other, pb, Denied);
    let s = lab.status();
    assert_eq!(s["counts"]["ports_guarded_everywhere"], 2, "{s:#}");
    let files: Vec<PathBuf> = s["policy"]["files"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        files,
        vec![main_path.clone(), a.clone(), b.clone()],
        "{s:#}"
    );

    // `one` defined again in a drop-in, while the main file also grants u
    // `one`: the reload is refused as a whole.
    lab.policy.rewrite(&main(&format!("\"{}\"", u.name)));
    let clash = lab.policy.dropin(
        "30-clash.toml",
        &format!("[vms.one]\nserver = \"localhost\"\nports = [{p1}]\n"),
    );
    let want = format!(
        "{}:1:6: vm `one` is also defined at {}:1:6",
        clash.display(),
        main_path.display()
    );
    let out = lab.pin.ctl(["reload"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "reload with a clash succeeded");
    assert!(err.contains(&want), "reload said:\n{err}\nexpected {want}");
    assert!(err.contains("previous policy stays in force"), "{err}");
    lab.expect(&u, p1, Denied);
    lab.expect(&u, p2, Allowed);
    lab.expect(&other, p3, Allowed);
    let s = lab.status();
    assert_eq!(s["last_reload"]["ok"], false, "{s:#}");
    assert!(
        s["last_reload"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&want)),
        "{s:#}"
    );
    // `check` says the same.
    expect_check_refuses(&main_path, &want);

    // Between two drop-ins, the later name is the one reported.
    lab.policy.remove_dropin("30-clash.toml");
    let early = lab.policy.dropin(
        "05-early.toml",
        &format!("[vms.two]\nserver = \"localhost\"\nports = [{p2}]\n"),
    );
    let want = format!(
        "{}:1:6: vm `two` is also defined at {}:1:6",
        a.display(),
        early.display()
    );
    expect_check_refuses(&main_path, &want);

    lab.policy.remove_dropin("05-early.toml");

    // A setting set in two files, likewise.
    let x = lab
        .policy
        .dropin("41-x.toml", "[settings]\nresolve_interval = \"10s\"\n");
    let y = lab
        .policy
        .dropin("42-y.toml", "[settings]\nresolve_interval = \"20s\"\n");
    let want = format!(
        "{}:2:20: setting `resolve_interval` is also set at {}:2:20",
        y.display(),
        x.display()
    );
    expect_check_refuses(&main_path, &want);
    lab.policy.remove_dropin("41-x.toml");
    lab.policy.remove_dropin("42-y.toml");

    // Clash gone: the reload applies, main file change included.
    lab.ctl_ok(&["reload"]);
    lab.expect(&u, p1, Allowed);
    lab.expect(&u, p2, Allowed);
}

// ---- audit mode -------------------------------------------------------------

fn audit_lines(lab: &Lab, who: &TestUser, vm: &str) -> usize {
    let uid = format!("AUDIT uid={} ", who.uid);
    let vm = format!(" vm={vm} ");
    lab.log_lines(|l| l.contains(&uid) && l.contains(&vm)).len()
}

fn deny_lines(lab: &Lab, who: &TestUser) -> usize {
    let uid = format!("DENY uid={} ", who.uid);
    lab.log_lines(|l| l.contains(&uid)).len()
}

#[test]
fn audit_mode_logs_what_it_would_refuse_and_refuses_nothing() {
    require_root();
    let granted = TestUser::new();
    let u1 = TestUser::new();
    let u2 = TestUser::new();
    let l1 = Listener::loopback();
    let l2 = Listener::loopback();
    let lp = Listener::loopback();
    let (p1, p2, pp) = (l1.port(), l2.port(), lp.port());

    // Everything in audit mode.
    let lab = lab(&format!(
        "[settings]\nmode = \"audit\"\n[protect]\nports = [{pp}]\n\
         [vms.lab]\nserver = \"localhost\"\nports = [{p1}]\nallow = [\"{}\"]\n",
        granted.name
    ));
    lab.expect(&u1, p1, Allowed);
    lab.expect(&u1, p1, Allowed);
    lab.expect(&u1, pp, Allowed);
    lab.expect(&granted, p1, Allowed);
    let line = lab.daemon().wait_for_line(
        &format!("AUDIT uid={} user={}", u1.uid, u1.name),
        Duration::from_secs(5),
    );
    assert!(
        line.contains(&format!("dst=127.0.0.1:{p1}")) && line.contains(" vm=lab "),
        "{line}"
    );
    let protect = lab
        .daemon()
        .wait_for_line(&format!("dst=127.0.0.1:{pp} vm=-"), Duration::from_secs(5));
    assert!(protect.contains("AUDIT uid="), "{protect}");
    let s = lab.status();
    assert_eq!(s["mode"], "audit", "{s:#}");
    let v = vm(&s, "lab");
    assert_eq!(v["mode"], "audit", "{v:#}");
    assert_eq!(v["audited"], 2, "{v:#}");
    assert_eq!(v["denied"], 0, "{v:#}");
    assert_eq!(v["allowed"], 1, "{v:#}");
    assert_eq!(s["protect_audited"], 1, "{s:#}");
    assert_eq!(s["protect_denied"], 0, "{s:#}");
    let (allow, why) = lab.why(&u1, &format!("127.0.0.1:{p1}"));
    assert!(
        allow && why.contains("[audit mode: logged, not refused]"),
        "{why}"
    );
    assert_eq!(deny_lines(&lab, &u1), 0, "DENY lines in audit mode");
    assert_eq!(
        lab.log_lines(|l| l.contains(&format!("uid={} ", granted.uid)))
            .len(),
        0,
        "a granted connect was logged"
    );

    // Global enforce, one VM in audit mode: mixed.
    lab.policy.rewrite(&format!(
        "[vms.audited]\nserver = \"localhost\"\nports = [{p1}]\nmode = \"audit\"\n\
         [vms.enforced]\nserver = \"localhost\"\nports = [{p2}]\n"
    ));
    lab.ctl_ok(&["reload"]);
    lab.expect(&u2, p1, Allowed);
    lab.expect(&u2, p2, Denied);
    let line = lab.daemon().wait_for_line(
        &format!("AUDIT uid={} user={}", u2.uid, u2.name),
        Duration::from_secs(5),
    );
    assert!(line.contains(" vm=audited "), "{line}");
    lab.daemon().wait_for_deny(
        "DENY of u2 on enforced",
        |d| d.uid == u2.uid && d.vm == "enforced" && d.dst == format!("127.0.0.1:{p2}"),
        Duration::from_secs(5),
    );
    assert_eq!(audit_lines(&lab, &u2, "enforced"), 0);
    assert_eq!(deny_lines(&lab, &u2), 1, "one DENY (on enforced) only");
    let s = lab.status();
    assert_eq!(s["mode"], "mixed", "{s:#}");
    let a = vm(&s, "audited");
    let e = vm(&s, "enforced");
    assert_eq!(
        (&a["mode"], &e["mode"]),
        (&"audit".into(), &"enforce".into())
    );
    assert_eq!(
        (&a["audited"], &a["denied"]),
        (&1.into(), &0.into()),
        "{a:#}"
    );
    assert_eq!(
        (&e["audited"], &e["denied"]),
        (&0.into(), &1.into()),
        "{e:#}"
    );

    // Global audit, one VM enforcing: mixed the other way round.
    lab.policy.rewrite(&format!(
        "[settings]\nmode = \"audit\"\n\
         [vms.audited]\nserver = \"localhost\"\nports = [{p1}]\n\
         [vms.enforced]\nserver = \"localhost\"\nports = [{p2}]\nmode = \"enforce\"\n"
    ));
    lab.ctl_ok(&["reload"]);
    lab.expect(&u1, p1, Allowed);
    lab.expect(&u1, p2, Denied);
    lab.daemon().wait_for_deny(
        "DENY of u1 on enforced",
        |d| d.uid == u1.uid && d.vm == "enforced",
        Duration::from_secs(5),
    );
    assert_eq!(lab.status()["mode"], "mixed");
}
