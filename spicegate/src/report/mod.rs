//! `spicegate report`: the access review. A users × VMs matrix of who may
//! open which VM and when: `always` (the VM's `allow`, groups expanded),
//! `schedule WINDOW` (each window that names the user), `console` (the VM
//! allows `@console`, shown once, in a row for the principal `@console`),
//! `temporary until TIME` (a `spicegate grant`).
//!
//! Pure: [`page`] computes one page of rows from a policy and the temporary
//! grants, in uid order, so the daemon answers a policy of a million grants
//! in bounded pages (the engine thread never builds the whole matrix) and
//! `spicegate report --policy FILE` computes the same rows without one.
//! Names are left out ([`Row::user`] is `None`): the control handler fills
//! them in off the engine thread (`control::fill_user_names`), a page at a
//! time.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ops::RangeInclusive,
};

use serde::{Deserialize, Serialize};

use crate::{
    grants::{TempGrant, rfc3339},
    policy::{Grantee, Policy, Principal, Schedule, Vm},
};

/// Rows (users) per page at most.
pub const REPORT_ROWS: usize = 1000;
/// Cells (rows × VM columns) per page at most: a policy of many VMs gets
/// pages of fewer rows.
pub const REPORT_CELLS: usize = 100_000;
/// The name of the row of the principal `@console`.
pub const CONSOLE_ROW: &str = "@console";

/// One way a principal may open a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum How {
    /// Named (or a member of a group named) in the VM's `allow`.
    Always,
    /// Named by schedules of the VM: their windows (`mon,tue 08:00-12:00`).
    Schedule { windows: Vec<String> },
    /// The VM allows `@console` (only in the `@console` row).
    Console,
    /// A temporary grant: until this RFC 3339 time, or `None` until revoked.
    Temporary { until: Option<String> },
}

/// What one principal may do on one VM (never empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Index into [`Page::vms`].
    pub vm: usize,
    pub how: Vec<How>,
}

/// One user (or `@console`) and the VMs they may open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// `None` for the `@console` row.
    pub uid: Option<u32>,
    /// Filled in off the engine thread; `@console` for that row.
    pub user: Option<String>,
    pub cells: Vec<Cell>,
}

impl Row {
    pub fn name(&self) -> String {
        match (&self.user, self.uid) {
            (Some(n), _) => n.clone(),
            (None, Some(u)) => format!("#{u}"),
            (None, None) => CONSOLE_ROW.to_owned(),
        }
    }
}

/// One page of the report: rows of uids above the request's `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The columns, by policy name (every VM; for a non-admin, the VMs of
    /// their own rows).
    pub vms: Vec<String>,
    /// The `@console` row (first page only), then users by uid.
    pub rows: Vec<Row>,
    /// Ask again with this `after` for the next page; `None` on the last.
    pub next_after: Option<u32>,
    /// Whether temporary grants are known (from a daemon) or not (from a
    /// policy file).
    pub temporary_known: bool,
}

