//! The validated policy: what the rest of the daemon reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use super::*;

// ---- the validated model ------------------------------------------------

/// Who an `allow` entry names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Principal {
    /// `name`: one user, looked up through NSS.
    User(String),
    /// `@name`: every member of a Unix group, primary and supplementary.
    Group(String),
    /// `#1021`: a numeric uid; needs no passwd entry.
    Uid(u32),
    /// The `#UID` entries of one `allow` list held together when there are
    /// more than [`UIDS_APART`] of them (how many): a list of 10,000
    /// numeric uids is one sorted array, not 10,000 entries.
    Uids(u32),
    /// `@console`: whoever holds the active session on seat0, while they do.
    Console,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(n) => write!(f, "{n}"),
            Self::Group(g) => write!(f, "@{g}"),
            Self::Uid(u) => write!(f, "#{u}"),
            Self::Uids(n) => write!(f, "{n} `#UID` entries"),
            Self::Console => write!(f, "@console"),
        }
    }
}

/// An `allow` list with more `#UID` entries than this holds them as one
/// [`Principal::Uids`].
pub const UIDS_APART: usize = 16;

/// Holds the `#UID` entries of `allow` as one [`Principal::Uids`] (where
/// the first one was) when there are more than [`UIDS_APART`].
pub(super) fn gather_uids(allow: Vec<Grantee>) -> Vec<Grantee> {
    let numeric = allow
        .iter()
        .filter(|g| matches!(g.principal, Principal::Uid(_)))
        .count();
    if numeric <= UIDS_APART {
        return allow;
    }
    let mut uids = Vec::with_capacity(numeric);
    let mut out = Vec::with_capacity(allow.len() - numeric + 1);
    let mut at = None;
    for g in allow {
        if let Principal::Uid(u) = g.principal {
            uids.push(u);
            at.get_or_insert(out.len());
        } else {
            out.push(g);
        }
    }
    out.insert(at.unwrap_or(0).min(out.len()), gathered(numeric, uids));
    out
}

/// The [`Principal::Uids`] entry of `numeric` `#UID` entries granting
/// `uids` (in any order, maybe repeated).
pub(super) fn gathered(numeric: usize, mut uids: Vec<u32>) -> Grantee {
    // Sorting a vector is several times cheaper than a BTreeSet, and the
    // lists as written are mostly sorted already.
    uids.sort_unstable();
    uids.dedup();
    Grantee {
        principal: Principal::Uids(u32::try_from(numeric).unwrap_or(u32::MAX)),
        uids: Uids::from_sorted(uids),
    }
}

/// Where a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTarget {
    /// The built-in `localhost`: any address of this machine.
    Local,
    /// Addresses: literals, and what hostnames resolved to.
    Addresses(Vec<IpAddr>),
    /// A hostname of it did not resolve (a lenient parse at start): its
    /// VMs' ports are guarded on every address, and no one is granted.
    Unresolved,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub target: ServerTarget,
    /// Hostnames among the addresses, re-resolved periodically.
    pub hostnames: Vec<String>,
}

/// One `allow` entry and the uids it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grantee {
    pub principal: Principal,
    pub uids: Uids,
}

/// The uids one `allow` entry stands for, sorted and without duplicates.
/// A user or `#uid` is one uid, kept inline: a policy of 100,000 of them
/// costs no allocation per entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Uids {
    #[default]
    None,
    One(u32),
    Many(Box<[u32]>),
}

impl Uids {
    pub fn as_slice(&self) -> &[u32] {
        match self {
            Self::None => &[],
            Self::One(u) => std::slice::from_ref(u),
            Self::Many(v) => v,
        }
    }
    pub fn iter(&self) -> std::slice::Iter<'_, u32> {
        self.as_slice().iter()
    }
    pub fn contains(&self, uid: &u32) -> bool {
        self.as_slice().binary_search(uid).is_ok()
    }
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl Uids {
    /// Uids sorted and without duplicates.
    pub fn from_sorted(uids: Vec<u32>) -> Self {
        match uids.as_slice() {
            [] => Self::None,
            [one] => Self::One(*one),
            _ => Self::Many(uids.into_boxed_slice()),
        }
    }
}

