//! Policy -> kernel rule table. Pure: the same policy and the same set of
//! local addresses always give the same table, and nothing here needs root.
//!
//! - this module: the compiled table ([`Compiled`]) and [`compile`];
//! - `addrs`: this machine's addresses and how destinations fold into
//!   localhost;
//! - `rules`: the table's entries other than grants;
//! - `changes`: a grant change worked out without recompiling
//!   ([`recompile_pairs`]) and the grants two tables differ in
//!   ([`grant_delta`]);
//! - `model`: the kernel program's decision, in user space, for `why`
//!   and the sweep.

mod addrs;
mod changes;
mod model;
mod rules;
#[cfg(test)]
mod tests;
mod words;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use spicegate_common::{
    ENDPOINT_AUDIT, ENDPOINT_SLOT_SHIFT, MAX_LOCAL_NET_LENS, MAX_VM_SLOTS, NO_VM, PORT_AUDIT,
    PORT_GUARD_ALL, PORT_GUARD_ENDPOINTS, RuleKey, RuleValue,
};

pub use self::{
    addrs::{LocalAddrs, canonical, dest_key, fold, is_local, key_addr},
    changes::{grant_delta, recompile_pairs},
    model::{decide, table_is_local},
    rules::Rules,
    words::UidHasher,
};
use crate::{
    grants::TempGrant,
    policy::{Mode, Policy, ServerTarget},
};

/// The largest rule table we create. A policy needing more is refused
/// before anything changes. Four million entries is ~300 MB of kernel memory.
pub const MAX_ENTRIES: usize = 4_000_000;

/// Where a destination lands after folding: a remote address or "this machine".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dest {
    Local,
    Remote(IpAddr),
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => write!(f, "localhost"),
            Self::Remote(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Self::Remote(a) => write!(f, "{a}"),
        }
    }
}

/// The compiled policy: the kernel table plus what the daemon needs to
/// explain it (VM names by id). The table's grants are the product of each
/// endpoint and its VM's uids; the daemon holds each VM's uids once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// What goes into the kernel's table besides the grants.
    pub rules: Rules,
    /// VM names by id.
    pub vm_names: BTreeMap<u32, String>,
    /// Ports guarded on every destination.
    pub guarded_everywhere: Vec<u16>,
    /// Guarded endpoints with their VM and granted uids; the endpoints of a
    /// VM share one [`EndpointInfo`].
    pub endpoints: BTreeMap<(Dest, u16), Arc<EndpointInfo>>,
    /// Ports only root and the listeners may bind.
    pub listen_ports: Vec<u16>,
    /// uids of `[protect] listeners`.
    pub listeners: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub vm: String,
    /// The VM's id in the kernel (its counters, its denials' records).
    pub vm_id: u32,
    /// The VM's slot: its bit in the words of grants (see
    /// [`spicegate_common::KIND_GRANT`]). VMs with endpoints are numbered
    /// from 0 in name order.
    pub slot: u32,
    /// Everyone granted now: by `allow`, a schedule, `@console` or a
    /// temporary grant.
    pub uids: BTreeSet<u32>,
    /// Those granted only by a temporary grant.
    pub temp_uids: BTreeSet<u32>,
    /// Those granted (also) by a schedule window open now.
    pub scheduled_uids: BTreeSet<u32>,
    /// The console user, when `allow` names `@console`.
    pub console_uid: Option<u32>,
    pub mode: Mode,
}

/// How a uid may open a VM now: the one answer `status`, `list`, `why`
/// and `report` share. When several apply, the first of this order wins:
/// a temporary grant, the policy's `allow`, the console, a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Temporary,
    Policy,
    Console,
    Schedule,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Temporary => "temporary",
            Self::Policy => "policy",
            Self::Console => "console",
            Self::Schedule => "schedule",
        }
    }
}

