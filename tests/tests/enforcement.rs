//! Root integration tests: the real daemon, the real kernel hooks, probes
//! running as real uids.
//!
//! Each test writes a policy with the ports of its own listeners (fresh
//! ephemeral ports, so nothing real is ever guarded), attaches the daemon to
//! its own child cgroup with its own pin dir, and runs sg-probe inside that
//! cgroup. Traffic only ever goes to this machine.
//!
//! Run as root, one test at a time: `cargo xtask test` (or
//! `cargo test -p spicegate-tests -- --test-threads=1`).

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use spicegate_tests::{
    Checks, Daemon, DenyLine, Listener, Outcome, PinDir, PolicyFile, Probe, TestGroup, TestUser,
    interface_addrs,
    lab::{Lab, v4, v6, vm, winlab},
    require_root, unused_uid,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

use Outcome::{Allowed, Denied};

#[test]
fn grant_matrix() {
    require_root();
    let staff = TestGroup::new();
    let alice = TestUser::new(); // granted by name
    let bob = TestUser::with_primary(&staff); // granted via @staff, primary group
    let carol = TestUser::with_supplementary(&staff); // granted via @staff, supplementary
    let dave = TestUser::new(); // not granted
    let ghost = unused_uid(); // granted by #uid, no passwd entry
    let guarded = Listener::loopback();
    let open = Listener::loopback();
    let lab = Lab::start(
        PROBE,
        &vm(
            "lab",
            guarded.port(),
            &[
                &alice.name,
                &format!("@{}", staff.name),
                &format!("#{ghost}"),
            ],
        ),
    );

    let g = v4(guarded.port());
    let o = v4(open.port());
    let mut c = Checks::new();
    c.expect(&lab.probe().as_user(&alice).connect(&g), Allowed);
    c.expect(&lab.probe().as_user(&bob).connect(&g), Allowed);
    c.expect(&lab.probe().as_user(&carol).connect(&g), Allowed);
    c.expect(&lab.probe().as_ids(ghost, ghost).connect(&g), Allowed);
    c.expect(&lab.probe().as_user(&dave).connect(&g), Denied);
    c.expect(&lab.probe().connect(&g), Denied); // root, not granted
    for u in [&alice, &bob, &carol, &dave] {
        c.expect(&lab.probe().as_user(u).connect(&o), Allowed);
    }
    c.expect(&lab.probe().as_ids(ghost, ghost).connect(&o), Allowed);
    c.expect(&lab.probe().connect(&o), Allowed);
    c.finish();
}

#[test]
fn root_is_allowed_only_when_granted() {
    require_root();
    let dave = TestUser::new();
    let by_name = Listener::loopback();
    let by_uid = Listener::loopback();
    let lab = Lab::start(
        PROBE,
        &format!(
            "{}{}",
            vm("byname", by_name.port(), &["root"]),
            vm("byuid", by_uid.port(), &["#0"])
        ),
    );
    let mut c = Checks::new();
    for l in [&by_name, &by_uid] {
        c.expect(&lab.probe().connect(v4(l.port())), Allowed);
        c.expect(&lab.probe().as_user(&dave).connect(v4(l.port())), Denied);
    }
    c.finish();
}

/// alice is granted the localhost VM, dave is not; both try every `dst`.
fn local_form(listen: &str, dsts: &[(&str, bool)]) {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::bind(listen);
    let lab = Lab::start(PROBE, &vm("winlab", l.port(), &[&alice.name]));
    let mut c = Checks::new();
    for (addr, v6_socket) in dsts {
        let dst = if addr.contains(':') {
            format!("[{addr}]:{}", l.port())
        } else {
            format!("{addr}:{}", l.port())
        };
        let probe = |u: &TestUser| {
            let p = lab.probe().as_user(u).connect(&dst);
            if *v6_socket { p.v6_socket() } else { p }
        };
        c.expect(&probe(&alice), Allowed);
        c.expect(&probe(&dave), Denied);
    }
    c.finish();
}

#[test]
fn localhost_ipv4_loopback() {
    local_form("127.0.0.1:0", &[("127.0.0.1", false)]);
}

#[test]
fn localhost_ipv4_loopback_alias() {
    local_form("0.0.0.0:0", &[("127.0.0.2", false), ("127.1.2.3", false)]);
}

#[test]
fn localhost_ipv4_unspecified() {
    local_form("0.0.0.0:0", &[("0.0.0.0", false)]);
}

#[test]
fn localhost_ipv6_loopback() {
    local_form("[::]:0", &[("::1", false)]);
}

#[test]
fn localhost_ipv6_unspecified() {
    local_form("[::]:0", &[("::", false)]);
}

#[test]
fn localhost_ipv4_mapped_from_ipv6_socket() {
    local_form(
        "[::]:0",
        &[
            ("::ffff:127.0.0.1", true),
            ("::ffff:127.0.0.2", true),
            ("::ffff:0.0.0.0", true),
        ],
    );
}

#[test]
fn localhost_interface_addresses() {
    let addrs = interface_addrs();
    if addrs.is_empty() {
        eprintln!("SKIP: this machine has no non-loopback interface address to connect to");
        return;
    }
    let names: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let dsts: Vec<(&str, bool)> = names.iter().map(|a| (a.as_str(), false)).collect();
    local_form("[::]:0", &dsts);
}

#[test]
fn server_with_local_address_is_localhost() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::dual_stack();
    let p = l.port();
    let lab = Lab::start(
        PROBE,
        &format!(
            "[servers.here]\naddress = \"127.0.0.1\"\n[vms.local]\nserver = \"here\"\nports = [{p}]\nallow = [\"{}\"]\n",
            alice.name
        ),
    );
    let mut c = Checks::new();
    for dst in [v4(p), format!("127.0.0.2:{p}"), v6(p)] {
        c.expect(&lab.probe().as_user(&alice).connect(&dst), Allowed);
        c.expect(&lab.probe().as_user(&dave).connect(&dst), Denied);
    }
    c.finish();
}

