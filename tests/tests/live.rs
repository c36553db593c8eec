//! Root integration tests of the live-policy commands against a running
//! daemon: reload (atomic, refused when invalid, diff), SIGHUP, the last
//! good policy, status, why, grant/revoke, revocation of open connections,
//! events, permissions and a hostile control socket.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use spicegate_tests::{
    Daemon, Listener, Outcome, PinDir, PolicyFile, Probe, TestCgroup, TestGroup, TestUser,
    require_root, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

use Outcome::{Allowed, Denied};

/// Daemon, pins and cgroup of one test; drop order stops the daemon first.
struct Lab {
    daemon: Option<Daemon>,
    pin: PinDir,
    cg: TestCgroup,
    policy: PolicyFile,
}

impl Lab {
    fn start(policy: &str) -> Self {
        require_root();
        let policy = PolicyFile::new(policy);
        let cg = TestCgroup::new();
        let pin = PinDir::new();
        let daemon = Daemon::start(policy.path(), Some(cg.path()), &pin);
        Self {
            daemon: Some(daemon),
            pin,
            cg,
            policy,
        }
    }

    fn probe(&self) -> Probe {
        Probe::new(PROBE).cgroup(&self.cg)
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.pin.ctl(args)
    }

    /// `spicegate status --json`, parsed.
    fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Runs the CLI as another user, through this lab's socket.
    fn ctl_as(&self, user: &TestUser, args: &[&str]) -> Output {
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                &user.uid.to_string(),
                "--regid",
                &user.gid.to_string(),
                "--clear-groups",
            ])
            .arg(spicegate_tests::spicegate_bin())
            .arg("--socket")
            .arg(self.pin.socket())
            .args(args)
            .output()
            .expect("running spicegate as a test user");
        eprintln!(
            "[test] as {}: spicegate {args:?} -> {}\n{}{}",
            user.name,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    fn expect(&self, who: &TestUser, port: u16, want: Outcome) {
        let got = self
            .probe()
            .as_user(who)
            .connect(format!("127.0.0.1:{port}"))
            .outcome();
        assert_eq!(got, want, "{} connecting to 127.0.0.1:{port}", who.name);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn vm(name: &str, port: u16, allow: &[&str]) -> String {
    let list: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[vms.{name}]\nserver = \"localhost\"\nports = [{port}]\nallow = [{}]\n",
        list.join(", ")
    )
}

#[test]
fn reload_is_atomic_under_load() {
    require_root();
    let keep = TestUser::new(); // allowed by both policies
    let deny = TestUser::new(); // refused by both
    let flip = TestUser::new(); // allowed by B only
    let l = Listener::loopback();
    let a = vm("v", l.port(), &[&keep.name]);
    // B is large: thousands of grants on other ports, so a non-atomic
    // writer would leave windows where v's entries are missing.
    let mut b = vm("v", l.port(), &[&keep.name, &flip.name]);
    let uids: Vec<String> = (0..200).map(|i| format!("#{}", 3_000_000 + i)).collect();
    let uids: Vec<&str> = uids.iter().map(String::as_str).collect();
    for i in 0..20u16 {
        b.push_str(&vm(&format!("big{i}"), 61000 + i, &uids));
    }
    let lab = Lab::start(&a);
    let n = 400;
    let k = lab
        .probe()
        .as_user(&keep)
        .connect(format!("127.0.0.1:{}", l.port()))
        .count(n)
        .interval_ms(2)
        .spawn();
    let d = lab
        .probe()
        .as_user(&deny)
        .connect(format!("127.0.0.1:{}", l.port()))
        .count(n)
        .interval_ms(2)
        .spawn();
    let start = Instant::now();
    let mut reloads = 0;
    while start.elapsed() < Duration::from_secs(60) && reloads < 200 {
        lab.policy.rewrite(if reloads % 2 == 0 { &b } else { &a });
        let out = lab.ctl(&["reload"]);
        assert!(
            out.status.success(),
            "reload {reloads} failed: {}",
            text(&out.stderr)
        );
        reloads += 1;
    }
    let (k, d) = (k.wait(), d.wait());
    eprintln!(
        "[test] {reloads} reloads in {:?}; {} + {} attempts",
        start.elapsed(),
        k.outcomes.len(),
        d.outcomes.len()
    );
    assert!(reloads >= 100, "only {reloads} reloads");
    assert_eq!(k.outcomes.len(), n as usize);
    assert!(
        k.mismatches(Allowed).is_empty(),
        "granted user refused during reloads: {:?}",
        k.mismatches(Allowed)
    );
    assert!(
        d.mismatches(Denied).is_empty(),
        "refused user let through during reloads: {:?}",
        d.mismatches(Denied)
    );
}

#[test]
fn invalid_reload_is_refused_and_the_old_policy_stays() {
    require_root();
    let u = TestUser::new();
    let l = Listener::loopback();
    let good = vm("v", l.port(), &[&u.name]);
    let lab = Lab::start(&good);
    lab.policy.rewrite(&format!("{good}\n[vms.broken\n"));
    let out = lab.ctl(&["reload"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}:6:", lab.policy.path().display())),
        "no FILE:LINE in {err}"
    );
    lab.policy.rewrite(&vm("v", l.port(), &["no-such-user-sg"]));
    let out = lab.ctl(&["reload"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown user `no-such-user-sg`"));
    lab.expect(&u, l.port(), Allowed);
    let s = lab.status();
    assert_eq!(s["last_reload"]["ok"], false, "{s}");
}

#[test]
fn reload_and_sighup_print_and_apply_changes() {
    require_root();
    let a = TestUser::new();
    let b = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&vm("v", l.port(), &[&a.name]));
    lab.policy.rewrite(&vm("v", l.port(), &[&b.name]));
    let diff = lab.ctl(&["check", "--diff", &lab.policy.path().display().to_string()]);
    let diff = text(&diff.stdout);
    assert!(
        diff.contains(&format!("+ {} may now open v", b.name)),
        "{diff}"
    );
    assert!(
        diff.contains(&format!("- {} may no longer open v", a.name)),
        "{diff}"
    );
    lab.expect(&a, l.port(), Allowed); // check --diff applies nothing
    let out = lab.ctl(&["reload"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains(&format!("+ {} may now open v", b.name)),
        "{stdout}"
    );
    lab.expect(&a, l.port(), Denied);
    lab.expect(&b, l.port(), Allowed);
    lab.policy.rewrite(&vm("v", l.port(), &[&a.name]));
    lab.daemon().signal(nix::sys::signal::Signal::SIGHUP);
    lab.daemon()
        .wait_for_line("(SIGHUP)", Duration::from_secs(5));
    lab.expect(&a, l.port(), Allowed);
    lab.expect(&b, l.port(), Denied);
}

#[test]
fn broken_policy_at_start_enforces_the_last_good_one() {
    require_root();
    let u = TestUser::new();
    let l = Listener::loopback();
    let mut lab = Lab::start(&vm("v", l.port(), &[&u.name]));
    drop(lab.daemon.take());
    lab.policy.rewrite("[vms.v\n");
    lab.daemon = Some(Daemon::start(
        lab.policy.path(),
        Some(lab.cg.path()),
        &lab.pin,
    ));
    lab.daemon()
        .wait_for_line("POLICY INVALID", Duration::from_secs(5));
    assert_eq!(lab.status()["policy"]["source"], "last-good");
    lab.expect(&u, l.port(), Allowed);

    // No last good copy: refused, nothing attached.
    let pin = PinDir::new();
    let cg = TestCgroup::new();
    let mut d = Daemon::spawn(lab.policy.path(), Some(cg.path()), &pin);
    assert!(
        wait_until(Duration::from_secs(10), || d.has_exited().is_some()),
        "daemon started on a broken policy"
    );
    assert!(!pin.path().join("connect4_v2").exists());
}

#[test]
fn status_reports_attachment_and_counters() {
    require_root();
    let u = TestUser::new();
    let other = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&vm("v", l.port(), &[&u.name]));
    lab.expect(&u, l.port(), Allowed);
    lab.expect(&other, l.port(), Denied);
    lab.expect(&other, l.port(), Denied);
    let s = lab.status();
    assert_eq!(s["running"], true);
    assert_eq!(s["attached"], true);
    assert_eq!(s["policy"]["sha256"].as_str().map(str::len), Some(64));
    let v = &s["vms"][0];
    assert_eq!(v["name"], "v");
    assert_eq!(v["allowed"], 1, "{s}");
    assert_eq!(v["denied"], 2, "{s}");
    assert_eq!(v["users"][0]["user"], u.name.as_str());

    let out = lab.ctl_as(&u, &["status"]);
    assert!(!out.status.success() && text(&out.stderr).contains("permission denied"));
    drop(lab);
}

#[test]
fn why_names_the_deciding_entry() {
    require_root();
    let g = TestGroup::new();
    let u = TestUser::with_supplementary(&g);
    let other = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&format!(
        "[protect]\nports = [{}]\n{}",
        l.port() + 1,
        vm("v", l.port(), &[&format!("@{}", g.name)])
    ));
    let ep = format!("127.0.0.1:{}", l.port());
    let out = lab.ctl(&["why", &u.name, &ep]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with(&format!(
            "allow: vm `v` allows {} (allow entry `@{}`)",
            u.name, g.name
        )),
        "{}",
        text(&out.stdout)
    );
    let out = lab.ctl(&["why", &other.name, &ep]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("deny: vm `v`"));
    let out = lab.ctl(&["why", &other.name, "127.0.0.1:1"]);
    assert!(out.status.success() && text(&out.stdout).contains("not guarded"));
    let out = lab.ctl(&["why", &u.name, &format!("10.9.9.9:{}", l.port() + 1)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("[protect]"));
    // Users may ask about themselves only.
    assert_eq!(
        lab.ctl_as(&other, &["why", &other.name, &ep]).status.code(),
        Some(1)
    );
    let out = lab.ctl_as(&other, &["why", &u.name, &ep]);
    assert!(text(&out.stderr).contains("only ask about yourself"));
}

#[test]
fn non_admins_cannot_change_anything_and_the_admin_group_can() {
    require_root();
    let admins = TestGroup::new();
    let admin = TestUser::with_supplementary(&admins);
    let user = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&format!(
        "[settings]\nadmins = \"{}\"\n{}",
        admins.name,
        vm("v", l.port(), &[])
    ));
    for args in [
        vec!["reload"],
        vec!["grant", &user.name, "v"],
        vec!["revoke", &user.name, "v"],
        vec!["status"],
    ] {
        let out = lab.ctl_as(&user, &args);
        assert!(
            !out.status.success() && text(&out.stderr).contains("permission denied"),
            "{args:?}"
        );
    }
    lab.expect(&user, l.port(), Denied);
    let out = lab.ctl_as(&admin, &["grant", &user.name, "v"]);
    assert!(out.status.success());
    lab.expect(&user, l.port(), Allowed);
}

#[test]
fn temporary_grants_expire_survive_restarts_and_are_revoked() {
    require_root();
    let u = TestUser::new();
    let w = TestUser::new();
    let l = Listener::loopback();
    let mut lab = Lab::start(&vm("v", l.port(), &[]));
    assert!(
        lab.ctl(&["grant", &u.name, "v", "--for", "4s"])
            .status
            .success()
    );
    assert!(lab.ctl(&["grant", &w.name, "v"]).status.success());
    lab.expect(&u, l.port(), Allowed);
    assert_eq!(
        lab.status()["temporary_grants"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(lab.ctl(&["reload"]).status.success());
    drop(lab.daemon.take());
    lab.daemon = Some(Daemon::start(
        lab.policy.path(),
        Some(lab.cg.path()),
        &lab.pin,
    ));
    lab.expect(&u, l.port(), Allowed);
    lab.expect(&w, l.port(), Allowed);
    assert!(
        wait_until(Duration::from_secs(8), || lab
            .probe()
            .as_user(&u)
            .connect(format!("127.0.0.1:{}", l.port()))
            .outcome()
            == Denied),
        "the 4 s grant did not expire"
    );
    assert!(lab.ctl(&["revoke", &w.name, "v"]).status.success());
    lab.expect(&w, l.port(), Denied);
    assert!(!lab.ctl(&["revoke", &w.name, "v"]).status.success());
    assert!(!lab.ctl(&["grant", &w.name, "no-such-vm"]).status.success());
}

/// A TCP connection held open as `user` inside the lab's cgroup; prints
/// "open" once connected and "closed after N ms" when the peer or the
/// kernel ends it.
fn hold(lab: &Lab, user: &TestUser, port: u16) -> (Child, BufReader<std::process::ChildStdout>) {
    let script = format!(
        "import socket,time\ns=socket.create_connection(('127.0.0.1',{port}))\nprint('open',flush=True)\nt=time.time()\n\
         try:\n  s.recv(1)\nexcept OSError as e:\n  pass\nprint('closed after',int((time.time()-t)*1000),flush=True)\ntime.sleep(30)\n"
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid {} --regid {} --clear-groups /usr/bin/python3 -c \"$0\"",
            lab.cg.path().display(),
            user.uid,
            user.gid
        ))
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the holder");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("holder output");
    assert_eq!(line.trim(), "open", "the holder could not connect");
    (child, out)
}

#[test]
fn revocation_closes_established_connections() {
    require_root();
    let u = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&vm("v", l.port(), &[&u.name]));
    let (mut child, mut out) = hold(&lab, &u, l.port());
    let t = Instant::now();
    lab.policy.rewrite(&vm("v", l.port(), &[]));
    assert!(lab.ctl(&["reload"]).status.success());
    let mut line = String::new();
    out.read_line(&mut line).expect("holder output");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("closed"), "connection not closed: {line}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "closed only after {:?}",
        t.elapsed()
    );
    lab.daemon()
        .wait_for_line(&format!("CLOSED uid={}", u.uid), Duration::from_secs(2));
}