impl EndpointInfo {
    /// How `uid` may open this VM now, `None` when it may not. `vm` is the
    /// VM's policy entry (its `allow` list).
    pub fn via(&self, vm: &crate::policy::Vm, uid: u32) -> Option<Via> {
        if !self.uids.contains(&uid) {
            None
        } else if self.temp_uids.contains(&uid) {
            Some(Via::Temporary)
        } else if vm.allows_uid(uid) {
            Some(Via::Policy)
        } else if self.console_uid == Some(uid) {
            Some(Via::Console)
        } else {
            Some(Via::Schedule)
        }
    }
}

/// Grants that change without a policy edit.
#[derive(Debug, Clone, Default)]
pub struct Dynamic<'a> {
    /// Temporary grants in force.
    pub temp: &'a [TempGrant],
    /// (vm, uid) pairs of schedule windows open now.
    pub scheduled: BTreeSet<(String, u32)>,
    /// uid holding the active session on seat0.
    pub console: Option<u32>,
}

impl Compiled {
    /// Number of grants (uid x endpoint).
    pub fn grant_count(&self) -> usize {
        self.endpoints.values().map(|i| i.uids.len()).sum()
    }

    /// The most entries the kernel table can need: the rules, and a word
    /// of grants per (uid, VM) at most. Cheap; [`Compiled::grant_words`]
    /// gives the real number.
    pub fn entry_bound(&self) -> usize {
        self.rules.len()
            + self
                .vms_by_slot()
                .iter()
                .flatten()
                .map(|i| i.uids.len())
                .sum::<usize>()
    }

    /// Whether the table grants `uid` on endpoint (`dest`, `port`).
    pub fn granted(&self, dest: Dest, port: u16, uid: u32) -> bool {
        self.endpoints
            .get(&(dest, port))
            .is_some_and(|i| i.uids.contains(&uid))
    }

    /// Capacity to create a kernel table of `entries` with: room to spare
    /// so the hash table stays sparse, never below a small floor.
    pub fn capacity(entries: usize) -> u32 {
        u32::try_from((entries + entries / 4 + 64).min(MAX_ENTRIES + MAX_ENTRIES / 4 + 64))
            .unwrap_or(u32::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "vms `{first}` and `{second}` both claim {dest}:{port}; an endpoint belongs to one VM{hint}"
    )]
    EndpointClash {
        first: String,
        second: String,
        dest: Dest,
        port: u16,
        hint: &'static str,
    },
    #[error(
        "the policy needs {needed} kernel entries, more than the limit of {limit}; split it across fewer users or endpoints"
    )]
    TooLarge { needed: usize, limit: usize },
    #[error(
        "the policy guards the endpoints of {count} VMs, more than the {max} one machine's table can tell apart; split it"
    )]
    TooManyVms { count: usize, max: usize },
    #[error(
        "this machine's `local` routes have {} different prefix lengths ({lens}), more than the {max} spicegate can fold into localhost; merge them (`ip route show table local type local`)",
        lens.split(", ").count()
    )]
    TooManyLocalNets { lens: String, max: usize },
}

/// Stable VM ids: the FNV-1a hash of the name, probing past collisions in
/// name order, never [`NO_VM`]. Stable ids keep the kernel's per-VM
/// counters attached to the same VM across reloads and restarts.
pub fn vm_ids<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, u32> {
    let mut sorted: Vec<&str> = names.collect();
    sorted.sort_unstable();
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for name in sorted {
        let mut id = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        while id == NO_VM || taken.contains(&id) {
            id = id.wrapping_add(1);
        }
        taken.insert(id);
        out.insert(name, id);
    }
    out
}

