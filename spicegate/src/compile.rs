//! Policy -> kernel rule table. Pure: the same policy and the same set of
//! local addresses always give the same table, and nothing here needs root.
//!
//! Longer than 600 lines (half of it tests): rules, local addresses and the
//! decision model that `why` and the sweep share; issue 14 splits it into
//! `compile/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    ops::RangeBounds,
    sync::Arc,
};

use spicegate_common::{
    ENDPOINT_AUDIT, GRANT_REVOKED, KIND_GRANT, LOCAL_ADDR, MAX_LOCAL_NET_LENS, NO_VM, PORT_AUDIT,
    PORT_GUARD_ALL, PORT_GUARD_ENDPOINTS, RuleKey, RuleValue, mapped_v4, mask_addr,
};

use crate::{
    grants::TempGrant,
    policy::{Mode, Policy, ServerTarget},
};

/// The largest rule table we create. A policy needing more is refused
/// before anything changes. Four million entries is ~300 MB of kernel memory.
pub const MAX_ENTRIES: usize = 4_000_000;

/// What reaches this machine's own listeners: its interface addresses, and
/// the networks its `local` routes cover (AnyIP: `ip route add local
/// 198.18.0.0/24 dev lo`). Loopback and unspecified addresses are always
/// local and need not be listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    addrs: BTreeSet<IpAddr>,
    /// (network address, prefix length in its own family), shorter than a
    /// single address.
    nets: BTreeSet<(IpAddr, u8)>,
}

impl LocalAddrs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, ip: IpAddr) -> bool {
        self.addrs.insert(canonical(ip))
    }

    /// A local route's destination; a full-length one is an address.
    pub fn insert_net(&mut self, ip: IpAddr, len: u8) {
        let ip = canonical(ip);
        let full = if ip.is_ipv4() { 32 } else { 128 };
        if ip.is_loopback() {
            // 127.0.0.0/8 and ::1: the program folds them without a table.
        } else if len >= full {
            self.addrs.insert(ip);
        } else {
            let masked = match ip {
                IpAddr::V4(v4) => IpAddr::V4(
                    (u32::from(v4) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)).into(),
                ),
                IpAddr::V6(v6) => IpAddr::V6(
                    (u128::from(v6) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0))
                        .into(),
                ),
            };
            self.nets.insert((masked, len));
        }
    }

    /// The single addresses.
    pub fn iter(&self) -> impl Iterator<Item = &IpAddr> {
        self.addrs.iter()
    }

    /// The networks, as (address, prefix length in IPv6 terms).
    pub fn nets_v6(&self) -> impl Iterator<Item = ([u8; 16], u16)> + '_ {
        self.nets.iter().map(|(ip, len)| {
            let len = u16::from(*len) + if ip.is_ipv4() { 96 } else { 0 };
            (mask_addr(key_addr(*ip), len), len)
        })
    }

    /// Whether `ip` is one of the addresses or in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.addrs.contains(&ip) || {
            let key = key_addr(ip);
            self.nets_v6().any(|(net, len)| mask_addr(key, len) == net)
        }
    }
}

impl<const N: usize> From<[IpAddr; N]> for LocalAddrs {
    fn from(ips: [IpAddr; N]) -> Self {
        let mut l = Self::new();
        for ip in ips {
            l.insert(ip);
        }
        l
    }
}

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

/// The kernel table's entries other than grants (ports, endpoints, local
/// addresses, binds), sorted by key: built by pushing and one sort, looked
/// up by binary search. Grants are not held here: they are generated from
/// [`Compiled::endpoints`] (one uid set per VM) while the table is filled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(Vec<(RuleKey, RuleValue)>);

