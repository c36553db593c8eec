//! The packaged service on a real boot: a minimal Debian (the host's suite,
//! debootstrapped once into /var/cache/spicegate-tests) boots with systemd
//! in systemd-nspawn, and the freshly built .deb is installed, driven and
//! removed inside it by tests/nspawn/service-scenario.sh:
//!
//! - install: enabled and started (Type=notify: active once enforcing), the
//!   shipped policy guards nothing, the daemon holds exactly CAP_BPF,
//!   CAP_NET_ADMIN and CAP_PERFMON;
//! - a policy guarding a loopback port refuses an ungranted uid and lets a
//!   granted one through; `journalctl -p warning` shows the DENY line;
//! - after a reboot (a second boot with a fresh bpffs), the policy is
//!   enforced from boot on, ready before logins are allowed;
//! - `systemctl reload` applies a change and refuses a broken policy;
//! - `systemctl restart`, `kill -9` of the daemon, and an upgrade to a
//!   rebuilt package with a higher version leave no gap: probe loops keep
//!   their answers throughout;
//! - remove stops and unloads (and keeps the configuration), purge deletes
//!   the configuration and the state.
//!
//! Root only. The first run debootstraps (a few minutes); later runs take
//! well under two minutes.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use spicegate_tests::{
    nspawn::{Container, cached_rootfs},
    require_root, spicegate_bin, workspace_dir,
};

const SCENARIO: &str = include_str!("../nspawn/service-scenario.sh");

/// Runs the scenario after boot, then powers off (the script's EXIT trap).
const SCENARIO_UNIT: &str = "\
[Unit]
Description=spicegate boot test scenario
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/bash /out/scenario.sh
StandardOutput=append:/out/scenario.log
StandardError=append:/out/scenario.log

[Install]
WantedBy=multi-user.target
";

/// The checks every run must pass: a renamed or skipped step fails the
/// test instead of vanishing from it.
const REQUIRED: &[&str] = &[
    "install",
    "install-enabled",
    "install-ready",
    "install-status-says-enforcing",
    "install-locks-nobody-out",
    "install-conffile",
    "install-capabilities",
    "reload",
    "granted-allowed",
    "ungranted-denied",
    "journal-warning-has-deny",
    "journal-info-is-not-warning",
    "boot-active",
    "boot-ready-before-logins",
    "boot-fresh-start",
    "boot-granted-allowed",
    "boot-ungranted-denied",
    "reload-changed-revokes",
    "reload-changed-grants",
    "reload-broken-fails",
    "reload-broken-keeps-old",
    "restart-new-daemon",
    "restart-granted-allowed-throughout",
    "restart-ungranted-denied-throughout",
    "kill9-sent",
    "kill9-restarted",
    "kill9-granted-allowed-throughout",
    "kill9-ungranted-denied-throughout",
    "upgrade",
    "upgrade-new-daemon",
    "upgrade-granted-allowed-throughout",
    "upgrade-ungranted-denied-throughout",
    "upgrade-version",
    "upgrade-keeps-policy",
    "remove",
    "remove-stopped",
    "remove-unloaded",
    "remove-enforces-nothing",
    "remove-keeps-config",
    "purge",
    "purge-config-gone",
    "purge-state-gone",
    "purge-enable-link-gone",
];

