//! Root integration tests of `[settings] metrics_file` (docs/metrics.md):
//! the daemon writes Prometheus metrics to a file, Debian's real
//! `prometheus-node-exporter` exports it through its textfile collector, and
//! what a scrape returns matches `spicegate status --json` after known
//! connects by real users. `promtool check metrics` passes on the file and
//! `promtool check rules` on the shipped alert rules.
//!
//! Everything is in guards: users, listeners on fresh loopback ports, a
//! child cgroup, a pin dir (own socket and state dir), the policy file, the
//! metrics directory, and node_exporter (listening on 127.0.0.1 only, on a
//! free high port; killed in Drop).
//!
//! Run as root, one test at a time: `cargo xtask build &&
//! SPICEGATE_BIN=$PWD/target/debug/spicegate cargo test -p spicegate-tests
//! --test metrics -- --test-threads=1`.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use spicegate_tests::{
    CliOutput, Daemon, Listener, Outcome, PinDir, PolicyFile, TestCgroup, TestUser,
    lab::{Lab, v4, vm},
    require_root, spicegate, wait_until, workspace_dir,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");
const NODE_EXPORTER: &str = "prometheus-node-exporter";
const PROMTOOL: &str = "promtool";

/// A directory for the metrics file (root's, 0755), removed on drop.
struct MetricsDir(PathBuf);

impl MetricsDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "sg-metrics-{}-{}",
            std::process::id(),
            spicegate_tests::next_id()
        ));
        fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod 0755");
        Self(p)
    }

    fn file(&self) -> PathBuf {
        self.0.join("spicegate.prom")
    }
}

impl Drop for MetricsDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("[harness] LEFTOVER {}: {e}", self.0.display());
        }
    }
}

/// Debian's node_exporter with only the textfile collector, on
/// 127.0.0.1:<free high port>. Drop kills and reaps it.
struct NodeExporter {
    child: Child,
    port: u16,
}

impl NodeExporter {
    fn start(dir: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut cmd = Command::new(NODE_EXPORTER);
        cmd.arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(["--collector.disable-defaults", "--collector.textfile"])
            .arg(format!("--collector.textfile.directory={}", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("starting {NODE_EXPORTER} ({e}): install it with `cargo xtask setup`")
        });
        eprintln!("[harness] started {cmd:?} as pid {}", child.id());
        let n = Self { child, port };
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "{NODE_EXPORTER} did not listen on 127.0.0.1:{port} within 10 s"
        );
        n
    }

    /// `GET /metrics` over plain HTTP/1.0; the body.
    fn scrape(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to scrape");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("sending the request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reading the response");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP header end in {text:?}"));
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "scrape failed: {head}"
        );
        body.to_owned()
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        if let Err(e) = self.child.wait() {
            eprintln!(
                "[harness] LEFTOVER {NODE_EXPORTER} pid {}: {e}",
                self.child.id()
            );
        }
    }
}

/// `name{b="2",a="1"}` as `name{a="1",b="2"}`: node_exporter sorts the
/// labels of what it exports. (Label values here hold no commas.)
fn normalize(series: &str) -> String {
    match series.split_once('{') {
        Some((name, labels)) => {
            let mut l: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            l.sort_unstable();
            format!("{name}{{{}}}", l.join(","))
        }
        None => series.to_owned(),
    }
}

/// The value of the sample `series` (`name` or `name{labels}`, labels in
/// any order) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    let want = normalize(series);
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (normalize(s) == want).then(|| v.trim().parse().ok())?
    })
}

fn connects(text: &str, vm: &str, outcome: &str) -> Option<f64> {
    sample(
        text,
        &format!("spicegate_connects_total{{vm=\"{vm}\",outcome=\"{outcome}\"}}"),
    )
}

fn policy(metrics: Option<&Path>, protect: u16, vms: &[(&str, u16, &[&str])]) -> String {
    let mut p = String::new();
    if let Some(m) = metrics {
        p += &format!("[settings]\nmetrics_file = \"{}\"\n\n", m.display());
    }
    p += &format!("[protect]\nports = [{protect}]\n");
    for (name, port, allow) in vms {
        p += &format!("\n{}", vm(name, *port, allow));
    }
    p
}

