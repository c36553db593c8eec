//! Root integration tests for what an ordinary user could still do around
//! the connect hook: crash the daemon with an absurd request, hog the
//! control socket through a subordinate uid range, learn about other users
//! through `why`, or grant himself every VM through a policy file others
//! can write. Each fails on a daemon without the matching fix.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::chown,
    path::PathBuf,
    process::{Command, Stdio},
};

use spicegate_tests::{
    Listener, PolicyDir, TestCgroup, TestUser,
    lab::{Lab, text, v4, vm},
    raw_request, require_root,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

/// A lab on `policy` (a [`PolicyDir`]: its file modes matter here).
fn lab(policy: PolicyDir) -> Lab<PolicyDir> {
    Lab::builder(PROBE).start_dir(policy)
}

/// Like [`lab`], with no daemon yet: the test prepares its state dir, then
/// calls `start_daemon`.
fn prepared_lab(policy: PolicyDir) -> Lab<PolicyDir> {
    Lab::builder(PROBE).without_daemon().start_dir(policy)
}

// ---- 4. bad requests never take the daemon down --------------------------

#[test]
fn absurd_grant_durations_are_refused_and_old_ones_do_not_crash_the_daemon() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback();
    let mut lab = prepared_lab(PolicyDir::new(&vm("v", l.port(), &[])));
    // A grants file as a daemon without the bound could have saved it.
    let state = lab.pin.state_dir();
    fs::create_dir_all(&state).expect("state dir");
    fs::write(
        state.join("grants.json"),
        format!(
            r#"[{{"uid":{},"user":"{}","vm":"v","expires":18446744073709551615,"granted_at":0,"granted_by":0}}]"#,
            user.uid, user.name
        ),
    )
    .expect("writing grants.json");
    lab.start_daemon();

    // The grantee's own commands, and status, work with that grant.
    let list = lab.ctl_as(&user, &["list", "--json"]);
    assert_eq!(list.code, Some(0), "list with a far-future grant: {list}");
    assert!(list.stdout.contains("9999-12-31T23:59:59Z"), "{list}");
    let why = lab.ctl_as(
        &user,
        &["why", &user.name, &format!("127.0.0.1:{}", l.port())],
    );
    assert_eq!(why.code, Some(0), "why with a far-future grant: {why}");
    let st = lab.status();
    assert_eq!(st["temporary_grants"][0]["expires"], "9999-12-31T23:59:59Z");

    // New absurd durations are refused, by the CLI and on the wire.
    let out = lab.pin.ctl(["grant", &user.name, "v", "--for", "10000y"]);
    assert!(!out.status.success(), "--for 10000y must be refused");
    assert!(
        text(&out.stderr).contains("longer than 10 years"),
        "{}",
        text(&out.stderr)
    );
    for secs in ["18446744073709551615", "315576001", "0"] {
        let answer = raw_request(
            &lab.pin.socket(),
            format!(
                r#"{{"cmd":"grant","user":"{}","vm":"v","for_secs":{secs}}}
"#,
                user.name
            )
            .as_bytes(),
            false,
            std::time::Duration::from_secs(5),
        );
        assert!(
            answer.contains(r#""ok":false"#) && answer.contains("1 second to 10 years"),
            "for_secs {secs}: {answer}"
        );
    }
    // Ten years exactly is fine.
    let out = lab.pin.ctl(["grant", &user.name, "v", "--for", "3652days"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lab.status()["running"], true);
    drop(lab);
}

// ---- 5. the control socket: order of checks, fairness ---------------------

#[test]
fn why_about_someone_else_is_refused_before_they_are_looked_up() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback();
    let lab = lab(PolicyDir::new(&vm("v", l.port(), &[])));
    let dst = format!("127.0.0.1:{}", l.port());
    for who in ["no-such-user-sg-holes", "root", "#0"] {
        let out = lab.ctl_as(&user, &["why", who, &dst]);
        assert!(
            out.code != Some(0) && out.stderr.contains("permission denied"),
            "why {who} as {}: {out}",
            user.name
        );
    }
    for me in [user.name.clone(), format!("#{}", user.uid)] {
        let out = lab.ctl_as(&user, &["why", &me, &dst]);
        assert!(
            !out.stderr.contains("permission denied"),
            "why {me} as {}: {out}",
            user.name
        );
    }
}

/// /etc/subuid with one more range; restored on drop.
struct SubuidFile {
    original: Option<Vec<u8>>,
}

const SUBUID: &str = "/etc/subuid";

impl SubuidFile {
    fn add(owner: &str, start: u32, count: u32) -> Self {
        let original = fs::read(SUBUID).ok();
        let mut text = original.clone().unwrap_or_default();
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        text.extend_from_slice(format!("{owner}:{start}:{count}\n").as_bytes());
        fs::write(SUBUID, text).expect("writing /etc/subuid");
        Self { original }
    }
}

impl Drop for SubuidFile {
    fn drop(&mut self) {
        let r = match &self.original {
            Some(b) => fs::write(SUBUID, b),
            None => fs::remove_file(SUBUID),
        };
        if let Err(e) = r {
            eprintln!("[test] LEFTOVER: could not restore {SUBUID}: {e}");
        }
    }
}

/// Forks one process per uid, each opening `per` connections and holding
/// them until stdin closes; prints how many answers said `busy`.
const HOG: &str = r#"
import os, socket, sys
path, uids, per = sys.argv[1], [int(u) for u in sys.argv[2].split(",")], int(sys.argv[3])
r, w = os.pipe()
kids = []
for u in uids:
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setgroups([]); os.setresgid(u, u, u); os.setresuid(u, u, u)
        socks = []
        for _ in range(per):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            socks.append(s)
        busy = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                if b"busy" in s.recv(4096):
                    busy += 1
            except socket.timeout:
                pass
        os.write(w, b"%d\n" % busy)
        sys.stdin.read()
        os._exit(0)
    kids.append(pid)
os.close(w)
f = os.fdopen(r)
busy = sum(int(f.readline()) for _ in uids)
print(busy, flush=True)
sys.stdin.read()
"#;

#[test]
fn a_subordinate_uid_range_counts_as_its_owner_on_the_control_socket() {
    require_root();
    let (hog, other) = (TestUser::new(), TestUser::new());
    let l = Listener::loopback();
    let lab = lab(PolicyDir::new(&vm("v", l.port(), &[&other.name])));
    let first = 3_000_000 + spicegate_tests::next_id() * 65_536;
    let _subuid = SubuidFile::add(&hog.name, first, 65_536);
    // Eight uids of the hog's range, eight connections each: all 64 slots
    // for non-admins if each uid counted on its own.
    let uids: Vec<String> = (0..8).map(|k| (first + k).to_string()).collect();
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(HOG)
        .arg(lab.pin.socket())
        .arg(uids.join(","))
        .arg("8")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut busy = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut busy)
        .expect("reading the hog's count");
    let served = lab.ctl_as(&other, &["list"]);
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    let busy: u32 = busy.trim().parse().expect("a count");
    eprintln!("[test] the hog's range got {busy} busy answers of 64");
    assert!(
        busy >= 56,
        "the hog's 8 subordinate uids held {} connections; at most 8 for the whole range",
        64 - busy
    );
    assert_eq!(
        served.code,
        Some(0),
        "another user must be served: {served}"
    );
}