impl From<BTreeSet<u32>> for Uids {
    fn from(set: BTreeSet<u32>) -> Self {
        match set.len() {
            0 => Self::None,
            1 => Self::One(set.into_iter().next().unwrap_or_default()),
            _ => Self::Many(set.into_iter().collect()),
        }
    }
}

impl<'a> IntoIterator for &'a Uids {
    type Item = &'a u32;
    type IntoIter = std::slice::Iter<'a, u32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Enforce (refuse what is not granted) or audit (log it, refuse nothing).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
    }
}

/// `[[vms.NAME.schedule]]`: grants that hold only inside a time window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub allow: Vec<Grantee>,
    /// Bit 0 = Monday ... bit 6 = Sunday.
    pub days: u8,
    /// Minutes after midnight, local time: [start, end). A window with
    /// end <= start runs past midnight into the next day.
    pub hours: Option<(u16, u16)>,
}

impl Schedule {
    /// `mon,tue 08:00-18:00`, for humans.
    pub fn describe(&self) -> String {
        const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        let days: Vec<&str> = (0..7)
            .filter(|d| self.days & (1 << d) != 0)
            .map(|d| NAMES[d])
            .collect();
        let days = if self.days == 0x7f {
            "every day".to_owned()
        } else {
            days.join(",")
        };
        match self.hours {
            None => days,
            Some((a, b)) => format!(
                "{days} {:02}:{:02}-{:02}:{:02}",
                a / 60,
                a % 60,
                b / 60,
                b % 60
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub server: String,
    pub ports: Vec<u16>,
    pub allow: Vec<Grantee>,
    pub schedules: Vec<Schedule>,
    /// `mode` of the VM; `None` follows `[settings] mode`.
    pub mode: Option<Mode>,
    /// `tls_port`: which of `ports` is Spice's TLS port (for `spicegate open`).
    pub tls_port: Option<u16>,
    /// `ca_file`: CA certificate the client verifies the TLS port with.
    pub ca_file: Option<PathBuf>,
}

impl Vm {
    /// The plain (non-TLS) Spice port, if any: the first port that is not
    /// the TLS port.
    pub fn plain_port(&self) -> Option<u16> {
        self.ports
            .iter()
            .copied()
            .find(|p| Some(*p) != self.tls_port)
    }

    /// Every uid the `allow` list grants at all times.
    pub fn uids(&self) -> BTreeSet<u32> {
        self.allow
            .iter()
            .flat_map(|g| g.uids.iter().copied())
            .collect()
    }

    /// Whether `allow` grants `uid` (by name, group or number; not the
    /// console), without building the set of every allowed uid.
    pub fn allows_uid(&self, uid: u32) -> bool {
        self.allow.iter().any(|g| g.uids.contains(&uid))
    }

    /// Whether `allow` names `@console`.
    pub fn allows_console(&self) -> bool {
        self.allow.iter().any(|g| g.principal == Principal::Console)
    }

    /// Whether anything about this VM depends on the console user.
    pub fn uses_console(&self) -> bool {
        self.allows_console()
            || self
                .schedules
                .iter()
                .any(|s| s.allow.iter().any(|g| g.principal == Principal::Console))
    }
}

/// `[settings]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `admins = "group"`: the group whose members may change things through
    /// the control socket (root always may), with its members' uids.
    pub admins: Option<(String, BTreeSet<u32>)>,
    /// `end_sessions` (default true): when access ends, close the user's
    /// established connections to the endpoint.
    pub end_sessions: bool,
    /// `timezone` for schedules; `None` is the machine's.
    pub timezone: Option<String>,
    /// How often hostnames and groups are looked up again.
    pub resolve_interval: Duration,
    /// Default mode of every VM and of `[protect]` ports.
    pub mode: Mode,
    /// Spice client `spicegate open` starts, with the URI appended.
    pub client: Vec<String>,
    /// `metrics_file`: where the daemon writes Prometheus metrics every
    /// 5 s (docs/metrics.md); `None` (the default) writes nothing.
    pub metrics_file: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            admins: None,
            end_sessions: true,
            timezone: None,
            resolve_interval: Duration::from_secs(300),
            mode: Mode::Enforce,
            client: vec!["remote-viewer".to_owned()],
            metrics_file: None,
        }
    }
}