/// Whether a scrape agrees with `status` on every VM's counters, the
/// `[protect]` counters, attached, table_in_force, the digest and counts.
fn disagreements(text: &str, st: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut check = |what: String, got: Option<f64>, want: Option<f64>| {
        if got.is_none() || got != want {
            wrong.push(format!("{what}: metrics {got:?}, status {want:?}"));
        }
    };
    for vm in st["vms"].as_array().expect("vms[]") {
        let name = vm["name"].as_str().expect("vm name");
        for outcome in ["allowed", "denied", "audited"] {
            check(
                format!("vm {name} {outcome}"),
                connects(text, name, outcome),
                vm[outcome].as_f64(),
            );
        }
    }
    check(
        "[protect] denied".into(),
        connects(text, "", "denied"),
        st["protect_denied"].as_f64(),
    );
    check(
        "[protect] audited".into(),
        connects(text, "", "audited"),
        st["protect_audited"].as_f64(),
    );
    let flag = |k: &str| st[k].as_bool().map(|b| f64::from(u8::from(b)));
    check(
        "attached".into(),
        sample(text, "spicegate_attached"),
        flag("attached"),
    );
    check(
        "table_in_force".into(),
        sample(text, "spicegate_table_in_force"),
        flag("table_in_force"),
    );
    check(
        "degraded".into(),
        sample(text, "spicegate_degraded"),
        flag("degraded"),
    );
    check(
        "grants".into(),
        sample(text, "spicegate_grants"),
        st["counts"]["grants"].as_f64(),
    );
    check(
        "guarded_endpoints".into(),
        sample(text, "spicegate_guarded_endpoints"),
        st["counts"]["guarded_endpoints"].as_f64(),
    );
    let sha = st["policy"]["sha256"].as_str().unwrap_or("?");
    check(
        "policy_info".into(),
        sample(text, &format!("spicegate_policy_info{{sha256=\"{sha}\"}}")),
        Some(1.0),
    );
    wrong
}

