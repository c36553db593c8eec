//! Security tests: every way we know for a process to reach a guarded
//! endpoint (the bypass matrix), and the faults spicegate must survive
//! without opening up (kill -9 in a reload, oversized policies, a full
//! state disk, missing bpffs or cgroup, someone detaching or unpinning it).
//!
//! The bypass cases follow how the kernel routes a connection-oriented
//! connect to the cgroup connect4/connect6 hooks:
//! - `connect(2)`, blocking or not, and `sendto(MSG_FASTOPEN)` /
//!   `TCP_FASTOPEN_CONNECT` all go through `__inet_stream_connect` and the
//!   protocol's `pre_connect`; io_uring's IORING_OP_CONNECT calls the same
//!   socket op from the submitter, an io-wq worker or the SQPOLL thread;
//! - the hook receives the address as given: IPv4 on an AF_INET6 socket
//!   arrives IPv4-mapped on connect6 only, `0.0.0.0`/`::` become loopback
//!   after the hook, and every local address reaches the same listener;
//! - the programs that run are those of the socket's cgroup and all its
//!   ancestors (descendants first); the uid is the task's real uid in the
//!   initial user namespace.
//!
//! For each case an ungranted user ("dave") must be refused with EPERM and
//! a granted user ("alice") must get through the same way. Each test
//! prints its whole matrix (`[matrix]` lines) so a run documents what was
//! tried and what happened. Traffic goes only to loopback, this machine's
//! own addresses, or the test's own network namespaces.
//!
//! Run as root, one test at a time:
//! `SPICEGATE_BIN=$PWD/target/debug/spicegate cargo test -p spicegate-tests --test security -- --test-threads=1`

use std::{
    fs,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use spicegate_tests::{
    Daemon, Listener, Outcome, PinDir, PolicyFile, Probe, TestCgroup, TestUser,
    bypass::{
        AttachMode, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BinCopy, Bypass,
        CgroupAttachment, ChildCgroup, Expect, Matrix, NetNs, Rng, TmpfsMount, allow_all_insns,
        allows_setuid, cgroup_prog_ids, clear_outer_map_slot, connect_progs, copy_grant_in_table,
        detach_pinned_link, link_local_addrs, load_connect_prog, outer_map_slot, pin_files, pinned,
        prefilter_ports, rewrite_port_insns, run_daemon_to_exit, status_json, write_inner_map,
        write_pinned_map,
    },
    cgroup2_root, interface_addrs,
    lab::{Lab, v4, v6, vm, winlab, winlab_granting},
    require_root, spicegate_cmd, wait_until,
};

const BYPASS: &str = env!("CARGO_BIN_EXE_sg-bypass");
const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");
/// How long the watchdog may take to notice and repair tampering.
const REPAIR_DEADLINE: Duration = Duration::from_millis(2500);

/// sg-bypass inside `lab`'s cgroup.
fn b(lab: &Lab) -> Bypass {
    Bypass::new(BYPASS).cgroup(&lab.cg)
}

/// Whether the lab's daemon says its programs are attached.
fn attached(lab: &Lab) -> Option<bool> {
    status_json(&lab.pin)["attached"].as_bool()
}

/// A listener inside `ns` (vm `inside`) and a dual-stack one on the host
/// (vm `host`), both granted to `alice`; with `protect`, the host's port is
/// also in `[protect]`.
fn inside_and_host(ns: &NetNs, alice: &TestUser, protect: bool) -> (Listener, Listener, Lab) {
    let inside = ns.listener("[::]:0");
    let host = Listener::dual_stack();
    let (q, p) = (inside.port(), host.port());
    let head = if protect {
        format!("[protect]\nports = [{p}]\n")
    } else {
        String::new()
    };
    let lab = Lab::start(
        PROBE,
        &format!(
            "{head}{}{}",
            vm("inside", q, &[&alice.name]),
            vm("host", p, &[&alice.name])
        ),
    );
    (inside, host, lab)
}

/// Stdout and stderr of a command, together.
fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// alice must get through and dave must be refused, both made by `make`.
fn both(
    m: &mut Matrix,
    case: &str,
    alice: &TestUser,
    dave: &TestUser,
    make: impl Fn(&TestUser) -> Bypass,
) {
    m.check(case, &make(alice), Expect::Allowed);
    m.check(case, &make(dave), Expect::Denied);
}

/// A TCP port on 127.0.0.1 that is bound but not listening: connects to it
/// get ECONNREFUSED (held for as long as the fd lives).
fn closed_port() -> (OwnedFd, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a probe port");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sin is a valid sockaddr_in.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert!(
        r == 0,
        "binding 127.0.0.1:{port}: {}",
        std::io::Error::last_os_error()
    );
    (sock, port)
}

// ===================================================== the bypass matrix

#[test]
fn plain_connect_ipv4_and_ipv6() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut m = Matrix::new();
    for dst in [v4(p), v6(p)] {
        both(&mut m, "plain connect", &alice, &dave, |u| {
            b(&lab).as_user(u).connect(&dst)
        });
    }
    m.finish();
}

#[test]
fn every_address_of_this_host_reaches_the_same_listener_and_is_guarded() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut m = Matrix::new();
    // (destination, through an AF_INET6 socket as an IPv4-mapped address)
    let mut forms: Vec<(String, bool)> = [
        "127.0.0.1",
        "127.0.0.2",
        "127.1.2.3",
        "127.255.255.254",
        "0.0.0.0",
        "[::]",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:0.0.0.0]",
        "[::ffff:127.1.2.3]",
    ]
    .iter()
    .map(|a| (format!("{a}:{p}"), false))
    .collect();
    forms.push((v4(p), true));
    forms.push((format!("127.9.9.9:{p}"), true));
    let own = interface_addrs();
    if own.is_empty() {
        m.note("this machine has no non-loopback interface address; only loopback forms tried");
    }
    for ip in &own {
        forms.push((sock(*ip, p), false));
        if let IpAddr::V4(v4) = ip {
            forms.push((format!("[{}]:{p}", v4.to_ipv6_mapped()), false));
        }
    }
    for (ip, index) in link_local_addrs() {
        forms.push((format!("[{ip}%{index}]:{p}"), false));
    }
    for (dst, mapped) in &forms {
        both(&mut m, "address form", &alice, &dave, |u| {
            let b = b(&lab).as_user(u).connect(dst);
            if *mapped { b.v6_socket() } else { b }
        });
    }
    m.finish();
}

/// `::127.0.0.1` (IPv4-compatible, deprecated), `::ffff:0:127.0.0.1`
/// (IPv4-translated) and `64:ff9b::127.0.0.1` (NAT64) are plain IPv6
/// addresses to Linux: they are not loopback, so they must never reach a
/// local listener. On this host they would route out of the machine, so
/// they are tried (1) in the test's own network namespace, which has only
/// `lo`, with the listener inside it, and (2) on the host against a port in
/// `[protect]`, where the hook must refuse them before any routing.
#[test]
fn ipv4_compatible_and_translated_ipv6_forms_never_reach_the_listener() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let ns = NetNs::new();
    let (inside, host, lab) = inside_and_host(&ns, &alice, true);
    let (q, p) = (inside.port(), host.port());
    let odd = [
        "::127.0.0.1",
        "::ffff:0:127.0.0.1",
        "::ffff:0:0.0.0.0",
        "64:ff9b::127.0.0.1",
        "::7f00:1",
    ];
    let mut m = Matrix::new();
    // Controls: the namespace's own listener is reachable and guarded.
    both(&mut m, "netns control ::1", &alice, &dave, |u| {
        b(&lab).netns(&ns).as_user(u).connect(v6(q))
    });
    for a in odd {
        for u in [&alice, &dave] {
            m.check(
                &format!("netns odd form {a}"),
                &b(&lab).netns(&ns).as_user(u).connect(format!("[{a}]:{q}")),
                Expect::NotConnected,
            );
        }
    }
    for a in odd {
        for u in [&alice, &dave] {
            m.check(
                &format!("host odd form {a} on a [protect] port"),
                &b(&lab).as_user(u).connect(format!("[{a}]:{p}")),
                Expect::Denied,
            );
        }
    }
    both(&mut m, "host control ::1", &alice, &dave, |u| {
        b(&lab).as_user(u).connect(v6(p))
    });
    m.finish();
}

