//! Throw-away Unix users and groups for one test: the test kit's
//! [`SystemUser`] and [`SystemGroup`] with unique names, dereferencing to
//! them (`user.name`, `user.uid`, `user.gid`).

use std::ops::Deref;

use nix::unistd::{Gid, Group, Uid, User};
use spicegate_testkit::users::{SystemGroup, SystemUser};

/// A system group `sgg<pid%10000><n>`; Drop runs groupdel.
#[derive(Debug)]
pub struct TestGroup(SystemGroup);

impl TestGroup {
    pub fn new() -> Self {
        let name = format!("sgg{:04}{}", std::process::id() % 10000, crate::next_id());
        Self(
            SystemGroup::create(&name).unwrap_or_else(|e| panic!("groupadd for a test group: {e}")),
        )
    }
}

impl Default for TestGroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for TestGroup {
    type Target = SystemGroup;

    fn deref(&self) -> &SystemGroup {
        &self.0
    }
}

/// A system user `sgt<pid%10000><n>` without home or login shell; Drop runs
/// userdel (and removes its personal group if userdel left it).
#[derive(Debug)]
pub struct TestUser(SystemUser);

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
        let user = SystemUser::create(
            &name,
            primary.map(|g| g.name.as_str()),
            supplementary.map(|g| g.name.as_str()),
        );
        Self(user.unwrap_or_else(|e| panic!("useradd for a test user: {e}")))
    }
}

impl Default for TestUser {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for TestUser {
    type Target = SystemUser;

    fn deref(&self) -> &SystemUser {
        &self.0
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
