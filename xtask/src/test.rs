//! `cargo xtask test`: every test, the root integration tests included.

use std::time::Instant;

use anyhow::bail;

use crate::util::{Step, cargo, is_root, run};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (when you know everything is installed).
    #[arg(long)]
    no_setup: bool,
    /// Skip the lint step (`cargo fmt --check`, and `cargo clippy -D
    /// warnings` on every crate, the kernel program included), which runs
    /// first by default.
    #[arg(long)]
    no_lint: bool,
    /// Run only this part of the suite (after setup and the build).
    #[arg(long, value_enum, value_name = "PART")]
    only: Option<Only>,
    /// Passed to the integration test binaries, after `--test-threads=1`
    /// (a test name filter, `--nocapture`, ...).
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

/// A part of the suite that runs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The .deb of the debug build: systemd-analyze verify of its units,
    /// lintian, and `ansible-playbook --syntax-check` of examples/ansible.
    /// No root needed, nothing loaded into the kernel.
    Packaging,
}

pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    let only_packaging = args.only == Some(Only::Packaging);
    if !is_root() && !only_packaging {
        bail!(
            "the integration tests load eBPF programs and create users: run `cargo xtask test` as root"
        );
    }
    let start = Instant::now();
    if !args.no_setup {
        crate::setup::setup()?;
    }
    let mut failed = Vec::new();

    if !args.no_lint && !only_packaging {
        failed.extend(crate::lint::lint());
    }

    let bin = match crate::build::build(&crate::build::BuildArgs { release: false }) {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            failed.push("build");
            return summary(&failed, start);
        }
    };

    if only_packaging {
        if !packaging(&bin) {
            failed.push("packaging");
        }
        return summary(&failed, start);
    }

    // Unit tests need no root and run in parallel.
    let step = Step::start("unit tests");
    let ok = run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "spicegate-tests",
        "--exclude",
        "spicegate-ebpf",
    ]))
    .is_ok();
    if !step.finish(ok) {
        failed.push("unit tests");
    }

    if !packaging(&bin) {
        failed.push("packaging");
    }

    // One test at a time: they share the kernel's cgroup, pins and users.
    // Every test file runs even after one fails, so one run shows all.
    let step = Step::start("root integration tests");
    let ok = run(cargo()
        .args([
            "test",
            "--no-fail-fast",
            "-p",
            "spicegate-tests",
            "--",
            "--test-threads=1",
        ])
        .args(&args.args)
        .env("SPICEGATE_BIN", &bin))
    .is_ok();
    if !step.finish(ok) {
        failed.push("integration tests");
    }

    summary(&failed, start)
}

/// The packaging step: the .deb of `bin`, with lintian and the rest
/// (xtask/src/packaging.rs). The boot test (tests/tests/service.rs) builds
/// its own packages from the same binary, with other versions.
fn packaging(bin: &std::path::Path) -> bool {
    let step = Step::start("packaging");
    let result = crate::packaging::check(bin);
    if let Err(e) = &result {
        eprintln!("xtask: {e:#}");
    }
    step.finish(result.is_ok())
}

fn summary(failed: &[&str], start: Instant) -> anyhow::Result<()> {
    let secs = start.elapsed().as_secs_f64();
    if failed.is_empty() {
        eprintln!("xtask: all passed ({secs:.1}s)");
        Ok(())
    } else {
        bail!("FAILED: {} ({secs:.1}s)", failed.join(", "))
    }
}
