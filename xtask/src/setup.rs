//! `cargo xtask setup`: installs what a fresh machine lacks, and is quick
//! (a handful of queries, no network) when everything is there already.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::util::{is_root, output, run};

/// The bpf-linker that links with rustc's own LLVM; newer ones need a
/// system LLVM this project does not install.
pub const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages the integration tests run (package, what for).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("passwd", "useradd, userdel"),
    ("util-linux", "setpriv"),
    ("procps", "ps, pkill"),
    ("python3", "test helpers"),
    ("dbus", "dbus-daemon: a private bus for the fake logind"),
    ("iptables", "benchmarks: the recipe spicegate replaces"),
    ("nftables", "benchmarks"),
    ("gzip", "man pages in the .deb"),
    ("binutils", "strip: the binary in the .deb"),
    ("systemd", "systemd-analyze verify of the units in the .deb"),
    ("lintian", "lintian on the .deb"),
    (
        "ansible-core",
        "ansible-playbook --syntax-check of examples/ansible",
    ),
    ("debootstrap", "the boot test's Debian"),
    ("systemd-container", "systemd-nspawn: the boot test"),
    (
        "dunst",
        "a real notification daemon for the `spicegate notify` test",
    ),
    (
        "desktop-file-utils",
        "desktop-file-validate of the autostart entry",
    ),
    ("qemu-system-x86", "the Spice e2e test's VM (with Spice)"),
    ("virt-viewer", "remote-viewer: the Spice e2e client"),
    ("xvfb", "an X display for remote-viewer"),
    // Both packages enable and start their services where systemd runs
    // (node_exporter on :9100, Prometheus on :9090); the test starts its
    // own node_exporter on 127.0.0.1 and needs neither service:
    // `systemctl disable --now prometheus prometheus-node-exporter`.
    (
        "prometheus-node-exporter",
        "the metrics test scrapes the metrics file through node_exporter's textfile collector",
    ),
    (
        "prometheus",
        "promtool: the metrics test checks the metrics file and the alert rules",
    ),
];

/// Nice to have (inspecting what is loaded), installed when apt has it.
const OPTIONAL_PACKAGES: &[(&str, &str)] = &[("bpftool", "inspecting loaded programs")];

fn item(name: &str, state: &str) {
    eprintln!("xtask: {name:<24} {state}");
}

fn rustup(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    // A missing toolchain must read as missing, not be installed behind
    // our back with the default profile.
    cmd.args(args).env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

fn have_rustup() -> bool {
    output(&mut rustup(&["--version"])).is_some()
}

fn have_nightly() -> bool {
    output(&mut rustup(&["toolchain", "list"])).is_some_and(|s| {
        s.lines()
            .any(|l| l.starts_with("nightly-") || l == "nightly")
    })
}

fn have_rust_src() -> bool {
    output(&mut rustup(&[
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.trim().starts_with("rust-src")))
}

/// The version line of the bpf-linker on PATH, if any.
fn bpf_linker_version() -> Option<String> {
    output(Command::new("bpf-linker").arg("--version")).map(|s| s.trim().to_owned())
}

fn have_bpf_linker() -> bool {
    bpf_linker_version().is_some_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Whether apt's package lists offer `pkg` (no network).
fn apt_has(pkg: &str) -> bool {
    output(Command::new("apt-cache").args(["policy", pkg])).is_some_and(|s| {
        s.lines()
            .any(|l| l.trim().starts_with("Candidate:") && !l.contains("(none)"))
    })
}

/// What the eBPF build needs, checked without installing anything; the
/// error says how to fix it.
pub fn check_toolchain() -> anyhow::Result<()> {
    if !have_rustup() {
        bail!(
            "rustup is not on PATH: install it from https://rustup.rs, then run `cargo xtask setup`"
        );
    }
    if !have_rust_src() {
        bail!(
            "the nightly toolchain with rust-src is missing: run `cargo xtask setup` \
             (or `rustup component add rust-src --toolchain nightly`)"
        );
    }
    if !have_bpf_linker() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} is missing: run `cargo xtask setup` \
             (or `cargo install bpf-linker@{BPF_LINKER_VERSION} --locked`)"
        );
    }
    Ok(())
}

