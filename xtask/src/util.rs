//! Small helpers shared by the subcommands.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map_or(here.clone(), Path::to_path_buf)
}

/// `cargo` in the workspace root, always building the real eBPF object: a
/// `SPICEGATE_SKIP_EBPF=1` left in the shell for `cargo clippy` would
/// otherwise produce a daemon that cannot load.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace())
        .env_remove("SPICEGATE_SKIP_EBPF");
    cmd
}

/// The command line as a user would type it, for messages.
pub fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion, inheriting stdout/stderr; fails naming the
/// command when it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = shown(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Stdout of a command that succeeded; `None` when it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"))
}

/// Puts cargo's bin directory on PATH when it is missing (`sudo` resets
/// PATH), so a freshly installed `bpf-linker` is found by the checks here
/// and by spicegate's build script.
pub fn ensure_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let mut dirs = vec![bin];
    dirs.extend(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(dirs) {
        set_path(joined);
    }
}

fn set_path(path: OsString) {
    // SAFETY: called first thing in main, before xtask starts any thread.
    unsafe { std::env::set_var("PATH", path) };
}

/// Where cargo puts build output, as cargo itself resolves it
/// (CARGO_TARGET_DIR, `build.target-dir` in a config file, or `target/`).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let json = output(&mut cmd)
        .ok_or_else(|| anyhow!("`{}` failed: is the workspace intact?", shown(&cmd)))?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("reading `cargo metadata` output")?;
    meta.get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo metadata` did not name a target directory"))
}

/// A named step that reports how long it took.
pub struct Step {
    name: &'static str,
    start: Instant,
}

impl Step {
    pub fn start(name: &'static str) -> Self {
        eprintln!("xtask: == {name}");
        Self {
            name,
            start: Instant::now(),
        }
    }

    /// Prints the outcome and elapsed seconds; returns whether it passed.
    pub fn finish(self, ok: bool) -> bool {
        eprintln!(
            "xtask: == {}: {} ({:.1}s)",
            self.name,
            if ok { "ok" } else { "FAILED" },
            self.start.elapsed().as_secs_f64()
        );
        ok
    }
}

/// Installs `handler` for SIGINT and SIGTERM (with SA_RESTART), so that
/// Ctrl-C reaches xtask's own cleanup instead of killing it. A caught
/// signal, unlike an ignored one, is reset to the default in a program
/// xtask execs.
pub fn on_interrupt(handler: extern "C" fn(libc::c_int)) -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action is zero-initialised and then filled in; the
        // handlers xtask installs only touch atomics and call kill.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing the Ctrl-C handler");
        }
    }
    Ok(())
}