/// AnyIP: `ip route add local NET dev lo` makes every address of NET reach
/// this machine's own listeners, like 127.0.0.1. The daemon reads the
/// `local` routes of its network namespace and folds those networks into
/// localhost, so a port guarded only as a localhost VM is guarded on them
/// too, IPv4, IPv4-mapped and IPv6, and a route added while it runs is
/// picked up within its address interval. Shown with the daemon in the
/// test's own namespace, where the test adds the routes (the host's routing
/// is not touched).
#[test]
fn anyip_local_routes_are_folded_into_localhost() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let ns = NetNs::new();
    ns.ip(&["route", "add", "local", "198.18.7.0/24", "dev", "lo"]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "local",
        "2001:db8:7::/64",
        "dev",
        "lo",
    ]);
    let l = ns.listener("[::]:0");
    let q = l.port();
    let lab = Lab::builder(PROBE)
        .in_netns(ns.name())
        .arg("--addr-interval")
        .arg("1")
        .start(&vm("vmonly", q, &[&alice.name]));
    let mut m = Matrix::new();
    let at = |u: &TestUser, dst: &str, mapped: bool| {
        let b = b(&lab).netns(&ns).as_user(u).connect(dst);
        if mapped { b.v6_socket() } else { b }
    };
    for (dst, mapped) in [
        (format!("127.0.0.1:{q}"), false),
        (format!("198.18.7.5:{q}"), false),
        (format!("198.18.7.200:{q}"), true),
        (format!("[2001:db8:7::5]:{q}"), false),
        (format!("[2001:db8:7:0:ffff::1]:{q}"), false),
    ] {
        both(
            &mut m,
            &format!("AnyIP {dst}{}", if mapped { " (mapped)" } else { "" }),
            &alice,
            &dave,
            |u| at(u, &dst, mapped),
        );
    }
    // A route added while the daemon runs.
    ns.ip(&["route", "add", "local", "198.19.3.0/28", "dev", "lo"]);
    let late = format!("198.19.3.9:{q}");
    let folded = wait_until(Duration::from_secs(5), || {
        at(&dave, &late, false).run().outcome() == Outcome::Denied
    });
    m.note(format!(
        "AnyIP route added at run time: dave refused on {late}: {folded}"
    ));
    if !folded {
        m.fail(format!(
            "a local route added at run time was not folded within 5 s ({late})"
        ));
    }
    both(&mut m, "AnyIP added at run time", &alice, &dave, |u| {
        at(u, &late, false)
    });
    m.finish();
}

/// Destinations that are local only inside another network namespace (its
/// own AnyIP routes and addresses) reach a listener in that namespace only,
/// never this machine's Spice ports; the daemon, in the host namespace, does
/// not fold them into "localhost". On a port in `[protect]` the ungranted
/// user is refused there too (asserted); on a port guarded only as a
/// localhost VM the result is reported (what such a namespace reaches is
/// its own listeners, which its creator already controls).
#[test]
fn local_route_and_other_namespace_addresses_on_protect_and_vm_ports() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let ns = NetNs::new();
    ns.ip(&["route", "add", "local", "198.18.7.0/24", "dev", "lo"]);
    ns.ip(&["addr", "add", "10.214.9.1/32", "dev", "lo"]);
    let protected = ns.listener("[::]:0");
    let vm_only = ns.listener("[::]:0");
    let (q1, q2) = (protected.port(), vm_only.port());
    let lab = Lab::start(
        PROBE,
        &format!(
            "[protect]\nports = [{q1}]\n{}{}",
            vm("protected", q1, &[&alice.name]),
            vm("vmonly", q2, &[&alice.name])
        ),
    );
    let mut m = Matrix::new();
    let forms = |q: u16| {
        [
            (format!("198.18.7.5:{q}"), false),
            (format!("198.18.7.5:{q}"), true),
            (format!("10.214.9.1:{q}"), false),
        ]
    };
    both(&mut m, "netns control 127.0.0.1", &alice, &dave, |u| {
        b(&lab).netns(&ns).as_user(u).connect(v4(q2))
    });
    for (dst, mapped) in forms(q1) {
        let b = |u: &TestUser| {
            let b = b(&lab).netns(&ns).as_user(u).connect(&dst);
            if mapped { b.v6_socket() } else { b }
        };
        m.check(
            "namespace-local address, [protect] port",
            &b(&dave),
            Expect::Denied,
        );
        let r = b(&alice).run();
        m.note(format!(
            "namespace-local {dst}{} on the [protect] port: alice (granted on localhost) gets {}",
            if mapped { " (mapped)" } else { "" },
            r.outcome()
        ));
    }
    for (dst, mapped) in forms(q2) {
        let mut b = b(&lab).netns(&ns).as_user(&dave).connect(&dst);
        if mapped {
            b = b.v6_socket();
        }
        let r = b.run();
        m.note(format!(
            "LIMITATION: namespace-local {dst}{} on a port guarded only as a localhost VM: dave gets {} ({})",
            if mapped { " (mapped)" } else { "" },
            r.outcome(),
            r.summary()
        ));
    }
    m.finish();
}

/// TCP Fast Open through sendto(MSG_FASTOPEN) (`via`) on the host, where the
/// client asks for a cookie in the SYN, and in the test's own namespace with
/// `tcp_fastopen=5` (client, no cookie needed), where data rides in the SYN.
fn fastopen_case(via: &str) {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let ns = NetNs::new();
    ns.sysctl("net.ipv4.tcp_fastopen", "5");
    let (inside, host, lab) = inside_and_host(&ns, &alice, false);
    let (q, p) = (inside.port(), host.port());
    let mut m = Matrix::new();
    for dst in [v4(p), v6(p)] {
        both(&mut m, &format!("{via} on the host"), &alice, &dave, |u| {
            b(&lab).as_user(u).connect(&dst).via(via)
        });
    }
    for dst in [v4(q), v6(q)] {
        both(
            &mut m,
            &format!("{via} in a netns with tcp_fastopen=5 (no cookie)"),
            &alice,
            &dave,
            |u| b(&lab).netns(&ns).as_user(u).connect(&dst).via(via),
        );
    }
    m.finish();
}

#[test]
fn tcp_fastopen_sendto_msg_fastopen() {
    fastopen_case("fastopen");
}

#[test]
fn tcp_fastopen_connect_sockopt_then_connect() {
    fastopen_case("fastopen-connect");
}

#[test]
fn io_uring_connect_and_sendmsg_fastopen() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if disabled == "2" {
        eprintln!("SKIP: io_uring is disabled on this machine (kernel.io_uring_disabled=2)");
        return;
    }
    let mut m = Matrix::new();
    // Inline from the submitter, IOSQE_ASYNC from an io-wq worker, from the
    // SQPOLL kernel thread, on a socket io_uring made itself, and as
    // IORING_OP_SENDMSG with MSG_FASTOPEN.
    for via in [
        "uring",
        "uring-async",
        "uring-sqpoll",
        "uring-socket",
        "uring-fastopen",
    ] {
        for dst in [v4(p), v6(p)] {
            both(&mut m, &format!("io_uring {via}"), &alice, &dave, |u| {
                b(&lab).as_user(u).connect(&dst).via(via)
            });
        }
    }
    m.finish();
}

#[test]
fn nonblocking_connect_einprogress() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut m = Matrix::new();
    for dst in [v4(p), v6(p)] {
        let a = m.check(
            "non-blocking connect",
            &b(&lab).as_user(&alice).connect(&dst).via("nonblock"),
            Expect::Allowed,
        );
        let d = m.check(
            "non-blocking connect",
            &b(&lab).as_user(&dave).connect(&dst).via("nonblock"),
            Expect::Denied,
        );
        // The refusal is synchronous: no EINPROGRESS for dave.
        m.note(format!(
            "connect() itself returned: alice {:?}, dave {:?}",
            a.step("connect"),
            d.step("connect")
        ));
        if d.step("connect") != Some("err 1 EPERM") {
            m.fail(format!(
                "dave's non-blocking connect() should fail at once with EPERM: {}",
                d.summary()
            ));
        }
    }
    m.finish();
}

