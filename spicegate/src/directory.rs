//! Users and groups, looked up through NSS (so LDAP and SSSD work as
//! /etc/passwd does), behind a trait so the policy tests run without them.

use std::{collections::BTreeSet, ffi::CStr, io, sync::Mutex};

use nix::unistd::{Gid, Group, Uid, User};

/// Answers the questions a policy asks about users and groups.
pub trait Directory {
    /// uid of a user name; `None` when NSS knows no such user.
    fn user_uid(&self, name: &str) -> io::Result<Option<u32>>;
    /// uids of every member of a group, primary and supplementary; `None`
    /// when NSS knows no such group.
    fn group_members(&self, name: &str) -> io::Result<Option<BTreeSet<u32>>>;
    /// Name of a uid, for logs; `None` when it has no passwd entry.
    fn user_name(&self, uid: u32) -> Option<String>;
}

/// The system's NSS databases.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nss;

/// `getpwent` walks a process-global cursor; one walk at a time.
static PWENT: Mutex<()> = Mutex::new(());

impl Directory for Nss {
    fn user_uid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(User::from_name(name)
            .map_err(io::Error::from)?
            .map(|u| u.uid.as_raw()))
    }

    fn group_members(&self, name: &str) -> io::Result<Option<BTreeSet<u32>>> {
        let Some(group) = Group::from_name(name).map_err(io::Error::from)? else {
            return Ok(None);
        };
        let mut uids = BTreeSet::new();
        // Supplementary members are listed by name in the group entry.
        for member in &group.mem {
            if let Some(user) = User::from_name(member).map_err(io::Error::from)? {
                uids.insert(user.uid.as_raw());
            } else {
                log::warn!(
                    "group `{name}` lists member `{member}`, which has no passwd entry; skipped"
                );
            }
        }
        // Primary members are only found by walking passwd. With SSSD/LDAP
        // this sees remote users only when enumeration is enabled.
        uids.extend(primary_members(group.gid));
        Ok(Some(uids))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }
}

fn primary_members(gid: Gid) -> Vec<u32> {
    let _guard = PWENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut found = Vec::new();
    // SAFETY: setpwent/getpwent/endpwent are not thread-safe; PWENT
    // serialises every use in this process, and each entry is copied out
    // before the next call.
    unsafe {
        libc::setpwent();
        loop {
            let entry = libc::getpwent();
            if entry.is_null() {
                break;
            }
            if (*entry).pw_gid == gid.as_raw() {
                found.push((*entry).pw_uid);
            }
            let _ = CStr::from_ptr((*entry).pw_name);
        }
        libc::endpwent();
    }
    found
}

/// In-memory directory for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct FakeDirectory {
    users: std::collections::BTreeMap<String, u32>,
    groups: std::collections::BTreeMap<String, BTreeSet<u32>>,
}

#[cfg(test)]
impl FakeDirectory {
    pub fn user(mut self, name: &str, uid: u32) -> Self {
        self.users.insert(name.to_owned(), uid);
        self
    }
    pub fn group(mut self, name: &str, uids: &[u32]) -> Self {
        self.groups
            .insert(name.to_owned(), uids.iter().copied().collect());
        self
    }
}

#[cfg(test)]
impl Directory for FakeDirectory {
    fn user_uid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(self.users.get(name).copied())
    }
    fn group_members(&self, name: &str) -> io::Result<Option<BTreeSet<u32>>> {
        Ok(self.groups.get(name).cloned())
    }
    fn user_name(&self, uid: u32) -> Option<String> {
        self.users
            .iter()
            .find(|(_, u)| **u == uid)
            .map(|(n, _)| n.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nss_knows_root() {
        assert_eq!(Nss.user_uid("root").expect("nss"), Some(0));
        assert_eq!(Nss.user_name(0).as_deref(), Some("root"));
        // root's primary group is root: primary membership is found.
        let members = Nss
            .group_members("root")
            .expect("nss")
            .expect("group root exists");
        assert!(members.contains(&0));
        assert_eq!(Nss.user_uid("no-such-user-spicegate").expect("nss"), None);
    }
}