// ---- 6. a policy that a user could have written is not trusted ------------

#[test]
fn a_policy_others_could_write_is_refused() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback();
    let mut lab = lab(PolicyDir::new(&vm("v", l.port(), &[])));
    let sha = lab.status()["policy"]["sha256"].clone();

    // What a user would write, once he can.
    let evil = vm("v", l.port(), &[&user.name]);
    let refused = |what: &str, needle: &str| {
        let check = spicegate_tests::spicegate(["check".as_ref(), lab.policy.main().as_os_str()]);
        assert!(!check.status.success(), "{what}: check must fail");
        let out = text(&check.stdout) + &text(&check.stderr);
        assert!(out.contains(needle), "{what}: check says:\n{out}");
        let reload = lab.pin.ctl(["reload"]);
        assert!(!reload.status.success(), "{what}: reload must be refused");
        let out = text(&reload.stderr);
        assert!(out.contains(needle), "{what}: reload says:\n{out}");
        assert_eq!(
            lab.status()["policy"]["sha256"],
            sha,
            "{what}: policy changed"
        );
    };

    fs::write(lab.policy.main(), &evil).expect("write");
    lab.policy.chmod(&lab.policy.main(), 0o666);
    refused("policy file 0666", "mode 0666");
    lab.policy.chmod(&lab.policy.main(), 0o620);
    refused("policy file 0620", "mode 0620");
    lab.policy.chmod(&lab.policy.main(), 0o644);
    chown(lab.policy.main(), Some(user.uid), None).expect("chown");
    refused(
        "policy file owned by a user",
        &format!("owned by uid {}", user.uid),
    );
    chown(lab.policy.main(), Some(0), None).expect("chown back");
    fs::write(lab.policy.main(), vm("v", l.port(), &[])).expect("write");

    let dropin = lab.policy.dropins().join("extra.toml");
    fs::write(&dropin, "[settings]\n").expect("drop-in");
    lab.policy.chmod(&dropin, 0o664);
    refused("policy.d file 0664", "mode 0664");
    fs::remove_file(&dropin).expect("rm");
    lab.policy.chmod(&lab.policy.dropins(), 0o777);
    refused("policy.d 0777", "mode 0777");
    lab.policy.chmod(&lab.policy.dropins(), 0o755);
    lab.policy.chmod(lab.policy.dir(), 0o775);
    refused("the policy's directory 0775", "mode 0775");
    lab.policy.chmod(lab.policy.dir(), 0o755);
    let ok = lab.pin.ctl(["reload"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    // At start: the last good copy is enforced instead.
    lab.stop();
    fs::write(lab.policy.main(), &evil).expect("write");
    lab.policy.chmod(&lab.policy.main(), 0o666);
    lab.start_daemon();
    assert_eq!(lab.status()["policy"]["source"], "last-good");
    assert!(
        lab.daemon().lines().iter().any(|l| l.contains("mode 0666")),
        "the start must say why the file was refused"
    );
}

// ---- 1. only the server may listen on a guarded port ----------------------

/// Binds ADDR:PORT (and, with a fourth argument, connects from it to that
/// address) as a uid inside a cgroup; prints `bound`, or `refused ERRNO`.
const BINDER: &str = r#"
import os, socket, sys
cg, uid, gid, addr, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
open(cg + "/cgroup.procs", "w").write(str(os.getpid()))
os.setgroups([]); os.setresgid(gid, gid, gid); os.setresuid(uid, uid, uid)
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
try:
    s.bind((addr, port))
    print("bound")
except OSError as e:
    print("refused", e.errno)
"#;

fn bind_as(cg: &TestCgroup, uid: u32, gid: u32, addr: &str, port: u16) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(BINDER)
        .arg(cg.path())
        .args([
            uid.to_string(),
            gid.to_string(),
            addr.to_owned(),
            port.to_string(),
        ])
        .output()
        .expect("python3");
    let s = text(&out.stdout).trim().to_owned();
    eprintln!(
        "[test] bind {addr}:{port} as uid {uid}: {s} {}",
        text(&out.stderr)
    );
    s
}

