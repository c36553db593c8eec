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
    pub fn len(&self) -> usize {
        self.inner().pieces.len()
    }

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
