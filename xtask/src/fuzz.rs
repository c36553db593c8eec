//! `cargo xtask fuzz`: runs the cargo-fuzz targets (policy parser, control
//! protocol, and request lines against a running daemon) for a while,
//! growing the corpus in fuzz/corpus. The bounded smoke that `cargo xtask
//! test` runs replays the parser corpora without cargo-fuzz
//! (spicegate/tests/fuzz_smoke.rs), and the engine corpus against a daemon
//! (tests/tests/holes.rs).

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::workspace;

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 300)]
    secs: u64,
    /// Only this target (`policy`, `control` or `engine`; `engine` needs
    /// root: it starts a daemon).
    #[arg(long)]
    target: Option<String>,
}

const TARGETS: &[&str] = &["policy", "control", "engine"];

pub fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    if !Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("xtask: installing cargo-fuzz");
        let ok = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("cargo install")?;
        if !ok.success() {
            bail!("cargo-fuzz could not be installed: run `cargo install cargo-fuzz --locked`");
        }
    }
    let targets: Vec<&str> = match &args.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!(
            "unknown fuzz target `{t}` (targets: {})",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    for t in targets {
        eprintln!("xtask: fuzzing {t} for {}s", args.secs);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(workspace().join("fuzz"))
            .args(["+nightly", "fuzz", "run", "-O", t, "--"])
            .arg(format!("-max_total_time={}", args.secs))
            .arg("-max_len=4096")
            // The fuzzers drive policy and protocol code only; no kernel
            // object is needed in their binary (the engine target talks to
            // a separately built daemon).
            .env("SPICEGATE_SKIP_EBPF", "1");
        if t == "engine" {
            if !crate::util::is_root() {
                bail!(
                    "the engine target starts a daemon: run `cargo xtask fuzz --target engine` as root"
                );
            }
            let bin = crate::build::build(&crate::build::BuildArgs { release: false })?;
            cmd.env("SPICEGATE_BIN", bin)
                .arg("-dict=dict/engine.dict")
                .arg("-timeout=30");
        }
        let status = cmd.status().context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target {t} failed: the crashing input is under fuzz/artifacts/{t}/");
        }
    }
    Ok(())
}
