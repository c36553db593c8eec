//! End to end with a real Spice server and a real Spice client: QEMU serves
//! a VM's console (the firmware screen, no disk) over Spice on a fresh
//! 127.0.0.1 port, spicegate guards that port for one user, and
//! `remote-viewer` runs on an Xvfb display as that user and as another one,
//! each inside the test's child cgroup where spicegate is attached.
//!
//! "Got the display" is decided on the server's side: QMP `query-spice`
//! lists the client's channels (main, display, ...), and the client end of
//! each channel's TCP connection is a socket owned by the granted uid. For
//! the refused user the daemon logs a DENY line naming the uid, the client
//! process and the VM, and no channel or socket of that uid ever appears.
//! Screenshots of the X screen go to `$CARGO_TARGET_TMPDIR/spice_e2e/`.
//!
//! Needs root and the packages `cargo xtask setup` installs
//! (qemu-system-x86, virt-viewer, xvfb). Run with `--test-threads=1`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use spicegate_tests::{
    TestUser,
    lab::Lab,
    require_root,
    spice::{Qemu, SpiceChannel, SpiceClient, UserHome, Xvfb, tcp_sockets},
    wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

const VM: &str = "spicevm";
/// remote-viewer starts GTK, then connects; generous for a loaded CI box.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a refused client is watched for any channel of its own.
const WATCH: Duration = Duration::from_secs(5);

/// The uid owning the client end of `ch` (the socket whose local port is
/// the channel's source port and whose peer is the Spice port).
fn owner(ch: &SpiceChannel, spice_port: u16) -> Option<u32> {
    tcp_sockets()
        .into_iter()
        .find(|s| s.local_port == ch.port && s.remote_port == spice_port)
        .map(|s| s.uid)
}