#[test]
fn connect_after_bind_to_a_chosen_local_address_and_port() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let free_port = |ip: &str| {
        std::net::TcpListener::bind(format!("{ip}:0"))
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("finding a free local port")
    };
    let mut m = Matrix::new();
    let mut binds = vec![
        ("127.0.0.9:0".to_owned(), v4(p)),
        (format!("127.0.0.9:{}", free_port("127.0.0.9")), v4(p)),
        (format!("0.0.0.0:{}", free_port("0.0.0.0")), v4(p)),
        ("[::1]:0".to_owned(), v6(p)),
        (format!("[::]:{}", free_port("[::]")), v6(p)),
    ];
    for ip in interface_addrs() {
        let dst = sock(ip, p);
        binds.push((sock(ip, 0), dst));
    }
    for (local, dst) in &binds {
        both(&mut m, "bind then connect", &alice, &dave, |u| {
            b(&lab).as_user(u).bind(local).connect(dst)
        });
    }
    m.finish();
}

#[test]
fn second_connect_on_the_same_socket_after_a_refused_one() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let guarded = Listener::dual_stack();
    let open = Listener::loopback();
    let (_closed_fd, closed) = closed_port();
    let p = guarded.port();
    let lab = Lab::start(PROBE, &vm("winlab", p, &[&alice.name]));
    let mut m = Matrix::new();
    let g = v4(p);
    let mapped = format!("[::ffff:127.0.0.1]:{p}");
    // Refused, then the same again.
    m.check(
        "again after EPERM",
        &b(&lab).as_user(&dave).first(&g).connect(&g),
        Expect::Denied,
    );
    // Refused, disconnected with AF_UNSPEC, then another spelling.
    m.check(
        "AF_UNSPEC then another spelling",
        &b(&lab)
            .as_user(&dave)
            .v6_socket()
            .first(&g)
            .first("unspec")
            .connect(&mapped),
        Expect::Denied,
    );
    // Refused, then a connect that fails elsewhere (ECONNREFUSED), then again.
    let r = m.check(
        "EPERM, ECONNREFUSED, then again",
        &b(&lab)
            .as_user(&dave)
            .first(&g)
            .first(v4(closed))
            .connect(&g),
        Expect::Denied,
    );
    if r.steps("first") != ["err 1 EPERM", "err 111 ECONNREFUSED"] {
        m.fail(format!("unexpected earlier steps: {}", r.summary()));
    }
    // Connected to an unguarded listener, disconnected, then the guarded one.
    for u in [&alice, &dave] {
        let want = if u.uid == alice.uid {
            Expect::Allowed
        } else {
            Expect::Denied
        };
        m.check(
            "connected elsewhere, AF_UNSPEC, then guarded",
            &b(&lab)
                .as_user(u)
                .first(v4(open.port()))
                .first("unspec")
                .connect(&g),
            want,
        );
    }
    // The granted user's socket survives a failed connect too.
    m.check(
        "ECONNREFUSED then guarded",
        &b(&lab).as_user(&alice).first(v4(closed)).connect(&g),
        Expect::Allowed,
    );
    m.finish();
}

#[test]
fn mptcp_and_seqpacket_sockets() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut m = Matrix::new();
    let probe = b(&lab).as_user(&dave).proto("mptcp").connect(v4(p)).run();
    match probe.step("socket") {
        Some("ok") => {
            for dst in [v4(p), v6(p)] {
                for via in ["connect", "fastopen", "nonblock"] {
                    both(&mut m, &format!("MPTCP (IPPROTO_MPTCP=262) {via}"), &alice, &dave, |u| {
                        b(&lab).as_user(u).proto("mptcp").connect(&dst).via(via)
                    });
                }
            }
        }
        other => m.note(format!(
            "MPTCP skipped: socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP) gives {other:?} (kernel without MPTCP or net.mptcp.enabled=0)"
        )),
    }
    // SOCK_SEQPACKET on AF_INET/AF_INET6 exists only with SCTP; anything
    // else must fail at socket() and never connect.
    for dst in [v4(p), v6(p)] {
        for proto in ["0", "tcp", "mptcp"] {
            let r = m.check(
                &format!("SOCK_SEQPACKET proto {proto}"),
                &b(&lab)
                    .as_user(&dave)
                    .seqpacket()
                    .proto(proto)
                    .connect(&dst),
                Expect::NotConnected,
            );
            m.note(format!(
                "SOCK_SEQPACKET proto {proto}: socket {:?}",
                r.step("socket")
            ));
        }
    }
    m.finish();
}

#[test]
fn sctp_one_to_one_and_one_to_many_if_the_kernel_has_it() {
    require_root();
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) {
            eprintln!(
                "SKIP: this kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e})"
            );
            return;
        }
        panic!("probing SCTP: {e}");
    }
    // SAFETY: fd is ours.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    let alice = TestUser::new();
    let dave = TestUser::new();
    // Nothing speaks SCTP on the port: a granted connect gets past the hook
    // and is refused by the peer; an ungranted one stops at the hook.
    let (_fd, port) = closed_port();
    let lab = Lab::start(PROBE, &vm("sctpvm", port, &[&alice.name]));
    let mut m = Matrix::new();
    for dst in [v4(port), v6(port)] {
        for seq in [false, true] {
            let case = if seq {
                "SCTP one-to-many (SOCK_SEQPACKET)"
            } else {
                "SCTP one-to-one"
            };
            let make = |u: &TestUser| {
                let b = b(&lab).as_user(u).proto("sctp").connect(&dst);
                if seq { b.seqpacket() } else { b }
            };
            m.check(case, &make(&alice), Expect::PassedHookNoListener);
            m.check(case, &make(&dave), Expect::Denied);
        }
    }
    m.finish();
}

/// SMC (AF_SMC, or AF_INET with IPPROTO_SMC since 6.11) makes its TCP
/// handshake on an internal kernel socket and falls back to plain TCP
/// without RDMA hardware, so it reaches a TCP listener: the connect hook
/// must decide that internal connect as the calling user.
#[test]
fn smc_sockets_if_the_kernel_has_them() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut m = Matrix::new();
    let mut tried = 0;
    for (what, af_smc) in [("AF_SMC", true), ("AF_INET + IPPROTO_SMC", false)] {
        let make = |u: &TestUser, dst: &str| {
            let b = b(&lab).as_user(u).connect(dst);
            if af_smc { b.af_smc() } else { b.proto("smc") }
        };
        let probe = make(&dave, &v4(p)).run();
        match probe.step("socket") {
            Some("ok") => {
                tried += 1;
                for dst in [v4(p), v6(p)] {
                    m.check(&format!("SMC {what}"), &make(&alice, &dst), Expect::Allowed);
                    m.check(&format!("SMC {what}"), &make(&dave, &dst), Expect::Denied);
                }
            }
            other => m.note(format!("{what} skipped: socket() gives {other:?}")),
        }
    }
    if tried == 0 {
        eprintln!("SKIP: this kernel has no SMC (neither AF_SMC nor IPPROTO_SMC sockets)");
    }
    m.finish();
}

#[test]
fn processes_in_child_cgroups_of_the_attached_cgroup() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let child = ChildCgroup::new(lab.cg.path(), "child");
    let grandchild = ChildCgroup::new(child.path(), "grandchild");
    let mut m = Matrix::new();
    for cg in [child.path(), grandchild.path()] {
        for dst in [v4(p), v6(p)] {
            both(&mut m, "child cgroup", &alice, &dave, |u| {
                Bypass::new(BYPASS).cgroup_path(cg).as_user(u).connect(&dst)
            });
        }
    }
    drop(grandchild);
    drop(child);
    m.finish();
}