#[test]
fn end_sessions_false_keeps_established_connections() {
    require_root();
    let u = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&format!(
        "[settings]\nend_sessions = false\n{}",
        vm("v", l.port(), &[&u.name])
    ));
    let (mut child, _out) = hold(&lab, &u, l.port());
    lab.policy.rewrite(&format!(
        "[settings]\nend_sessions = false\n{}",
        vm("v", l.port(), &[])
    ));
    assert!(lab.ctl(&["reload"]).status.success());
    sleep(Duration::from_millis(1500));
    assert!(!lab.daemon().lines().iter().any(|l| l.contains("CLOSED")));
    assert!(matches!(child.try_wait(), Ok(None)));
    let _ = child.kill();
    let _ = child.wait();
    lab.expect(&u, l.port(), Denied);
}

#[test]
fn events_stream_own_denials_to_users_and_all_to_root() {
    require_root();
    let u = TestUser::new();
    let other = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&vm("v", l.port(), &[]));
    let spawn_events = |as_user: Option<&TestUser>| -> Child {
        let mut cmd = match as_user {
            Some(x) => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    &x.uid.to_string(),
                    "--regid",
                    &x.gid.to_string(),
                    "--clear-groups",
                ])
                .arg(spicegate_tests::spicegate_bin());
                c
            }
            None => Command::new(spicegate_tests::spicegate_bin()),
        };
        cmd.arg("--socket")
            .arg(lab.pin.socket())
            .args(["events", "--json"])
            .stdout(Stdio::piped());
        cmd.spawn().expect("spicegate events")
    };
    let mut all = spawn_events(None);
    let mut mine = spawn_events(Some(&u));
    sleep(Duration::from_millis(500));
    lab.expect(&other, l.port(), Denied);
    lab.expect(&u, l.port(), Denied);
    sleep(Duration::from_millis(800));
    let collect = |c: &mut Child| -> Vec<serde_json::Value> {
        let _ = c.kill();
        let mut s = String::new();
        let _ = c.stdout.take().expect("piped").read_to_string(&mut s);
        let _ = c.wait();
        s.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let all = collect(&mut all);
    let mine = collect(&mut mine);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(mine.len(), 1, "{mine:?}");
    let e = &mine[0];
    assert_eq!(e["uid"], u.uid);
    assert_eq!(e["user"], u.name.as_str());
    assert_eq!(e["vm"], "v");
    assert_eq!(e["dst"], format!("127.0.0.1:{}", l.port()));
    assert_eq!(e["comm"], "sg-probe");
}