#[test]
fn protect_guards_a_port_on_every_address() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let only_protected = Listener::dual_stack();
    let protected_and_vm = Listener::dual_stack();
    let (p1, p2) = (only_protected.port(), protected_and_vm.port());
    let lab = Lab::start(
        PROBE,
        &format!(
            "[protect]\nports = [{p1}, \"{p2}-{p2}\"]\n{}",
            vm("winlab", p2, &[&alice.name])
        ),
    );
    let mut c = Checks::new();
    for dst in [v4(p1), v6(p1), format!("127.0.0.5:{p1}")] {
        c.expect(&lab.probe().as_user(&alice).connect(&dst), Denied);
        c.expect(&lab.probe().as_user(&dave).connect(&dst), Denied);
        c.expect(&lab.probe().connect(&dst), Denied);
    }
    for dst in [v4(p2), v6(p2)] {
        c.expect(&lab.probe().as_user(&alice).connect(&dst), Allowed);
        c.expect(&lab.probe().as_user(&dave).connect(&dst), Denied);
    }
    c.finish();
}

#[test]
fn vm_on_remote_server_leaves_loopback_alone() {
    require_root();
    const REMOTE: &str = "192.0.2.1";
    assert!(
        !interface_addrs().iter().any(|a| a.to_string() == REMOTE),
        "{REMOTE} is an address of this machine; the test needs it to be remote"
    );
    let alice = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::dual_stack();
    let p = l.port();
    // Nothing is ever sent to 192.0.2.1: only loopback connects are made.
    let lab = Lab::start(
        PROBE,
        &format!(
            "[servers.far]\naddress = \"{REMOTE}\"\n[vms.remote]\nserver = \"far\"\nports = [{p}]\nallow = [\"{}\"]\n",
            alice.name
        ),
    );
    let mut c = Checks::new();
    for dst in [v4(p), v6(p)] {
        c.expect(&lab.probe().as_user(&dave).connect(&dst), Allowed);
        c.expect(&lab.probe().as_user(&alice).connect(&dst), Allowed);
        c.expect(&lab.probe().connect(&dst), Allowed);
    }
    c.finish();
}

#[test]
fn fastopen_sendto_is_decided_like_connect() {
    require_root();
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut c = Checks::new();
    for dst in [v4(p), v6(p)] {
        c.expect(&lab.probe().as_user(&dave).connect(&dst).fastopen(), Denied);
        c.expect(
            &lab.probe().as_user(&alice).connect(&dst).fastopen(),
            Allowed,
        );
    }
    c.finish();
}

/// alice allowed and dave denied, at 127.0.0.1 and ::1.
fn expect_decisions(lab: &Lab, port: u16, alice: &TestUser, dave: &TestUser, when: &str) {
    eprintln!("[test] decisions {when}");
    let mut c = Checks::new();
    for dst in [v4(port), v6(port)] {
        c.expect(&lab.probe().as_user(alice).connect(&dst), Allowed);
        c.expect(&lab.probe().as_user(dave).connect(&dst), Denied);
    }
    c.finish();
}

/// The daemon is gone (`when`), its pins are not, and they still decide.
fn expect_left_enforcing(lab: &Lab, port: u16, alice: &TestUser, dave: &TestUser, when: &str) {
    assert!(
        lab.pin.exists(),
        "pin dir {} vanished {when}",
        lab.pin.path().display()
    );
    expect_decisions(lab, port, alice, dave, when);
}