/// Compiles a validated policy into the kernel rule table.
/// `dynamic` adds temporary, scheduled and console grants; those naming a
/// VM the policy does not have are ignored.
pub fn compile(
    policy: &Policy,
    local: &LocalAddrs,
    dynamic: &Dynamic<'_>,
) -> Result<Compiled, CompileError> {
    let temp = dynamic.temp;
    let mut port_flags: BTreeMap<u16, u32> = BTreeMap::new();
    for &p in &policy.protect_ports {
        *port_flags.entry(p).or_default() |= PORT_GUARD_ALL;
    }

    // Count before building, so an oversized policy is refused at once.
    let mut needed = policy.protect_ports.len();
    for vm in policy.vms.values() {
        let dests = match policy.servers.get(&vm.server).map(|s| &s.target) {
            Some(ServerTarget::Addresses(a)) => a.len(),
            _ => 1,
        };
        let extra = temp.iter().filter(|g| g.vm == vm.name).count()
            + dynamic
                .scheduled
                .iter()
                .filter(|(v, _)| *v == vm.name)
                .count()
            + 1;
        let allowed: usize = vm.allow.iter().map(|g| g.uids.len()).sum();
        // Two entries per endpoint (its port, itself), a word of grants
        // per uid at most.
        needed = needed
            .saturating_add(dests.saturating_mul(vm.ports.len()).saturating_mul(2))
            .saturating_add(allowed + extra);
    }
    if needed > MAX_ENTRIES {
        return Err(CompileError::TooLarge {
            needed,
            limit: MAX_ENTRIES,
        });
    }

    let mut rules = Rules::with_capacity(64);
    let ids = vm_ids(policy.vms.keys().map(String::as_str));
    let mut endpoints: BTreeMap<(Dest, u16), Arc<EndpointInfo>> = BTreeMap::new();
    let mut next_slot = 0u32;
    for (name, vm) in &policy.vms {
        let id = ids[name.as_str()];
        let dests: BTreeSet<Dest> = match policy.servers.get(&vm.server).map(|s| &s.target) {
            Some(ServerTarget::Local) | None => [Dest::Local].into(),
            Some(ServerTarget::Addresses(addrs)) => addrs.iter().map(|a| fold(*a, local)).collect(),
            Some(ServerTarget::Unresolved) => {
                // Where the server is unknown, its ports are guarded on
                // every address and granted to no one until it resolves.
                for &port in &vm.ports {
                    *port_flags.entry(port).or_default() |= PORT_GUARD_ALL;
                }
                continue;
            }
        };
        // The next free slot: a VM without endpoints takes none.
        let slot = next_slot;
        if !vm.ports.is_empty() && !dests.is_empty() {
            if slot as usize >= MAX_VM_SLOTS {
                return Err(CompileError::TooManyVms {
                    count: policy.vms.len(),
                    max: MAX_VM_SLOTS,
                });
            }
            next_slot += 1;
        }
        let info = Arc::new(vm_access(policy, vm, id, slot, dynamic));
        let mode = info.mode;
        for &dest in &dests {
            for &port in &vm.ports {
                if let Some(prev) = endpoints.get(&(dest, port)) {
                    return Err(CompileError::EndpointClash {
                        first: prev.vm.clone(),
                        second: name.clone(),
                        dest,
                        port,
                        hint: if dest == Dest::Local {
                            " (every address of this machine is the same endpoint per port)"
                        } else {
                            ""
                        },
                    });
                }
                endpoints.insert((dest, port), Arc::clone(&info));
                *port_flags.entry(port).or_default() |= PORT_GUARD_ENDPOINTS;
                let addr = dest_key(dest);
                let audit = if mode == Mode::Audit {
                    ENDPOINT_AUDIT
                } else {
                    0
                };
                let flags = audit | slot << ENDPOINT_SLOT_SHIFT;
                rules.insert(RuleKey::endpoint(addr, port), RuleValue { vm: id, flags });
            }
        }
    }
    let audit_all = if policy.settings.mode == Mode::Audit {
        PORT_AUDIT
    } else {
        0
    };
    for (&port, &flags) in &port_flags {
        rules.insert(
            RuleKey::port(port),
            RuleValue {
                vm: NO_VM,
                flags: flags | audit_all,
            },
        );
    }
    // Only needed when something is guarded; the kernel's fast path never
    // looks them up otherwise.
    if !port_flags.is_empty() {
        for ip in local.iter() {
            let ip = canonical(*ip);
            if !(ip.is_loopback() || ip.is_unspecified()) {
                rules.insert(RuleKey::local(key_addr(ip)), RuleValue::default());
            }
        }
        let mut lens: Vec<u16> = Vec::new();
        for (net, len) in local.nets_v6() {
            rules.insert(RuleKey::local_net(net, len), RuleValue::default());
            if !lens.contains(&len) {
                lens.push(len);
            }
        }
        if !lens.is_empty() {
            lens.sort_unstable_by(|a, b| b.cmp(a));
            if lens.len() > MAX_LOCAL_NET_LENS {
                return Err(CompileError::TooManyLocalNets {
                    lens: lens
                        .iter()
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    max: MAX_LOCAL_NET_LENS,
                });
            }
            let mut packed = [0u8; 4];
            for (slot, len) in packed.iter_mut().zip(&lens) {
                *slot = u8::try_from(*len).unwrap_or(u8::MAX);
            }
            rules.insert(
                RuleKey::local_nets(),
                RuleValue {
                    vm: u32::from_ne_bytes(packed),
                    flags: lens.len() as u32,
                },
            );
        }
    }
    // Binds: who may serve the guarded local ports.
    let listen_ports = policy.listen_ports();
    let listeners = policy.listener_uids();
    if !listen_ports.is_empty() {
        // The VM on this machine that owns the port, if any.
        let local_vm: BTreeMap<u16, &str> = endpoints
            .iter()
            .filter(|((d, _), _)| *d == Dest::Local)
            .map(|((_, p), i)| (*p, i.vm.as_str()))
            .collect();
        for &port in &listen_ports {
            let owner = local_vm.get(&port).and_then(|n| policy.vms.get(*n));
            let (vm, mode) = match owner {
                Some(v) => (ids[v.name.as_str()], policy.vm_mode(v)),
                None => (NO_VM, policy.settings.mode),
            };
            rules.insert(
                RuleKey::bind_port(port),
                RuleValue {
                    vm,
                    flags: if mode == Mode::Audit { PORT_AUDIT } else { 0 },
                },
            );
        }
        for &uid in &listeners {
            rules.insert(RuleKey::listener(uid), RuleValue::default());
        }
    }
    let rules = rules.seal();
    let vm_names = ids.into_iter().map(|(n, id)| (id, n.to_owned())).collect();
    let compiled = Compiled {
        rules,
        vm_names,
        guarded_everywhere: policy.protect_ports.clone(),
        endpoints,
        listen_ports: listen_ports.into_iter().collect(),
        listeners: listeners.into_iter().collect(),
    };
    compiled.check_size()?;
    Ok(compiled)
}

