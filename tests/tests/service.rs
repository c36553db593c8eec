//! The packaged service on a real boot: a minimal Debian (the host's suite,
//! debootstrapped once into /var/cache/spicegate-tests) boots with systemd
//! in systemd-nspawn, and the .deb of the previous release, then the
//! freshly built one, are installed, driven and removed inside it by
//! tests/nspawn/service-scenario.sh:
//!
//! - install of the previous release (the commit in
//!   tests/nspawn/previous-release): enabled and started (Type=notify:
//!   active once enforcing), the shipped policy guards nothing, the daemon
//!   holds exactly CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON;
//! - a policy guarding a loopback port refuses an ungranted uid and lets a
//!   granted one through; `journalctl -p warning` shows the DENY line;
//! - the upgrade from the previous release to the package under test leaves
//!   no gap while probe loops run, even when the pinned layout changes, and
//!   leaves nothing of the old layout pinned;
//! - after a reboot (a second boot with a fresh bpffs), the policy is
//!   enforced from boot on, ready before logins are allowed;
//! - `systemctl reload` applies a change and refuses a broken policy;
//! - `systemctl restart`, `kill -9` of the daemon, and an upgrade to a
//!   rebuilt package with a higher version leave no gap: probe loops keep
//!   their answers throughout;
//! - remove stops and unloads (and keeps the configuration), purge deletes
//!   the configuration and the state.
//!
//! Root only. The first run debootstraps (a few minutes) and builds the
//! previous release (`cargo xtask deb` in an export of that commit, several
//! minutes; cached by commit in /var/cache/spicegate-tests/previous-release);
//! later runs take well under two minutes.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use spicegate_tests::{
    nspawn::{CACHE_DIR, Container, cached_rootfs},
    require_root, spicegate_bin, workspace_dir,
};

const SCENARIO: &str = include_str!("../nspawn/service-scenario.sh");

/// The commit of the previous release (its first line), and why.
const PREVIOUS_RELEASE: &str = include_str!("../nspawn/previous-release");

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
    "install-is-previous-release",
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
    "install-old-layout-pinned",
    "release-upgrade",
    "release-upgrade-new-daemon",
    "release-upgrade-granted-allowed-throughout",
    "release-upgrade-ungranted-denied-throughout",
    "release-upgrade-version",
    "release-upgrade-runs-new-binary",
    "release-upgrade-status-says-enforcing",
    "release-upgrade-capabilities",
    "release-upgrade-keeps-policy",
    "upgrade-old-layout-retired-or-adopted",
    "upgrade-overlays-pinned",
    "upgrade-fast-marks-pinned",
    "upgrade-mark-slots-pinned",
    "upgrade-kept-maps-adopted",
    "upgrade-port-prefilter-pinned",
    "upgrade-release-link-pinned",
    "upgrade-new-links-pinned",
    "release-upgrade-granted-allowed",
    "release-upgrade-ungranted-denied",
    "boot-active",
    "boot-ready-before-logins",
    "boot-fresh-start",
    "boot-granted-allowed",
    "boot-ungranted-denied",
    "boot-capabilities",
    "boot-status-cli",
    "install-unknown-account-in-policy",
    "install-reload-with-unknown-account-refused",
    "boot-degraded-names-the-account",
    "boot-degraded-in-journal",
    "boot-table-in-force",
    "boot-no-false-tampering",
    "boot-journal-warning-has-deny",
    "journal-deny-fields",
    "journal-deny-by-message-id",
    "journal-deny-by-vm",
    "journal-no-fallback",
    "reload-changed-revokes",
    "reload-changed-grants",
    "journal-reload-event",
    "reload-broken-fails",
    "journal-reload-refused-event",
    "reload-broken-keeps-old",
    "reload-path-disabled-by-default",
    "reload-path-enable",
    "reload-path-reloads-on-change",
    "reload-path-change-in-force",
    "reload-path-refuses-broken",
    "reload-path-broken-keeps-old",
    "reload-path-picks-up-the-fix",
    "reload-path-fix-in-force",
    "reload-path-disable",
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
    "upgrade-keeps-pins",
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

/// The previous release's commit: the first line of
/// tests/nspawn/previous-release that is not a comment, 40 hex digits.
fn previous_release_commit() -> String {
    let commit = PREVIOUS_RELEASE
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default();
    assert!(
        commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "tests/nspawn/previous-release must start with a full commit id (40 hex digits), not {commit:?}"
    );
    commit.to_ascii_lowercase()
}

