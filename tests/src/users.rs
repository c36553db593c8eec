//! Throw-away Unix users and groups, made with the shadow tools so NSS (and
//! therefore the daemon) sees them like any real account.

use std::process::Command;

use nix::unistd::{Gid, Group, Uid, User};

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

/// A system group `sgg<pid%10000><n>`; Drop runs groupdel.
#[derive(Debug)]
pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    pub fn new() -> Self {
        let name = format!("sgg{:04}{}", std::process::id() % 10000, crate::next_id());
        run(Command::new("groupadd").arg("--system").arg(&name))
            .expect("groupadd for a test group");
        let gid = Group::from_name(&name)
            .expect("looking up the new test group")
            .unwrap_or_else(|| panic!("group {name} missing right after groupadd"))
            .gid
            .as_raw();
        Self { name, gid }
    }
}

impl Default for TestGroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("groupdel").arg(&self.name)) {
            eprintln!("[harness] LEFTOVER group {}: {e}", self.name);
        }
    }
}

/// A system user `sgt<pid%10000><n>` without home or login shell; Drop runs
/// userdel (and removes its personal group if userdel left it).
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Whether useradd made a personal group of the same name.
    own_group: bool,
}

impl TestUser {
    /// A user with its own personal group as primary group.
    pub fn new() -> Self {
        Self::create(None, None)
    }

    /// A user whose primary group is `group`.
    pub fn with_primary(group: &TestGroup) -> Self {
        Self::create(Some(group), None)
    }

    /// A user with its own primary group and `group` as a supplementary group.
    pub fn with_supplementary(group: &TestGroup) -> Self {
        Self::create(None, Some(group))
    }

    fn create(primary: Option<&TestGroup>, supplementary: Option<&TestGroup>) -> Self {
        let name = format!("sgt{:04}{}", std::process::id() % 10000, crate::next_id());
        let mut cmd = Command::new("useradd");
        cmd.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ]);
        match primary {
            Some(g) => cmd.args(["--no-user-group", "--gid", &g.name]),
            None => cmd.arg("--user-group"),
        };
        if let Some(g) = supplementary {
            cmd.args(["--groups", &g.name]);
        }
        cmd.arg(&name);
        run(&mut cmd).expect("useradd for a test user");
        let user = User::from_name(&name)
            .expect("looking up the new test user")
            .unwrap_or_else(|| panic!("user {name} missing right after useradd"));
        Self {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            own_group: primary.is_none(),
        }
    }
}

impl Default for TestUser {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("userdel").arg(&self.name)) {
            eprintln!("[harness] LEFTOVER user {}: {e}", self.name);
        }
        // userdel removes the personal group only when login.defs says
        // USERGROUPS_ENAB yes; do not depend on it.
        if self.own_group
            && matches!(Group::from_gid(Gid::from_raw(self.gid)), Ok(Some(g)) if g.name == self.name)
            && let Err(e) = run(Command::new("groupdel").arg(&self.name))
        {
            eprintln!("[harness] LEFTOVER group {}: {e}", self.name);
        }
    }
}

/// A uid with no passwd entry (and, as a gid, no group entry), for grants by
/// `#uid`. Derived from the pid so parallel runs pick different ones.
pub fn unused_uid() -> u32 {
    let start = 61_000 + (std::process::id() % 2000) * 2;
    (start..start + 4000)
        .find(|&n| {
            matches!(User::from_uid(Uid::from_raw(n)), Ok(None))
                && matches!(Group::from_gid(Gid::from_raw(n)), Ok(None))
        })
        .expect("no free uid between 61000 and 69000")
}