impl Compiled {
    pub(super) fn check_size(&self) -> Result<(), CompileError> {
        let n = self.entry_bound();
        if n > MAX_ENTRIES {
            return Err(CompileError::TooLarge {
                needed: n,
                limit: MAX_ENTRIES,
            });
        }
        Ok(())
    }
}

/// Who may open `vm` now, and by what: its `allow` list (plus the console
/// user when it allows `@console`), its open schedule windows, and
/// temporary grants.
pub(super) fn vm_access(
    policy: &Policy,
    vm: &crate::policy::Vm,
    id: u32,
    slot: u32,
    dynamic: &Dynamic<'_>,
) -> EndpointInfo {
    let mut policy_uids = vm.uids();
    let console_uid = if vm.allows_console() {
        dynamic.console
    } else {
        None
    };
    policy_uids.extend(console_uid);
    let scheduled_uids: BTreeSet<u32> = dynamic
        .scheduled
        .range((vm.name.clone(), 0)..=(vm.name.clone(), u32::MAX))
        .map(|(_, u)| *u)
        .collect();
    let temp_uids: BTreeSet<u32> = dynamic
        .temp
        .iter()
        .filter(|g| {
            g.vm == vm.name && !policy_uids.contains(&g.uid) && !scheduled_uids.contains(&g.uid)
        })
        .map(|g| g.uid)
        .collect();
    let mut uids = policy_uids;
    uids.extend(&scheduled_uids);
    uids.extend(&temp_uids);
    EndpointInfo {
        vm: vm.name.clone(),
        vm_id: id,
        slot,
        uids,
        temp_uids,
        scheduled_uids,
        console_uid,
        mode: policy.vm_mode(vm),
    }
}