/// The test's own allow-all connect4/connect6 programs on a child cgroup,
/// attached every way the kernel offers. spicegate's programs are attached
/// with a bpf_link (multi semantics) on the parent, so the kernel runs them
/// too, after the child's: the answer must not change.
#[test]
fn child_cgroup_with_its_own_allow_all_connect_programs() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let decoy = Listener::dual_stack();
    let mut m = Matrix::new();
    for mode in [
        AttachMode::Exclusive,
        AttachMode::Override,
        AttachMode::Multi,
        AttachMode::Link,
    ] {
        let child = ChildCgroup::new(
            lab.cg.path(),
            &format!("own-progs-{}", spicegate_tests::next_id()),
        );
        let mut guards = Vec::new();
        for t in [BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT] {
            let prog = load_connect_prog(t, &allow_all_insns())
                .unwrap_or_else(|e| panic!("loading an allow-all program: {e}"));
            match CgroupAttachment::attach(child.path(), prog, t, mode) {
                Ok(a) => guards.push(a),
                Err(e) => m.fail(format!(
                    "attaching with {mode} to the child was refused: {e}"
                )),
            }
        }
        let eff = cgroup_prog_ids(child.path(), BPF_CGROUP_INET4_CONNECT, true).unwrap_or_default();
        m.note(format!(
            "{mode}: programs in effect on the child (connect4): {eff:?}"
        ));
        for dst in [v4(p), v6(p)] {
            both(
                &mut m,
                &format!("child cgroup + own allow prog, {mode}"),
                &alice,
                &dave,
                |u| {
                    Bypass::new(BYPASS)
                        .cgroup_path(child.path())
                        .as_user(u)
                        .connect(&dst)
                },
            );
        }
        drop(guards);
        drop(child);
    }

    // A child program that redirects a connect to an unguarded port onto the
    // guarded one: spicegate runs after it and sees the final destination.
    let child = ChildCgroup::new(lab.cg.path(), "rewrite");
    let mut guards = Vec::new();
    for t in [BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT] {
        let prog = load_connect_prog(t, &rewrite_port_insns(p)).expect("loading a rewrite program");
        guards.push(
            CgroupAttachment::attach(child.path(), prog, t, AttachMode::Multi)
                .expect("attaching the rewrite program"),
        );
    }
    for dst in [v4(decoy.port()), v6(decoy.port())] {
        let a = m.check(
            "child prog rewrites an unguarded port to the guarded one",
            &Bypass::new(BYPASS)
                .cgroup_path(child.path())
                .as_user(&alice)
                .connect(&dst),
            Expect::Allowed,
        );
        m.note(format!(
            "alice ended up at {:?} (guarded port {p})",
            a.step("peer")
        ));
        m.check(
            "child prog rewrites an unguarded port to the guarded one",
            &Bypass::new(BYPASS)
                .cgroup_path(child.path())
                .as_user(&dave)
                .connect(&dst),
            Expect::Denied,
        );
    }
    drop(guards);
    drop(child);

    // Root-only observation: a program on the *same* cgroup, attached after
    // spicegate's link, runs after it and could redirect an allowed connect.
    let mut guards = Vec::new();
    for t in [BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT] {
        let prog = load_connect_prog(t, &rewrite_port_insns(p)).expect("loading a rewrite program");
        match CgroupAttachment::attach(lab.cg.path(), prog, t, AttachMode::Multi) {
            Ok(g) => guards.push(g),
            Err(e) => m.note(format!(
                "multi-attaching next to spicegate was refused: {e}"
            )),
        }
    }
    if guards.len() == 2 {
        let r = b(&lab).as_user(&dave).connect(v4(decoy.port())).run();
        m.note(format!(
            "ROOT-ONLY: a rewrite program multi-attached by root to spicegate's own cgroup after it: dave -> decoy port gets {} ({})",
            r.outcome(),
            r.summary()
        ));
    }
    drop(guards);
    // An exclusive attach next to spicegate's link must be refused.
    let prog = load_connect_prog(BPF_CGROUP_INET4_CONNECT, &allow_all_insns()).expect("loading");
    match CgroupAttachment::attach(
        lab.cg.path(),
        prog,
        BPF_CGROUP_INET4_CONNECT,
        AttachMode::Exclusive,
    ) {
        Ok(g) => {
            m.fail("an exclusive attach to spicegate's cgroup was accepted".to_owned());
            drop(g);
        }
        Err(e) => m.note(format!(
            "exclusive attach next to spicegate's link refused: {e}"
        )),
    }
    m.finish();
}

#[test]
fn unprivileged_user_cannot_move_out_of_the_attached_cgroup() {
    let (_alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let outside = TestCgroup::new();
    let root = cgroup2_root();
    let copy = BinCopy::new(Path::new(BYPASS), 0, 0, false);
    let mut m = Matrix::new();
    let check_moves = |m: &mut Matrix, r: &spicegate_tests::bypass::BypassRun| {
        for l in r.lines.iter().filter(|l| l.starts_with("move-to ")) {
            if !(l.ends_with("EACCES") || l.ends_with("EPERM")) {
                m.fail(format!(
                    "a move out of the attached cgroup did not fail: {l}"
                ));
            } else {
                m.note(l.clone());
            }
        }
        let lab_cg = format!(
            "/{}",
            lab.cg
                .path()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        );
        if !r.steps("cgroup").iter().all(|c| *c == lab_cg) {
            m.fail(format!("the process left {lab_cg}: {}", r.summary()));
        }
    };
    let r = m.check(
        "write own pid to another cgroup.procs as the user",
        &b(&lab)
            .as_user(&dave)
            .move_to_cgroup(outside.path())
            .move_to_cgroup(&root)
            .connect(v4(p)),
        Expect::Denied,
    );
    check_moves(&mut m, &r);
    // As root of its own user namespace the user is still not allowed to.
    let inner = Bypass::new(copy.path())
        .move_to_cgroup(outside.path())
        .move_to_cgroup(&root)
        .ids()
        .connect(v4(p));
    let mut argv = vec!["unshare", "-Ur"];
    let inner_argv = inner.argv();
    argv.extend(inner_argv.iter().map(String::as_str));
    let r = m.check(
        "write own pid to another cgroup.procs as root of a user namespace",
        &b(&lab).as_user(&dave).exec(&argv),
        Expect::Denied,
    );
    check_moves(&mut m, &r);
    drop(outside);
    m.finish();
}

#[test]
fn user_and_network_namespaces_via_unshare() {
    // root is granted: a user namespace's uid 0 must not count as root.
    let (alice, dave, l, lab) = winlab_granting(PROBE, &["root"]);
    let p = l.port();
    let copy = BinCopy::new(Path::new(BYPASS), 0, 0, false);
    let mut m = Matrix::new();
    let unshared = |u: &TestUser, flags: &str, lo_up: bool, dst: &str| {
        let mut inner = Bypass::new(copy.path()).ids();
        if lo_up {
            inner = inner.lo_up();
        }
        let inner_argv = inner.connect(dst).argv();
        let mut argv = vec!["unshare", flags];
        argv.extend(inner_argv.iter().map(String::as_str));
        b(&lab).as_user(u).exec(&argv)
    };
    for dst in [v4(p), v6(p)] {
        // User namespace only: uid 0 inside, same network: the listener.
        let r = m.check(
            "unshare -Ur (uid 0 inside)",
            &unshared(&alice, "-Ur", false, &dst),
            Expect::Allowed,
        );
        m.note(format!("inside the namespace: {:?}", r.step("ids")));
        m.check(
            "unshare -Ur (uid 0 inside)",
            &unshared(&dave, "-Ur", false, &dst),
            Expect::Denied,
        );
        // User + network namespace, lo up: the hook still runs (EPERM for
        // dave); alice gets past it and finds nobody listening there.
        m.check(
            "unshare -Urn (own netns, lo up)",
            &unshared(&alice, "-Urn", true, &dst),
            Expect::PassedHookNoListener,
        );
        m.check(
            "unshare -Urn (own netns, lo up)",
            &unshared(&dave, "-Urn", true, &dst),
            Expect::Denied,
        );
    }
    m.finish();
}

#[test]
fn network_namespace_with_a_veth_pair_to_the_host() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let ns = NetNs::with_veth();
    let host_ip = ns.host_ip();
    // Listens on the host side of the veth only: the namespace reaches it,
    // nothing else does.
    let l = Listener::bind(&sock(host_ip, 0));
    let p = l.port();
    // Started after the veth exists, so its host address is "local".
    let lab = Lab::start(PROBE, &vm("winlab", p, &[&alice.name]));
    let mut m = Matrix::new();
    both(
        &mut m,
        &format!("from a netns over veth to the host's {host_ip}"),
        &alice,
        &dave,
        |u| b(&lab).netns(&ns).as_user(u).connect(sock(host_ip, p)),
    );
    for via in ["fastopen", "uring"] {
        both(
            &mut m,
            &format!("from a netns over veth, {via}"),
            &alice,
            &dave,
            |u| {
                b(&lab)
                    .netns(&ns)
                    .as_user(u)
                    .connect(sock(host_ip, p))
                    .via(via)
            },
        );
    }
    m.note(format!("namespace side address {}", ns.ns_ip()));
    m.finish();
}