/// A loopback TCP port nothing listens on (chosen by the kernel, then freed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn only_root_and_listeners_may_bind_a_guarded_local_port() {
    require_root();
    let squatter = TestUser::new();
    let qemu_group = spicegate_tests::TestGroup::new();
    let qemu = TestUser::with_primary(&qemu_group);
    let (p, q, r) = (free_port(), free_port(), free_port());
    let lab = lab(PolicyDir::new(&format!(
        "[protect]\nports = [{p}]\nlisteners = [\"@{}\"]\n\
         [vms.console]\nserver = \"localhost\"\nports = [{q}]\nallow = [\"{}\"]\n",
        qemu_group.name, squatter.name
    )));

    // Every local address, both families, both kinds of guarded port.
    for (addr, port) in [
        ("127.0.0.1", p),
        ("::1", p),
        ("0.0.0.0", p),
        ("127.0.0.2", q),
        ("::", q),
        ("127.0.0.1", q),
    ] {
        assert_eq!(
            bind_as(&lab.cg, squatter.uid, squatter.gid, addr, port),
            "refused 1",
            "{} must not bind {addr}:{port}",
            squatter.name
        );
        assert_eq!(
            bind_as(&lab.cg, qemu.uid, qemu.gid, addr, port),
            "bound",
            "the listener {} may bind {addr}:{port}",
            qemu.name
        );
        assert_eq!(bind_as(&lab.cg, 0, 0, addr, port), "bound", "root may bind");
    }
    // A port nobody guards is anyone's.
    assert_eq!(
        bind_as(&lab.cg, squatter.uid, squatter.gid, "127.0.0.1", r),
        "bound"
    );

    let deny = lab.daemon().wait_for_deny(
        "the refused bind",
        |d| d.uid == squatter.uid && d.line.contains("op=bind"),
        std::time::Duration::from_secs(3),
    );
    assert!(deny.line.contains(&format!(":{p}")), "{}", deny.line);

    // why, check and status name the listeners.
    let why = lab
        .pin
        .ctl(["why", &squatter.name, &format!("127.0.0.1:{q}")]);
    assert!(
        text(&why.stdout).contains(&format!("may not listen on port {q}")),
        "{}",
        text(&why.stdout)
    );
    let check = spicegate_tests::spicegate(["check".as_ref(), lab.policy.main().as_os_str()]);
    assert!(
        text(&check.stdout).contains(&format!("{}({})", qemu.name, qemu.uid)),
        "{}",
        text(&check.stdout)
    );
    let st = lab.status();
    assert_eq!(
        st["listeners"]["users"][0]["user"],
        qemu.name.as_str(),
        "{st:#}"
    );
}