/// The text of a cell: `always` (or `console`) alone when it applies,
/// else every way joined with "; ". Empty when there is none.
pub fn cell_text(how: &[How]) -> String {
    if how.contains(&How::Always) {
        return "always".into();
    }
    if how.contains(&How::Console) {
        return "console".into();
    }
    how.iter()
        .filter_map(|h| match h {
            How::Schedule { windows } => Some(format!("schedule {}", windows.join("; "))),
            How::Temporary { until: Some(t) } => Some(format!("temporary until {t}")),
            How::Temporary { until: None } => Some("temporary (until revoked)".into()),
            How::Always | How::Console => None,
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Adds `how` to a cell, merging schedule windows and skipping repeats.
fn add(cell: &mut Vec<How>, how: How) {
    if let How::Schedule { windows } = &how
        && let Some(How::Schedule { windows: have }) =
            cell.iter_mut().find(|h| matches!(h, How::Schedule { .. }))
    {
        for w in windows {
            if !have.contains(w) {
                have.push(w.clone());
            }
        }
        return;
    }
    if !cell.contains(&how) {
        cell.push(how);
    }
}

/// The uids of `g` inside `range` (a sub-slice found by binary search).
fn in_range<'a>(g: &'a Grantee, range: &RangeInclusive<u32>) -> &'a [u32] {
    let s = g.uids.as_slice();
    let lo = s.partition_point(|u| u < range.start());
    let hi = s.partition_point(|u| u <= range.end());
    &s[lo..hi.max(lo)]
}

/// Every grantee of the VM, with the schedule it is in (`None`: `allow`).
fn grantees(vm: &Vm) -> impl Iterator<Item = (&Grantee, Option<&Schedule>)> {
    vm.allow.iter().map(|g| (g, None)).chain(
        vm.schedules
            .iter()
            .flat_map(|s| s.allow.iter().map(move |g| (g, Some(s)))),
    )
}

/// The first `n` uids in `range` that the policy or a temporary grant
/// names, and whether there are more. Each allow list is sorted, so this
/// costs a binary search per list and at most `n + 1` uids from each.
fn first_uids(
    policy: &Policy,
    temp: &[TempGrant],
    range: &RangeInclusive<u32>,
    n: usize,
) -> (Vec<u32>, bool) {
    let mut found = BTreeSet::new();
    let offer = |u: u32, found: &mut BTreeSet<u32>| -> bool {
        if found.len() > n && found.last().is_some_and(|l| u >= *l) {
            return false;
        }
        found.insert(u);
        if found.len() > n + 1 {
            found.pop_last();
        }
        true
    };
    for vm in policy.vms.values() {
        for (g, _) in grantees(vm) {
            for u in in_range(g, range) {
                if !offer(*u, &mut found) {
                    break;
                }
            }
        }
    }
    for g in temp {
        if range.contains(&g.uid) && policy.vms.contains_key(&g.vm) {
            offer(g.uid, &mut found);
        }
    }
    let more = found.len() > n;
    let mut uids: Vec<u32> = found.into_iter().collect();
    uids.truncate(n);
    (uids, more)
}

/// One page of the report: the `@console` row (on the first page), then up
/// to [`REPORT_ROWS`] users above `after`, by uid. With `only`, that user's
/// row alone (and the `@console` row), with the columns of those rows: what
/// a user who is not an admin may see.
pub fn page(
    policy: &Policy,
    temp: &[TempGrant],
    temporary_known: bool,
    after: Option<u32>,
    only: Option<u32>,
) -> Page {
    let vms: Vec<&str> = policy.vms.keys().map(String::as_str).collect();
    let per_page = (REPORT_CELLS / vms.len().max(1)).clamp(1, REPORT_ROWS);
    let range = match (after, only) {
        // A non-admin's report is one page.
        (Some(_), Some(_)) => None,
        (None, Some(u)) => Some(u..=u),
        (None, None) => Some(0..=u32::MAX),
        (Some(a), None) => a.checked_add(1).map(|s| s..=u32::MAX),
    };
    let (uids, more) = range.as_ref().map_or((Vec::new(), false), |r| {
        first_uids(policy, temp, r, per_page)
    });
    let mut cells: BTreeMap<u32, BTreeMap<usize, Vec<How>>> = BTreeMap::new();
    let mut console: BTreeMap<usize, Vec<How>> = BTreeMap::new();
    if let (Some(first), Some(last)) = (uids.first(), uids.last()) {
        let range = *first..=*last;
        for (i, vm) in policy.vms.values().enumerate() {
            for (g, sched) in grantees(vm) {
                let uids = in_range(g, &range);
                if uids.is_empty() || g.principal == Principal::Console {
                    continue;
                }
                let window = sched.map(Schedule::describe);
                let how = || match &window {
                    None => How::Always,
                    Some(w) => How::Schedule {
                        windows: vec![w.clone()],
                    },
                };
                for u in uids {
                    add(cells.entry(*u).or_default().entry(i).or_default(), how());
                }
            }
        }
        for g in temp.iter().filter(|g| range.contains(&g.uid)) {
            if let Some(i) = policy.vms.keys().position(|v| *v == g.vm) {
                let how = How::Temporary {
                    until: g.expires.map(rfc3339),
                };
                add(cells.entry(g.uid).or_default().entry(i).or_default(), how);
            }
        }
    }
    if after.is_none() {
        for (i, vm) in policy.vms.values().enumerate() {
            for (g, sched) in grantees(vm) {
                if g.principal == Principal::Console {
                    let how = sched.map_or(How::Console, |s| How::Schedule {
                        windows: vec![s.describe()],
                    });
                    add(console.entry(i).or_default(), how);
                }
            }
        }
    }
    let mut rows = Vec::new();
    let to_cells = |m: BTreeMap<usize, Vec<How>>| -> Vec<Cell> {
        m.into_iter().map(|(vm, how)| Cell { vm, how }).collect()
    };
    if !console.is_empty() {
        rows.push(Row {
            uid: None,
            user: Some(CONSOLE_ROW.into()),
            cells: to_cells(console),
        });
    }
    for (uid, m) in cells {
        rows.push(Row {
            uid: Some(uid),
            user: None,
            cells: to_cells(m),
        });
    }
    let mut vms: Vec<String> = vms.into_iter().map(str::to_owned).collect();
    if only.is_some() {
        // Only the columns of what this user may see.
        let used: BTreeSet<usize> = rows
            .iter()
            .flat_map(|r| r.cells.iter().map(|c| c.vm))
            .collect();
        let renumber: HashMap<usize, usize> = used
            .iter()
            .enumerate()
            .map(|(new, old)| (*old, new))
            .collect();
        vms = used.iter().map(|i| vms[*i].clone()).collect();
        for r in &mut rows {
            for c in &mut r.cells {
                c.vm = renumber.get(&c.vm).copied().unwrap_or(c.vm);
            }
        }
    }
    Page {
        vms,
        rows,
        next_after: if more { uids.last().copied() } else { None },
        temporary_known,
    }
}

#[cfg(test)]
mod tests;