#[test]
fn setuid_helpers_are_decided_by_the_real_uid() {
    let (alice, dave, l, lab) = winlab_granting(PROBE, &["root"]);
    let p = l.port();
    let tmp = std::env::temp_dir();
    assert!(
        allows_setuid(&tmp),
        "{} is mounted nosuid: the setuid test needs a filesystem that honours setuid bits",
        tmp.display()
    );
    let root_suid = BinCopy::new(Path::new(BYPASS), 0, 0, true);
    let dave_suid = BinCopy::new(Path::new(BYPASS), dave.uid, dave.gid, true);
    let alice_suid = BinCopy::new(Path::new(BYPASS), alice.uid, alice.gid, true);
    let mut m = Matrix::new();
    let via = |u: Option<&TestUser>, copy: &BinCopy, dst: &str| {
        let argv = [
            copy.path_str(),
            "--ids".into(),
            "--connect".into(),
            dst.to_owned(),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let b = b(&lab);
        match u {
            Some(u) => b.as_user(u).exec(&argv),
            None => b.exec(&argv),
        }
    };
    let expect_ids =
        |m: &mut Matrix, r: &spicegate_tests::bypass::BypassRun, ruid: u32, euid: u32| {
            let want = format!("ruid={ruid} euid={euid} suid={euid}");
            if r.step("ids") != Some(want.as_str()) {
                m.fail(format!(
                    "the setuid copy did not run with {want}: {}",
                    r.summary()
                ));
            }
        };
    for dst in [v4(p), v6(p)] {
        let r = m.check(
            "dave runs a setuid-root copy (root granted)",
            &via(Some(&dave), &root_suid, &dst),
            Expect::Denied,
        );
        expect_ids(&mut m, &r, dave.uid, 0);
        let r = m.check(
            "dave runs a copy setuid to granted alice",
            &via(Some(&dave), &alice_suid, &dst),
            Expect::Denied,
        );
        expect_ids(&mut m, &r, dave.uid, alice.uid);
        let r = m.check(
            "alice runs a copy setuid to ungranted dave",
            &via(Some(&alice), &dave_suid, &dst),
            Expect::Allowed,
        );
        expect_ids(&mut m, &r, alice.uid, dave.uid);
        let r = m.check(
            "root runs the setuid-root copy",
            &via(None, &root_suid, &dst),
            Expect::Allowed,
        );
        expect_ids(&mut m, &r, 0, 0);
    }
    m.finish();
}

/// Connect loops from both users across SIGTERM, a stopped gap, a restart,
/// SIGKILL, a dead gap and another restart: dave is refused every time.
#[test]
fn daemon_stopped_killed_and_restarting_refuses_throughout() {
    let (alice, dave, l, mut lab) = winlab(PROBE);
    let p = l.port();
    let looping = |u: &TestUser, dst: String| {
        Probe::new(PROBE)
            .cgroup(&lab.cg)
            .as_user(u)
            .connect(dst)
            .count(2000)
            .interval_ms(3)
            .spawn()
    };
    let mut loops = vec![
        ("dave v4", looping(&dave, v4(p)), Outcome::Denied),
        ("dave v6", looping(&dave, v6(p)), Outcome::Denied),
        ("alice v4", looping(&alice, v4(p)), Outcome::Allowed),
    ];
    sleep(Duration::from_millis(200));
    lab.stop();
    sleep(Duration::from_millis(500));
    lab.start_daemon();
    sleep(Duration::from_millis(200));
    lab.kill9();
    sleep(Duration::from_millis(500));
    lab.start_daemon();
    sleep(Duration::from_millis(200));
    for (what, l, _) in &mut loops {
        assert!(
            l.is_running(),
            "the {what} loop ended before the restarts were done; the test proves nothing"
        );
    }
    let mut failures = Vec::new();
    for (what, l, want) in loops {
        let r = l.wait();
        let wrong = r.mismatches(want);
        eprintln!(
            "[test] {what}: {} attempts, {} not {want}",
            r.outcomes.len(),
            wrong.len()
        );
        if !wrong.is_empty() || r.outcomes.len() != 2000 {
            failures.push(format!(
                "{what}: {} of {} attempts were not {want}; first {:?}",
                wrong.len(),
                r.outcomes.len(),
                wrong.first()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "answers changed across stop/kill/restart:\n  {}",
        failures.join("\n  ")
    );
}

// ================================================================ faults

/// Which of alice, bob, carol and dave get through, at 127.0.0.1 and ::1.
fn decisions(lab: &Lab, users: &[&TestUser], port: u16) -> Vec<bool> {
    let mut out = Vec::new();
    for u in users {
        for dst in [v4(port), v6(port)] {
            let r = b(lab).as_user(u).connect(&dst).run();
            out.push(match r.outcome() {
                Outcome::Allowed => true,
                Outcome::Denied => false,
                other => panic!("{}: unexpected {other}: {r}", r.what),
            });
        }
    }
    out
}

/// Where the kill lands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KillDuring {
    /// `spicegate reload` of the running daemon.
    Reload,
    /// A new daemon taking over the pinned state.
    Start,
}

/// Rounds of: rewrite the policy file to the other of two policies, start
/// the change (a reload, or a new daemon), SIGKILL the daemon after a random
/// delay, check that the kernel decides exactly by the old or exactly by
/// the new policy (alice is granted only by A, bob only by B, carol by both,
/// dave by neither), then start a daemon again and check it enforces the
/// file and says it is attached.
fn kill9_rounds(during: KillDuring, rounds: u32) {
    require_root();
    let alice = TestUser::new();
    let bob = TestUser::new();
    let carol = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::dual_stack();
    let p = l.port();
    let pol_a = vm("winlab", p, &[&alice.name, &carol.name]);
    let pol_b = vm("winlab", p, &[&bob.name, &carol.name]);
    let users = [&alice, &bob, &carol, &dave];
    let want =
        |a: bool| -> Vec<bool> { [a, !a, true, false].iter().flat_map(|x| [*x, *x]).collect() };
    let mut lab = Lab::start(PROBE, &pol_a);
    let mut rng = Rng::from_time();
    eprintln!("[test] random seed {}", rng.seed());
    let mut current_a = true;
    assert_eq!(
        decisions(&lab, &users, p),
        want(true),
        "policy A before the rounds"
    );
    // How long a start takes here, so kills during a start spread over it.
    let t = Instant::now();
    lab.stop();
    lab.start_daemon();
    let start_ms = (t.elapsed().as_millis() as u64).max(50);
    eprintln!("[test] a stop and start takes {start_ms} ms");
    let (mut old_seen, mut new_seen) = (0, 0);
    let mut failures = Vec::new();
    for round in 0..rounds {
        let next_a = !current_a;
        lab.policy.rewrite(if next_a { &pol_a } else { &pol_b });
        // Half the rounds spread over 0-30 ms, half over the first 8 ms,
        // where a reload of a small policy is still running.
        let delay = match (during, round % 2) {
            (KillDuring::Reload, 0) => Duration::from_millis(rng.below(31)),
            (KillDuring::Reload, _) => Duration::from_micros(rng.below(8000)),
            (KillDuring::Start, _) => Duration::from_millis(rng.below(start_ms + start_ms / 5)),
        };
        let reply = match during {
            KillDuring::Reload => {
                let mut reload = spicegate_cmd(&lab.pin, None);
                reload.arg("reload");
                let client = std::thread::spawn(move || reload.output());
                sleep(delay);
                lab.kill9();
                client
                    .join()
                    .expect("reload thread")
                    .map(|o| {
                        format!(
                            "reload client: {} {}",
                            o.status,
                            String::from_utf8_lossy(&o.stdout)
                                .lines()
                                .next()
                                .unwrap_or("")
                        )
                    })
                    .unwrap_or_else(|e| e.to_string())
            }
            KillDuring::Start => {
                lab.stop();
                let mut d = Daemon::spawn(lab.policy.path(), Some(lab.cg.path()), &lab.pin);
                sleep(delay);
                let started = d.lines().iter().any(|l| l.contains("enforcing policy"));
                d.kill9();
                format!(
                    "the new daemon had{} said `enforcing policy`",
                    if started { "" } else { " not" }
                )
            }
        };
        let got = decisions(&lab, &users, p);
        let which = if got == want(current_a) {
            old_seen += 1;
            "old"
        } else if got == want(next_a) {
            new_seen += 1;
            "new"
        } else {
            failures.push(format!(
                "round {round} (kill after {delay:?}): decisions {got:?} are neither old {:?} nor new {:?}",
                want(current_a),
                want(next_a)
            ));
            "MIX"
        };
        eprintln!(
            "[test] round {round}: killed {delay:?} into the {}; {reply}; the kernel decides by the {which} policy",
            if during == KillDuring::Reload {
                "reload"
            } else {
                "start"
            }
        );
        lab.start_daemon();
        let after = decisions(&lab, &users, p);
        if after != want(next_a) {
            failures.push(format!(
                "round {round}: the restarted daemon enforces {after:?}, not the policy file's {:?}",
                want(next_a)
            ));
        }
        if attached(&lab) != Some(true) {
            failures.push(format!(
                "round {round}: status of the restarted daemon says not attached"
            ));
        }
        current_a = next_a;
    }
    eprintln!(
        "[test] {rounds} rounds: the old policy was in force after the kill {old_seen} times, the new one {new_seen} times"
    );
    assert!(
        failures.is_empty(),
        "seed {}:\n  {}",
        rng.seed(),
        failures.join("\n  ")
    );
}

#[test]
fn kill9_at_random_points_of_a_reload_leaves_the_old_or_the_new_policy() {
    kill9_rounds(KillDuring::Reload, 30);
}

#[test]
fn kill9_at_random_points_of_a_restart_leaves_the_old_or_the_new_policy() {
    kill9_rounds(KillDuring::Start, 12);
}

fn oversized_policy(port: u16, alice: &str) -> String {
    let uids: Vec<String> = (0..100).map(|i| format!("\"#{}\"", 70_000 + i)).collect();
    // 40 addresses x 65535 ports: about 5.2 million endpoint and port
    // entries, over the 4,000,000 limit (the 100 uids take one word of
    // grants each). The server is TEST-NET-2 and is never contacted.
    let addrs: Vec<String> = (1..=40).map(|i| format!("\"198.51.100.{i}\"")).collect();
    format!(
        "{}[servers.far]\naddresses = [{}]\n[vms.huge]\nserver = \"far\"\nports = [\"1-65535\"]\nallow = [{}]\n",
        vm("winlab", port, &[alice]),
        addrs.join(", "),
        uids.join(", ")
    )
}

#[test]
fn oversized_policy_is_refused_by_reload_and_at_start() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let before = status_json(&lab.pin);
    lab.policy.rewrite(&oversized_policy(p, &alice.name));
    let out = lab.pin.ctl(["reload"]);
    let text = said(&out);
    assert!(
        !out.status.success(),
        "reload of an oversized policy succeeded: {text}"
    );
    assert!(
        text.contains("kernel entries") && text.contains("4000000"),
        "reload should say the policy needs more kernel entries than the limit of 4000000: {text}"
    );
    let after = status_json(&lab.pin);
    assert_eq!(
        before["policy"]["sha256"], after["policy"]["sha256"],
        "the policy in force changed after a refused reload"
    );
    let mut m = Matrix::new();
    both(&mut m, "after the refused reload", &alice, &dave, |u| {
        b(&lab).as_user(u).connect(v4(p))
    });

    // At start: exits non-zero, attaches nothing, pins no link.
    let cg = TestCgroup::new();
    let pin = PinDir::new();
    let policy = PolicyFile::new(&oversized_policy(p, &alice.name));
    let t = Instant::now();
    let run = run_daemon_to_exit(
        &pin,
        policy.path(),
        Some(cg.path()),
        pin.path(),
        Duration::from_secs(60),
    );
    eprintln!("[test] the refused start took {:?}", t.elapsed());
    assert!(
        !run.timed_out && run.code().is_some_and(|c| c != 0),
        "spicegate run with an oversized policy should exit non-zero: {run}"
    );
    assert!(
        run.text().contains("kernel entries"),
        "the start error should name the kernel entry limit: {run}"
    );
    let (p4, p6) = connect_progs(cg.path());
    assert!(
        p4.is_empty() && p6.is_empty(),
        "programs attached after a refused start: {p4:?} {p6:?}"
    );
    let files = pin_files(pin.path());
    assert!(
        !files.iter().any(|f| f.starts_with("connect")),
        "links pinned after a refused start: {files:?}"
    );
    m.note(format!("pin dir after the refused start: {files:?}"));
    m.finish();
}

#[test]
fn full_state_directory_refuses_grant_and_still_reloads() {
    require_root();
    let alice = TestUser::new();
    let dave = TestUser::new();
    let l = Listener::dual_stack();
    let p = l.port();
    let mut lab = Lab::builder(PROBE)
        .without_daemon()
        .start(&vm("winlab", p, &[&alice.name]));
    let disk = TmpfsMount::new(&lab.pin.state_dir(), "size=16k,mode=0700");
    lab.start_daemon();
    let filled = disk.fill("filler");
    eprintln!("[test] filled the state directory with {filled} bytes");

    let out = lab.pin.ctl(["grant", &dave.name, "winlab"]);
    let text = said(&out);
    assert!(
        !out.status.success(),
        "grant succeeded on a full state directory: {text}"
    );
    assert!(
        text.contains("No space left") || text.contains("cannot save"),
        "grant should say it cannot save (disk full): {text}"
    );
    let mut m = Matrix::new();
    m.note(format!("grant on a full disk: {}", text.trim()));
    m.check(
        "after the refused grant",
        &b(&lab).as_user(&dave).connect(v4(p)),
        Expect::Denied,
    );
    let st = status_json(&lab.pin);
    assert_eq!(
        st["temporary_grants"].as_array().map(Vec::len),
        Some(0),
        "a refused grant shows in status: {}",
        st["temporary_grants"]
    );

    lab.policy
        .rewrite(&vm("winlab", p, &[&alice.name, &dave.name]));
    let out = lab.pin.ctl(["reload"]);
    assert!(
        out.status.success(),
        "reload should still apply with a full state directory: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.check(
        "after the reload that grants dave",
        &b(&lab).as_user(&dave).connect(v4(p)),
        Expect::Allowed,
    );
    let warned = wait_until(Duration::from_secs(2), || {
        lab.daemon().lines().iter().any(|l| {
            l.contains("copy of the good policy")
                || l.contains("last-good")
                || l.contains("last good")
        })
    });
    if !warned {
        m.fail(format!(
            "no warning about the last-good copy after a reload on a full disk; log:\n{}",
            lab.daemon().lines().join("\n")
        ));
    }
    drop(lab.daemon.take());
    drop(disk);
    m.finish();
}

/// Removes a directory tree when dropped (for paths the daemon might make).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = fs::remove_dir_all(&self.0)
        {
            eprintln!("[test] LEFTOVER {}: {e}", self.0.display());
        }
    }
}

