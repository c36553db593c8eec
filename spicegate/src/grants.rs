//! Temporary grants (`spicegate grant USER VM [--for D]`): on top of the
//! policy, kept in the state directory so they survive restarts and
//! reloads, gone at expiry.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One temporary grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempGrant {
    pub uid: u32,
    /// The name it was granted under (for display).
    pub user: String,
    pub vm: String,
    /// Unix seconds; `None` means until revoked.
    pub expires: Option<u64>,
    pub granted_at: u64,
    /// uid of the admin who granted it.
    pub granted_by: u32,
}

impl TempGrant {
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// The longest temporary grant: ten years (of 365.25 days). Longer ones are
/// refused (they are policy, not temporary), which also keeps every expiry
/// far inside what the arithmetic and the formatting below can hold.
pub const MAX_GRANT_SECS: u64 = 10 * 36_525 * 864;

/// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
const MAX_RFC3339: u64 = 253_402_300_799;

/// RFC 3339 UTC time of unix seconds, for display and JSON. Never panics:
/// a time past year 9999 (only a hand-edited grants file can hold one) is
/// written as the last second of 9999.
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(
        UNIX_EPOCH + std::time::Duration::from_secs(unix.min(MAX_RFC3339)),
    )
    .to_string()
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The grants file and its contents.
#[derive(Debug)]
pub struct GrantStore {
    path: PathBuf,
    pub grants: Vec<TempGrant>,
    writer: GrantWriter,
}

type SaveJob = (Vec<u8>, Option<std::sync::mpsc::Sender<Result<(), String>>>);

/// Writes the grants file on its own thread, in order: the engine hands an
/// expiry's copy over and goes on (an fsync never delays the end of
/// access), while `grant` and `revoke` wait for theirs so that a failure is
/// reported. Ordered, so an older copy never lands after a newer one.
#[derive(Debug)]
struct GrantWriter {
    tx: std::sync::mpsc::Sender<SaveJob>,
}

impl GrantWriter {
    fn start(path: PathBuf) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<SaveJob>();
        std::thread::Builder::new()
            .name("sg-grants".into())
            .spawn(move || {
                for (bytes, reply) in rx {
                    let r = crate::state::write_atomic(&path, &bytes).map_err(|e| format!("{e:#}"));
                    match reply {
                        Some(tx) => {
                            let _ = tx.send(r);
                        }
                        None => {
                            if let Err(e) = r {
                                log::error!("could not save temporary grants: {e}");
                            }
                        }
                    }
                }
            })
            .context("starting the grants writer")?;
        Ok(Self { tx })
    }
}

impl GrantStore {
    /// An empty store that is never read (an untrusted state directory).
    pub fn empty(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("grants.json");
        let writer = GrantWriter::start(path.clone())?;
        Ok(Self {
            path,
            grants: Vec::new(),
            writer,
        })
    }

    /// Loads `DIR/grants.json`; a missing file is an empty store.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("grants.json");
        let grants = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a valid grants file; fix or remove it",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let writer = GrantWriter::start(path.clone())?;
        Ok(Self {
            path,
            grants,
            writer,
        })
    }

    /// Writes the store atomically (temp file, fsync, rename) and waits
    /// for it.
    pub fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.grants)?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.writer
            .tx
            .send((bytes, Some(tx)))
            .map_err(|_| anyhow::anyhow!("the grants writer stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the grants writer stopped"))?
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("saving {}", self.path.display()))
    }

    /// Hands a copy of the store to the writer and returns at once (errors
    /// are logged).
    pub fn save_in_background(&self) {
        match serde_json::to_vec_pretty(&self.grants) {
            Ok(bytes) => {
                let _ = self.writer.tx.send((bytes, None));
            }
            Err(e) => log::error!("could not save temporary grants: {e}"),
        }
    }

    /// Adds or replaces the grant of `uid` on `vm`.
    pub fn upsert(&mut self, grant: TempGrant) {
        self.grants
            .retain(|g| !(g.uid == grant.uid && g.vm == grant.vm));
        self.grants.push(grant);
    }

    /// Removes the grant of `uid` on `vm`; whether there was one.
    pub fn remove(&mut self, uid: u32, vm: &str) -> bool {
        let before = self.grants.len();
        self.grants.retain(|g| !(g.uid == uid && g.vm == vm));
        before != self.grants.len()
    }

    /// Drops expired grants and returns them.
    pub fn expire(&mut self, now: u64) -> Vec<TempGrant> {
        let (gone, keep): (Vec<_>, Vec<_>) = self.grants.drain(..).partition(|g| g.expired(now));
        self.grants = keep;
        gone
    }

    /// When the next grant expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.grants.iter().filter_map(|g| g.expires).min()
    }

    /// The grants in force at `now`.
    pub fn active(&self, now: u64) -> Vec<TempGrant> {
        self.grants
            .iter()
            .filter(|g| !g.expired(now))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod rfc3339_tests {
    #[test]
    fn formats_any_u64_without_panicking() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(super::rfc3339(253_402_300_800), "9999-12-31T23:59:59Z");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(uid: u32, vm: &str, expires: Option<u64>) -> TempGrant {
        TempGrant {
            uid,
            user: format!("u{uid}"),
            vm: vm.into(),
            expires,
            granted_at: 0,
            granted_by: 0,
        }
    }

    #[test]
    fn upsert_remove_expire_and_persist() {
        let dir = std::env::temp_dir().join(format!("sg-grants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let mut s = GrantStore::load(&dir).expect("empty store");
        assert!(s.grants.is_empty());
        s.upsert(g(1, "a", Some(100)));
        s.upsert(g(1, "a", Some(200)));
        s.upsert(g(2, "a", None));
        assert_eq!(s.grants.len(), 2);
        assert_eq!(s.next_expiry(), Some(200));
        s.save().expect("save");
        let mut back = GrantStore::load(&dir).expect("load");
        assert_eq!(back.grants, s.grants);
        assert_eq!(back.active(250).len(), 1);
        assert_eq!(back.expire(250).len(), 1);
        assert!(back.remove(2, "a"));
        assert!(!back.remove(2, "a"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
