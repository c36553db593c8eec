//! Builds the eBPF object with aya-build and leaves it in OUT_DIR, where
//! `include_bytes_aligned!` picks it up.
//!
//! `SPICEGATE_SKIP_EBPF=1` (set by `cargo clippy`/`check` users who lack
//! bpf-linker) skips the kernel build and embeds an empty object; such a
//! binary refuses to load with a sentence saying so.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SPICEGATE_SKIP_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    if env::var_os("SPICEGATE_SKIP_EBPF").is_some_and(|v| v == "1") {
        fs::write(out_dir.join("spicegate"), []).context("writing placeholder eBPF object")?;
        return Ok(());
    }
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed: run `cargo xtask setup` \
             (or `cargo install bpf-linker@0.10.4 --locked`)"
        ));
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "spicegate-ebpf")
        .ok_or_else(|| anyhow!("spicegate-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("spicegate-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF program (needs the nightly toolchain with rust-src: `cargo xtask setup`)")
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