#[test]
fn pin_dir_on_a_missing_bpffs_fails_clearly_and_attaches_nothing() {
    require_root();
    let l = Listener::dual_stack();
    let policy = PolicyFile::new(&vm("winlab", l.port(), &["root"]));
    let cg = TestCgroup::new();
    let pin = PinDir::new();
    let base = std::env::temp_dir().join(format!(
        "spicegate-test-{}-{}-nobpffs",
        std::process::id(),
        spicegate_tests::next_id()
    ));
    let _cleanup = RemoveOnDrop(base.clone());
    let mut m = Matrix::new();
    for parent_exists in [false, true] {
        if parent_exists {
            fs::create_dir_all(&base).expect("creating a plain directory");
        }
        let dir = base.join("pins");
        let run = run_daemon_to_exit(
            &pin,
            policy.path(),
            Some(cg.path()),
            &dir,
            Duration::from_secs(30),
        );
        if run.timed_out || run.code().is_none_or(|c| c == 0) {
            m.fail(format!(
                "pin dir {} not on bpffs: the daemon did not fail: {run}",
                dir.display()
            ));
        }
        let lower = run.text().to_lowercase();
        if !(lower.contains("bpf filesystem") || lower.contains("bpffs")) {
            m.fail(format!("the error does not name bpffs: {run}"));
        } else {
            m.note(format!("error: {}", run.stderr.trim()));
        }
        let (p4, p6) = connect_progs(cg.path());
        if !(p4.is_empty() && p6.is_empty()) {
            m.fail(format!("programs attached: {p4:?} {p6:?}"));
        }
        if dir.exists() {
            m.fail(format!(
                "{} was created: {:?}",
                dir.display(),
                pin_files(&dir)
            ));
        }
    }
    m.finish();
}