fn describe(chans: &[SpiceChannel], spice_port: u16) -> String {
    if chans.is_empty() {
        return "no channels".into();
    }
    chans
        .iter()
        .map(|c| match owner(c, spice_port) {
            Some(uid) => format!("{c} uid {uid}"),
            None => format!("{c} uid ?"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("spice_e2e")
        .join(name)
}

#[test]
fn remote_viewer_gets_the_display_only_when_granted() {
    require_root();
    let started = Instant::now();
    // Declared first, dropped last: users, then QEMU and Xvfb outlive
    // everything that uses them.
    let alice = TestUser::new(); // granted
    let mallory = TestUser::new(); // not granted
    let mut qemu = Qemu::start(VM);
    let port = qemu.port();
    let x = Xvfb::start();
    let alice_home = UserHome::new(&alice, &x);
    let mallory_home = UserHome::new(&mallory, &x);
    let policy = format!(
        "[vms.{VM}]\nserver = \"localhost\"\nports = [{port}]\nallow = [\"{}\"]\n",
        alice.name
    );
    let lab = Lab::start(PROBE, &policy);
    eprintln!("[test] set up in {:.1}s", started.elapsed().as_secs_f64());
    assert!(
        qemu.channels().is_empty(),
        "a Spice client is connected before the test started one: {}",
        describe(&qemu.channels(), port)
    );

    // --- granted: alice gets the display.
    let t = Instant::now();
    let mut granted = SpiceClient::start(&lab.cg, &alice, &alice_home, &x, &qemu.uri());
    let mut chans = Vec::new();
    let connected = wait_until(CONNECT_TIMEOUT, || {
        chans = qemu.channels();
        let kinds: Vec<&str> = chans.iter().map(|c| c.kind.as_str()).collect();
        kinds.contains(&"main")
            && kinds.contains(&"display")
            && chans.iter().all(|c| owner(c, port) == Some(alice.uid))
    });
    assert!(
        connected,
        "remote-viewer as granted {} (uid {}) got no main and display channel within {CONNECT_TIMEOUT:?}: \
         query-spice shows {}; client exit {:?}; client output:\n{}\ndaemon log:\n{}",
        alice.name,
        alice.uid,
        describe(&chans, port),
        granted.exited(),
        granted.output().join("\n"),
        lab.daemon().lines().join("\n")
    );
    eprintln!(
        "[test] granted {} connected in {:.1}s: {}",
        alice.name,
        t.elapsed().as_secs_f64(),
        describe(&chans, port)
    );
    // Let the other channels join and the firmware screen arrive.
    std::thread::sleep(Duration::from_secs(3));
    let settled = qemu.channels();
    let alice_conn = settled
        .iter()
        .find(|c| c.kind == "main")
        .map(|c| c.connection_id)
        .unwrap_or_else(|| {
            panic!(
                "the granted client lost its main channel: {}",
                describe(&settled, port)
            )
        });
    assert!(
        settled.iter().all(|c| owner(c, port) == Some(alice.uid)),
        "a channel not of {}: {}",
        alice.name,
        describe(&settled, port)
    );
    eprintln!("[test] granted session: {}", describe(&settled, port));
    x.screenshot(&artifact("granted.png"));
    assert_eq!(
        granted.exited(),
        None,
        "the granted client exited; output:\n{}",
        granted.output().join("\n")
    );

    // --- refused: mallory's connect is refused in the kernel.
    let mut refused = SpiceClient::start(&lab.cg, &mallory, &mallory_home, &x, &qemu.uri());
    let deny = lab.daemon().wait_for_deny(
        &format!("DENY uid={}", mallory.uid),
        |d| d.uid == mallory.uid,
        CONNECT_TIMEOUT,
    );
    let threads = refused.thread_names();
    eprintln!(
        "[test] refused {}: {} (remote-viewer pid {}, threads {threads:?})",
        mallory.name,
        deny.line,
        refused.pid()
    );
    let dst = format!("127.0.0.1:{port}");
    let mut wrong = Vec::new();
    if deny.user != mallory.name {
        wrong.push(format!("user={} (expected {})", deny.user, mallory.name));
    }
    if deny.pid != refused.pid() {
        wrong.push(format!(
            "pid={} (expected remote-viewer's pid {})",
            deny.pid,
            refused.pid()
        ));
    }
    // The kernel reports the connecting thread's name; spice-gtk connects
    // from remote-viewer's main thread or from one of its own threads.
    if deny.comm != "remote-viewer" && !threads.contains(&deny.comm) {
        wrong.push(format!(
            "comm={} (expected remote-viewer or one of its threads {threads:?})",
            deny.comm
        ));
    }
    if deny.dst != dst {
        wrong.push(format!("dst={} (expected {dst})", deny.dst));
    }
    if deny.vm != VM {
        wrong.push(format!("vm={} (expected {VM})", deny.vm));
    }
    assert!(
        wrong.is_empty(),
        "the DENY line of the refused client is wrong: {}\n{}",
        wrong.join(", "),
        deny.line
    );

    // Watch: nothing of mallory's reaches the server, and alice's session
    // is untouched (a second Spice client would have replaced it).
    let deadline = Instant::now() + WATCH;
    while Instant::now() < deadline {
        let now = qemu.channels();
        let strays: Vec<&SpiceChannel> = now
            .iter()
            .filter(|c| c.connection_id != alice_conn || owner(c, port) != Some(alice.uid))
            .collect();
        assert!(
            strays.is_empty(),
            "channels other than {}'s session appeared after {}'s client started: {}",
            alice.name,
            mallory.name,
            describe(&now, port)
        );
        assert!(
            now.iter().any(|c| c.kind == "main") && now.iter().any(|c| c.kind == "display"),
            "{}'s session lost its main or display channel: {}",
            alice.name,
            describe(&now, port)
        );
        let socks: Vec<_> = tcp_sockets()
            .into_iter()
            .filter(|s| s.uid == mallory.uid && s.remote_port == port)
            .collect();
        assert!(
            socks.is_empty(),
            "{} holds TCP sockets to the Spice port: {socks:?}",
            mallory.name
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // remote-viewer itself saw the kernel's EPERM (its --debug output).
    let eperm = wait_until(WATCH, || {
        refused
            .output()
            .iter()
            .any(|l| l.contains("Operation not permitted"))
    });
    assert!(
        eperm,
        "the refused remote-viewer never said \"Operation not permitted\"; output:\n{}",
        refused.output().join("\n")
    );
    x.screenshot(&artifact("refused.png"));
    let fate = match refused.exited() {
        Some(st) => format!("exited ({st})"),
        None => "still running, unconnected".into(),
    };
    let said: Vec<String> = refused
        .output()
        .into_iter()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("unable to connect")
                || l.contains("not permitted")
                || l.contains("error")
                || l.contains("fail")
        })
        .collect();
    eprintln!(
        "[test] refused client {fate}; it said: {}",
        if said.is_empty() {
            "nothing about the failure".to_owned()
        } else {
            said.join(" | ")
        }
    );
    assert!(
        lab.daemon().deny_lines().iter().all(|d| d.uid != alice.uid),
        "the granted user was refused somewhere: {:?}",
        lab.daemon().deny_lines()
    );
    assert_eq!(
        granted.exited(),
        None,
        "the granted client exited; output:\n{}",
        granted.output().join("\n")
    );
    eprintln!(
        "[test] done in {:.1}s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        artifact("").display()
    );
}
