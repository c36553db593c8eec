//! `cargo xtask build`.

use std::{path::PathBuf, process::Command};

use anyhow::bail;

use crate::util::{Step, run, target_dir, workspace};

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Optimised build.
    #[arg(long)]
    pub release: bool,
}

/// Builds the default members' binaries (never `--workspace`: the eBPF
/// crate only builds for the BPF target, through spicegate's build.rs) and
/// returns the path of `spicegate`.
pub fn build(args: &BuildArgs) -> anyhow::Result<PathBuf> {
    crate::setup::check_toolchain()?;
    let step = Step::new(if args.release {
        "build (release)"
    } else {
        "build"
    });
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace()).args(["build", "--bins"]);
    if args.release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let bin = target_dir()
        .join(if args.release { "release" } else { "debug" })
        .join("spicegate");
    if !bin.is_file() {
        bail!("the build finished but {} is missing", bin.display());
    }
    step.done();
    Ok(bin)
}
