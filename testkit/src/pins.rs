//! The pin directory of a daemon under test, with its control socket and
//! state directory beside it, so no test or benchmark touches
//! `/run/spicegate` or `/var/lib/spicegate`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use crate::{context, log_prefix};

/// A pin directory under /sys/fs/bpf (not created: the daemon makes it)
/// and a run directory for the daemon's control socket and state. Drop
/// runs `spicegate unload --pin-dir` on it, removes the pins by hand if
/// that left them (unpinning a link nobody else holds detaches it) and
/// removes the run directory.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    run_dir: PathBuf,
    bin: PathBuf,
}

impl PinDir {
    /// `/sys/fs/bpf/<name>`, unloaded with the spicegate binary `bin`.
    pub fn new(name: &str, run_dir: PathBuf, bin: &Path) -> Self {
        Self {
            path: Path::new("/sys/fs/bpf").join(name),
            run_dir,
            bin: bin.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Where the control socket, the state and other files of the daemon go.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.join("state")
    }

    /// `spicegate unload --pin-dir <this>`, its output echoed on stderr.
    pub fn unload(&self) -> io::Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("unload")
            .arg("--pin-dir")
            .arg(&self.path)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| context(format!("running {cmd:?}"), e))?;
        echo_output(&cmd, &out);
        Ok(out)
    }
}

impl PinDir {
    /// Unloads (when loaded) and removes the run directory, so that the
    /// next daemon starts from nothing; an unload that fails is an error.
    pub fn clear(&self) -> io::Result<()> {
        if self.path.exists() {
            let out = self.unload()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "`spicegate unload --pin-dir {}` failed: {}",
                    self.path.display(),
                    out.status
                )));
            }
        }
        match fs::remove_dir_all(&self.run_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(context(format!("removing {}", self.run_dir.display()), e))
            }
            _ => Ok(()),
        }
    }
}

/// Shows what a one-shot command did, on stderr (the test's output, shown
/// when it fails).
pub fn echo_output(cmd: &Command, out: &Output) {
    let p = log_prefix();
    eprintln!("{p} {cmd:?} -> {}", out.status);
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        eprintln!("[spicegate stdout] {l}");
    }
    for l in String::from_utf8_lossy(&out.stderr).lines() {
        eprintln!("[spicegate stderr] {l}");
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let p = log_prefix();
        if self.path.exists() {
            // Never panic here: this often runs while a failed test unwinds.
            match self.unload() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "{p} `spicegate unload --pin-dir {}` failed: {}",
                    self.path.display(),
                    out.status
                ),
                Err(e) => eprintln!("{p} could not unload {}: {e}", self.path.display()),
            }
        }
        if self.path.exists() {
            match fs::remove_dir_all(&self.path) {
                Ok(()) => eprintln!(
                    "{p} removed {} by hand after unload left it",
                    self.path.display()
                ),
                Err(e) => eprintln!("{p} LEFTOVER pin dir {}: {e}", self.path.display()),
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.run_dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("{p} LEFTOVER run dir {}: {e}", self.run_dir.display());
        }
    }
}
