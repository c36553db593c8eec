//! The lint step of `cargo xtask test`: rustfmt, and clippy with
//! `-D warnings` on every crate, the kernel program included (checked for
//! its BPF target with the nightly toolchain it is built with).

use std::process::Command;

use crate::util::{Step, cargo, run, workspace};

/// Runs every lint; returns the names of those that failed.
pub fn lint() -> Vec<&'static str> {
    let mut failed = Vec::new();
    let step = Step::start("rustfmt --check");
    if !step.finish(run(cargo().args(["fmt", "--all", "--", "--check"])).is_ok()) {
        failed.push("rustfmt");
    }
    let step = Step::start("clippy");
    let ok = run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "spicegate-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .is_ok();
    if !step.finish(ok) {
        failed.push("clippy");
    }
    let step = Step::start("clippy (kernel program, bpfel-unknown-none)");
    if !step.finish(run(&mut ebpf_clippy()).is_ok()) {
        failed.push("clippy (kernel program)");
    }
    failed
}

/// `cargo +nightly clippy` of spicegate-ebpf for its BPF target, the way
/// build.rs builds it (core from rust-src), without the variables the
/// outer stable cargo set for its own build.
fn ebpf_clippy() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "spicegate-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cmd
}
