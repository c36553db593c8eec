//! The test kit: what the integration tests (`spicegate-tests`), their
//! helper binaries (sg-probe, sg-bypass, sg-flood) and the benchmark
//! (`cargo xtask bench`, sg-bench) all need, once.
//!
//! - [`flags`]: the helpers' command lines;
//! - [`privilege`]: joining a cgroup and dropping to a uid/gid, in the
//!   order the kernel needs;
//! - [`sockaddr`]: `sockaddr_in`/`sockaddr_in6` from and to `SocketAddr`,
//!   errno names;
//! - [`cgroup`]: the cgroup2 mount and a child-cgroup guard;
//! - [`users`]: throw-away system users and groups;
//! - [`pins`]: a daemon pin directory that is unloaded on drop;
//! - [`proc`]: a child process that is stopped and reaped on drop, and the
//!   collector of its output lines;
//! - [`TempDir`]: a scratch directory removed on drop.
//!
//! Every guard's `Drop` undoes its change without panicking: a cleanup that
//! fails is reported on stderr as `LEFTOVER`, prefixed with
//! [`log_prefix`], so the leftover is named for whoever cleans up.
//!
//! Fallible calls return `std::io::Result` with the step in the message;
//! the tests panic on it, the benchmark and the helpers report it.
//!
//! Deliberately not here: the tests' own bpf(2) and mountinfo readers
//! check the kernel independently of the daemon's code, and the daemon
//! does not use this crate.

pub mod cgroup;
pub mod flags;
pub mod pins;
pub mod privilege;
pub mod proc;
pub mod sockaddr;
pub mod users;

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

static PREFIX: OnceLock<&'static str> = OnceLock::new();

/// What the guards put before their messages on stderr: `[harness]` unless
/// the program set another one with [`set_log_prefix`].
pub fn log_prefix() -> &'static str {
    PREFIX.get().copied().unwrap_or("[harness]")
}

/// Sets [`log_prefix`] once, before the first guard is made (the benchmark
/// says `xtask:`); later calls change nothing.
pub fn set_log_prefix(prefix: &'static str) {
    let _ = PREFIX.set(prefix);
}

/// A number unique within this process; with the pid it makes names that
/// cannot collide with a parallel run or a leftover of an old one.
pub fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `<tag>-<pid>-<n>`: a name no other run and no other guard of this one
/// uses.
pub fn unique_name(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), next_id())
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An `io::Error` of the same kind with `what` in front of its message;
/// [`os_errno`] still finds the errno.
pub(crate) fn context(what: impl std::fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        Context {
            what: what.to_string(),
            source: e,
        },
    )
}

/// What failed, and why.
#[derive(Debug)]
struct Context {
    what: String,
    source: io::Error,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The errno behind `e`, also when the kit put a step in front of it
/// (0 when there is none).
pub fn os_errno(e: &io::Error) -> i32 {
    e.raw_os_error()
        .or_else(|| {
            e.get_ref()?
                .downcast_ref::<Context>()
                .map(|c| os_errno(&c.source))
        })
        .unwrap_or(0)
}

/// A directory under the temp dir, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<temp dir>/<name>` (which must not exist yet; see
    /// [`unique_name`]).
    pub fn new(name: &str) -> io::Result<Self> {
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).map_err(|e| context(format!("creating {}", path.display()), e))?;
        Ok(Self { path })
    }

    /// `<temp dir>/<tag>-<pid>-<n>` (see [`unique_name`]).
    pub fn unique(tag: &str) -> io::Result<Self> {
        Self::new(&unique_name(tag))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!(
                "{} LEFTOVER directory {}: {e}",
                log_prefix(),
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn context_keeps_the_errno() {
        let e = super::context("joining x", std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(super::os_errno(&e), libc::EACCES);
        assert!(e.to_string().starts_with("joining x: "), "{e}");
    }
}