#[test]
fn control_socket_survives_garbage() {
    require_root();
    let u = TestUser::new();
    let l = Listener::loopback();
    let lab = Lab::start(&vm("v", l.port(), &[&u.name]));
    let sock = lab.pin.socket();
    let answer = |payload: &[u8]| -> String {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    for payload in [
        &b"garbage\n"[..],
        b"\xff\xfe\n",
        b"{\"cmd\":\"status\"",
        b"{\"cmd\":\"rm -rf\"}\n",
    ] {
        let out = answer(payload);
        assert!(out.starts_with("{\"ok\":false"), "{payload:?} -> {out}");
    }
    let big = vec![b'x'; 100_000];
    assert!(answer(&big).contains("larger than"));
    // A client that sends nothing is timed out, not waited for.
    let mut idle = UnixStream::connect(&sock).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = String::new();
    let _ = idle.read_to_string(&mut out);
    assert!(out.contains("no complete request"), "{out}");
    // Many clients at once.
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).expect("connect");
                let _ = s.write_all(b"{\"cmd\":\"list\"}\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out
            })
        })
        .collect();
    for t in threads {
        let out = t.join().expect("client thread");
        assert!(out.starts_with("{\"ok\""), "{out}");
    }
    assert_eq!(lab.status()["running"], true);
    lab.expect(&u, l.port(), Allowed);
}