/// Builds the .deb of the binary under test with `cargo xtask deb`, as
/// version `version`, into `out`; returns its path.
fn build_deb(version: &str, out: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_dir())
        .args(["run", "--quiet", "--package", "xtask", "--", "deb", "--bin"])
        .arg(spicegate_bin())
        .args(["--deb-version", version, "--out"])
        .arg(out);
    let result = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "{cmd:?} failed ({}):\n{stderr}",
        result.status
    );
    // The path is the last line it prints.
    let stdout = String::from_utf8_lossy(&result.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        path.is_file(),
        "`cargo xtask deb` printed {path:?}, which is not a file:\n{stderr}"
    );
    path
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn packaged_service_boots_enforces_restarts_upgrades_and_uninstalls() {
    require_root();
    let start = Instant::now();
    let rootfs = cached_rootfs();
    let rootfs_time = start.elapsed();

    // Version A as the workspace says, B a higher one (a rebuilt package).
    let version_a = env!("CARGO_PKG_VERSION").to_owned();
    let version_b = format!("{version_a}+boottest1");
    let mut container = Container::new(&rootfs);
    let out = container.out();
    let t = Instant::now();
    let debs = std::thread::scope(|s| {
        let a = s.spawn(|| build_deb(&version_a, &out));
        let b = s.spawn(|| build_deb(&version_b, &out));
        (a.join(), b.join())
    });
    let (deb_a, deb_b) = match debs {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!(
            "building the packages failed: {:?}",
            [a.err(), b.err()]
                .into_iter()
                .flatten()
                .map(|e| e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panic".into()))
                .collect::<Vec<_>>()
        ),
    };
    let deb_time = t.elapsed();
    fs::rename(&deb_a, out.join("spicegate-a.deb")).expect("renaming package A");
    fs::rename(&deb_b, out.join("spicegate-b.deb")).expect("renaming package B");
    fs::write(out.join("b-version"), &version_b).expect("writing b-version");
    fs::write(out.join("scenario.sh"), SCENARIO).expect("writing the scenario");
    container.write(
        "/etc/systemd/system/spicegate-boottest.service",
        SCENARIO_UNIT,
        0o644,
    );
    container.enable("spicegate-boottest.service");

    // Two boots: install and set a policy; then, after a "reboot" (fresh
    // bpffs), everything else.
    let read = |name: &str| fs::read_to_string(out.join(name)).unwrap_or_default();
    let mut boot_times = Vec::new();
    let mut console = String::new();
    let mut powered_off = true;
    for stage in ["install", "reboot"] {
        fs::write(out.join("stage"), stage).expect("writing the stage");
        if stage != "install" {
            container.fresh_bpffs();
        }
        let boot = container.boot(Duration::from_secs(120));
        boot_times.push(format!("{stage} {:.1}s", boot.elapsed.as_secs_f64()));
        console.push_str(&boot.console);
        let ended = read("results").lines().any(|l| l == format!("END {stage}"));
        if boot.status.is_none() {
            powered_off = false;
        }
        if !powered_off || !ended {
            break;
        }
    }
    let results = read("results");
    let scenario_log = read("scenario.log");
    eprintln!(
        "[service] rootfs {:.1}s, two packages {:.1}s, boots {}, total {:.1}s",
        rootfs_time.as_secs_f64(),
        deb_time.as_secs_f64(),
        boot_times.join(", "),
        start.elapsed().as_secs_f64()
    );
    for line in scenario_log.lines().filter(|l| !l.starts_with('+')) {
        eprintln!("[scenario] {line}");
    }

    let passed: BTreeSet<&str> = results
        .lines()
        .filter_map(|l| l.strip_prefix("PASS "))
        .collect();
    let failed: Vec<&str> = results.lines().filter(|l| l.starts_with("FAIL ")).collect();
    let missing: Vec<&&str> = REQUIRED.iter().filter(|n| !passed.contains(**n)).collect();
    let finished = results.lines().any(|l| l == "END reboot");
    if !failed.is_empty() || !missing.is_empty() || !finished {
        eprintln!("[service] console:\n{}", tail(&console, 40));
        eprintln!("[service] scenario log:\n{}", tail(&scenario_log, 80));
        for stage in ["install", "reboot"] {
            eprintln!(
                "[service] journal of the {stage} stage:\n{}",
                tail(&read(&format!("journal-{stage}.txt")), 100)
            );
        }
    }
    assert!(
        powered_off,
        "the container did not power off within 2 minutes (results so far:\n{results})"
    );
    assert!(
        finished,
        "the scenario did not finish (results so far:\n{results})"
    );
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
    eprintln!("[service] {} checks passed", passed.len());
    assert!(
        missing.is_empty(),
        "checks that never ran: {missing:?}\nresults:\n{results}"
    );
    drop(container);
}
