//! `cargo xtask test`: every test, root ones included.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{Step, is_root, run, workspace};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
    /// Also run rustfmt --check and clippy -D warnings first.
    #[arg(long, env = "SPICEGATE_LINT")]
    lint: bool,
    /// Passed to the integration test run (a test name filter, say).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and create users: run `cargo xtask test` as root"
        );
    }
    if !args.no_setup {
        crate::setup::setup()?;
    }
    let bin = crate::build::build(&crate::build::BuildArgs { release: false })?;
    let mut failed = Vec::new();

    if args.lint {
        let step = Step::new("rustfmt --check");
        if run(Command::new("cargo")
            .current_dir(workspace())
            .args(["fmt", "--all", "--", "--check"]))
        .is_err()
        {
            failed.push("rustfmt");
        }
        step.done();
        let step = Step::new("clippy");
        if run(Command::new("cargo").current_dir(workspace()).args([
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .is_err()
        {
            failed.push("clippy");
        }
        step.done();
    }

    let step = Step::new("unit tests");
    if run(Command::new("cargo").current_dir(workspace()).args([
        "test",
        "--exclude",
        "spicegate-tests",
        "--workspace",
        "--exclude",
        "spicegate-ebpf",
    ]))
    .is_err()
    {
        failed.push("unit tests");
    }
    step.done();

    let step = Step::new("root integration tests");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace())
        .args(["test", "-p", "spicegate-tests", "--"])
        .arg("--test-threads=1")
        .args(&args.args)
        .env("SPICEGATE_BIN", &bin);
    if run(&mut cmd).context("integration tests").is_err() {
        failed.push("integration tests");
    }
    step.done();

    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}
