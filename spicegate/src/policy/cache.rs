//! Parsed pieces of a large policy, kept from one reload to the next.
//!
//! A large policy is parsed a piece of VM tables at a time (see
//! [`crate::policy_split`]). A reload usually changes one VM or a few, so
//! most pieces are the very text parsed last time: the cache keeps each
//! piece's parse (the TOML as written, before validation) under the
//! SHA-256 of its exact text, and only pieces whose text changed are
//! parsed again. Validation (names through NSS, servers, every error with
//! its place) runs on every piece each time, so a cached piece is checked
//! exactly as a fresh one; a piece's positions are its own, and where the
//! piece now sits in the file is worked out anew on each parse.
//!
//! Memory stays that of one policy: after each parse the cache holds the
//! pieces of that parse only (those of earlier texts are dropped), and a
//! piece holds a `#UID` entry in 4 bytes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use sha2::{Digest as _, Sha256};

use super::raw::RawPolicy;

type Key = [u8; 32];

/// The parsed pieces of the last policy text parsed with it. Shared by the
/// threads that parse for `reload`.
#[derive(Default)]
pub struct ParseCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pieces: HashMap<Key, Arc<RawPolicy>>,
    last: PieceCounts,
}

/// How the pieces of one parse were had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PieceCounts {
    /// Parsed, their text being new.
    pub parsed: usize,
    /// Taken from the cache.
    pub reused: usize,
}

impl ParseCache {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counts of the last parse that used the cache.
    pub fn last(&self) -> PieceCounts {
        self.inner().last
    }

    /// How many pieces it holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner().pieces.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pieces one parse went through: what the cache keeps afterwards.
#[derive(Default)]
pub(super) struct Pass<'a> {
    cache: Option<&'a ParseCache>,
    used: HashMap<Key, Arc<RawPolicy>>,
    counts: PieceCounts,
}

impl<'a> Pass<'a> {
    pub(super) fn new(cache: Option<&'a ParseCache>) -> Self {
        Self {
            cache,
            ..Self::default()
        }
    }

    /// The parse of one piece, `None` when it is not valid TOML (the caller
    /// then parses the whole text, for the exact errors).
    pub(super) fn piece(&mut self, text: &str) -> Option<Arc<RawPolicy>> {
        let Some(cache) = self.cache else {
            return toml::from_str::<RawPolicy>(text).ok().map(Arc::new);
        };
        let key: Key = Sha256::digest(text.as_bytes()).into();
        if let Some(raw) = self.used.get(&key) {
            self.counts.reused += 1;
            return Some(Arc::clone(raw));
        }
        let cached = cache.inner().pieces.get(&key).cloned();
        let raw = match cached {
            Some(raw) => {
                self.counts.reused += 1;
                raw
            }
            None => {
                self.counts.parsed += 1;
                Arc::new(toml::from_str::<RawPolicy>(text).ok()?)
            }
        };
        self.used.insert(key, Arc::clone(&raw));
        Some(raw)
    }

