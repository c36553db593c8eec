//! Who gained and who lost access between two tables, as the reload
//! answer, `check --diff` and the log show it. Computing a diff needs no
//! names; rendering it does (NSS), so the engine computes and another
//! thread renders.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
};

use serde::{Deserialize, Serialize};

use crate::{compile::Compiled, directory::Directory};

/// Change lines shown per reload.
pub const MAX_DIFF_LINES: usize = 50;

/// The first [`MAX_DIFF_LINES`] changes (gains first) and how many there
/// were in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    /// (vm, uid) that may now open the VM.
    pub gained: Vec<(String, u32)>,
    /// (vm, uid) that may no longer.
    pub lost: Vec<(String, u32)>,
    pub total: usize,
}

/// Who may open which VM: (vm, uid) pairs, for diffs.
pub fn access_pairs(c: &Compiled) -> BTreeSet<(String, u32)> {
    c.endpoints
        .values()
        .flat_map(|i| i.uids.iter().map(|u| (i.vm.clone(), *u)))
        .collect()
}

/// Who may open each VM now, by VM name (the union over its endpoints).
fn vm_access(c: &Compiled) -> BTreeMap<&str, Cow<'_, BTreeSet<u32>>> {
    let mut m: BTreeMap<&str, Cow<'_, BTreeSet<u32>>> = BTreeMap::new();
    for i in c.endpoints.values() {
        match m.entry(i.vm.as_str()) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Cow::Borrowed(&i.uids));
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if !i.uids.is_subset(e.get()) {
                    e.get_mut().to_mut().extend(&i.uids);
                }
            }
        }
    }
    m
}

impl Diff {
    fn push(&mut self, gained: bool, vm: &str, uid: u32) {
        self.total += 1;
        let list = if gained {
            &mut self.gained
        } else {
            &mut self.lost
        };
        if list.len() < MAX_DIFF_LINES {
            list.push((vm.to_owned(), uid));
        }
    }

    /// Between two access sets.
    pub fn of_pairs(old: &BTreeSet<(String, u32)>, new: &BTreeSet<(String, u32)>) -> Self {
        let mut d = Self::default();
        for (vm, u) in new.difference(old) {
            d.push(true, vm, *u);
        }
        for (vm, u) in old.difference(new) {
            d.push(false, vm, *u);
        }
        d
    }

    /// Between two compiled tables, VM by VM: VMs whose users did not
    /// change cost one set comparison, so a one-grant change to a
    /// 100,000-grant policy is cheap.
    pub fn of_tables(old: &Compiled, new: &Compiled) -> Self {
        let (o, n) = (vm_access(old), vm_access(new));
        let empty = BTreeSet::new();
        let mut d = Self::default();
        let names: BTreeSet<&str> = o.keys().chain(n.keys()).copied().collect();
        for vm in names {
            let a = o.get(vm).map_or(&empty, |c| c.as_ref());
            let b = n.get(vm).map_or(&empty, |c| c.as_ref());
            if a == b {
                continue;
            }
            for u in b.difference(a) {
                d.push(true, vm, *u);
            }
            for u in a.difference(b) {
                d.push(false, vm, *u);
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// "+ user may now open vm" / "- user may no longer open vm" lines,
    /// gains first, at most [`MAX_DIFF_LINES`] of them and then a count.
    pub fn lines(&self, dir: &dyn Directory) -> Vec<String> {
        let name = |u: u32| dir.user_name(u).unwrap_or_else(|| format!("#{u}"));
        // A big policy change must not turn into thousands of log lines (or
        // thousands of user lookups): the first ones, then a count.
        let mut out: Vec<String> = self
            .gained
            .iter()
            .map(|p| ('+', p))
            .chain(self.lost.iter().map(|p| ('-', p)))
            .take(MAX_DIFF_LINES)
            .map(|(sign, (vm, u))| match sign {
                '+' => format!("+ {} may now open {vm}", name(*u)),
                _ => format!("- {} may no longer open {vm}", name(*u)),
            })
            .collect();
        if self.total > MAX_DIFF_LINES {
            out.push(format!(
                "... and {} more changes",
                self.total - MAX_DIFF_LINES
            ));
        }
        out
    }
}

/// Human lines for what changed between two access sets.
pub fn diff_lines(
    old: &BTreeSet<(String, u32)>,
    new: &BTreeSet<(String, u32)>,
    dir: &dyn Directory,
) -> Vec<String> {
    Diff::of_pairs(old, new).lines(dir)
}

/// [`diff_lines`] of two compiled tables.
pub fn access_diff(old: &Compiled, new: &Compiled, dir: &dyn Directory) -> Vec<String> {
    Diff::of_tables(old, new).lines(dir)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn diff_names_gains_and_losses() {
        let dir = crate::directory::FakeDirectory::default().user("bob", 1001);
        let old: BTreeSet<(String, u32)> = [("a".to_owned(), 1001), ("b".to_owned(), 7)].into();
        let new: BTreeSet<(String, u32)> = [("a".to_owned(), 1001), ("c".to_owned(), 1001)].into();
        assert_eq!(
            diff_lines(&old, &new, &dir),
            vec!["+ bob may now open c", "- #7 may no longer open b"]
        );
    }

    /// (vm, port, uids) of each endpoint.
    type Endpoints<'a> = &'a [(&'a str, u16, &'a [u32])];

    fn compiled(vms: Endpoints<'_>) -> Compiled {
        let mut c = Compiled::default();
        for (vm, port, uids) in vms {
            c.endpoints.insert(
                (crate::compile::Dest::Local, *port),
                std::sync::Arc::new(crate::compile::EndpointInfo {
                    vm: (*vm).to_owned(),
                    vm_id: 1,
                    slot: 0,
                    uids: uids.iter().copied().collect(),
                    temp_uids: BTreeSet::new(),
                    scheduled_uids: BTreeSet::new(),
                    console_uid: None,
                    mode: crate::policy::Mode::Enforce,
                }),
            );
        }
        c
    }

    #[test]
    fn access_diff_matches_the_pairwise_diff() {
        let dir = crate::directory::FakeDirectory::default().user("bob", 1001);
        let cases: [(Endpoints<'_>, Endpoints<'_>); 4] = [
            (
                &[("a", 1, &[1001]), ("b", 2, &[7])],
                &[("a", 1, &[1001]), ("c", 3, &[1001])],
            ),
            (&[("a", 1, &[1, 2, 3])], &[("a", 1, &[1, 2, 3])]),
            // A VM on two endpoints: the union counts.
            (&[("a", 1, &[1]), ("a", 2, &[2])], &[("a", 1, &[1, 2])]),
            (&[], &[("z", 9, &[5, 6]), ("y", 8, &[1001])]),
        ];
        for (old, new) in cases {
            let (o, n) = (compiled(old), compiled(new));
            assert_eq!(
                access_diff(&o, &n, &dir),
                diff_lines(&access_pairs(&o), &access_pairs(&n), &dir),
                "{old:?} -> {new:?}"
            );
        }
        let many: Vec<u32> = (0..200).collect();
        let lines = access_diff(&compiled(&[]), &compiled(&[("v", 1, &many)]), &dir);
        assert_eq!(lines.len(), MAX_DIFF_LINES + 1);
        assert_eq!(
            lines.last().map(String::as_str),
            Some("... and 150 more changes")
        );
    }
}
