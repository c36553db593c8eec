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
mod policy;
mod probe;
mod users;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

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
pub use policy::{PolicyDir, PolicyFile};
pub use probe::{
    Batch, Checks, HeldConnection, Outcome, Probe, ProbeChild, ProbeLoop, ProbeResult,
};
pub use users::{TestGroup, TestUser, unused_uid};

/// Panics unless the test runs as root: every test of this crate changes
/// kernel state (cgroups, BPF programs, users).
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root: run via `cargo xtask test` as root");
    }
}

/// A number unique within this test process; with the pid it makes names
/// that cannot collide with a parallel run or a leftover of an old one.
pub fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// This machine's non-loopback, non-link-local interface addresses.
pub fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family says which struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: family is AF_INET.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: family is AF_INET6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if !ip.is_loopback() && !ip.is_unspecified() && !link_local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Waits until `cond` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