/// Runs promtool; panics with its output unless it exits 0.
fn promtool(args: &[&str], stdin: Option<&Path>) {
    let mut cmd = Command::new(PROMTOOL);
    cmd.args(args);
    if let Some(f) = stdin {
        cmd.stdin(fs::File::open(f).expect("opening promtool's input"));
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("running {PROMTOOL} ({e}): install it with `cargo xtask setup`")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_scraped_through_node_exporter_match_status() {
    require_root();
    let alice = TestUser::new(); // granted
    let bob = TestUser::new(); // refused
    let vm_port = Listener::loopback_keeping_connections();
    let idle = Listener::loopback();
    let protect = Listener::loopback();
    let dir = MetricsDir::new();
    let text = policy(
        Some(&dir.file()),
        protect.port(),
        &[
            ("metricsvm", vm_port.port(), &[&alice.name]),
            ("idlevm", idle.port(), &[&alice.name]),
        ],
    );
    let lab = Lab::start(PROBE, &text);
    lab.daemon().wait_for_line(
        "METRICS: writing Prometheus metrics to",
        Duration::from_secs(5),
    );

    // Known connects: 3 granted, 2 refused to the VM, 1 refused on the
    // [protect] port of no VM.
    let probe = |u: &TestUser, port: u16| lab.probe().as_user(u).connect(v4(port));
    for _ in 0..3 {
        assert_eq!(probe(&alice, vm_port.port()).outcome(), Outcome::Allowed);
    }
    for _ in 0..2 {
        assert_eq!(probe(&bob, vm_port.port()).outcome(), Outcome::Denied);
    }
    assert_eq!(probe(&bob, protect.port()).outcome(), Outcome::Denied);
    let held = probe(&alice, vm_port.port()).hold(60);

    let exporter = NodeExporter::start(&dir.0);
    let st = lab.status();
    let vm = st["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "metricsvm"))
        .expect("metricsvm in status");
    assert_eq!(
        (vm["allowed"].as_u64(), vm["denied"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(st["protect_denied"].as_u64(), Some(1));
    let mut last = String::new();
    let agreed = wait_until(Duration::from_secs(15), || {
        last = exporter.scrape();
        disagreements(&last, &st).is_empty()
    });
    assert!(
        agreed,
        "the scrape never matched status within 15 s: {:?}\n--- scrape\n{last}",
        disagreements(&last, &st)
    );
    assert_eq!(connects(&last, "idlevm", "allowed"), Some(0.0), "{last}");
    assert_eq!(sample(&last, "spicegate_attached"), Some(1.0));
    assert_eq!(sample(&last, "spicegate_reload_failures_total"), Some(0.0));
    assert_eq!(sample(&last, "spicegate_unresolved_names"), Some(0.0));
    // node_exporter read the file without complaint.
    assert_eq!(
        sample(&last, "node_textfile_scrape_error"),
        Some(0.0),
        "node_exporter could not read the file:\n{last}"
    );

    // The file: mode 0644, no temporary file left, valid for promtool.
    let meta = fs::metadata(dir.file()).expect("the metrics file");
    assert_eq!(meta.mode() & 0o7777, 0o644, "mode of the metrics file");
    let names: Vec<String> = fs::read_dir(&dir.0)
        .expect("listing the metrics dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(
        names,
        vec!["spicegate.prom".to_owned()],
        "files in the metrics dir"
    );
    promtool(&["check", "metrics"], Some(&dir.file()));
    let rules = workspace_dir().join("packaging/prometheus/spicegate-rules.yml");
    promtool(&["check", "rules", &rules.display().to_string()], None);

    // A broken reload is counted; the previous policy stays.
    lab.policy.rewrite("[vms.broken\n");
    let out = CliOutput::new(lab.pin.ctl(["reload"]), &["reload"]);
    assert_eq!(out.code, Some(1), "a broken reload must fail:\n{out}");
    assert!(
        wait_until(Duration::from_secs(12), || {
            last = exporter.scrape();
            sample(&last, "spicegate_reload_failures_total") == Some(1.0)
        }),
        "reload failure not counted within 12 s:\n{last}"
    );

    // A reload that takes alice off the VM closes her held connection.
    let before = sample(&last, "spicegate_last_reload_success_timestamp_seconds");
    lab.policy.rewrite(&policy(
        Some(&dir.file()),
        protect.port(),
        &[
            ("metricsvm", vm_port.port(), &[]),
            ("idlevm", idle.port(), &[&alice.name]),
        ],
    ));
    let out = CliOutput::new(lab.pin.ctl(["reload"]), &["reload"]);
    assert_eq!(out.code, Some(0), "reload failed:\n{out}");
    lab.daemon()
        .wait_for_line("CLOSED uid=", Duration::from_secs(3));
    drop(held);
    assert!(
        wait_until(Duration::from_secs(12), || {
            last = exporter.scrape();
            sample(&last, "spicegate_sessions_closed_total") == Some(1.0)
                && disagreements(&last, &lab.status()).is_empty()
        }),
        "closed session not counted or metrics not matching status within 12 s:\n{last}"
    );
    let after = sample(&last, "spicegate_last_reload_success_timestamp_seconds");
    assert!(
        after >= before && after.is_some(),
        "{before:?} -> {after:?}"
    );
    assert!(sample(&last, "spicegate_last_reload_duration_seconds").is_some_and(|s| s > 0.0));

    // Without metrics_file the file goes (nobody would update it).
    lab.policy.rewrite(&policy(
        None,
        protect.port(),
        &[("metricsvm", vm_port.port(), &[])],
    ));
    let out = CliOutput::new(lab.pin.ctl(["reload"]), &["reload"]);
    assert_eq!(out.code, Some(0), "reload failed:\n{out}");
    assert!(
        wait_until(Duration::from_secs(12), || !dir.file().exists()),
        "{} still there 12 s after metrics_file was removed",
        dir.file().display()
    );
    drop(exporter);
    drop(lab);
}

#[test]
fn a_relative_or_missing_metrics_file_is_a_policy_error() {
    require_root();
    let l = Listener::loopback();
    let relative = PolicyFile::new(&format!(
        "[settings]\nmetrics_file = \"spicegate.prom\"\n\n[protect]\nports = [{}]\n",
        l.port()
    ));
    let out = spicegate([std::ffi::OsStr::new("check"), relative.path().as_os_str()]);
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let at = format!(
        "{}:2:16: metrics_file `spicegate.prom`",
        relative.path().display()
    );
    assert!(err.contains(&at) && err.contains("absolute path"), "{err}");

    let missing = PolicyFile::new(&format!(
        "[settings]\nmetrics_file = \"/nonexistent-sg-metrics/spicegate.prom\"\n\n[protect]\nports = [{}]\n",
        l.port()
    ));
    let out = spicegate([std::ffi::OsStr::new("check"), missing.path().as_os_str()]);
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}:2:16: metrics_file", missing.path().display()))
            && err.contains("/nonexistent-sg-metrics cannot be used"),
        "{err}"
    );

    // The start refuses it too (no last good copy: nothing enforced).
    let cg = TestCgroup::new();
    let pin = PinDir::new();
    let mut d = Daemon::spawn(missing.path(), Some(cg.path()), &pin);
    d.wait_for_line("metrics_file", Duration::from_secs(15));
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = d.has_exited();
            status.is_some()
        }),
        "the daemon kept running with a missing metrics directory"
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
}
