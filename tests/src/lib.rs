//! Harness for spicegate's root-only integration tests.
//!
//! Every change a test makes to the machine (child cgroup, bpffs pins, users,
//! groups, listening sockets, a running daemon, policy files) sits in an RAII
//! guard whose `Drop` undoes it. Drops never panic: a failed cleanup is
//! reported on stderr, so a failing test still shows its own panic and the
//! leftover is named for whoever cleans up.
//!
//! Tests share kernel state (cgroup hooks, users), so run them with
//! `--test-threads=1`, as root, through `cargo xtask test`.

mod cgroup;
mod client;
mod daemon;
mod listener;
mod netif;
mod policy;
mod probe;
mod users;

use std::path::PathBuf;

pub use cgroup::{TestCgroup, cgroup2_root};
pub use client::{CliOutput, CliStream, ctl_as, raw_request, spicegate_cmd};
pub use daemon::{Daemon, DenyLine, PinDir, spicegate, spicegate_bin};
pub mod bypass;
pub mod desktop;
pub mod lab;
pub mod logind;
pub mod nspawn;
pub mod spice;
pub mod time;
pub use listener::Listener;
pub use netif::interface_addrs;
pub use policy::{PolicyDir, PolicyFile};
pub use probe::{
    Batch, Checks, HeldConnection, Outcome, Probe, ProbeChild, ProbeLoop, ProbeResult,
};
pub use spicegate_testkit::{next_id, wait_until};
pub use users::{TestGroup, TestUser, unused_uid};

/// Panics unless the test runs as root: every test of this crate changes
/// kernel state (cgroups, BPF programs, users).
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root: run via `cargo xtask test` as root");
    }
}

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}
