//! Root integration tests of the commands for the people at the keyboard:
//! `spicegate list` (answers for the caller's uid only), `spicegate open`
//! (starts the Spice client with the right URI, or refuses with a sentence
//! and when access next begins), `spicegate notify` (a desktop notification
//! on the user's own session bus, shown by a real notification daemon, for
//! the user's own denials only, at most one per VM per `--every`), and the
//! autostart file that starts the agent.
//!
//! Each test has its own users, listeners on fresh loopback ports (which
//! are the only ports guarded), child cgroup, pin dir with its own control
//! socket and state dir, and policy file, all in guards. The CLI runs as the
//! unprivileged test users (setpriv, no supplementary groups, no sudo)
//! against the test's socket.
//!
//! Run as root, one test at a time: `cargo xtask test`, or
//! `cargo build --bins && SPICEGATE_BIN=$PWD/target/debug/spicegate \
//!  cargo test -p spicegate-tests --test user -- --test-threads=1`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use spicegate_tests::{
    CliOutput, Listener, Outcome, TestGroup, TestUser,
    desktop::{Background, DesktopSession},
    lab::Lab,
    logind::{FakeLogind, SessionSpec},
    require_root, spicegate_cmd,
    time::{now_unix, utc},
    unused_uid, wait_until, workspace_dir,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

/// A directory removed on Drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "spicegate-{tag}-{}-{}",
            std::process::id(),
            spicegate_tests::next_id()
        ));
        fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("[test] LEFTOVER directory {}: {e}", self.0.display());
        }
    }
}

/// A weekday three days from today (UTC) and the unix time it begins at:
/// neither today nor tomorrow, so a test crossing midnight still sees it
/// in the future.
fn weekday_in_three_days() -> (&'static str, u64) {
    let day = now_unix() / 86_400 + 3;
    (weekday_name(day), day * 86_400)
}

/// `mon` ... `sun` of a day counted from 1970-01-01 (a Thursday).
fn weekday_name(day: u64) -> &'static str {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    NAMES[usize::try_from((day + 3) % 7).expect("small")]
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as the daemon prints instants.
fn rfc3339(unix: u64) -> String {
    utc(i64::try_from(unix).expect("sane time"))
}