// ---- 3. a start without working name services still enforces --------------

/// An account made with useradd under a chosen name; userdel on drop.
struct NamedUser {
    name: String,
}

impl NamedUser {
    fn create(name: &str) -> (Self, u32) {
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
        let uid = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
            .expect("the new user");
        (
            Self {
                name: name.to_owned(),
            },
            uid,
        )
    }
}

impl Drop for NamedUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

fn connect_as(lab: &Lab<PolicyDir>, uid: u32, port: u16) -> spicegate_tests::Outcome {
    lab.probe().as_ids(uid, uid).connect(v4(port)).outcome()
}

#[test]
fn a_start_with_names_that_do_not_resolve_enforces_the_rest_and_catches_up() {
    use spicegate_tests::Outcome::{Allowed, Denied};
    require_root();
    let granted = TestUser::new();
    let other = TestUser::new();
    let id = spicegate_tests::next_id();
    let late_user = format!("sglate{}x{id}", std::process::id() % 10_000);
    let (p, q) = (Listener::loopback(), Listener::loopback());
    let mut lab = prepared_lab(PolicyDir::new(&format!(
        "[protect]\nports = [{pp}]\n\
         [servers.gone]\naddress = \"kvm-{id}.spicegate-test.invalid\"\n\
         [vms.local]\nserver = \"localhost\"\nports = [{qp}]\n\
         allow = [\"{}\", \"{late_user}\", \"@nosuchgroup-sg{id}\"]\n\
         [vms.remote]\nserver = \"gone\"\nports = [{pp}]\nallow = [\"{}\"]\n",
        granted.name,
        other.name,
        pp = p.port(),
        qp = q.port(),
    )));
    assert!(
        !lab.pin.state_dir().join("last-good").exists(),
        "the test needs a start without a last good copy"
    );
    lab.start_daemon();

    let st = lab.status();
    assert_eq!(st["degraded"], true, "{st:#}");
    let names: Vec<String> = st["unresolved"]
        .as_array()
        .expect("unresolved")
        .iter()
        .map(|u| u["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    for want in [
        format!("user {late_user}"),
        format!("group @nosuchgroup-sg{id}"),
        format!("hostname kvm-{id}.spicegate-test.invalid"),
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(
        lab.daemon().lines().iter().any(|l| l.contains("DEGRADED")),
        "the start must say it is degraded"
    );
    // The resolvable parts are enforced; the unresolvable server's port is
    // guarded everywhere and granted to no one.
    assert_eq!(connect_as(&lab, granted.uid, q.port()), Allowed);
    assert_eq!(connect_as(&lab, other.uid, q.port()), Denied);
    assert_eq!(connect_as(&lab, other.uid, p.port()), Denied);
    assert_eq!(connect_as(&lab, granted.uid, p.port()), Denied);
    // A reload of the same policy is refused and says what a start does.
    let reload = lab.pin.ctl(["reload"]);
    assert!(!reload.status.success());
    assert!(
        text(&reload.stderr).contains("at start spicegate enforces the rest"),
        "{}",
        text(&reload.stderr)
    );

    // The account appears: within the retry interval it is granted and no
    // longer listed.
    let (_late, late_uid) = NamedUser::create(&late_user);
    let start = std::time::Instant::now();
    assert!(
        spicegate_tests::wait_until(std::time::Duration::from_secs(20), || {
            connect_as(&lab, late_uid, q.port()) == Allowed
        }),
        "{late_user} was not granted once the account existed"
    );
    eprintln!(
        "[test] {late_user} granted {:?} after the account appeared",
        start.elapsed()
    );
    let st = lab.status();
    let names = st["unresolved"].to_string();
    assert!(!names.contains(&late_user), "{names}");
    assert_eq!(
        st["degraded"], true,
        "the group and the hostname still do not resolve"
    );
    assert!(
        lab.daemon()
            .lines()
            .iter()
            .any(|l| l.contains(&format!("RESOLVED: user {late_user}"))),
        "the daemon must say the name resolves again"
    );
}

// ---- 2. ending access closes the right sockets ----------------------------

#[test]
fn revocation_closes_a_connection_whose_cgroup_is_gone() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = lab(PolicyDir::new(&vm("v", l.port(), &[])));
    let out = lab.pin.ctl(["grant", &user.name, "v"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Connected from a cgroup that then goes away (as a session scope
    // does when the session ends), the process living on elsewhere.
    let sub = lab.cg.path().join("session");
    fs::create_dir(&sub).expect("mkdir the session cgroup");
    let mut held = spicegate_tests::Probe::new(env!("CARGO_BIN_EXE_sg-probe"))
        .cgroup_dir(&sub)
        .as_user(&user)
        .connect(format!("127.0.0.1:{}", l.port()))
        .hold(60);
    fs::write(lab.cg.path().join("cgroup.procs"), held.pid.to_string()).expect("moving the probe");
    assert!(
        spicegate_tests::wait_until(std::time::Duration::from_secs(5), || fs::remove_dir(&sub)
            .is_ok()),
        "the session cgroup could not be removed"
    );

    let out = lab.pin.ctl(["revoke", &user.name, "v"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let closed = held.wait_closed(std::time::Duration::from_secs(3));
    assert!(
        closed.is_some(),
        "the revoked connection from a removed cgroup stayed open; daemon log:\n{}",
        lab.daemon().lines().join("\n")
    );
}

/// Server (as `uid`, on 127.0.0.1:`server_port`) and client (as root, bound
/// to the source port `src_port`) of one connection, both in `cg`. Prints
/// `ready`, then, for each line on stdin, `open` or `closed` for each side.
const PAIR: &str = r#"
import os, socket, sys
cg, uid, server_port, src_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
open(cg + "/cgroup.procs", "w").write(str(os.getpid()))
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", server_port)); l.listen(1)
    os.write(w, b"l")
    c, _ = l.accept()
    l.close()
    while True:
        line = os.read(0, 100)
        if not line:
            os._exit(0)
        try:
            d = c.recv(1, socket.MSG_DONTWAIT)
            print("server", "closed" if d == b"" else "open", flush=True)
        except BlockingIOError:
            print("server open", flush=True)
        except OSError:
            print("server closed", flush=True)
os.read(r, 1)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", src_port)); s.connect(("127.0.0.1", server_port))
print("ready", flush=True)
os.waitpid(pid, 0)
"#;

#[test]
fn ending_access_leaves_the_server_side_of_a_connection_alone() {
    require_root();
    let serving = TestUser::new(); // granted nothing
    let guarded = free_port();
    let server_port = free_port();
    let lab = lab(PolicyDir::new(&format!("[protect]\nports = [{guarded}]\n")));
    // root's client uses the guarded port as its *source* port (root may
    // bind it); the server side's remote port is then the guarded one.
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PAIR)
        .arg(lab.cg.path())
        .arg(serving.uid.to_string())
        .arg(server_port.to_string())
        .arg(guarded.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("ready"),
        "the pair did not connect"
    );
    // Every apply sweeps (now and a second later).
    let out = lab.pin.ctl(["reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::thread::sleep(std::time::Duration::from_millis(2500));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"?\n");
        let state = lines.next().and_then(Result::ok).unwrap_or_default();
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(state, "server open", "the server side was closed");
    }
    let closed = lab.log_lines(|l| l.contains("CLOSED"));
    assert!(
        closed.is_empty(),
        "false CLOSED lines:\n{}",
        closed.join("\n")
    );
}

// ---- 4. the engine fuzz corpus, replayed against a running daemon ---------

#[test]
fn the_engine_fuzz_corpus_never_takes_the_daemon_down() {
    require_root();
    // The fuzz target's policy (fuzz/fuzz_targets/engine.rs), on this
    // test's own cgroup, pins and socket.
    let mut lab = lab(PolicyDir::new(
        "[protect]\nports = [47911]\nlisteners = [\"#64055\"]\n\
         [vms.v]\nserver = \"localhost\"\nports = [47910, 47911]\ntls_port = 47911\nallow = [\"root\", \"#1001\"]\n\
         [[vms.v.schedule]]\nallow = [\"#1002\"]\ndays = [\"mon\", \"sun\"]\nhours = \"22:00-06:00\"\n\
         [vms.c]\nserver = \"localhost\"\nports = [47912]\nallow = [\"@console\"]\n",
    ));
    let dir = spicegate_tests::workspace_dir().join("fuzz/corpus/engine");
    let mut inputs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    for input in &inputs {
        let data = fs::read(input).expect("reading an input");
        if data.windows(6).any(|w| w == b"events") {
            continue; // a stream, not a request
        }
        let mut line = data.clone();
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let _ = raw_request(
            &lab.pin.socket(),
            &line,
            false,
            std::time::Duration::from_secs(10),
        );
        assert!(
            lab.daemon_mut().has_exited().is_none(),
            "the daemon died on {}: {:?}\nlog:\n{}",
            input.display(),
            String::from_utf8_lossy(&data),
            lab.daemon().lines().join("\n")
        );
    }
    let st = lab.status();
    assert_eq!(st["running"], true);
    eprintln!("[test] {} corpus inputs replayed", inputs.len());
}