pub fn setup() -> anyhow::Result<()> {
    let start = Instant::now();
    rust_toolchain()?;
    lint_components()?;
    bpf_linker()?;
    debian_packages()?;
    eprintln!("xtask: setup done ({:.1}s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn rust_toolchain() -> anyhow::Result<()> {
    if !have_rustup() {
        bail!(
            "rustup is not installed: install it from https://rustup.rs, then run `cargo xtask setup` again"
        );
    }
    // rust-src listed means nightly is there too: one query in the common case.
    if have_rust_src() {
        item("nightly toolchain", "present");
        item("rust-src (nightly)", "present");
        return Ok(());
    }
    if have_nightly() {
        item("nightly toolchain", "present");
    } else {
        run(&mut rustup(&[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context(
            "could not install the nightly toolchain: check the network, then run \
             `rustup toolchain install nightly --profile minimal`",
        )?;
        item("nightly toolchain", "installed");
    }
    run(&mut rustup(&[
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "could not add rust-src to nightly: check the network, then run \
         `rustup component add rust-src --toolchain nightly`",
    )?;
    item("rust-src (nightly)", "installed");
    Ok(())
}

/// rustfmt and clippy for the lint step: stable for the workspace, nightly
/// for the kernel program.
fn lint_components() -> anyhow::Result<()> {
    for toolchain in ["stable", "nightly"] {
        let have = output(
            rustup(&["component", "list", "--installed", "--toolchain", toolchain]).arg("--quiet"),
        )
        .unwrap_or_default();
        let missing: Vec<&str> = ["clippy", "rustfmt"]
            .into_iter()
            .filter(|c| !have.lines().any(|l| l.starts_with(c)))
            .collect();
        if missing.is_empty() {
            item(&format!("clippy and rustfmt ({toolchain})"), "present");
            continue;
        }
        let mut args = vec!["component", "add"];
        args.extend(&missing);
        args.extend(["--toolchain", toolchain]);
        run(&mut rustup(&args)).with_context(|| {
            format!(
                "could not add {} to {toolchain}: check the network, then run `rustup component add {} --toolchain {toolchain}`",
                missing.join(" and "),
                missing.join(" ")
            )
        })?;
        item(
            &format!("{} ({toolchain})", missing.join(" and ")),
            "installed",
        );
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let name = format!("bpf-linker {BPF_LINKER_VERSION}");
    if have_bpf_linker() {
        item(&name, "present");
        return Ok(());
    }
    if let Some(other) = bpf_linker_version() {
        eprintln!("xtask: found {other}; replacing it with {BPF_LINKER_VERSION}");
    }
    run(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        // Replaces another version; a no-op cost only when we install anyway.
        "--force",
    ]))
    .with_context(|| {
        format!(
            "could not build bpf-linker {BPF_LINKER_VERSION}: fix what cargo reported above, then run \
             `cargo install bpf-linker@{BPF_LINKER_VERSION} --locked`"
        )
    })?;
    if !have_bpf_linker() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but the one found on PATH is {}: \
             put cargo's bin directory (~/.cargo/bin) first on PATH",
            bpf_linker_version().unwrap_or_else(|| "none".to_owned())
        );
    }
    item(&name, "installed");
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for &(pkg, what) in PACKAGES {
        if dpkg_installed(pkg) {
            item(pkg, "present");
        } else {
            eprintln!("xtask: {pkg:<24} missing ({what})");
            missing.push(pkg);
        }
    }
    // Optional packages absent from the lists are only looked for again
    // after an `apt-get update` we run anyway: never update just for them.
    let mut optional = Vec::new();
    for &(pkg, _) in OPTIONAL_PACKAGES {
        if dpkg_installed(pkg) {
            item(pkg, "present");
        } else {
            optional.push(pkg);
        }
    }
    let available: Vec<&str> = optional.iter().copied().filter(|p| apt_has(p)).collect();
    if missing.is_empty() && available.is_empty() {
        skipped(&optional);
        return Ok(());
    }
    if !is_root() {
        if missing.is_empty() {
            for pkg in &available {
                item(pkg, "not installed (optional; installing needs root)");
            }
            skipped(&unavailable(&optional, &available));
            return Ok(());
        }
        bail!(
            "Debian packages {} are missing and installing them needs root: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    apt_get(&["update"]).context(
        "`apt-get update` failed: check the network and /etc/apt/sources.list, then run `cargo xtask setup` again",
    )?;
    let available: Vec<&str> = optional.iter().copied().filter(|p| apt_has(p)).collect();
    let mut install = missing.clone();
    install.extend(&available);
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&install);
    apt_get(&args).context(
        "`apt-get install` failed: fix what apt reported above, then run `cargo xtask setup` again",
    )?;
    for pkg in &install {
        item(pkg, "installed");
    }
    skipped(&unavailable(&optional, &available));
    Ok(())
}

fn unavailable<'a>(optional: &[&'a str], available: &[&str]) -> Vec<&'a str> {
    optional
        .iter()
        .copied()
        .filter(|p| !available.contains(p))
        .collect()
}

fn skipped(pkgs: &[&str]) {
    for pkg in pkgs {
        item(pkg, "not in apt, skipped (optional)");
    }
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
