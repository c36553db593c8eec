//! Request lines sent to a *running* daemon (`spicegate run`, started once
//! at the first input on a test cgroup, pins and socket of its own): after
//! every input the daemon must still be alive and answer. Catches what the
//! parser target cannot: arithmetic, formatting and state reached only
//! with a policy, grants and a kernel behind the request (an absurd
//! `for_secs`, a far expiry rendered by `status`, ...).
//!
//! Needs root and a built daemon: `SPICEGATE_BIN` (set by `cargo xtask
//! fuzz`). Inputs are raw request lines; `fuzz/dict/engine.dict` gives the
//! mutator the protocol's words. The corpus is replayed against a daemon by
//! `tests/tests/holes.rs::the_engine_fuzz_corpus_never_takes_the_daemon_down`.
#![no_main]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;

struct Daemon {
    child: Child,
    socket: PathBuf,
    pin: PathBuf,
    cgroup: PathBuf,
    dir: PathBuf,
}

static DAEMON: OnceLock<Mutex<Daemon>> = OnceLock::new();

fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2").then_some(())?;
            let f: Vec<&str> = left.split_whitespace().collect();
            (f.get(3) == Some(&"/")).then(|| PathBuf::from(f[4]))
        })
        .expect("a cgroup2 mount")
}

extern "C" fn cleanup() {
    if let Some(d) = DAEMON.get() {
        let mut d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = d.child.kill();
        let _ = d.child.wait();
        let bin = std::env::var("SPICEGATE_BIN").unwrap_or_default();
        let _ = Command::new(bin).arg("unload").arg("--pin-dir").arg(&d.pin).status();
        let _ = std::fs::remove_dir(&d.cgroup);
        let _ = std::fs::remove_dir_all(&d.dir);
    }
}

fn start() -> Mutex<Daemon> {
    let bin = std::env::var("SPICEGATE_BIN").expect("SPICEGATE_BIN: the spicegate binary to fuzz");
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("spicegate-fuzz-{id}"));
    std::fs::create_dir_all(dir.join("state")).expect("fuzz dir");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[protect]\nports = [47911]\nlisteners = [\"#64055\"]\n\
         [vms.v]\nserver = \"localhost\"\nports = [47910, 47911]\ntls_port = 47911\nallow = [\"root\", \"#1001\"]\n\
         [[vms.v.schedule]]\nallow = [\"#1002\"]\ndays = [\"mon\", \"sun\"]\nhours = \"22:00-06:00\"\n\
         [vms.c]\nserver = \"localhost\"\nports = [47912]\nallow = [\"@console\"]\n",
    )
    .expect("policy");
    let cgroup = cgroup2_root().join(format!("spicegate-fuzz-{id}"));
    let _ = std::fs::create_dir(&cgroup);
    let pin = PathBuf::from(format!("/sys/fs/bpf/spicegate-fuzz-{id}"));
    let socket = dir.join("control.sock");
    let child = Command::new(&bin)
        .arg("--socket")
        .arg(&socket)
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--cgroup")
        .arg(&cgroup)
        .arg("--pin-dir")
        .arg(&pin)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting spicegate run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(cleanup) };
    Mutex::new(Daemon {
        child,
        socket,
        pin,
        cgroup,
        dir,
    })
}

/// Sends one line; returns the daemon's answer (empty if it closed).
fn send(socket: &PathBuf, line: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("the daemon stopped answering on its socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = s.write_all(line);
    if !line.ends_with(b"\n") {
        let _ = s.write_all(b"\n");
    }
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    answer
}

fuzz_target!(|data: &[u8]| {
    let d = DAEMON.get_or_init(start);
    let mut d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // `events` streams forever: not a request/answer.
    if data.windows(6).any(|w| w == b"events") {
        return;
    }
    let _ = send(&d.socket, data);
    if let Ok(Some(st)) = d.child.try_wait() {
        panic!("the daemon exited ({st}) after this input");
    }
    let status = send(&d.socket, b"{\"cmd\":\"status\"}\n");
    assert!(
        status.contains("\"ok\":true"),
        "status failed after this input: {status}"
    );
});
