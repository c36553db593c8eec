//! Changing grants without recompiling the policy: what a grant, a
//! revoke, an expiry, a schedule edge or a console switch changes, and the
//! words of grants two tables differ in (what the kernel's overlays take).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use spicegate_common::{RuleKey, RuleValue};

use super::{CompileError, Compiled, Dynamic, EndpointInfo, words::changed_words};
use crate::policy::Policy;

/// `prev` with the access of the (vm, uid) `pairs` worked out again from
/// `dynamic` (and the console user, when `console_changed`): what a grant,
/// a revoke, an expiry, a schedule edge or a console switch changes,
/// without recompiling the rest. Costs in proportion to the pairs, plus
/// a copy of the endpoint map (one pointer per endpoint).
pub fn recompile_pairs(
    prev: &Compiled,
    policy: &Policy,
    dynamic: &Dynamic<'_>,
    pairs: &BTreeSet<(String, u32)>,
    console_changed: bool,
) -> Result<Compiled, CompileError> {
    let mut next = prev.clone();
    // The VMs touched, each with its new access (one copy per VM).
    let mut touched: BTreeMap<&str, EndpointInfo> = BTreeMap::new();
    let current = |name: &str| {
        prev.endpoints
            .values()
            .find(|i| i.vm == name)
            .map(|i| EndpointInfo::clone(i))
    };
    if console_changed {
        for vm in policy.vms.values().filter(|v| v.allows_console()) {
            if let Some(mut info) = current(&vm.name) {
                let old = info.console_uid;
                info.console_uid = dynamic.console;
                for uid in old.into_iter().chain(dynamic.console) {
                    refresh(&mut info, vm, dynamic, uid);
                }
                touched.insert(vm.name.as_str(), info);
            }
        }
    }
    for (name, uid) in pairs {
        let Some(vm) = policy.vms.get(name) else {
            continue;
        };
        let info = match touched.entry(vm.name.as_str()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => match current(name) {
                Some(i) => e.insert(i),
                None => continue, // unresolved server: nobody is granted
            },
        };
        refresh(info, vm, dynamic, *uid);
    }
    for (name, info) in touched {
        let info = Arc::new(info);
        for slot in next.endpoints.values_mut().filter(|i| i.vm == name) {
            *slot = Arc::clone(&info);
        }
    }
    next.check_size()?;
    Ok(next)
}

/// Works out again whether `uid` may open `vm`, and by what, the way
/// [`vm_access`] does.
fn refresh(info: &mut EndpointInfo, vm: &crate::policy::Vm, dynamic: &Dynamic<'_>, uid: u32) {
    let by_policy = vm.allow.iter().any(|g| g.uids.contains(&uid)) || info.console_uid == Some(uid);
    let scheduled = dynamic.scheduled.contains(&(vm.name.clone(), uid));
    let temp =
        !by_policy && !scheduled && dynamic.temp.iter().any(|g| g.vm == vm.name && g.uid == uid);
    set(&mut info.scheduled_uids, uid, scheduled);
    set(&mut info.temp_uids, uid, temp);
    set(&mut info.uids, uid, by_policy || scheduled || temp);
}

fn set(s: &mut BTreeSet<u32>, uid: u32, on: bool) {
    if on {
        s.insert(uid);
    } else {
        s.remove(&uid);
    }
}

/// The words of grants that differ between two tables whose other
/// entries are the same, each with its value in `new` (see
/// [`super::words`]). `None` when more than grants changed (ports,
/// endpoints, VM slots, local addresses, binds), or more than `limit`
/// words: then only a new table will do.
pub fn grant_delta(
    old: &Compiled,
    new: &Compiled,
    limit: usize,
) -> Option<Vec<(RuleKey, RuleValue)>> {
    if old.rules != new.rules
        || old.endpoints.len() != new.endpoints.len()
        || old
            .endpoints
            .iter()
            .zip(&new.endpoints)
            .any(|((ka, a), (kb, b))| {
                ka != kb || a.vm_id != b.vm_id || a.slot != b.slot || a.mode != b.mode
            })
    {
        return None;
    }
    changed_words(old, new, limit)
}
