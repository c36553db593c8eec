//! Becoming the process under test: join a cgroup (needs root), then drop
//! to the user. The helpers (sg-probe, sg-bypass, sg-bench worker, sg-flood)
//! do it in this order so that every connect afterwards is made by a
//! process whose *real* uid is the one under test, inside the cgroup
//! spicegate may be attached to.

use std::{fs, io, path::Path};

use crate::context;

/// Moves this process into the cgroup directory `dir` (writes its own pid,
/// not 0, to `cgroup.procs`: the line is also a record of who joined).
pub fn join_cgroup(dir: impl AsRef<Path>) -> io::Result<()> {
    let procs = dir.as_ref().join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .map_err(|e| context(format!("joining {}", procs.display()), e))
}

/// Drops to `uid` and `gid` for good: setgroups([gid]), then setresgid,
/// then setresuid (each needs the privilege the next one gives up). The
/// error names the step that failed.
pub fn drop_to(uid: u32, gid: u32) -> io::Result<()> {
    let groups = [gid as libc::gid_t];
    // SAFETY: a valid one-element array.
    if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
        return Err(context("setgroups", io::Error::last_os_error()));
    }
    // SAFETY: plain syscall.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(context("setresgid", io::Error::last_os_error()));
    }
    // SAFETY: plain syscall.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(context("setresuid", io::Error::last_os_error()));
    }
    Ok(())
}

/// Changes only the real uid, keeping effective and saved uid 0 so that
/// the next switch is allowed: how sg-flood makes connects as many uids
/// from one process. Not a privilege drop.
pub fn switch_real_uid(uid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::setresuid(uid, 0, 0) } != 0 {
        return Err(context(
            format!("setresuid({uid}, 0, 0)"),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}
