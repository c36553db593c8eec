//! `cargo xtask build`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::util::{Step, cargo, run, target_dir};

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Optimised build (target/release).
    #[arg(long)]
    pub release: bool,
}

/// Builds every binary of the workspace and returns the path of
/// `spicegate`.
///
/// `spicegate-ebpf` is excluded: it only builds for the BPF target (its
/// binary is also named `spicegate`), and spicegate's build.rs builds it.
pub fn build(args: &BuildArgs) -> anyhow::Result<PathBuf> {
    // A missing piece must fail with the fix, not deep inside aya-build.
    crate::setup::check_toolchain()?;
    let step = Step::start(if args.release {
        "build (release)"
    } else {
        "build"
    });
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--workspace",
        "--exclude",
        "spicegate-ebpf",
        "--bins",
    ]);
    if args.release {
        cmd.arg("--release");
    }
    let built = run(&mut cmd);
    step.finish(built.is_ok());
    built.context("the build failed: see cargo's errors above")?;
    let bin = target_dir()?
        .join(if args.release { "release" } else { "debug" })
        .join("spicegate");
    if !bin.is_file() {
        bail!(
            "the build finished but {} is missing: is the spicegate crate's binary still named `spicegate`?",
            bin.display()
        );
    }
    Ok(bin)
}
