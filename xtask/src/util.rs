//! Small helpers shared by the subcommands.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Runs a command to completion, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Output of a command, or `None` when it cannot run.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Prints how long a step took.
pub struct Step {
    name: String,
    start: Instant,
}

impl Step {
    pub fn new(name: &str) -> Self {
        eprintln!("xtask: == {name}");
        Self {
            name: name.to_owned(),
            start: Instant::now(),
        }
    }
    pub fn done(self) {
        eprintln!(
            "xtask: == {} done in {:.1}s",
            self.name,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Where cargo puts build output (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}
