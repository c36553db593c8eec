//! `cargo xtask setup`: installs what a fresh machine lacks, quickly when
//! everything is there already.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{Step, is_root, output, run};

/// The bpf-linker that uses rustc's own LLVM (newer ones need a system LLVM).
pub const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages the build, the tests and the benchmarks use.
pub const PACKAGES: &[&str] = &[
    "iproute2",   // ip: addresses, network namespaces
    "passwd",     // useradd/userdel/groupadd for real test users
    "util-linux", // setpriv, unshare
    "procps",     // ps, pkill
    "python3",    // small probes inside the boot test
    "dbus",       // dbus-daemon: a private bus for the fake logind
    "iptables",   // benchmarks: the recipe spicegate replaces
    "nftables",   // benchmarks
    "gzip",       // man pages in the .deb
];

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn have_rust_src() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")))
}

fn have_nightly() -> bool {
    output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")))
}

pub fn have_bpf_linker() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|s| s.contains(BPF_LINKER_VERSION))
}

/// Verifies the toolchain pieces the eBPF build needs, with a sentence
/// naming the fix.
pub fn check_toolchain() -> anyhow::Result<()> {
    if !have_nightly() || !have_rust_src() {
        bail!(
            "the nightly toolchain with rust-src is missing: run `cargo xtask setup` (or `rustup component add rust-src --toolchain nightly`)"
        );
    }
    if !have_bpf_linker() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} is missing: run `cargo xtask setup` (or `cargo install bpf-linker@{BPF_LINKER_VERSION} --locked`)"
        );
    }
    Ok(())
}

pub fn setup() -> anyhow::Result<()> {
    let step = Step::new("setup");
    if have_nightly() {
        eprintln!("xtask: nightly toolchain: present");
    } else {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("installing the nightly toolchain")?;
        eprintln!("xtask: nightly toolchain: installed");
    }
    if have_rust_src() {
        eprintln!("xtask: nightly rust-src: present");
    } else {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("installing rust-src for nightly")?;
        eprintln!("xtask: nightly rust-src: installed");
    }
    if have_bpf_linker() {
        eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION}: present");
    } else {
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))
        .context("installing bpf-linker")?;
        eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION}: installed");
    }
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("xtask: Debian packages: present");
    } else if !is_root() {
        bail!(
            "Debian packages {} are missing and installing them needs root: run `sudo cargo xtask setup`",
            missing.join(" ")
        );
    } else {
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update")?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get install")?;
    }
    step.done();
    Ok(())
}