#[test]
fn missing_cgroup_fails_clearly_and_leaves_no_links() {
    require_root();
    let l = Listener::dual_stack();
    let policy = PolicyFile::new(&vm("winlab", l.port(), &["root"]));
    let pin = PinDir::new();
    let missing = cgroup2_root().join(format!(
        "spicegate-test-{}-{}-missing",
        std::process::id(),
        spicegate_tests::next_id()
    ));
    let run = run_daemon_to_exit(
        &pin,
        policy.path(),
        Some(&missing),
        pin.path(),
        Duration::from_secs(30),
    );
    assert!(
        !run.timed_out && run.code().is_some_and(|c| c != 0),
        "spicegate run on a missing cgroup should exit non-zero: {run}"
    );
    assert!(
        run.text().contains(&missing.display().to_string()),
        "the error should name the missing cgroup {}: {run}",
        missing.display()
    );
    assert!(
        !missing.exists(),
        "the daemon created the missing cgroup {}",
        missing.display()
    );
    assert_failed_start_left_nothing(&pin);
}

/// No cgroup2 filesystem mounted at all (the daemon started in a mount
/// namespace where every cgroup2 mount was unmounted; the host keeps its
/// own): a clear error and nothing loaded or left behind.
#[test]
fn no_cgroup2_mounted_fails_clearly_and_leaves_nothing() {
    require_root();
    let l = Listener::dual_stack();
    let policy = PolicyFile::new(&vm("winlab", l.port(), &["root"]));
    let pin = PinDir::new();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "for m in $(findmnt -rn -t cgroup2 -o TARGET); do umount -l \"$m\" || exit 99; done; \
             findmnt -rn -t cgroup2 && exit 98; exec \"$@\"",
        )
        .arg("sh")
        .arg(spicegate_tests::spicegate_bin())
        .arg("--socket")
        .arg(pin.socket())
        .args(["run", "--policy"])
        .arg(policy.path())
        .arg("--state-dir")
        .arg(pin.state_dir())
        .arg("--pin-dir")
        .arg(pin.path())
        .env_remove("JOURNAL_STREAM");
    let run = spicegate_tests::bypass::run_to_exit(cmd, Duration::from_secs(30));
    eprintln!("[harness] {run}");
    assert!(
        !matches!(run.code(), Some(98 | 99)),
        "could not unmount cgroup2 in a private mount namespace: {run}"
    );
    assert!(
        run.code().is_some_and(|c| c != 0)
            && run.text().contains("no cgroup2 filesystem is mounted"),
        "spicegate run without a cgroup2 mount: {run}"
    );
    assert!(
        cgroup2_root().exists(),
        "the host's cgroup2 mount must be untouched"
    );
    assert_failed_start_left_nothing(&pin);
}

/// A start that fails leaves no pins, no pin directory and no socket behind
/// (when nothing was enforced from that pin directory before).
fn assert_failed_start_left_nothing(pin: &PinDir) {
    let files = pin_files(pin.path());
    eprintln!(
        "[test] pin dir after the failed start: exists {}, {files:?}",
        pin.path().exists()
    );
    assert!(
        files.is_empty(),
        "a failed start left pins in {}: {files:?}",
        pin.path().display()
    );
    assert!(
        !pin.socket().exists(),
        "a failed start left its control socket {}",
        pin.socket().display()
    );
}

/// Pointing --cgroup at a directory that is not a cgroup, or starting on a
/// broken policy with nothing in force, fails before anything is loaded or
/// left behind.
#[test]
fn failed_starts_name_the_problem_and_leave_nothing_behind() {
    require_root();
    let l = Listener::dual_stack();
    let policy = PolicyFile::new(&vm("winlab", l.port(), &["root"]));
    let pin = PinDir::new();
    let not_a_cgroup = std::env::temp_dir();
    let run = run_daemon_to_exit(
        &pin,
        policy.path(),
        Some(&not_a_cgroup),
        pin.path(),
        Duration::from_secs(30),
    );
    assert!(
        run.code().is_some_and(|c| c != 0) && run.text().contains("not a cgroup v2 directory"),
        "--cgroup {}: {run}",
        not_a_cgroup.display()
    );
    assert_failed_start_left_nothing(&pin);

    let broken = PolicyFile::new("[protect]\nports = [\"70000\"]\n");
    let cg = TestCgroup::new();
    let run = run_daemon_to_exit(
        &pin,
        broken.path(),
        Some(cg.path()),
        pin.path(),
        Duration::from_secs(30),
    );
    assert!(
        run.code().is_some_and(|c| c != 0) && run.text().contains("70000"),
        "broken policy: {run}"
    );
    assert_failed_start_left_nothing(&pin);
}

/// What a tampering case did to the running daemon's pins or links.
fn tamper(what: &str, act: impl FnOnce(&Lab, &TestUser, u16)) {
    let deadline = REPAIR_DEADLINE;
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let mut m = Matrix::new();
    both(&mut m, "before tampering", &alice, &dave, |u| {
        b(&lab).as_user(u).connect(v4(p))
    });
    let lines_before = lab.daemon().lines().len();
    let t0 = Instant::now();
    act(&lab, &dave, p);
    // What dave gets right after, before the watchdog's next tick.
    let window = b(&lab).as_user(&dave).connect(v4(p)).run();
    m.note(format!(
        "{what}: dave right after ({:?} later): {}",
        t0.elapsed(),
        window.outcome()
    ));
    let logged = wait_until(deadline, || {
        lab.daemon().lines()[lines_before..]
            .iter()
            .any(|l| l.contains("TAMPERING"))
    });
    let t_log = t0.elapsed();
    let mut refused_at = None;
    let repaired = wait_until(deadline, || {
        let ok = attached(&lab) == Some(true)
            && b(&lab).as_user(&dave).connect(v4(p)).run().outcome() == Outcome::Denied;
        if ok {
            refused_at = Some(t0.elapsed());
        }
        ok
    });
    let new_lines: Vec<String> = lab.daemon().lines()[lines_before..].to_vec();
    m.note(format!(
        "{what}: TAMPERING logged: {logged} (after {t_log:?}); attached and refusing again after {refused_at:?}; daemon said:\n    {}",
        new_lines.join("\n    ")
    ));
    if !logged {
        m.fail(format!("{what}: no TAMPERING line within {deadline:?}"));
    }
    if !repaired {
        m.fail(format!(
            "{what}: not attached and refusing again within {deadline:?} (status attached: {:?})",
            attached(&lab)
        ));
    }
    both(&mut m, "after the repair", &alice, &dave, |u| {
        b(&lab).as_user(u).connect(v4(p))
    });
    both(&mut m, "after the repair", &alice, &dave, |u| {
        b(&lab).as_user(u).connect(v6(p))
    });
    for prefix in ["connect4", "connect6", "policy"] {
        if pinned(lab.pin.path(), prefix).is_none() {
            m.fail(format!(
                "{what}: {prefix} is not pinned again: {:?}",
                pin_files(lab.pin.path())
            ));
        }
    }
    m.finish();
}

fn link_pins(lab: &Lab) -> Vec<PathBuf> {
    ["connect4", "connect6"]
        .iter()
        .map(|p| {
            pinned(lab.pin.path(), p)
                .unwrap_or_else(|| panic!("no {p} link pinned in {:?}", pin_files(lab.pin.path())))
        })
        .collect()
}