#[test]
fn sigterm_and_sigint_exit_zero_and_enforcement_stays() {
    require_root();
    let (alice, dave, l, mut lab) = winlab(PROBE);
    let p = l.port();
    expect_decisions(&lab, p, &alice, &dave, "while running");

    lab.stop();
    expect_left_enforcing(&lab, p, &alice, &dave, "after SIGTERM");

    lab.start_daemon();
    lab.daemon().signal(nix::sys::signal::Signal::SIGINT);
    let st = lab.daemon_mut().stop();
    assert!(
        st.success(),
        "spicegate run should exit 0 on SIGINT, got {st}"
    );
    expect_decisions(&lab, p, &alice, &dave, "after SIGINT");
}

#[test]
fn kill9_fails_closed() {
    require_root();
    let (alice, dave, l, mut lab) = winlab(PROBE);
    let p = l.port();
    expect_decisions(&lab, p, &alice, &dave, "while running");
    lab.kill9();
    expect_left_enforcing(&lab, p, &alice, &dave, "after kill -9");
}

#[test]
fn restart_adopts_pinned_state_without_a_gap() {
    require_root();
    let (alice, dave, l, mut lab) = winlab(PROBE);
    let p = l.port();

    // ~4 s of connects every 5 ms from each user, across two restarts.
    let loop_probe = |u: &TestUser| {
        lab.probe()
            .as_user(u)
            .connect(v4(p))
            .count(800)
            .interval_ms(5)
            .spawn()
    };
    let mut allowed = loop_probe(&alice);
    let mut denied = loop_probe(&dave);
    sleep(Duration::from_millis(300));

    let t = Instant::now();
    lab.restart();
    eprintln!("[test] SIGTERM + restart took {:?}", t.elapsed());
    sleep(Duration::from_millis(300));

    let t = Instant::now();
    lab.kill9();
    lab.start_daemon();
    eprintln!("[test] kill -9 + restart took {:?}", t.elapsed());
    sleep(Duration::from_millis(100));

    assert!(
        allowed.is_running() && denied.is_running(),
        "the probe loops ended before the restarts were done; the test proves nothing (make them longer)"
    );
    let a = allowed.wait();
    let d = denied.wait();
    assert_eq!(a.outcomes.len(), 800, "alice's loop: {a:?}");
    assert_eq!(d.outcomes.len(), 800, "dave's loop: {d:?}");
    let (am, dm) = (a.mismatches(Allowed), d.mismatches(Denied));
    assert!(
        am.is_empty() && dm.is_empty(),
        "answers changed across restarts: alice (granted) got {} wrong, first {:?}; dave (not granted) got {} wrong, first {:?}",
        am.len(),
        am.first(),
        dm.len(),
        dm.first()
    );
    expect_decisions(&lab, p, &alice, &dave, "after both restarts");
}

#[test]
fn unload_removes_enforcement() {
    require_root();
    let (alice, dave, l, mut lab) = winlab(PROBE);
    let p = l.port();
    expect_decisions(&lab, p, &alice, &dave, "while running");
    lab.stop();

    let out = lab.pin.unload();
    assert!(
        out.status.success(),
        "spicegate unload exited {}",
        out.status
    );
    assert!(
        !lab.pin.exists(),
        "spicegate unload left {}",
        lab.pin.path().display()
    );
    let mut c = Checks::new();
    for dst in [v4(p), v6(p)] {
        c.expect(&lab.probe().as_user(&dave).connect(&dst), Allowed);
        c.expect(&lab.probe().connect(&dst), Allowed);
    }
    c.finish();
}

