//! The table's entries other than grants.

use spicegate_common::{RuleKey, RuleValue};

/// The kernel table's entries other than grants (ports, endpoints, local
/// addresses, binds), sorted by key: built by pushing and one sort, looked
/// up by binary search. Grants are not held here: they are generated from
/// [`Compiled::endpoints`] (one uid set per VM) while the table is filled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(Vec<(RuleKey, RuleValue)>);

impl Rules {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub(super) fn insert(&mut self, k: RuleKey, v: RuleValue) {
        self.0.push((k, v));
    }
    /// Sorts; of entries with equal keys the last inserted wins.
    pub(super) fn seal(mut self) -> Self {
        self.0.sort_by_key(|e| e.0);
        let mut out: Vec<(RuleKey, RuleValue)> = Vec::with_capacity(self.0.len());
        for e in self.0 {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Self(out)
    }
    pub fn get(&self, k: &RuleKey) -> Option<&RuleValue> {
        self.0
            .binary_search_by(|(key, _)| key.cmp(k))
            .ok()
            .map(|i| &self.0[i].1)
    }
    pub fn contains_key(&self, k: &RuleKey) -> bool {
        self.get(k).is_some()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&RuleKey, &RuleValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    pub fn as_slice(&self) -> &[(RuleKey, RuleValue)] {
        &self.0
    }
}