/// The .deb of the previous release, built once per commit and cached as
/// /var/cache/spicegate-tests/previous-release/<commit>.deb; returns it
/// with how long the build took (`None` when it was cached).
///
/// The build exports the commit with `git archive` (the repository's
/// worktrees are left alone) and runs that tree's own `cargo xtask deb`,
/// with a target directory of its own under the cache (kept, so building
/// the next release only rebuilds spicegate's crates). The package's
/// version is that tree's with `~prev` appended, which sorts before it: the
/// package under test upgrades it even when the workspace version was not
/// bumped since. The package is built in a temporary directory and renamed
/// into place once complete, so a killed run leaves no half package behind.
fn previous_release_deb(commit: &str) -> (PathBuf, Option<Duration>) {
    let short = &commit[..7];
    let cache = Path::new(CACHE_DIR).join("previous-release");
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));
    let deb = cache.join(format!("{commit}.deb"));
    // Concurrent runs wait for one build.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join(".lock"))
        .expect("opening the previous release's lock");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking the previous release's cache: {e}"));
    if deb.is_file() {
        return (deb, None);
    }
    let start = Instant::now();
    let repo = workspace_dir();
    let known = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        known,
        "the previous release {commit} (tests/nspawn/previous-release) is not in {}: `git fetch` it",
        repo.display()
    );
    eprintln!(
        "[service] building the previous release {short} (once per commit; several minutes) into {}",
        deb.display()
    );

    let src = cache.join(format!("src-{commit}"));
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).unwrap_or_else(|e| panic!("creating {}: {e}", src.display()));
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting git archive");
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.take().expect("git archive's stdout"))
        .status()
        .expect("starting tar");
    let archived = archive.wait().expect("waiting for git archive");
    assert!(
        archived.success() && untar.success(),
        "exporting {commit} into {}: git archive {archived}, tar {untar}",
        src.display()
    );

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut meta = Command::new(&cargo);
    meta.current_dir(&src)
        .args(["metadata", "--format-version", "1", "--no-deps"]);
    let meta_out = meta
        .output()
        .unwrap_or_else(|e| panic!("running {meta:?}: {e}"));
    assert!(
        meta_out.status.success(),
        "{meta:?} failed: {}",
        String::from_utf8_lossy(&meta_out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&meta_out.stdout).expect("reading `cargo metadata`");
    let cargo_version = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "spicegate"))
        .and_then(|p| p["version"].as_str())
        .expect("the previous release has no spicegate package with a version")
        .to_owned();
    // As `cargo xtask deb` turns it into a Debian version (1.2.0-rc.1 is
    // 1.2.0~rc.1), then older than that.
    let version = match cargo_version.split_once('+') {
        Some((base, build)) => format!("{}+{build}~prev", base.replacen('-', "~", 1)),
        None => format!("{}~prev", cargo_version.replacen('-', "~", 1)),
    };

    // What killed runs left (none is building now: this holds the lock).
    for e in fs::read_dir(&cache).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let tmp = cache.join(format!("tmp-{commit}"));
    let log_path = cache.join(format!("build-{commit}.log"));
    let log = fs::File::create(&log_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&src)
        .args(["run", "--quiet", "--package", "xtask", "--", "deb"])
        .args(["--deb-version", &version, "--out"])
        .arg(&tmp)
        .env("CARGO_TARGET_DIR", cache.join("target"))
        .stderr(log);
    let result = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let built = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !result.status.success() || !built.is_file() {
        let _ = fs::remove_dir_all(&tmp);
        panic!(
            "building the previous release {commit} failed ({}; printed {built:?}); last lines of {}:\n{}",
            result.status,
            log_path.display(),
            tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
        );
    }
    // dpkg-deb finished writing it: only now does it get the name the next
    // run looks for.
    fs::rename(&built, &deb)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", built.display(), deb.display()));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(&src);
    (deb, Some(start.elapsed()))
}

/// The Version: field of a .deb.
fn deb_version(deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(["--field"])
        .arg(deb)
        .arg("Version")
        .output()
        .expect("running dpkg-deb --field");
    assert!(
        out.status.success(),
        "dpkg-deb --field {} Version failed: {}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

    // The previous release first; then version A as the workspace says (the
    // tree under test), and B a higher one (a rebuilt package).
    let commit = previous_release_commit();
    let version_a = env!("CARGO_PKG_VERSION").to_owned();
    let version_b = format!("{version_a}+boottest1");
    let mut container = Container::new(&rootfs);
    let out = container.out();
    let t = Instant::now();
    let debs = std::thread::scope(|s| {
        let prev = s.spawn(|| previous_release_deb(&commit));
        let a = s.spawn(|| build_deb(&version_a, &out));
        let b = s.spawn(|| build_deb(&version_b, &out));
        (prev.join(), a.join(), b.join())
    });
    let ((deb_prev, prev_build), deb_a, deb_b) = match debs {
        (Ok(prev), Ok(a), Ok(b)) => (prev, a, b),
        (prev, a, b) => panic!(
            "building the packages failed: {:?}",
            [prev.err(), a.err(), b.err()]
                .into_iter()
                .flatten()
                .map(|e| e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".into()))
                .collect::<Vec<_>>()
        ),
    };
    let deb_time = t.elapsed();
    let version_prev = deb_version(&deb_prev);
    eprintln!(
        "[service] previous release {} ({version_prev}): {}",
        &commit[..7],
        prev_build.map_or_else(
            || format!("cached {}", deb_prev.display()),
            |d| format!("built in {:.0}s", d.as_secs_f64())
        )
    );
    fs::copy(&deb_prev, out.join("spicegate-prev.deb")).expect("copying the previous release");
    fs::rename(&deb_a, out.join("spicegate-a.deb")).expect("renaming package A");
    fs::rename(&deb_b, out.join("spicegate-b.deb")).expect("renaming package B");
    fs::write(out.join("prev-version"), &version_prev).expect("writing prev-version");
    fs::write(out.join("a-version"), &version_a).expect("writing a-version");
    fs::write(out.join("b-version"), &version_b).expect("writing b-version");
    fs::write(out.join("scenario.sh"), SCENARIO).expect("writing the scenario");
    container.write(
        "/etc/systemd/system/spicegate-boottest.service",
        SCENARIO_UNIT,
        0o644,
    );
    container.enable("spicegate-boottest.service");

    // Two boots: install the previous release, set a policy and upgrade to
    // the package under test; then, after a "reboot" (fresh bpffs),
    // everything else.
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
        "[service] rootfs {:.1}s, packages {:.1}s, boots {}, total {:.1}s",
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