#[test]
fn deny_lines_name_uid_user_pid_comm_destination_and_vm() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let ghost = unused_uid();
    let vm_port = Listener::dual_stack();
    let protect_port = Listener::dual_stack();
    let (p1, p2) = (vm_port.port(), protect_port.port());
    let lab = Lab::start(
        PROBE,
        &format!(
            "[protect]\nports = [{p2}]\n{}",
            vm("winlab", p1, &[&alice.name])
        ),
    );

    let dave_user = dave.name.clone();
    let ghost_user = format!("#{ghost}");
    // (probe, uid, user, dst as printed, vm)
    let cases: Vec<(Probe, u32, &str, String, &str)> = vec![
        (
            lab.probe().as_user(&dave).connect(v4(p1)),
            dave.uid,
            &dave_user,
            v4(p1),
            "winlab",
        ),
        (
            lab.probe().as_user(&dave).connect(v6(p1)),
            dave.uid,
            &dave_user,
            v6(p1),
            "winlab",
        ),
        (
            lab.probe()
                .as_user(&dave)
                .connect(format!("[::ffff:127.0.0.1]:{p1}")),
            dave.uid,
            &dave_user,
            v4(p1),
            "winlab",
        ),
        (
            lab.probe().as_ids(ghost, ghost).connect(v4(p1)),
            ghost,
            &ghost_user,
            v4(p1),
            "winlab",
        ),
        (lab.probe().connect(v4(p2)), 0, "root", v4(p2), "-"),
    ];
    let mut failures = Vec::new();
    for (probe, uid, user, dst, vm) in cases {
        let r = probe.run();
        assert_eq!(r.outcomes, [Denied], "{}", probe.describe());
        let pid = r.pid;
        let got = lab.daemon().wait_for_deny(
            &format!("DENY for pid {pid}"),
            |d| d.pid == pid,
            EVENT_TIMEOUT,
        );
        let want = DenyLine {
            uid,
            user: user.to_owned(),
            pid,
            comm: "sg-probe".into(),
            dst,
            vm: vm.into(),
            suppressed: 0,
            line: got.line.clone(),
        };
        if got != want {
            failures.push(format!(
                "{}:\n    got  {}\n    want {want:?}",
                probe.describe(),
                got.line
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "wrong DENY lines:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn deny_lines_are_rate_limited_per_uid() {
    require_root();
    let dave = TestUser::new();
    let other = TestUser::new();
    let l = Listener::loopback();
    let p = l.port();
    let lab = Lab::start(PROBE, &vm("winlab", p, &["root"]));

    let t0 = Instant::now();
    let burst = lab.probe().as_user(&dave).connect(v4(p)).count(100).run();
    assert_eq!(burst.outcomes.len(), 100);
    assert!(
        burst.mismatches(Denied).is_empty(),
        "all 100 connects should be denied: {:?}",
        burst.mismatches(Denied)
    );
    lab.daemon().wait_for_deny(
        "first DENY of the burst",
        |d| d.uid == dave.uid,
        EVENT_TIMEOUT,
    );
    // Another uid has its own budget, and its line proves the ring buffer
    // was drained past the burst.
    let o = lab.probe().as_user(&other).connect(v4(p)).run();
    assert_eq!(o.outcomes, [Denied]);
    lab.daemon().wait_for_deny(
        "DENY of another uid after the burst",
        |d| d.pid == o.pid,
        EVENT_TIMEOUT,
    );
    sleep(Duration::from_millis(500));
    let logged = lab
        .daemon()
        .deny_lines()
        .into_iter()
        .filter(|d| d.uid == dave.uid)
        .count();
    assert!(
        (1..=5).contains(&logged),
        "100 denials of one uid in a burst gave {logged} DENY lines; at most 5 expected"
    );

    let window_end = t0 + Duration::from_millis(10_500);
    sleep(window_end.saturating_duration_since(Instant::now()));
    let r = lab.probe().as_user(&dave).connect(v4(p)).run();
    assert_eq!(r.outcomes, [Denied]);
    let pid = r.pid;
    let line = lab
        .daemon()
        .wait_for_deny("DENY after the window", |d| d.pid == pid, EVENT_TIMEOUT);
    assert!(
        line.suppressed >= 90 && line.suppressed != u32::MAX,
        "after 100 denials and {logged} DENY lines, the next window's line should say suppressed>=90: {}",
        line.line
    );
}

/// The one test attached to the real cgroup root: it guards only a fresh
/// loopback port, so nothing else on the machine notices.
#[test]
fn attaches_to_the_real_cgroup_root_by_default() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::loopback();
    let p = l.port();
    let policy = PolicyFile::new(&vm("rootvm", p, &[&alice.name]));
    let pin = PinDir::new();
    let mut daemon = Daemon::start(policy.path(), None, &pin);
    let line = daemon.wait_for_line("enforcing policy", Duration::from_secs(1));
    let root = spicegate_tests::cgroup2_root();
    if !line.contains(&root.display().to_string()) {
        eprintln!(
            "[test] note: the start line does not name the cgroup {}: {line}",
            root.display()
        );
    }

    // No --cgroup: the probes stay wherever the test runs.
    let mut c = Checks::new();
    c.expect(&Probe::new(PROBE).as_user(&dave).connect(v4(p)), Denied);
    c.expect(&Probe::new(PROBE).as_user(&alice).connect(v4(p)), Allowed);
    c.finish();

    let st = daemon.stop();
    assert!(st.success(), "SIGTERM: spicegate run exited {st}");
    let out = pin.unload();
    assert!(
        out.status.success(),
        "spicegate unload exited {}",
        out.status
    );
    assert!(
        !pin.exists(),
        "spicegate unload left {}",
        pin.path().display()
    );
    let mut c = Checks::new();
    c.expect(&Probe::new(PROBE).as_user(&dave).connect(v4(p)), Allowed);
    c.finish();
}