impl Settings {
    /// Whether `uid` may change things through the control socket.
    pub fn is_admin(&self, uid: u32) -> bool {
        uid == 0
            || self
                .admins
                .as_ref()
                .is_some_and(|(_, uids)| uids.contains(&uid))
    }
}

/// A policy that parsed and validated: safe to compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The main file.
    pub source: PathBuf,
    /// Every file it was read from: the main file, then policy.d in order.
    pub files: Vec<PathBuf>,
    /// Guarded on every destination address; sorted, unique.
    pub protect_ports: Vec<u16>,
    /// `[protect] listeners`: who may bind the guarded local ports (the
    /// `[protect]` ports and the ports of VMs on `localhost`), besides root.
    pub listeners: Vec<Grantee>,
    /// Includes the built-in `localhost`.
    pub servers: BTreeMap<String, Server>,
    pub vms: BTreeMap<String, Vm>,
    pub settings: Settings,
    /// Names that did not resolve (only a lenient parse has any).
    pub unresolved: Vec<Unresolved>,
}

impl Policy {
    /// A warning for a policy whose VMs on this machine only root may
    /// serve: QEMU running as another user (libvirt's `libvirt-qemu`)
    /// could not open their Spice ports once it restarts.
    pub fn listener_warning(&self) -> Option<String> {
        if !self.listeners.is_empty() {
            return None;
        }
        let local: Vec<&str> = self
            .vms
            .values()
            .filter(|vm| {
                matches!(
                    self.servers.get(&vm.server).map(|s| &s.target),
                    Some(ServerTarget::Local) | None
                )
            })
            .map(|vm| vm.name.as_str())
            .collect();
        (!local.is_empty()).then(|| {
            format!(
                "only root may listen on the ports of vm(s) {} on this machine: if their Spice server (QEMU) runs as another user (libvirt: libvirt-qemu), name it in `[protect] listeners`, or it cannot open those ports when it next starts",
                local.join(", ")
            )
        })
    }

    /// Whether reading the policy again could give another result: it names
    /// a user, a group or a hostname (NSS and DNS can change their answer),
    /// or a name did not resolve. A policy of `#UID`s, addresses,
    /// `localhost` and `@console` reads the same every time.
    pub fn looks_up_names(&self) -> bool {
        let named = |allow: &[Grantee]| {
            allow
                .iter()
                .any(|g| matches!(g.principal, Principal::User(_) | Principal::Group(_)))
        };
        !self.unresolved.is_empty()
            || named(&self.listeners)
            || self
                .servers
                .values()
                .any(|s| !s.hostnames.is_empty() || matches!(s.target, ServerTarget::Unresolved))
            || self
                .vms
                .values()
                .any(|vm| named(&vm.allow) || vm.schedules.iter().any(|s| named(&s.allow)))
    }

    /// Every uid `[protect] listeners` names.
    pub fn listener_uids(&self) -> BTreeSet<u32> {
        self.listeners
            .iter()
            .flat_map(|g| g.uids.as_slice().iter().copied())
            .collect()
    }

    /// The guarded local ports: only root and the listeners may bind them,
    /// on any address (`[protect]` ports and the ports of VMs on
    /// `localhost`).
    pub fn listen_ports(&self) -> BTreeSet<u16> {
        let mut ports: BTreeSet<u16> = self.protect_ports.iter().copied().collect();
        for vm in self.vms.values() {
            if matches!(
                self.servers.get(&vm.server).map(|s| &s.target),
                Some(ServerTarget::Local) | None
            ) {
                ports.extend(vm.ports.iter().copied());
            }
        }
        ports
    }

    /// The mode a VM runs in.
    pub fn vm_mode(&self, vm: &Vm) -> Mode {
        vm.mode.unwrap_or(self.settings.mode)
    }
}
