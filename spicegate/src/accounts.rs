//! Which account a uid belongs to, for the control socket's per-user
//! limit. A user with a subordinate uid range (`/etc/subuid`, 65,536 uids
//! on Debian) can connect as any of those uids from a user namespace; all
//! of them count as that user. uids that are neither real accounts (below
//! 65,536) nor in anyone's range share one bucket.
//!
//! Read from the files directly (`/etc/subuid`, and `/etc/passwd` for the
//! owners' uids), re-read when they change: the thread that accepts
//! connections never asks NSS.

use std::{collections::HashMap, fs, path::PathBuf, sync::Mutex, time::SystemTime};

/// Below this, a uid is its own account.
const LOW_UIDS: u32 = 65_536;

/// Whose quota a connection counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// An account, by uid.
    Uid(u32),
    /// An account known only by name (in /etc/subuid, not /etc/passwd).
    Name(String),
    /// Every uid of no account.
    Shared,
}

/// One subordinate range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    start: u32,
    count: u32,
    owner: Bucket,
}

/// The ranges of `/etc/subuid`, cached by the files' modification times.
#[derive(Debug)]
pub struct Accounts {
    subuid: PathBuf,
    passwd: PathBuf,
    cache: Mutex<(Option<SystemTime>, Option<SystemTime>, Vec<Range>)>,
}

impl Default for Accounts {
    fn default() -> Self {
        Self::new("/etc/subuid", "/etc/passwd")
    }
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Accounts {
    pub fn new(subuid: impl Into<PathBuf>, passwd: impl Into<PathBuf>) -> Self {
        Self {
            subuid: subuid.into(),
            passwd: passwd.into(),
            cache: Mutex::new((None, None, Vec::new())),
        }
    }

    /// The bucket of `uid`.
    pub fn bucket(&self, uid: u32) -> Bucket {
        let (s, p) = (mtime(&self.subuid), mtime(&self.passwd));
        let mut c = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.0 != s || c.1 != p {
            let ranges = parse(
                &fs::read_to_string(&self.subuid).unwrap_or_default(),
                &fs::read_to_string(&self.passwd).unwrap_or_default(),
            );
            *c = (s, p, ranges);
        }
        bucket_of(uid, &c.2)
    }
}

fn bucket_of(uid: u32, ranges: &[Range]) -> Bucket {
    if let Some(r) = ranges
        .iter()
        .find(|r| uid >= r.start && u64::from(uid) < u64::from(r.start) + u64::from(r.count))
    {
        return r.owner.clone();
    }
    if uid < LOW_UIDS {
        Bucket::Uid(uid)
    } else {
        Bucket::Shared
    }
}

/// `owner:start:count` lines; owners by uid, or by name mapped through the
/// passwd file when it lists them.
fn parse(subuid: &str, passwd: &str) -> Vec<Range> {
    let uids: HashMap<&str, u32> = passwd
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((name, uid))
        })
        .collect();
    subuid
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let owner = f.next()?;
            let start = f.next()?.parse().ok()?;
            let count = f.next()?.parse().ok()?;
            let owner = match owner.parse::<u32>() {
                Ok(uid) => Bucket::Uid(uid),
                Err(_) => uids
                    .get(owner)
                    .map_or_else(|| Bucket::Name(owner.to_owned()), |u| Bucket::Uid(*u)),
            };
            Some(Range {
                start,
                count,
                owner,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_belong_to_their_owner() {
        let ranges = parse(
            "bob:100000:65536\n# comment\n1002:165536:65536\nldapuser:231072:65536\nbroken\n",
            "root:x:0:0::/root:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n",
        );
        assert_eq!(bucket_of(1001, &ranges), Bucket::Uid(1001));
        assert_eq!(bucket_of(100_000, &ranges), Bucket::Uid(1001));
        assert_eq!(bucket_of(165_535, &ranges), Bucket::Uid(1001));
        assert_eq!(bucket_of(165_536, &ranges), Bucket::Uid(1002));
        assert_eq!(bucket_of(231_072, &ranges), Bucket::Name("ldapuser".into()));
        assert_eq!(bucket_of(500_000, &ranges), Bucket::Shared);
        assert_eq!(bucket_of(4_000_000_000, &ranges), Bucket::Shared);
        assert_eq!(bucket_of(0, &ranges), Bucket::Uid(0));
    }
}