impl Rules {
    fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    fn insert(&mut self, k: RuleKey, v: RuleValue) {
        self.0.push((k, v));
    }
    /// Sorts; of entries with equal keys the last inserted wins.
    fn seal(mut self) -> Self {
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
    /// The VM's id in the kernel (its counters, its grants' values).
    pub vm_id: u32,
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
    /// Number of grant entries (uid x endpoint).
    pub fn grant_count(&self) -> usize {
        self.endpoints.values().map(|i| i.uids.len()).sum()
    }

    /// Number of entries of the kernel table.
    pub fn entry_count(&self) -> usize {
        self.rules.len() + self.grant_count()
    }

    /// The grant entries of the endpoints in `range` (by position).
    pub fn grants(
        &self,
        range: impl RangeBounds<usize>,
    ) -> impl Iterator<Item = (RuleKey, RuleValue)> + '_ {
        let start = match range.start_bound() {
            std::ops::Bound::Included(&s) => s,
            std::ops::Bound::Excluded(&s) => s + 1,
            std::ops::Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            std::ops::Bound::Included(&e) => e + 1,
            std::ops::Bound::Excluded(&e) => e,
            std::ops::Bound::Unbounded => usize::MAX,
        };
        self.endpoints
            .iter()
            .skip(start)
            .take(end.saturating_sub(start))
            .flat_map(|(&(dest, port), i)| {
                let addr = dest_key(dest);
                let value = RuleValue {
                    vm: i.vm_id,
                    flags: 0,
                };
                i.uids
                    .iter()
                    .map(move |&uid| (RuleKey::grant(uid, addr, port), value))
            })
    }

    /// Whether the table grants `uid` on endpoint (`dest`, `port`).
    pub fn granted(&self, dest: Dest, port: u16, uid: u32) -> bool {
        self.endpoints
            .get(&(dest, port))
            .is_some_and(|i| i.uids.contains(&uid))
    }

    /// Capacity to create the kernel table with: room to spare so the hash
    /// table stays sparse, never below a small floor.
    pub fn capacity(&self) -> u32 {
        let n = self.entry_count();
        u32::try_from((n + n / 4 + 64).min(MAX_ENTRIES + MAX_ENTRIES / 4 + 64)).unwrap_or(u32::MAX)
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
        "this machine's `local` routes have {} different prefix lengths ({lens}), more than the {max} spicegate can fold into localhost; merge them (`ip route show table local type local`)",
        lens.split(", ").count()
    )]
    TooManyLocalNets { lens: String, max: usize },
}

/// The 16-byte form the kernel compares: IPv4 mapped into IPv6.
pub fn key_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a connect to `ip` lands on this machine.
pub fn is_local(ip: IpAddr, local: &LocalAddrs) -> bool {
    let ip = canonical(ip);
    ip.is_loopback() || ip.is_unspecified() || local.contains(ip)
}

/// Folds a destination the way the kernel program does.
pub fn fold(ip: IpAddr, local: &LocalAddrs) -> Dest {
    if is_local(ip, local) {
        Dest::Local
    } else {
        Dest::Remote(canonical(ip))
    }
}

pub fn dest_key(d: Dest) -> [u8; 16] {
    match d {
        Dest::Local => LOCAL_ADDR,
        Dest::Remote(ip) => key_addr(ip),
    }
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
        needed = needed.saturating_add(dests * vm.ports.len() * (2 + allowed + extra));
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
        let info = Arc::new(vm_access(policy, vm, id, dynamic));
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
                let flags = if mode == Mode::Audit {
                    ENDPOINT_AUDIT
                } else {
                    0
                };
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
    fn check_size(&self) -> Result<(), CompileError> {
        let n = self.entry_count();
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
fn vm_access(
    policy: &Policy,
    vm: &crate::policy::Vm,
    id: u32,
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
        uids,
        temp_uids,
        scheduled_uids,
        console_uid,
        mode: policy.vm_mode(vm),
    }
}

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

/// The grant entries that differ between two tables whose other entries
/// are the same: each with its value in `new`, or flagged
/// [`GRANT_REVOKED`] when `new` no longer has it. `None` when more than
/// grants changed (ports, endpoints, local addresses, binds), or more than
/// `limit` grants: then only a new table will do.
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
            .any(|((ka, a), (kb, b))| ka != kb || a.vm_id != b.vm_id || a.mode != b.mode)
    {
        return None;
    }
    let mut out = Vec::new();
    for ((&(dest, port), a), b) in old.endpoints.iter().zip(new.endpoints.values()) {
        if Arc::ptr_eq(a, b) || a.uids == b.uids {
            continue;
        }
        let addr = dest_key(dest);
        for &uid in b.uids.difference(&a.uids) {
            out.push((
                RuleKey::grant(uid, addr, port),
                RuleValue {
                    vm: b.vm_id,
                    flags: 0,
                },
            ));
        }
        for &uid in a.uids.difference(&b.uids) {
            out.push((
                RuleKey::grant(uid, addr, port),
                RuleValue {
                    vm: a.vm_id,
                    flags: GRANT_REVOKED,
                },
            ));
        }
        if out.len() > limit {
            return None;
        }
    }
    debug_assert!(out.iter().all(|(k, _)| k.kind == KIND_GRANT));
    Some(out)
}