/// The entry named `name` of a `list --json` document.
fn entry<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["vms"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no vm `{name}` in {doc:#}"))
}

fn names(doc: &Value) -> Vec<String> {
    let mut n: Vec<String> = doc["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("`vms` is not a list in {doc:#}"))
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("?").to_owned())
        .collect();
    n.sort();
    n
}

/// Panics unless each (key, value) of `want` is in `vm`.
fn expect_fields(vm: &Value, want: &Value) {
    let wrong: Vec<String> = want
        .as_object()
        .expect("an object")
        .iter()
        .filter(|(k, v)| vm[k.as_str()] != **v)
        .map(|(k, v)| format!("{k}: expected {v}, got {}", vm[k.as_str()]))
        .collect();
    assert!(
        wrong.is_empty(),
        "vm {}:\n  {}\nwhole entry: {vm:#}",
        vm["name"],
        wrong.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// 1. list
// ---------------------------------------------------------------------------

#[test]
fn list_answers_for_the_caller_only() {
    require_root();
    let team = TestGroup::new();
    let anne = TestUser::with_supplementary(&team);
    let bob = TestUser::new();
    let ports: Vec<Listener> = (0..7).map(|_| Listener::loopback()).collect();
    let p = |i: usize| ports[i].port();
    // A window "today, all day" must not end while the test runs.
    if now_unix() % 86_400 > 86_400 - 120 {
        sleep(Duration::from_secs(121 - (86_400 - now_unix() % 86_400)));
    }
    let (day, begins) = weekday_in_three_days();
    let today_name = weekday_name(now_unix() / 86_400);
    let midnight = (now_unix() / 86_400 + 1) * 86_400;
    let nobody = unused_uid();
    let mut logind = FakeLogind::start();
    let base = format!(
        r##"[settings]
timezone = "UTC"

[servers.srv]
address = "192.0.2.10"

[vms.lab]
server = "localhost"
ports = [{p0}, {p1}]
tls_port = {p1}
ca_file = "/etc/spicegate-test/ca.pem"
allow = ["{anne}"]

[vms.remote]
server = "srv"
ports = [{p4}]
allow = ["@{team}"]

[vms.later]
server = "localhost"
ports = [{p2}]

[[vms.later.schedule]]
allow = ["{anne}"]
days = ["{day}"]

[vms.today]
server = "localhost"
ports = [{p5}]

[[vms.today.schedule]]
allow = ["{anne}"]
days = ["{today_name}"]

[vms.hidden]
server = "localhost"
ports = [{p3}]
allow = ["#{nobody}"]
"##,
        p0 = p(0),
        p1 = p(1),
        p2 = p(2),
        p3 = p(3),
        p4 = p(4),
        p5 = p(5),
        anne = anne.name,
        team = team.name,
    );
    let lab = Lab::builder(PROBE)
        .arg("--logind-bus")
        .arg(&logind.address)
        .start(&base);

    // Anne: lab, remote and today now, later on its day; hidden is not hers.
    let doc = lab.list_json(&anne);
    assert_eq!(doc["uid"], anne.uid, "{doc:#}");
    assert_eq!(doc["user"], anne.name.as_str(), "{doc:#}");
    assert_eq!(doc["client"], json!(["remote-viewer"]), "{doc:#}");
    assert_eq!(names(&doc), ["lab", "later", "remote", "today"], "{doc:#}");
    expect_fields(
        entry(&doc, "lab"),
        &json!({
            "server": "localhost", "host": "localhost", "addresses": [],
            "port": p(0), "tls_port": p(1), "tls": true,
            "ca_file": "/etc/spicegate-test/ca.pem",
            "allowed_now": true, "via": "policy", "console_only": false,
            "next_change": null, "schedules": [],
        }),
    );
    expect_fields(
        entry(&doc, "remote"),
        &json!({
            "server": "srv", "host": "192.0.2.10", "addresses": ["192.0.2.10"],
            "port": p(4), "tls_port": null, "tls": false, "ca_file": null,
            "allowed_now": true, "via": "policy", "console_only": false, "next_change": null,
        }),
    );
    expect_fields(
        entry(&doc, "later"),
        &json!({
            "server": "localhost", "host": "localhost",
            "port": p(2), "tls_port": null, "tls": false, "ca_file": null,
            "allowed_now": false, "via": "none", "console_only": false,
            "next_change": rfc3339(begins), "schedules": [day],
        }),
    );
    expect_fields(
        entry(&doc, "today"),
        &json!({
            "allowed_now": true, "via": "schedule", "console_only": false,
            "next_change": rfc3339(midnight), "schedules": [today_name],
        }),
    );
    let text = lab.ctl_ok_as(&anne, &["list"]);
    let want = format!(
        "lab: open now; localhost (server localhost) port {} tls-port {}\n\
         later: later (from {}); localhost (server localhost) port {}\n\
         remote: open now; 192.0.2.10 (server srv) port {}\n\
         today: open now (until {}); localhost (server localhost) port {}\n",
        p(0),
        p(1),
        rfc3339(begins),
        p(2),
        p(4),
        rfc3339(midnight),
        p(5)
    );
    assert_eq!(text.stdout, want, "`list` as {}:\n{text}", anne.name);

    // What `list` says is what the kernel does.
    for (port, want, what) in [
        (p(0), Outcome::Allowed, "lab (open now)"),
        (p(5), Outcome::Allowed, "today (open now by schedule)"),
        (p(2), Outcome::Denied, "later (not now)"),
        (p(3), Outcome::Denied, "hidden (not hers)"),
    ] {
        let got = lab.outcome(&anne, port);
        assert_eq!(
            got, want,
            "{} -> {what}: list and kernel disagree",
            anne.name
        );
    }
    assert_eq!(lab.outcome(&bob, p(0)), Outcome::Denied, "bob -> lab");

    // Bob: nothing, said so, exit 0.
    let doc = lab.list_json(&bob);
    assert_eq!(doc["uid"], bob.uid, "{doc:#}");
    assert_eq!(doc["vms"], json!([]), "bob's list: {doc:#}");
    let text = lab.ctl_ok_as(&bob, &["list"]);
    assert_eq!(
        text.stdout,
        format!("{}: no VMs, now or later\n", bob.name),
        "{text}"
    );

    // Root is answered for root too: no one sees another's list.
    let out = CliOutput::new(lab.pin.ctl(["list", "--json"]), &["list", "--json"]);
    assert_eq!(out.code, Some(0), "{out}");
    let root_doc: Value = serde_json::from_str(&out.stdout).expect("root's list is JSON");
    assert_eq!(root_doc["uid"], 0, "{out}");
    assert_eq!(
        root_doc["vms"],
        json!([]),
        "root is granted nothing:\n{out}"
    );

    // The request has no field to ask for someone else: one smuggled in
    // is refused or ignored, and the answer is still the caller's own.
    let raw = raw_as(
        &bob,
        &lab.pin.socket(),
        &format!(
            r#"{{"cmd":"list","uid":{0},"user":"{1}"}}"#,
            anne.uid, anne.name
        ),
    );
    let answer: Value = serde_json::from_str(&raw)
        .unwrap_or_else(|e| panic!("the daemon's answer is not JSON ({e}): {raw}"));
    assert!(
        answer["ok"] == false
            || (answer["result"]["uid"] == bob.uid && answer["result"]["vms"] == json!([])),
        "a list request naming {} must not answer for her, got {raw}",
        anne.name
    );

    // A temporary grant shows for its user only, and goes with revoke.
    let grant = ["grant", bob.name.as_str(), "hidden", "--for", "1h"];
    let out = CliOutput::new(lab.pin.ctl(grant), &grant);
    assert_eq!(out.code, Some(0), "{out}");
    let doc = lab.list_json(&bob);
    assert_eq!(names(&doc), ["hidden"], "bob's list with a grant: {doc:#}");
    expect_fields(
        entry(&doc, "hidden"),
        &json!({"allowed_now": true, "via": "temporary", "console_only": false}),
    );
    let end = entry(&doc, "hidden")["next_change"].clone();
    eprintln!("[test] a temporary grant's end in `list`: next_change = {end}");
    assert!(
        end.as_str()
            .is_some_and(|t| t.ends_with('Z') || t.contains('+')),
        "a temporary grant's `list` entry names when it ends: {doc:#}"
    );
    let text = lab.ctl_ok_as(&bob, &["list"]).stdout;
    assert!(
        text.contains("open now (until "),
        "bob's `list` says until when the grant holds: {text}"
    );
    assert_eq!(
        lab.outcome(&bob, p(3)),
        Outcome::Allowed,
        "bob -> hidden (granted)"
    );
    assert!(
        !names(&lab.list_json(&anne)).contains(&"hidden".to_owned()),
        "bob's grant shows in anne's list"
    );
    let revoke = ["revoke", bob.name.as_str(), "hidden"];
    let out = CliOutput::new(lab.pin.ctl(revoke), &revoke);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(lab.list_json(&bob)["vms"], json!([]), "after revoke");

    // A VM for the console user: listed for everyone; open now only for
    // whoever holds seat0.
    lab.reload_to(&format!(
        "{base}\n[vms.screen]\nserver = \"localhost\"\nports = [{}]\nallow = [\"@console\"]\n",
        p(6)
    ));
    let console_only = json!({
        "server": "localhost", "host": "localhost", "port": p(6),
        "allowed_now": false, "console_only": true, "next_change": null, "via": "none",
    });
    let doc = lab.list_json(&anne);
    assert_eq!(
        names(&doc),
        ["lab", "later", "remote", "screen", "today"],
        "{doc:#}"
    );
    expect_fields(entry(&doc, "screen"), &console_only);
    let text = lab.ctl_ok_as(&anne, &["list"]);
    let line = format!(
        "screen: only while you hold this machine's console; localhost (server localhost) port {}",
        p(6)
    );
    assert!(
        text.stdout.lines().any(|l| l == line),
        "`list` as {} lacks {line:?}:\n{text}",
        anne.name
    );
    let doc = lab.list_json(&bob);
    assert_eq!(names(&doc), ["screen"], "bob's list: {doc:#}");
    expect_fields(entry(&doc, "screen"), &console_only);

    // Anne logs in at the screen: open now for her, still not for bob.
    logind.activate(SessionSpec::local(anne.uid));
    let mut doc = Value::Null;
    let became = wait_until(Duration::from_secs(5), || {
        doc = lab.list_json(&anne);
        entry(&doc, "screen")["allowed_now"] == true
    });
    assert!(
        became,
        "screen not open for the console user within 5 s: {doc:#}"
    );
    expect_fields(
        entry(&doc, "screen"),
        &json!({"allowed_now": true, "via": "console", "console_only": false}),
    );
    assert_eq!(
        lab.outcome(&anne, p(6)),
        Outcome::Allowed,
        "console user -> screen"
    );
    let doc = lab.list_json(&bob);
    expect_fields(entry(&doc, "screen"), &console_only);
    assert_eq!(lab.outcome(&bob, p(6)), Outcome::Denied, "bob -> screen");
    drop(lab);
}

/// One raw request line on the control socket, sent as `user` (python3,
/// which the harness installs, so the peer credentials are the user's).
fn raw_as(user: &TestUser, socket: &Path, request: &str) -> String {
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(sys.argv[2].encode() + b'\\n')\n\
                  s.settimeout(5)\n\
                  print(s.makefile().readline().strip())\n";
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &user.uid.to_string(),
            "--regid",
            &user.gid.to_string(),
            "--clear-groups",
            // Debian's, not whatever `python3` PATH finds first (root's
            // pyenv shims are not readable by the test user).
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(socket)
        .arg(request)
        .output()
        .expect("running python3 as a test user");
    assert!(
        out.status.success(),
        "raw request as {}: {}",
        user.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// 2. open
// ---------------------------------------------------------------------------

/// A stand-in Spice client: writes its ids and argv (one per line) to
/// `out/<its name>.argv` next to itself.
const FAKE_CLIENT: &str = r#"#!/bin/sh
out="$(dirname "$0")/out/$(basename "$0").argv"
{ echo "ruid=$(id -ru) euid=$(id -u)"; for a in "$0" "$@"; do printf '%s\n' "$a"; done; } > "$out"
"#;

/// What a fake client recorded, and removes the record.
fn recorded(dir: &Path, client: &str) -> Option<Vec<String>> {
    let p = dir.join("out").join(format!("{client}.argv"));
    let text = fs::read_to_string(&p).ok()?;
    fs::remove_file(&p).unwrap_or_else(|e| panic!("removing {}: {e}", p.display()));
    Some(text.lines().map(str::to_owned).collect())
}

#[test]
fn open_runs_the_client_with_the_uri() {
    require_root();
    let anne = TestUser::new();
    let bob = TestUser::new();
    let ports: Vec<Listener> = (0..7).map(|_| Listener::loopback()).collect();
    let p = |i: usize| ports[i].port();
    let (day, begins) = weekday_in_three_days();

    let clients = Scratch::new("clients");
    let dir = clients.0.clone();
    for name in ["remote-viewer", "myviewer"] {
        let f = dir.join(name);
        fs::write(&f, FAKE_CLIENT).unwrap_or_else(|e| panic!("writing {}: {e}", f.display()));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", f.display()));
    }
    let out_dir = dir.join("out");
    fs::create_dir(&out_dir).expect("creating the clients' out dir");
    nix::unistd::chown(
        &out_dir,
        Some(nix::unistd::Uid::from_raw(anne.uid)),
        Some(nix::unistd::Gid::from_raw(anne.gid)),
    )
    .expect("chown of the clients' out dir");

    let policy = |client: &str| {
        format!(
            r#"[settings]
timezone = "UTC"
client = "{client}"

[servers.six]
address = "::1"

[vms.tlsvm]
server = "localhost"
ports = [{p0}, {p1}]
tls_port = {p1}
ca_file = "/etc/spicegate-test/ca.pem"
allow = ["{anne}"]

[vms.tlsonly]
server = "localhost"
ports = [{p2}]
tls_port = {p2}
allow = ["{anne}"]

[vms.v6vm]
server = "six"
ports = [{p3}]
allow = ["{anne}"]

[vms.later]
server = "localhost"
ports = [{p4}]

[[vms.later.schedule]]
allow = ["{anne}"]
days = ["{day}"]

[vms.bobs]
server = "localhost"
ports = [{p5}]
allow = ["{bob}"]

[vms.screen]
server = "localhost"
ports = [{p6}]
allow = ["@console"]
"#,
            p0 = p(0),
            p1 = p(1),
            p2 = p(2),
            p3 = p(3),
            p4 = p(4),
            p5 = p(5),
            p6 = p(6),
            anne = anne.name,
            bob = bob.name,
        )
    };
    let myviewer = dir.join("myviewer").display().to_string();
    let remote_viewer = dir.join("remote-viewer").display().to_string();
    let lab = Lab::start(PROBE, &policy(&format!("{myviewer} --full-screen")));
    let ids = format!("ruid={0} euid={0}", anne.uid);
    let tls_uri = format!("spice://localhost?port={}&tls-port={}", p(0), p(1));

    // A client not named remote-viewer gets its own words and the URI only.
    let out = lab.ctl_ok_as(&anne, &["open", "tlsvm", "--dry-run"]);
    assert_eq!(
        out.stdout,
        format!("{myviewer} --full-screen {tls_uri}\n"),
        "{out}"
    );
    assert_eq!(
        recorded(&dir, "myviewer"),
        None,
        "--dry-run started the client"
    );
    lab.ctl_ok_as(&anne, &["open", "tlsvm"]);
    assert_eq!(
        recorded(&dir, "myviewer"),
        Some(vec![
            ids.clone(),
            myviewer.clone(),
            "--full-screen".into(),
            tls_uri.clone()
        ]),
        "argv of the client `open tlsvm` started"
    );
    lab.ctl_ok_as(&anne, &["open", "v6vm"]);
    assert_eq!(
        recorded(&dir, "myviewer"),
        Some(vec![
            ids.clone(),
            myviewer.clone(),
            "--full-screen".into(),
            format!("spice://[::1]?port={}", p(3))
        ]),
        "argv of the client `open v6vm` started"
    );

    // remote-viewer also gets the CA file, when the VM has one.
    lab.reload_to(&policy(&remote_viewer));
    let out = lab.ctl_ok_as(&anne, &["open", "tlsvm", "--dry-run"]);
    assert_eq!(
        out.stdout,
        format!("{remote_viewer} --spice-ca-file=/etc/spicegate-test/ca.pem {tls_uri}\n"),
        "{out}"
    );
    lab.ctl_ok_as(&anne, &["open", "tlsvm"]);
    assert_eq!(
        recorded(&dir, "remote-viewer"),
        Some(vec![
            ids.clone(),
            remote_viewer.clone(),
            "--spice-ca-file=/etc/spicegate-test/ca.pem".into(),
            tls_uri.clone()
        ]),
        "argv of remote-viewer for `open tlsvm`"
    );
    lab.ctl_ok_as(&anne, &["open", "tlsonly"]);
    assert_eq!(
        recorded(&dir, "remote-viewer"),
        Some(vec![
            ids.clone(),
            remote_viewer.clone(),
            format!("spice://localhost?tls-port={}", p(2))
        ]),
        "argv of remote-viewer for `open tlsonly` (no ca_file: no --spice-ca-file)"
    );

    // Not now: a sentence, when access begins, exit 1, no client.
    let out = lab.ctl_as(&anne, &["open", "later"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("may not open VM `later`")
            && out
                .stderr
                .contains(&format!("your access begins {}", rfc3339(begins))),
        "`open later` must say she may not open it and when access begins:\n{out}"
    );
    let out = lab.ctl_as(&anne, &["open", "screen"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("may not open VM `screen`")
            && out
                .stderr
                .contains("only for whoever is logged in at this machine's screen"),
        "`open screen` (console-only):\n{out}"
    );

    // Another's VM and a VM that does not exist read the same: no access.
    let theirs = lab.ctl_as(&anne, &["open", "bobs"]);
    let none = lab.ctl_as(&anne, &["open", "no-such-vm"]);
    for (out, vm) in [(&theirs, "bobs"), (&none, "no-such-vm")] {
        assert!(out.failed(), "{out}");
        assert!(
            out.stderr
                .contains(&format!("you have no access to VM `{vm}`")),
            "`open {vm}` must say she has no access:\n{out}"
        );
    }
    assert_eq!(
        theirs.stderr.replace("bobs", "X"),
        none.stderr.replace("no-such-vm", "X"),
        "`open` must not tell another user's VM from a missing one"
    );
    for (user, vm) in [(&anne, "later"), (&anne, "bobs"), (&anne, "no-such-vm")] {
        let out = lab.ctl_as(user, &["open", vm, "--dry-run"]);
        assert!(
            out.failed() && out.stdout.is_empty(),
            "dry run of {vm}:\n{out}"
        );
    }
    assert_eq!(
        recorded(&dir, "remote-viewer"),
        None,
        "a refused open started the client"
    );

    // Bob opens his own.
    let out = lab.ctl_ok_as(&bob, &["open", "bobs", "--dry-run"]);
    assert_eq!(
        out.stdout,
        format!("{remote_viewer} spice://localhost?port={}\n", p(5)),
        "{out}"
    );
    drop(lab);
}

// ---------------------------------------------------------------------------
// 3. notify
// ---------------------------------------------------------------------------

/// Established connections to the control socket (the server's ends carry
/// its path in /proc/net/unix; state 03 is connected).
fn connections_to(socket: &Path) -> usize {
    let path = socket.display().to_string();
    fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8 && f[5] == "03" && f[7] == path
        })
        .count()
}

#[test]
fn notify_shows_a_desktop_notification() {
    require_root();
    let anne = TestUser::new();
    let bob = TestUser::new();
    let ports: Vec<Listener> = (0..4).map(|_| Listener::loopback()).collect();
    let p = |i: usize| ports[i].port();
    let (day, begins) = weekday_in_three_days();
    let other = unused_uid();
    let mut lab = Lab::start(
        PROBE,
        &format!(
            r##"[settings]
timezone = "UTC"

[vms.ng]
server = "localhost"
ports = [{p0}]
allow = ["#{other}"]

[vms.sched]
server = "localhost"
ports = [{p1}]

[[vms.sched.schedule]]
allow = ["{anne}"]
days = ["{day}"]

[vms.screen]
server = "localhost"
ports = [{p2}]
allow = ["@console"]

[vms.bobvm]
server = "localhost"
ports = [{p3}]
"##,
            p0 = p(0),
            p1 = p(1),
            p2 = p(2),
            p3 = p(3),
            anne = anne.name,
        ),
    );

    let t = Instant::now();
    let mut desk = DesktopSession::start(&anne);
    eprintln!("[test] desktop session up in {:?}", t.elapsed());
    let mut cmd = spicegate_cmd(&lab.pin, Some(&anne));
    desk.enter(&mut cmd);
    cmd.args(["notify", "--every", "2"]);
    let mut agent = Background::spawn(cmd, "spicegate notify (as anne)");
    let socket = lab.pin.socket();
    assert!(
        wait_until(Duration::from_secs(10), || connections_to(&socket) >= 1),
        "the notify agent did not connect to {} within 10 s",
        socket.display()
    );
    // Connected; give it a moment to send its request and be subscribed.
    sleep(Duration::from_millis(300));
    agent.expect_running();

    let wait_count = |desk: &mut DesktopSession, n: usize, what: &str| {
        let mut got = Vec::new();
        let ok = wait_until(Duration::from_secs(10), || {
            got = desk.notifications();
            got.len() >= n
        });
        assert!(
            ok,
            "{what}: expected {n} notification(s) within 10 s, got {got:#?}\ndunst: {}",
            desk.log("dunst.err")
        );
        got
    };

    // Bob's denial is not anne's business.
    lab.deny(&bob, p(0), 1);
    sleep(Duration::from_millis(2500));
    let seen = desk.notifications();
    assert!(seen.is_empty(), "bob's denial notified anne: {seen:#?}");

    // Anne's: the VM in the summary, the short reason in the body.
    let first = lab.deny(&anne, p(0), 1);
    let t = Instant::now();
    let seen = wait_count(&mut desk, 1, "anne denied on ng");
    eprintln!("[test] first notification after {:?}", t.elapsed());
    let n = &seen[0];
    assert_eq!(n.app, "spicegate", "{n:#?}");
    assert!(
        n.summary.contains("ng") && n.summary == "Access to VM ng refused",
        "summary must name the VM: {n:#?}"
    );
    assert!(
        n.body.contains("not granted") && n.body.contains(&format!("127.0.0.1:{}", p(0))),
        "body must say why: {n:#?}"
    );

    // A burst on one VM: one notification in the --every window.
    let burst = lab.deny(&anne, p(1), 3);
    let seen = wait_count(&mut desk, 2, "anne denied 3 times on sched");
    let outside = format!("outside {day} (next access {})", rfc3339(begins));
    let sched: Vec<_> = seen
        .iter()
        .filter(|n| n.summary.contains("sched"))
        .collect();
    assert!(
        sched.len() == 1 && sched[0].body.contains(&outside),
        "expected one notice for sched with {outside:?}, got {seen:#?}"
    );
    let deny_lines = lab
        .daemon()
        .deny_lines()
        .iter()
        .filter(|d| d.uid == anne.uid && d.dst.ends_with(&format!(":{}", p(1))))
        .count();
    assert_eq!(deny_lines, 3, "all three denials must have been reported");

    // The console-only VM.
    lab.deny(&anne, p(2), 1);
    let seen = wait_count(&mut desk, 3, "anne denied on screen");
    let screen: Vec<_> = seen
        .iter()
        .filter(|n| n.summary.contains("screen"))
        .collect();
    assert!(
        screen.len() == 1
            && screen[0].summary == "Access to VM screen refused"
            && screen[0].body.contains("only for the console user"),
        "{seen:#?}"
    );

    // Bob again, on a VM anne never touched.
    lab.deny(&bob, p(3), 1);

    // After the window, sched notifies again. The kernel logs 5 denials
    // per uid per 10 s, and anne used them up: wait for a fresh budget.
    let ready = (first + Duration::from_millis(10_500)).max(burst + Duration::from_secs(3));
    sleep(ready.saturating_duration_since(Instant::now()));
    lab.deny(&anne, p(1), 1);
    let seen = wait_count(&mut desk, 4, "anne denied on sched after the window");
    sleep(Duration::from_millis(1500));
    let seen_later = desk.notifications();
    assert_eq!(seen, seen_later, "more notifications than denials");
    let summaries: Vec<&str> = seen.iter().map(|n| n.summary.as_str()).collect();
    assert_eq!(
        summaries,
        [
            "Access to VM ng refused",
            "Access to VM sched refused",
            "Access to VM screen refused",
            "Access to VM sched refused",
        ],
        "{seen:#?}"
    );

    // The daemon restarts (an upgrade does): the agent reconnects by itself.
    lab.restart();
    assert!(
        wait_until(Duration::from_secs(15), || connections_to(&socket) >= 1),
        "the notify agent did not reconnect to {} within 15 s of a daemon restart",
        socket.display()
    );
    sleep(Duration::from_millis(300));
    lab.deny(&anne, p(0), 1);
    let seen = wait_count(&mut desk, 5, "anne denied on ng after a daemon restart");
    assert_eq!(seen[4].summary, "Access to VM ng refused", "{seen:#?}");
    assert!(seen[4].body.contains("not granted"), "{seen:#?}");

    agent.expect_running();
    let pids = desk.pids();
    drop(agent);
    drop(desk);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "session process {pid} still there after Drop"
        );
    }
    drop(lab);
}

// ---------------------------------------------------------------------------
// 4. the autostart file
// ---------------------------------------------------------------------------

#[test]
fn autostart_desktop_file_is_valid() {
    let file = workspace_dir().join("packaging/spicegate-notify.desktop");
    let out = Command::new("desktop-file-validate")
        .arg(&file)
        .output()
        .expect("desktop-file-validate (package desktop-file-utils; `cargo xtask setup`)");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "desktop-file-validate {}: {}\n{}{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&file).expect("reading the .desktop file");
    assert!(
        text.lines()
            .any(|l| l.starts_with("Exec=") && l.ends_with("spicegate notify")),
        "the autostart entry must run `spicegate notify`:\n{text}"
    );
}