#[test]
fn tampering_link_pins_removed_is_repaired() {
    tamper("rm of both link pins", |lab, _, _| {
        for pin in link_pins(lab) {
            fs::remove_file(&pin).unwrap_or_else(|e| panic!("rm {}: {e}", pin.display()));
        }
    });
}

#[test]
fn tampering_bpf_link_detach_on_the_pinned_links_is_repaired() {
    tamper("BPF_LINK_DETACH on both pinned links", |lab, _, _| {
        for pin in link_pins(lab) {
            detach_pinned_link(&pin)
                .unwrap_or_else(|e| panic!("BPF_LINK_DETACH {}: {e}", pin.display()));
        }
        let (p4, p6) = connect_progs(lab.cg.path());
        eprintln!("[test] programs on the cgroup right after the detach: {p4:?} {p6:?}");
    });
}

#[test]
fn tampering_policy_map_pin_removed_is_repaired() {
    tamper("rm of the policy map pin", |lab, _, _| {
        let pin = pinned(lab.pin.path(), "policy").expect("policy map pinned");
        fs::remove_file(&pin).unwrap_or_else(|e| panic!("rm {}: {e}", pin.display()));
    });
}

#[test]
fn tampering_whole_pin_directory_removed_is_repaired() {
    // The watchdog re-creates the directory when it pins the maps again,
    // before it re-attaches, so one pass repairs everything.
    tamper("rm -r of the pin directory", |lab, _, _| {
        fs::remove_dir_all(lab.pin.path())
            .unwrap_or_else(|e| panic!("rm -r {}: {e}", lab.pin.path().display()));
    });
}

/// Root empties the policy slot of the pinned outer map (what `bpftool map
/// delete pinned .../policy_vN key 0 0 0 0` does). The kernel program finds
/// no table and lets everything through until the watchdog, within a
/// second, notices the slot no longer holds the table it installed and
/// installs it again.
#[test]
fn tampering_policy_slot_emptied_is_repaired() {
    tamper("BPF_MAP_DELETE_ELEM of the policy slot", |lab, _, _| {
        let pin = pinned(lab.pin.path(), "policy").expect("policy map pinned");
        let before = outer_map_slot(&pin, 0).expect("reading the policy slot");
        clear_outer_map_slot(&pin, 0).unwrap_or_else(|e| panic!("emptying the slot: {e}"));
        let after = outer_map_slot(&pin, 0).expect("reading the policy slot");
        eprintln!("[test] policy slot 0: inner map {before:?} -> {after:?}");
    });
}

/// Root clears the port prefilter (`bpftool map update pinned .../ports_v3`
/// with zeroes): the programs would let every port go without a look at
/// the table. The watchdog finds a bit of the table's ports missing within
/// a second and installs the table again, which writes the prefilter.
#[test]
fn tampering_the_port_prefilter_cleared_is_repaired() {
    tamper(
        "BPF_MAP_UPDATE_ELEM of zeroes into the port prefilter",
        |lab, _, port| {
            let pin = pinned(lab.pin.path(), "ports_v").expect("port prefilter pinned");
            assert_eq!(
                prefilter_ports(&pin).expect("reading the prefilter"),
                [port]
            );
            write_pinned_map(&pin, &0u32.to_ne_bytes(), &[0u8; 8192])
                .unwrap_or_else(|e| panic!("clearing the prefilter: {e}"));
        },
    );
}

/// The port prefilter holds the ports of the table in force: a reload that
/// moves the VM to another port moves the bit, and the old port is
/// nobody's to refuse any more.
#[test]
fn the_port_prefilter_follows_the_table() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let other = Listener::dual_stack();
    let q = other.port();
    let pin = pinned(lab.pin.path(), "ports_v").expect("port prefilter pinned");
    assert_eq!(prefilter_ports(&pin).expect("reading the prefilter"), [p]);
    assert_eq!(
        lab.outcome(&dave, p),
        Outcome::Denied,
        "dave on the guarded port"
    );
    assert_eq!(
        lab.outcome(&dave, q),
        Outcome::Allowed,
        "dave on a port nobody guards"
    );

    lab.reload_to(&vm("winlab", q, &[&alice.name]));
    assert_eq!(prefilter_ports(&pin).expect("reading the prefilter"), [q]);
    assert_eq!(
        lab.outcome(&dave, q),
        Outcome::Denied,
        "dave on the newly guarded port"
    );
    assert_eq!(
        lab.outcome(&alice, q),
        Outcome::Allowed,
        "alice on the newly guarded port"
    );
    assert_eq!(
        lab.outcome(&dave, p),
        Outcome::Allowed,
        "dave on the port no longer guarded"
    );
}

/// Root writes a grant for dave straight into the rule table in force
/// (`bpftool map update` on the inner map). The table is frozen when it is
/// installed, so the kernel refuses the write and dave stays refused.
#[test]
fn tampering_a_grant_written_into_the_table_is_refused_by_the_kernel() {
    let (alice, dave, l, lab) = winlab(PROBE);
    let p = l.port();
    let pin = pinned(lab.pin.path(), "policy").expect("policy map pinned");
    let r = copy_grant_in_table(&pin, alice.uid, dave.uid);
    eprintln!("[test] copying alice's grant to dave in the table in force: {r:?}");
    match r {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "the write must fail because the table is frozen, got {e}"
        ),
        Ok(true) => panic!("the kernel accepted a write into the table in force"),
        Ok(false) => panic!("no grant of alice's found in the table in force"),
    }
    let d = b(&lab).as_user(&dave).connect(v4(p)).run().outcome();
    let a = b(&lab).as_user(&alice).connect(v4(p)).run().outcome();
    assert_eq!(d, Outcome::Denied, "dave after the forged write");
    assert_eq!(a, Outcome::Allowed, "alice after the forged write");
}

/// Root writes a grant for dave into both overlays of the table in force
/// (`bpftool map update` on the inner maps of the overlay map), with the
/// table's generation, so the program would let dave in. Overlays are not
/// frozen (a change writes them), so the kernel takes the write; the
/// watchdog finds entries it did not write within a second and installs a
/// new table with fresh overlays.
#[test]
fn tampering_a_grant_written_into_the_overlays_is_repaired() {
    tamper(
        "BPF_MAP_UPDATE_ELEM of a grant in both overlays",
        |lab, dave, _| {
            let pin = pinned(lab.pin.path(), "overlay_v").expect("overlay map pinned");
            let st = status_json(&lab.pin);
            let generation = st["table"]["generation"].as_u64().expect("generation") as u8;
            let dave = dave.uid;
            // RuleKey: kind 3 (a word of grants), pad = generation, port =
            // block 0 (the only VM has slot 0), uid, addr zero; RuleValue:
            // the word as two u32s, bit 0 (slot 0) set.
            let mut key = vec![3u8, generation];
            key.extend_from_slice(&0u16.to_ne_bytes());
            key.extend_from_slice(&dave.to_ne_bytes());
            key.extend_from_slice(&[0; 16]);
            let mut value = 1u32.to_ne_bytes().to_vec();
            value.extend_from_slice(&[0; 4]);
            for slot in 0..2 {
                write_inner_map(&pin, slot, &key, &value)
                    .unwrap_or_else(|e| panic!("writing overlay {slot}: {e}"));
            }
        },
    );
}

/// Signal-driven stop while a reload runs: also old-or-new.
#[test]
fn sigterm_during_reload_keeps_enforcing() {
    let (alice, dave, l, mut lab) = winlab(PROBE);
    let p = l.port();
    lab.policy
        .rewrite(&vm("winlab", p, &[&alice.name, &dave.name]));
    lab.daemon().signal(Signal::SIGHUP);
    lab.daemon().signal(Signal::SIGTERM);
    lab.stop();
    let a = b(&lab).as_user(&alice).connect(v4(p)).run().outcome();
    let d = b(&lab).as_user(&dave).connect(v4(p)).run().outcome();
    eprintln!("[test] after SIGHUP+SIGTERM: alice {a}, dave {d}");
    assert_eq!(a, Outcome::Allowed, "alice is granted in both policies");
    assert!(
        matches!(d, Outcome::Allowed | Outcome::Denied),
        "dave must be decided by the old (refused) or the new (allowed) policy, got {d}"
    );
}