/// What the kernel decides, computed from the table the way the kernel
/// program does. Used to find established connections a new table would
/// refuse, and by tests.
/// Whether the program folds `ip` into localhost with this table: the
/// built-in loopback and unspecified ranges, a [`RuleKey::local`] address,
/// or a local network of one of the lengths the table lists.
pub fn table_is_local(c: &Compiled, ip: IpAddr) -> bool {
    let ip = canonical(ip);
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let key = key_addr(ip);
    if c.rules.contains_key(&RuleKey::local(key)) {
        return true;
    }
    let Some(nets) = c.rules.get(&RuleKey::local_nets()) else {
        return false;
    };
    nets.vm
        .to_ne_bytes()
        .iter()
        .take(nets.flags as usize)
        .map(|len| u16::from(*len))
        .any(|len| {
            c.rules
                .contains_key(&RuleKey::local_net(mask_addr(key, len), len))
        })
}

pub fn decide(c: &Compiled, uid: u32, ip: IpAddr, port: u16) -> bool {
    let Some(port_rule) = c.rules.get(&RuleKey::port(port)) else {
        return true;
    };
    let mapped = canonical(ip);
    let addr = if table_is_local(c, mapped) {
        LOCAL_ADDR
    } else {
        key_addr(mapped)
    };
    let endpoint = c.rules.get(&RuleKey::endpoint(addr, port));
    let guarded = port_rule.flags & PORT_GUARD_ALL != 0 || endpoint.is_some();
    let dest = if addr == LOCAL_ADDR {
        Dest::Local
    } else {
        Dest::Remote(mapped)
    };
    if !guarded || c.granted(dest, port, uid) {
        return true;
    }
    // Audit mode lets it through (and logs it).
    match endpoint {
        Some(e) => e.flags & ENDPOINT_AUDIT != 0,
        None => port_rule.flags & PORT_AUDIT != 0,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{directory::FakeDirectory, policy::parse};

    fn policy(text: &str) -> Policy {
        let dir = FakeDirectory::default()
            .user("myself", 1000)
            .user("ralph", 1001)
            .group("bookkeeping", &[1002, 1003]);
        parse(text, Path::new("p.toml"), &dir).unwrap_or_else(|e| panic!("{e}"))
    }

    const SEED: &str = r##"
[protect]
ports = ["20001-20010", 5930]
[servers.mysrv]
address = "192.168.2.2"
[vms.debianx]
server = "mysrv"
ports = [20002]
allow = ["myself", "@bookkeeping", "#1021"]
[vms.winlab]
server = "localhost"
ports = [5930]
allow = ["ralph"]
"##;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip literal")
    }

    #[test]
    fn local_networks_fold_into_localhost() {
        let mut local = LocalAddrs::new();
        local.insert_net(ip("198.18.7.9"), 24);
        local.insert_net(ip("2001:db8:7::"), 64);
        local.insert_net(ip("127.0.0.0"), 8); // built in: not listed
        local.insert_net(ip("10.1.1.1"), 32); // a single address
        let c = compile(&policy(SEED), &local, &Dynamic::default()).expect("compiles");
        // winlab on localhost:5930 allows ralph (1001) only.
        for a in [
            "198.18.7.1",
            "198.18.7.255",
            "::ffff:198.18.7.77",
            "2001:db8:7::1",
            "2001:db8:7:0:ffff:ffff:ffff:ffff",
            "10.1.1.1",
        ] {
            assert!(table_is_local(&c, ip(a)), "{a} is local");
            assert!(!decide(&c, 1000, ip(a), 5930), "{a}:5930 is winlab's");
            assert!(decide(&c, 1001, ip(a), 5930), "{a}:5930 ralph");
        }
        for a in [
            "198.18.8.1",
            "2001:db8:8::1",
            "10.1.1.2",
            "::ffff:198.18.6.255",
        ] {
            assert!(!table_is_local(&c, ip(a)), "{a} is not local");
        }
        assert_eq!(
            c.rules.get(&RuleKey::local_nets()).map(|v| v.flags),
            Some(2),
            "two prefix lengths: /120 (v4 /24) and /64"
        );
    }

    #[test]
    fn more_local_network_lengths_than_the_program_checks_are_refused() {
        let mut local = LocalAddrs::new();
        for len in [16u8, 20, 24, 28, 30] {
            local.insert_net(ip("198.18.0.0"), len);
        }
        let e = compile(&policy(SEED), &local, &Dynamic::default()).expect_err("5 lengths");
        assert!(e.to_string().contains("5 different prefix lengths"), "{e}");
    }

    #[test]
    fn seed_decisions() {
        let local: LocalAddrs = [ip("10.9.9.9")].into();
        let c = compile(&policy(SEED), &local, &Dynamic::default()).expect("compiles");
        let d = |uid, a: &str, port| decide(&c, uid, ip(a), port);
        // debianx on mysrv:20002
        assert!(d(1000, "192.168.2.2", 20002));
        assert!(d(1003, "192.168.2.2", 20002));
        assert!(d(1021, "192.168.2.2", 20002));
        assert!(
            d(1000, "::ffff:192.168.2.2", 20002),
            "mapped form decided like IPv4"
        );
        assert!(!d(1001, "192.168.2.2", 20002));
        assert!(!d(0, "192.168.2.2", 20002), "root is not special");
        // 20002 is also a [protect] port: guarded everywhere, granted nowhere else.
        assert!(!d(1000, "192.168.2.3", 20002));
        // winlab on localhost:5930, every local spelling.
        for a in [
            "127.0.0.1",
            "127.0.0.2",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "10.9.9.9",
        ] {
            assert!(d(1001, a, 5930), "{a}");
            assert!(!d(1000, a, 5930), "{a}");
        }
        // 5930 is protected everywhere: a remote 5930 is denied even to ralph.
        assert!(!d(1001, "192.168.2.2", 5930));
        // Unguarded ports pass.
        assert!(d(1000, "192.168.2.2", 22));
        assert!(d(1000, "127.0.0.1", 20011));
    }

    #[test]
    fn vm_port_guarded_only_on_its_server() {
        let p = policy(
            "[servers.s]\naddress=\"192.0.2.1\"\n[vms.v]\nserver=\"s\"\nports=[40000]\nallow=[\"myself\"]\n",
        );
        let local = LocalAddrs::new();
        let c = compile(&p, &local, &Dynamic::default()).expect("compiles");
        assert!(!decide(&c, 1001, ip("192.0.2.1"), 40000));
        assert!(decide(&c, 1000, ip("192.0.2.1"), 40000));
        assert!(
            decide(&c, 1001, ip("127.0.0.1"), 40000),
            "other destinations untouched"
        );
        assert!(
            decide(&c, 1001, ip("192.0.2.2"), 40000),
            "other destinations untouched"
        );
    }

    #[test]
    fn server_on_a_local_address_guards_every_local_spelling() {
        // This machine is 192.168.2.2: 127.0.0.1:20002 reaches the same listener.
        let local: LocalAddrs = [ip("192.168.2.2")].into();
        let c = compile(&policy(SEED), &local, &Dynamic::default()).expect("compiles");
        assert!(!decide(&c, 1001, ip("127.0.0.1"), 20002));
        assert!(decide(&c, 1000, ip("127.0.0.1"), 20002));
        assert!(decide(&c, 1000, ip("192.168.2.2"), 20002));
    }

    #[test]
    fn vm_ids_are_stable_and_distinct() {
        let a = vm_ids(["debianx", "winlab"].into_iter());
        let b = vm_ids(["winlab", "other", "debianx"].into_iter());
        assert_eq!(a["debianx"], b["debianx"]);
        assert_eq!(a["winlab"], b["winlab"]);
        assert_ne!(a["debianx"], a["winlab"]);
        assert!(a.values().all(|id| *id != NO_VM));
    }

    #[test]
    fn temporary_grants_add_to_the_policy() {
        let local = LocalAddrs::new();
        let g = |uid, vm: &str| TempGrant {
            uid,
            user: String::new(),
            vm: vm.into(),
            expires: None,
            granted_at: 0,
            granted_by: 0,
        };
        let temp = [g(4242, "winlab"), g(4243, "no-such-vm")];
        let c = compile(
            &policy(SEED),
            &local,
            &Dynamic {
                temp: &temp,
                ..Dynamic::default()
            },
        )
        .expect("compiles");
        assert!(decide(&c, 4242, ip("127.0.0.1"), 5930));
        assert!(!decide(&c, 4242, ip("192.168.2.2"), 20002));
        assert!(!decide(&c, 4243, ip("127.0.0.1"), 5930));
        let info = &c.endpoints[&(Dest::Local, 5930)];
        assert!(info.temp_uids.contains(&4242) && info.uids.contains(&1001));
    }

    #[test]
    fn audit_mode_lets_through_and_console_grants() {
        let p = policy(
            "[settings]\nmode=\"audit\"\n[protect]\nports=[9]\n[vms.a]\nserver=\"localhost\"\nports=[1]\n\
             [vms.e]\nserver=\"localhost\"\nports=[2]\nmode=\"enforce\"\nallow=[\"@console\"]\n",
        );
        let local = LocalAddrs::new();
        let c = compile(
            &p,
            &local,
            &Dynamic {
                console: Some(77),
                ..Dynamic::default()
            },
        )
        .expect("compiles");
        assert!(
            decide(&c, 5, ip("127.0.0.1"), 1),
            "audit VM lets everyone through"
        );
        assert!(
            decide(&c, 5, ip("10.0.0.1"), 9),
            "global audit covers [protect]"
        );
        assert!(
            !decide(&c, 5, ip("127.0.0.1"), 2),
            "an enforce VM still refuses"
        );
        assert!(
            decide(&c, 77, ip("127.0.0.1"), 2),
            "the console user is granted"
        );
        let c = compile(&p, &local, &Dynamic::default()).expect("compiles");
        assert!(
            !decide(&c, 77, ip("127.0.0.1"), 2),
            "nobody at the console, nobody granted"
        );
    }

    /// A change worked out pair by pair is the same as a full compile, and
    /// the grant delta between the two tables is exactly the change.
    #[test]
    fn recompiling_pairs_matches_a_full_compile() {
        let p = policy(
            r##"
[servers.two]
addresses = ["192.168.2.2", "2001:db8::2"]
[vms.debianx]
server = "two"
ports = [20002, 20003]
allow = ["myself", "@bookkeeping", "@console"]
[vms.winlab]
server = "localhost"
ports = [5930]
allow = ["ralph"]
[[vms.winlab.schedule]]
allow = ["#1021"]
days = ["mon"]
"##,
        );
        let local = LocalAddrs::new();
        let temp = vec![
            TempGrant {
                uid: 4242,
                user: "#4242".into(),
                vm: "winlab".into(),
                expires: None,
                granted_at: 0,
                granted_by: 0,
            },
            TempGrant {
                uid: 1000,
                user: "myself".into(),
                vm: "debianx".into(),
                expires: None,
                granted_at: 0,
                granted_by: 0,
            },
        ];
        let before = Dynamic {
            temp: &temp[1..],
            scheduled: BTreeSet::new(),
            console: Some(1001),
        };
        let after = Dynamic {
            temp: &temp,
            scheduled: [("winlab".to_owned(), 1021)].into(),
            console: Some(1003),
        };
        let old = compile(&p, &local, &before).expect("compiles");
        let full = compile(&p, &local, &after).expect("compiles");
        let pairs: BTreeSet<(String, u32)> = [
            ("winlab".to_owned(), 4242),
            ("winlab".to_owned(), 1021),
            ("debianx".to_owned(), 1000),
        ]
        .into();
        let quick = recompile_pairs(&old, &p, &after, &pairs, true).expect("recompiles");
        assert_eq!(quick, full);
        let delta = grant_delta(&old, &quick, 100).expect("only grants changed");
        // 4242 and 1021 on winlab's endpoint; the console moves from 1001
        // (ralph, not otherwise on debianx) to 1003 (already in
        // @bookkeeping): 1001 loses debianx's four endpoints.
        let added: BTreeSet<(u32, u16)> = delta
            .iter()
            .filter(|(_, v)| v.flags & GRANT_REVOKED == 0)
            .map(|(k, _)| (k.uid, k.port))
            .collect();
        let revoked: BTreeSet<(u32, u16)> = delta
            .iter()
            .filter(|(_, v)| v.flags & GRANT_REVOKED != 0)
            .map(|(k, _)| (k.uid, k.port))
            .collect();
        assert_eq!(added, [(4242, 5930), (1021, 5930)].into());
        assert_eq!(revoked, [(1001, 20002), (1001, 20003)].into());
        assert_eq!(delta.len(), 2 + 4);
        assert!(grant_delta(&old, &quick, 5).is_none(), "over the limit");
        let moved = compile(&policy(SEED), &local, &before).expect("compiles");
        assert!(
            grant_delta(&old, &moved, 100).is_none(),
            "endpoints changed"
        );
    }

    #[test]
    fn clash_is_an_error() {
        let p = policy(
            "[servers.a]\naddress=\"127.0.0.2\"\n[vms.x]\nserver=\"a\"\nports=[1]\n[vms.y]\nserver=\"localhost\"\nports=[1]\n",
        );
        let e = compile(&p, &LocalAddrs::new(), &Dynamic::default()).expect_err("clash");
        assert!(e.to_string().contains("both claim localhost:1"), "{e}");
    }

    #[test]
    fn empty_policy_has_empty_table() {
        let c =
            compile(&policy(""), &[ip("10.0.0.1")].into(), &Dynamic::default()).expect("compiles");
        assert!(c.rules.is_empty());
        assert_eq!(c.capacity(), 64);
    }

    #[test]
    fn table_contents_and_capacity() {
        let c = compile(&policy(SEED), &LocalAddrs::new(), &Dynamic::default()).expect("compiles");
        // 11 port entries (20001-20010, 5930), 2 endpoints, 4+1 grants,
        // and the same 11 ports for binds (all on this machine or in
        // [protect]).
        assert_eq!(c.rules.len(), 11 + 2 + 11);
        assert_eq!(c.entry_count(), 11 + 2 + 5 + 11);
        assert_eq!(c.listen_ports.len(), 11);
        assert_eq!(c.grant_count(), 5);
        assert_eq!(c.grants(..).count(), 5);
        assert!(c.capacity() as usize >= c.entry_count() + c.entry_count() / 4);
        // The endpoints of a VM share its uids.
        let mut shared = c.endpoints.values().collect::<Vec<_>>();
        shared.dedup_by(|a, b| Arc::ptr_eq(a, b));
        assert_eq!(shared.len(), 2);
        let names: Vec<&str> = c.vm_names.values().map(String::as_str).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"debianx") && names.contains(&"winlab"));
    }

    #[test]
    fn too_large_is_refused() {
        let mut allow = String::new();
        for uid in 0..2000 {
            allow.push_str(&format!("\"#{uid}\","));
        }
        let p = policy(&format!(
            "[vms.v]\nserver=\"localhost\"\nports=[\"1-2100\"]\nallow=[{allow}]\n"
        ));
        let e = compile(&p, &LocalAddrs::new(), &Dynamic::default()).expect_err("4.2M grants");
        assert!(matches!(e, CompileError::TooLarge { .. }), "{e}");
    }
}
