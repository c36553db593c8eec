//! Throw-away system users and groups, made with the shadow tools so NSS
//! (and therefore the daemon) sees them like any real account.

use std::{io, process::Command};

use crate::log_prefix;

/// Runs a command to completion; its stderr in the error when it fails.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The numeric fields 2 and 3 of `getent <db> <name>` (uid and gid of a
/// passwd entry, gid of a group entry); `None` when there is no entry.
fn getent(db: &str, name: &str) -> Option<(u32, Option<u32>)> {
    let line = run(Command::new("getent").args([db, name])).ok()?;
    let fields: Vec<&str> = line.trim().split(':').collect();
    let first = fields.get(2)?.parse().ok()?;
    Some((first, fields.get(3).and_then(|s| s.parse().ok())))
}

/// A system group; Drop runs groupdel.
#[derive(Debug)]
pub struct SystemGroup {
    pub name: String,
    pub gid: u32,
}

impl SystemGroup {
    pub fn create(name: &str) -> io::Result<Self> {
        run(Command::new("groupadd").arg("--system").arg(name))?;
        let (gid, _) = getent("group", name).ok_or_else(|| {
            io::Error::other(format!("group {name} missing right after groupadd"))
        })?;
        Ok(Self {
            name: name.to_owned(),
            gid,
        })
    }
}

impl Drop for SystemGroup {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("groupdel").arg(&self.name)) {
            eprintln!("{} LEFTOVER group {}: {e}", log_prefix(), self.name);
        }
    }
}

/// A system user without home or login shell; Drop runs userdel (and
/// removes its personal group if userdel left it).
#[derive(Debug)]
pub struct SystemUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether useradd made a personal group of the same name.
    own_group: bool,
}

impl SystemUser {
    /// `useradd --system` with a personal group as primary group, unless
    /// `primary` names another; `supplementary`, when given, is added.
    pub fn create(
        name: &str,
        primary: Option<&str>,
        supplementary: Option<&str>,
    ) -> io::Result<Self> {
        let mut cmd = Command::new("useradd");
        cmd.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ]);
        match primary {
            Some(g) => cmd.args(["--no-user-group", "--gid", g]),
            None => cmd.arg("--user-group"),
        };
        if let Some(g) = supplementary {
            cmd.args(["--groups", g]);
        }
        run(cmd.arg(name))?;
        // From here on, Drop removes what useradd made.
        let mut user = Self {
            name: name.to_owned(),
            uid: 0,
            gid: 0,
            own_group: primary.is_none(),
        };
        match getent("passwd", name) {
            Some((uid, Some(gid))) => (user.uid, user.gid) = (uid, gid),
            _ => {
                return Err(io::Error::other(format!(
                    "user {name} missing right after useradd"
                )));
            }
        }
        Ok(user)
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        let p = log_prefix();
        if let Err(e) = run(Command::new("userdel").arg(&self.name)) {
            eprintln!("{p} LEFTOVER user {}: {e}", self.name);
        }
        // userdel removes the personal group only when login.defs says
        // USERGROUPS_ENAB yes; do not depend on it.
        if self.own_group
            && getent("group", &self.name).is_some_and(|(gid, _)| gid == self.gid)
            && let Err(e) = run(Command::new("groupdel").arg(&self.name))
        {
            eprintln!("{p} LEFTOVER group {}: {e}", self.name);
        }
    }
}