/// A user holding many control connections (idle ones, say) gets a "busy"
/// answer past its own share, and another user is still served.
#[test]
fn one_user_cannot_take_every_control_slot() {
    use std::os::unix::process::CommandExt as _;
    require_root();
    let (hog, other) = (TestUser::new(), TestUser::new());
    let l = Listener::loopback();
    let lab = Lab::start(&vm("v", l.port(), &[&other.name]));
    // Nine connections, the ninth's answer printed; the rest held until
    // stdin closes (the daemon drops idle ones after its request timeout).
    let script = "import socket,sys\n\
                  s=[socket.socket(socket.AF_UNIX) for _ in range(9)]\n\
                  [c.connect(sys.argv[1]) for c in s]\n\
                  s[8].settimeout(3)\n\
                  print(s[8].recv(4096).decode().strip(), flush=True)\n\
                  sys.stdin.read()\n";
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(lab.pin.socket())
        .uid(hog.uid)
        .gid(hog.gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("reading the ninth answer");
    eprintln!("[test] {}'s ninth connection: {first}", hog.name);
    let served = spicegate_tests::ctl_as(&lab.pin, &other, &["list"]);
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.contains("\"ok\":false") && first.contains("already have 8 connections"),
        "the ninth connection of one user must be turned away: {first}"
    );
    assert_eq!(
        served.code,
        Some(0),
        "another user is served while the first holds 8: {served}"
    );
    assert_eq!(lab.status()["running"], true);
}

#[test]
fn commands_fail_clearly_without_a_daemon() {
    require_root();
    let pin = PinDir::new();
    for args in [
        vec!["reload"],
        vec!["status"],
        vec!["why", "root", "127.0.0.1:1"],
        vec!["grant", "root", "v"],
        vec!["revoke", "root", "v"],
        vec!["list"],
    ] {
        let out = pin.ctl(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out.stderr).contains("not running") || text(&out.stdout).contains("not running"),
            "{args:?}"
        );
    }
    let _ = Path::new("/");
}