    /// Leaves in the cache the pieces of this parse, and only those.
    pub(super) fn finish(self) {
        if let Some(cache) = self.cache {
            let mut inner = cache.inner();
            // The pieces of the text before are dropped after the lock is
            // let go: freeing a large policy's parse takes a while.
            let old = std::mem::replace(&mut inner.pieces, self.used);
            inner.last = self.counts;
            drop(inner);
            drop(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        directory::FakeDirectory,
        policy::{Env, FakeResolver, Policy, PolicyErrors, Source, parse_sources},
    };

    /// A policy large enough to be cut (12 VMs of 10,000 uids, each a
    /// piece of its own, and 60 small ones grouped into pieces), with
    /// `extra` added to the `allow` list of VM `big3`.
    fn policy(extra: &str) -> String {
        let uids: Vec<String> = (0..10_000)
            .map(|u| format!("\"#{}\"", 1_000_000 + u))
            .collect();
        let mut s =
            String::from("[settings]\ntimezone = \"UTC\"\n[protect]\nports = [\"6000-6999\"]\n");
        for i in 0..12 {
            let more = if i == 3 { extra } else { "" };
            s.push_str(&format!(
                "\n[vms.big{i}]\nserver = \"localhost\"\nports = [{}]\nallow = [{}{more}]\n",
                5900 + i,
                uids.join(", ")
            ));
        }
        for i in 0..60 {
            s.push_str(&format!(
                "\n[vms.small{i}]\nserver = \"localhost\"\nports = [{}]\nallow = [\"#{i}\", \"myself\"]\n[[vms.small{i}.schedule]]\nallow = [\"#7\"]\nhours = \"08:00-18:00\"\n",
                6000 + i
            ));
        }
        assert!(s.len() > crate::policy_split::SPLIT_FROM, "{}", s.len());
        s
    }

    /// The errors of a parse that must fail (a policy this large is not
    /// printed when it does not).
    fn refused(r: Result<Policy, PolicyErrors>) -> PolicyErrors {
        match r {
            Ok(_) => panic!("the policy was accepted"),
            Err(e) => e,
        }
    }

    fn dir() -> FakeDirectory {
        FakeDirectory::default().user("myself", 1000)
    }

    fn parse_with(
        text: &str,
        dir: &FakeDirectory,
        cache: Option<&ParseCache>,
    ) -> Result<Policy, PolicyErrors> {
        let sources = [Source {
            path: Path::new("p.toml").to_owned(),
            text: text.to_owned(),
        }];
        let env = Env {
            dir,
            resolver: &FakeResolver,
        };
        match cache {
            Some(c) => crate::policy::parse_sources_cached(&sources, &env, c),
            None => parse_sources(&sources, &env),
        }
    }

    /// Only the piece that changed is parsed again, and the policy is what
    /// a parse without the cache gives.
    #[test]
    fn only_changed_pieces_are_parsed_again() {
        let cache = ParseCache::default();
        let dir = dir();
        let first = policy("");
        let p = parse_with(&first, &dir, Some(&cache)).expect("parses");
        let all = cache.last();
        assert_eq!(all.reused, 0);
        assert!(all.parsed > 12, "{all:?}");
        assert_eq!(cache.len(), all.parsed);
        assert!(Some(&p) == parse_with(&first, &dir, None).ok().as_ref());

        // The same text: nothing parsed.
        let again = parse_with(&first, &dir, Some(&cache)).expect("parses");
        assert_eq!(
            cache.last(),
            PieceCounts {
                parsed: 0,
                reused: all.parsed
            }
        );
        assert!(again == p);

        // One user more in one VM: that VM's piece alone (the rest of the
        // document did not change either).
        let second = policy(", \"#42\"");
        let q = parse_with(&second, &dir, Some(&cache)).expect("parses");
        assert_eq!(
            cache.last(),
            PieceCounts {
                parsed: 1,
                reused: all.parsed - 1
            }
        );
        assert!(q.vms["big3"].allows_uid(42) && !p.vms["big3"].allows_uid(42));
        assert!(Some(&q) == parse_with(&second, &dir, None).ok().as_ref());
        // The pieces of the first text are gone: one policy's worth.
        assert_eq!(cache.len(), all.parsed);

        // A cached piece is validated again: a user NSS no longer knows
        // is refused, with its place.
        let e = refused(parse_with(&second, &FakeDirectory::default(), Some(&cache)));
        assert_eq!(cache.last().parsed, 0);
        let whole = refused(parse_with(&second, &FakeDirectory::default(), None));
        assert_eq!(e, whole);
        assert!(e.to_string().contains("unknown user `myself`"), "{e}");
    }

    /// The resolver thread's reading of the policy in force parses no
    /// piece again, and sees what NSS says now.
    #[test]
    fn names_are_read_again_from_cached_pieces() {
        let cache = ParseCache::default();
        let text = policy("");
        let p = parse_with(&text, &dir(), Some(&cache)).expect("parses");
        let pieces = cache.last().parsed;
        let sources = [Source {
            path: Path::new("p.toml").to_owned(),
            text,
        }];
        let moved = FakeDirectory::default().user("myself", 2000);
        let env = Env {
            dir: &moved,
            resolver: &FakeResolver,
        };
        let q =
            crate::policy::reparse_names(&sources, &env, false, Some(&cache)).expect("names only");
        assert_eq!(
            cache.last(),
            PieceCounts {
                parsed: 0,
                reused: pieces
            }
        );
        assert!(p.vms["small0"].allows_uid(1000) && !p.vms["small0"].allows_uid(2000));
        assert!(q.vms["small0"].allows_uid(2000) && !q.vms["small0"].allows_uid(1000));
    }

    /// An error in a piece taken from the cache names the line and column
    /// where that piece is now, after the text before it grew.
    #[test]
    fn errors_in_cached_pieces_keep_their_place() {
        let cache = ParseCache::default();
        let dir = dir();
        let broken = |extra: &str| {
            policy(extra).replace(
                "[vms.small40]\nserver = \"localhost\"",
                "[vms.small40]\nserver = \"nowhere\"",
            )
        };
        let first = broken("");
        let e = refused(parse_with(&first, &dir, Some(&cache)));
        assert!(e.to_string().contains("names server `nowhere`"), "{e}");
        // big3 grows by a line: everything after it moves down.
        let second = broken(",\n\"#42\"");
        let e = refused(parse_with(&second, &dir, Some(&cache)));
        assert_eq!(
            cache.last().parsed,
            1,
            "small40's piece came from the cache"
        );
        let at = second.find("\"nowhere\"").unwrap_or(0);
        let line = second[..at].lines().count();
        let col = at - second[..at].rfind('\n').unwrap_or(0);
        assert!(
            e.to_string().contains(&format!("p.toml:{line}:{col}: ")),
            "{e}"
        );
        assert_eq!(Some(e), parse_with(&second, &dir, None).err());

        // A syntax error: the whole text is parsed, for the exact error.
        let third = policy("").replace(
            "hours = \"08:00-18:00\"\n\n[vms.small41]",
            "hours = \n\n[vms.small41]",
        );
        assert_ne!(third, policy(""));
        let e = refused(parse_with(&third, &dir, Some(&cache)));
        assert_eq!(Some(&e), parse_with(&third, &dir, None).err().as_ref());
        let at = third.find("hours = \n\n[vms.small41]").unwrap_or(0);
        let line = third[..at].lines().count() + 1;
        assert!(e.to_string().contains(&format!("p.toml:{line}:")), "{e}");
    }

    /// A text whose cut is not safe is parsed whole, the cache unused and
    /// left empty.
    #[test]
    fn unsafe_cuts_are_parsed_whole() {
        let cache = ParseCache::default();
        let dir = dir();
        parse_with(&policy(""), &dir, Some(&cache)).expect("parses");
        assert!(!cache.is_empty());
        let mut text = policy("");
        text.push_str("[[vms.big3.schedule]]\nallow = [\"#2\"]\n");
        assert!(crate::policy_split::split(&text).is_none());
        let p = parse_with(&text, &dir, Some(&cache)).expect("parses");
        assert_eq!(cache.last(), PieceCounts::default());
        assert!(cache.is_empty());
        assert_eq!(p.vms["big3"].schedules.len(), 1);
        assert!(Some(p) == parse_with(&text, &dir, None).ok());
    }
}
