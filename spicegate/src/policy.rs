//! The TOML policy: what the admin writes, and its validation.
//!
//! Parsing never touches the kernel. Every error names the file, the line and
//! the column of the offending value; all errors of a file are reported at
//! once, and a policy with any error is never applied.
//!
//! Longer than 600 lines (a third of it tests): raw TOML, model, errors,
//! sources and validation are one module until issue 14 splits them into
//! `policy/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::directory::Directory;

/// Name of the built-in server meaning "this machine".
pub const LOCALHOST: &str = "localhost";

/// One problem in a policy file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---- the file as written ------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    protect: Option<RawProtect>,
    #[serde(default)]
    servers: BTreeMap<Spanned<String>, RawServer>,
    #[serde(default)]
    vms: BTreeMap<Spanned<String>, RawVm>,
    #[serde(default)]
    settings: Option<RawSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    admins: Option<Spanned<String>>,
    #[serde(default)]
    end_sessions: Option<Spanned<bool>>,
    #[serde(default)]
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    resolve_interval: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    client: Option<Spanned<String>>,
    #[serde(default)]
    metrics_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    listeners: Vec<Spanned<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    addresses: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    server: Spanned<String>,
    ports: Spanned<Vec<Spanned<toml::Value>>>,
    #[serde(default)]
    allow: RawAllow,
    #[serde(default)]
    schedule: Vec<RawSchedule>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    tls_port: Option<Spanned<toml::Value>>,
    #[serde(default)]
    ca_file: Option<Spanned<String>>,
}

/// An `allow` or `listeners` entry as written. A valid `#UID` is kept as
/// its number, so a policy of a million of them allocates nothing per
/// entry; anything else (names, `@group`, a malformed `#...`) as text, for
/// [`grantee`] to resolve or refuse.
enum RawEntry {
    Uid(u32),
    Text(String),
}

impl<'de> Deserialize<'de> for RawEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl serde::de::Visitor<'_> for Entry {
            type Value = RawEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawEntry, E> {
                let uid = s
                    .trim()
                    .strip_prefix('#')
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|u| *u != u32::MAX);
                Ok(match uid {
                    Some(u) => RawEntry::Uid(u),
                    None => RawEntry::Text(s.to_owned()),
                })
            }
        }
        d.deserialize_str(Entry)
    }
}

/// A VM's `allow` list as written, in 8 bytes per `#UID` entry (what a
/// list of thousands of numeric uids is made of): each entry's place in
/// the list and its uid, and the other entries with their place.
#[derive(Default)]
struct RawAllow {
    uids: Vec<(u32, u32)>,
    others: Vec<(u32, Spanned<RawEntry>)>,
}

impl RawAllow {
    /// The entries in the order written.
    fn entries(&self) -> impl Iterator<Item = RawItem<'_>> {
        let mut uids = self.uids.iter().peekable();
        let mut others = self.others.iter().peekable();
        std::iter::from_fn(move || match (uids.peek(), others.peek()) {
            (Some((a, _)), Some((b, _))) if b < a => others.next().map(|(_, e)| RawItem::Other(e)),
            (Some(_), _) => uids.next().map(|(_, u)| RawItem::Uid(*u)),
            (None, Some(_)) => others.next().map(|(_, e)| RawItem::Other(e)),
            (None, None) => None,
        })
    }
}

enum RawItem<'a> {
    Uid(u32),
    Other(&'a Spanned<RawEntry>),
}

impl<'de> Deserialize<'de> for RawAllow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = RawAllow;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawAllow, A::Error> {
                let mut out = RawAllow::default();
                let mut at = 0u32;
                while let Some(e) = seq.next_element::<Spanned<RawEntry>>()? {
                    match e.get_ref() {
                        RawEntry::Uid(u) => out.uids.push((at, *u)),
                        RawEntry::Text(_) => out.others.push((at, e)),
                    }
                    at = at.saturating_add(1);
                }
                out.uids.shrink_to_fit();
                Ok(out)
            }
        }
        d.deserialize_seq(List)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    allow: Spanned<Vec<Spanned<RawEntry>>>,
    #[serde(default)]
    days: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    hours: Option<Spanned<String>>,
}

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
fn gather_uids(allow: Vec<Grantee>) -> Vec<Grantee> {
    let numeric = allow
        .iter()
        .filter(|g| matches!(g.principal, Principal::Uid(_)))
        .count();
    if numeric <= UIDS_APART {
        return allow;
    }
    let mut uids = BTreeSet::new();
    let mut out = Vec::with_capacity(allow.len() - numeric + 1);
    let mut at = None;
    for g in allow {
        if let Principal::Uid(u) = g.principal {
            uids.insert(u);
            at.get_or_insert(out.len());
        } else {
            out.push(g);
        }
    }
    let gathered = Grantee {
        principal: Principal::Uids(u32::try_from(numeric).unwrap_or(u32::MAX)),
        uids: uids.into(),
    };
    out.insert(at.unwrap_or(0).min(out.len()), gathered);
    out
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
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

/// One policy file's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// Resolves hostnames to addresses.
pub trait Resolver {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String>;
}

/// The system resolver (getaddrinfo: /etc/hosts, DNS, whatever
/// nsswitch.conf says), every A and AAAA record.
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        use std::net::ToSocketAddrs as _;
        let mut out: Vec<IpAddr> = (host, 0)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .map(|sa| sa.ip())
            .collect();
        out.sort();
        out.dedup();
        if out.is_empty() {
            Err("no addresses".into())
        } else {
            Ok(out)
        }
    }
}

/// What validation looks up outside the text.
pub struct Env<'a> {
    pub dir: &'a dyn Directory,
    pub resolver: &'a dyn Resolver,
}

/// `policy.d` next to the main file.
pub fn dropin_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new(".")).join("policy.d")
}

/// Reads the main file and `policy.d/*.toml` in name order.
pub fn read_sources(main: &Path) -> Result<Vec<Source>, PolicyErrors> {
    let unreadable = |path: &Path, e: std::io::Error| {
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: 0,
            col: 0,
            message: format!("cannot read the policy: {e}"),
        }])
    };
    let mut sources = vec![Source {
        path: main.to_owned(),
        text: std::fs::read_to_string(main).map_err(|e| unreadable(main, e))?,
    }];
    let dir = dropin_dir(main);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| unreadable(&f, e))?;
            sources.push(Source { path: f, text });
        }
    }
    let files: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
    crate::trust::check_policy(&files, &dir).map_err(|message| {
        PolicyErrors(vec![PolicyError {
            file: main.to_owned(),
            line: 0,
            col: 0,
            message,
        }])
    })?;
    Ok(sources)
}

/// Reads and validates a policy (with its policy.d).
pub fn load(path: &Path, dir: &dyn Directory) -> Result<Policy, PolicyErrors> {
    parse_sources(
        &read_sources(path)?,
        &Env {
            dir,
            resolver: &SystemResolver,
        },
    )
}

/// Resolver for tests: `*.example.lan` names from a fixed table, nothing else.
#[cfg(test)]
pub struct FakeResolver;

#[cfg(test)]
impl Resolver for FakeResolver {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        match host {
            "mysrv.example.lan" => Ok(vec![
                "192.0.2.7".parse().expect("ip"),
                "2001:db8::7".parse().expect("ip"),
            ]),
            _ => Err("Name or service not known".into()),
        }
    }
}

/// Validates one policy text (tests: hostnames through [`FakeResolver`]).
#[cfg(test)]
pub fn parse(text: &str, path: &Path, dir: &dyn Directory) -> Result<Policy, PolicyErrors> {
    parse_sources(
        &[Source {
            path: path.to_owned(),
            text: text.to_owned(),
        }],
        &Env {
            dir,
            resolver: &FakeResolver,
        },
    )
}

/// Validates a main file and its drop-ins together. A name defined twice is
/// an error naming both places.
pub fn parse_sources(sources: &[Source], env: &Env<'_>) -> Result<Policy, PolicyErrors> {
    parse_sources_with(sources, env, false, true)
}

/// Like [`parse_sources`], but a name that does not resolve (a user or
/// group NSS does not know, a hostname that does not resolve) is not an
/// error: it grants nothing, a server it names guards its VMs' ports on
/// every address with no one granted, and it is listed in
/// [`Policy::unresolved`]. Text errors (syntax, unknown keys, clashes) are
/// still errors. What the daemon enforces at start while LDAP or DNS is
/// down.
pub fn parse_sources_lenient(sources: &[Source], env: &Env<'_>) -> Result<Policy, PolicyErrors> {
    parse_sources_with(sources, env, true, true)
}

/// The policy in force parsed again for its names only (the resolver
/// thread): like [`parse_sources`] (or, `lenient`, its lenient form) but
/// without looking at the file system. A metrics directory removed
/// since the policy was applied must not stop groups and hostnames from
/// being followed.
pub fn reparse_names(
    sources: &[Source],
    env: &Env<'_>,
    lenient: bool,
) -> Result<Policy, PolicyErrors> {
    parse_sources_with(sources, env, lenient, false)
}

fn parse_sources_with(
    sources: &[Source],
    env: &Env<'_>,
    lenient: bool,
    check_paths: bool,
) -> Result<Policy, PolicyErrors> {
    let mut errs = Errors {
        sources,
        views: Vec::new(),
        list: Vec::new(),
        lenient,
        check_paths,
        unresolved: Vec::new(),
    };
    let mut raws = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        // A very large text a piece at a time (see policy_split); any
        // trouble, and it is parsed whole, for the exact errors.
        let pieces = crate::policy_split::split(&src.text).and_then(|docs| {
            docs.into_iter()
                .map(|d| Some((toml::from_str::<RawPolicy>(&d.text).ok()?, d.map)))
                .collect::<Option<Vec<_>>>()
        });
        if let Some(pieces) = pieces {
            for (raw, map) in pieces {
                raws.push((errs.views.len(), raw));
                errs.views.push(View { file: i, map });
            }
            continue;
        }
        let view = errs.views.len();
        errs.views.push(View {
            file: i,
            map: Vec::new(),
        });
        match toml::from_str::<RawPolicy>(&src.text) {
            Ok(raw) => raws.push((view, raw)),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                errs.push(view, &span, e.message().trim_end().to_owned());
            }
        }
    }
    if !errs.list.is_empty() {
        return Err(PolicyErrors(errs.list));
    }

    // Names defined twice across files (within one file TOML refuses them).
    let mut server_at: BTreeMap<&str, (usize, Range<usize>)> = BTreeMap::new();
    let mut vm_at: BTreeMap<&str, (usize, Range<usize>)> = BTreeMap::new();
    for (i, raw) in &raws {
        for (what, keys, seen) in [
            (
                "server",
                raw.servers.keys().collect::<Vec<_>>(),
                &mut server_at,
            ),
            ("vm", raw.vms.keys().collect::<Vec<_>>(), &mut vm_at),
        ] {
            for k in keys {
                if let Some((j, first)) = seen.get(k.get_ref().as_str()) {
                    let at = errs.at(*j, first);
                    errs.push(
                        *i,
                        &k.span(),
                        format!("{what} `{}` is also defined at {at}", k.get_ref()),
                    );
                } else {
                    seen.insert(k.get_ref().as_str(), (*i, k.span()));
                }
            }
        }
    }

    let mut settings = Settings::default();
    let mut settings_at: BTreeMap<&str, (usize, Range<usize>)> = BTreeMap::new();
    for (i, raw) in &raws {
        if let Some(rs) = &raw.settings {
            settings_from_raw(*i, rs, &mut settings, &mut settings_at, env, &mut errs);
        }
    }

    let mut protect_ports = BTreeSet::new();
    let mut listeners = Vec::new();
    for (i, raw) in &raws {
        if let Some(protect) = &raw.protect {
            for p in &protect.ports {
                if let Some(range) = port_spec(*i, p, &mut errs) {
                    protect_ports.extend(range);
                }
            }
            for l in &protect.listeners {
                if matches!(l.get_ref(), RawEntry::Text(t) if t == "@console") {
                    errs.push(
                        *i,
                        &l.span(),
                        "`@console` cannot be a listener: name the user or group the Spice server (QEMU) runs as".into(),
                    );
                    continue;
                }
                if let Some(g) = grantee(*i, l, env.dir, &mut errs) {
                    listeners.push(g);
                }
            }
        }
    }

    let mut servers = BTreeMap::new();
    servers.insert(
        LOCALHOST.to_owned(),
        Server {
            name: LOCALHOST.to_owned(),
            target: ServerTarget::Local,
            hostnames: vec![],
        },
    );
    let mut defined: BTreeSet<String> = [LOCALHOST.to_owned()].into();
    for (i, raw) in &raws {
        for (name, server) in &raw.servers {
            defined.insert(name.get_ref().clone());
            if name.get_ref() == LOCALHOST {
                errs.push(
                    *i,
                    &name.span(),
                    "`localhost` is built in (this machine, any local address); pick another name"
                        .into(),
                );
                continue;
            }
            if let Some(s) = server_from_raw(*i, name, server, env, &mut errs) {
                servers.insert(s.name.clone(), s);
            }
        }
    }

    let mut vms = BTreeMap::new();
    for (i, raw) in &raws {
        for (name, vm) in &raw.vms {
            if let Some(v) = vm_from_raw(*i, name, vm, &defined, env, &mut errs) {
                vms.insert(v.name.clone(), v);
            }
        }
    }

    if !errs.list.is_empty() {
        return Err(PolicyErrors(errs.list));
    }
    Ok(Policy {
        source: sources[0].path.clone(),
        files: sources.iter().map(|s| s.path.clone()).collect(),
        protect_ports: protect_ports.into_iter().collect(),
        listeners,
        servers,
        vms,
        settings,
        unresolved: errs.unresolved,
    })
}

/// A name of the policy that did not resolve when it was read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    /// `user bob`, `group @staff`, `hostname kvm.lan`.
    pub name: String,
    /// `FILE:LINE:COL`.
    pub at: String,
    pub why: String,
}

struct Errors<'a> {
    sources: &'a [Source],
    /// What the first number of an error's place means: the file, and
    /// where the parsed document's bytes are in it (a file parsed in
    /// pieces, see policy_split; empty when parsed whole).
    views: Vec<View>,
    list: Vec<PolicyError>,
    lenient: bool,
    /// Whether paths are checked against the file system (`metrics_file`).
    check_paths: bool,
    unresolved: Vec<Unresolved>,
}

/// Appended to the error of a name that does not resolve.
const UNRESOLVED_HINT: &str = "; a reload with it is refused, but at start spicegate enforces the rest of the policy, grants nothing to it (and guards the ports of a server it names on every address) and keeps trying; `spicegate status` lists it";

/// A document parsed from part of (or all of) one source file.
struct View {
    file: usize,
    map: Vec<(usize, usize)>,
}

impl Errors<'_> {
    /// The source file and 1-based line and column of `span` in document
    /// `view`.
    fn locate(&self, view: usize, span: &Range<usize>) -> (&Source, usize, usize) {
        let (file, at) = match self.views.get(view) {
            Some(v) => (
                v.file,
                crate::policy_split::Doc::file_offset(&v.map, span.start),
            ),
            None => (view, span.start),
        };
        let src = &self.sources[file];
        let (line, col) = line_col(&src.text, at);
        (src, line, col)
    }

    /// `path:line:col` of `span` in document `view`.
    fn at(&self, view: usize, span: &Range<usize>) -> String {
        let (src, line, col) = self.locate(view, span);
        format!("{}:{line}:{col}", src.path.display())
    }

    /// A name that does not resolve: an error, or, when lenient, an entry
    /// of the unresolved list. Returns whether it was lenient.
    fn unresolved(
        &mut self,
        file: usize,
        span: &Range<usize>,
        name: String,
        message: String,
    ) -> bool {
        if self.lenient {
            let at = self.at(file, span);
            self.unresolved.push(Unresolved {
                name,
                at,
                why: message,
            });
        } else {
            self.push(file, span, format!("{message}{UNRESOLVED_HINT}"));
        }
        self.lenient
    }

    fn push(&mut self, file: usize, span: &Range<usize>, message: String) {
        let (src, line, col) = self.locate(file, span);
        let file = src.path.clone();
        self.list.push(PolicyError {
            file,
            line,
            col,
            message,
        });
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn parse_mode(file: usize, v: &Spanned<String>, errs: &mut Errors<'_>) -> Option<Mode> {
    match v.get_ref().as_str() {
        "enforce" => Some(Mode::Enforce),
        "audit" => Some(Mode::Audit),
        other => {
            errs.push(
                file,
                &v.span(),
                format!("mode `{other}`: use \"enforce\" or \"audit\""),
            );
            None
        }
    }
}

fn settings_from_raw(
    file: usize,
    raw: &RawSettings,
    settings: &mut Settings,
    seen: &mut BTreeMap<&'static str, (usize, Range<usize>)>,
    env: &Env<'_>,
    errs: &mut Errors<'_>,
) {
    let mut once = |key: &'static str, span: Range<usize>, errs: &mut Errors<'_>| -> bool {
        if let Some((j, first)) = seen.get(key) {
            let at = errs.at(*j, first);
            errs.push(file, &span, format!("setting `{key}` is also set at {at}"));
            false
        } else {
            seen.insert(key, (file, span));
            true
        }
    };
    if let Some(end) = &raw.end_sessions
        && once("end_sessions", end.span(), errs)
    {
        settings.end_sessions = *end.get_ref();
    }
    if let Some(group) = &raw.admins
        && once("admins", group.span(), errs)
    {
        let name = group.get_ref().trim().trim_start_matches('@');
        // Unresolved, nobody but root is an admin: fail closed.
        match env.dir.group_members(name) {
            Ok(Some(uids)) => settings.admins = Some((name.to_owned(), uids)),
            Ok(None) => {
                errs.unresolved(
                    file,
                    &group.span(),
                    format!("group @{name}"),
                    format!("unknown admin group `{name}` (looked up through NSS)"),
                );
            }
            Err(e) => {
                errs.unresolved(
                    file,
                    &group.span(),
                    format!("group @{name}"),
                    format!("cannot look up group `{name}`: {e}"),
                );
            }
        }
    }
    if let Some(tz) = &raw.timezone
        && once("timezone", tz.span(), errs)
    {
        match jiff::tz::TimeZone::get(tz.get_ref()) {
            Ok(_) => settings.timezone = Some(tz.get_ref().clone()),
            Err(e) => errs.push(
                file,
                &tz.span(),
                format!("unknown time zone `{}`: {e}", tz.get_ref()),
            ),
        }
    }
    if let Some(iv) = &raw.resolve_interval
        && once("resolve_interval", iv.span(), errs)
    {
        match humantime::parse_duration(iv.get_ref()) {
            Ok(d) if d >= Duration::from_secs(1) => settings.resolve_interval = d,
            _ => errs.push(
                file,
                &iv.span(),
                format!(
                    "resolve_interval `{}`: a duration of at least 1s, like \"5m\"",
                    iv.get_ref()
                ),
            ),
        }
    }
    if let Some(client) = &raw.client
        && once("client", client.span(), errs)
    {
        let words: Vec<String> = client
            .get_ref()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if words.is_empty() {
            errs.push(
                file,
                &client.span(),
                "client: name the Spice client command, e.g. \"remote-viewer\"".into(),
            );
        } else {
            settings.client = words;
        }
    }
    if let Some(mode) = &raw.mode
        && once("mode", mode.span(), errs)
        && let Some(m) = parse_mode(file, mode, errs)
    {
        settings.mode = m;
    }
    if let Some(path) = &raw.metrics_file
        && once("metrics_file", path.span(), errs)
    {
        match metrics_file(path.get_ref(), errs.check_paths) {
            Ok(p) => settings.metrics_file = Some(p),
            Err(e) => errs.push(file, &path.span(), e),
        }
    }
}

/// `[settings] metrics_file`: an absolute path of a `.prom` file (what
/// node_exporter's textfile collector reads) in a directory that exists
/// (checked when `check_dir`). Looks at the file system: runs where the
/// policy is parsed (`check`, the start, the reload loader thread), never
/// on the engine thread.
pub fn metrics_file(text: &str, check_dir: bool) -> Result<std::path::PathBuf, String> {
    let path = Path::new(text);
    let name = path.file_name().and_then(|n| n.to_str());
    if !path.is_absolute() {
        return Err(format!(
            "metrics_file `{text}`: use an absolute path, like \"/var/lib/prometheus/node-exporter/spicegate.prom\""
        ));
    }
    if text.ends_with('/') || name.is_none_or(|n| !n.ends_with(".prom") || n == ".prom") {
        return Err(format!(
            "metrics_file `{text}`: name a file ending in `.prom` (node_exporter's textfile collector reads only those), like \"/var/lib/prometheus/node-exporter/spicegate.prom\""
        ));
    }
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "metrics_file `{text}`: write the path without `..`"
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !check_dir {
        return Ok(path.to_owned());
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(path.to_owned()),
        Ok(_) => Err(format!(
            "metrics_file `{text}`: {} is not a directory",
            dir.display()
        )),
        Err(e) => Err(format!(
            "metrics_file `{text}`: its directory {} cannot be used ({e}); create it (Debian's prometheus-node-exporter package makes /var/lib/prometheus/node-exporter) or fix the path",
            dir.display()
        )),
    }
}

fn port_spec(
    file: usize,
    value: &Spanned<toml::Value>,
    errs: &mut Errors<'_>,
) -> Option<std::ops::RangeInclusive<u16>> {
    let span = value.span();
    let bad = |errs: &mut Errors<'_>, what: String| {
        errs.push(
            file,
            &span,
            format!("{what}: a port is 1-65535, a range is \"LOW-HIGH\" with LOW <= HIGH"),
        );
        None
    };
    let one = |n: i64| u16::try_from(n).ok().filter(|&p| p != 0);
    match value.get_ref() {
        toml::Value::Integer(n) => match one(*n) {
            Some(p) => Some(p..=p),
            None => bad(errs, format!("bad port {n}")),
        },
        toml::Value::String(s) => {
            let parse = |t: &str| t.trim().parse::<i64>().ok().and_then(one);
            let (lo, hi) = match s.split_once('-') {
                Some((a, b)) => (parse(a), parse(b)),
                None => (parse(s), parse(s)),
            };
            match (lo, hi) {
                (Some(lo), Some(hi)) if lo <= hi => Some(lo..=hi),
                _ => bad(errs, format!("bad port range \"{s}\"")),
            }
        }
        other => bad(errs, format!("bad port {other}")),
    }
}

fn server_from_raw(
    file: usize,
    name: &Spanned<String>,
    raw: &RawServer,
    env: &Env<'_>,
    errs: &mut Errors<'_>,
) -> Option<Server> {
    let mut literals: Vec<&Spanned<String>> = Vec::new();
    if let Some(a) = &raw.address {
        literals.push(a);
    }
    if let Some(list) = &raw.addresses {
        literals.extend(list.get_ref().iter());
        if list.get_ref().is_empty() {
            errs.push(
                file,
                &list.span(),
                format!("server `{}` has an empty `addresses` list", name.get_ref()),
            );
        }
    }
    if literals.is_empty() {
        errs.push(
            file,
            &name.span(),
            format!(
                "server `{}` needs `address = \"...\"` or `addresses = [...]`",
                name.get_ref()
            ),
        );
        return None;
    }
    let mut addrs = Vec::new();
    let mut hostnames = Vec::new();
    let mut ok = true;
    let mut unresolved = false;
    for lit in literals {
        let text = lit.get_ref().trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            addrs.push(ip);
            continue;
        }
        if !is_hostname(text) {
            ok = false;
            errs.push(
                file,
                &lit.span(),
                format!(
                    "server `{}`: `{text}` is neither an IP address nor a hostname",
                    name.get_ref()
                ),
            );
            continue;
        }
        match env.resolver.resolve(text) {
            Ok(found) => {
                addrs.extend(found);
                hostnames.push(text.to_owned());
            }
            Err(e) => {
                let lenient = errs.unresolved(
                    file,
                    &lit.span(),
                    format!("hostname {text}"),
                    format!(
                        "server `{}`: hostname `{text}` does not resolve: {e}",
                        name.get_ref()
                    ),
                );
                if lenient {
                    unresolved = true;
                    hostnames.push(text.to_owned());
                } else {
                    ok = false;
                }
            }
        }
    }
    addrs.sort();
    addrs.dedup();
    ok.then(|| Server {
        name: name.get_ref().clone(),
        // Where part of a server is unknown, none of it is trusted: its
        // VMs' ports are guarded everywhere and granted to nobody.
        target: if unresolved {
            ServerTarget::Unresolved
        } else {
            ServerTarget::Addresses(addrs)
        },
        hostnames,
    })
}

/// RFC 1123 host names: letters, digits, hyphens and dots.
fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn vm_from_raw(
    file: usize,
    name: &Spanned<String>,
    vm: &RawVm,
    servers: &BTreeSet<String>,
    env: &Env<'_>,
    errs: &mut Errors<'_>,
) -> Option<Vm> {
    if !servers.contains(vm.server.get_ref()) {
        let known: Vec<&str> = servers.iter().map(String::as_str).collect();
        errs.push(
            file,
            &vm.server.span(),
            format!(
                "vm `{}` names server `{}`, which is not defined (defined: {})",
                name.get_ref(),
                vm.server.get_ref(),
                known.join(", ")
            ),
        );
    }
    let mut ports = BTreeSet::new();
    for p in vm.ports.get_ref() {
        if let Some(range) = port_spec(file, p, errs) {
            ports.extend(range);
        }
    }
    if vm.ports.get_ref().is_empty() {
        errs.push(
            file,
            &vm.ports.span(),
            format!("vm `{}` has no ports", name.get_ref()),
        );
    }
    let allow: Vec<Grantee> = vm
        .allow
        .entries()
        .filter_map(|e| match e {
            RawItem::Uid(uid) => Some(Grantee {
                principal: Principal::Uid(uid),
                uids: Uids::One(uid),
            }),
            RawItem::Other(e) => grantee(file, e, env.dir, errs),
        })
        .collect();
    let allow = gather_uids(allow);
    let mut schedules = Vec::new();
    for s in &vm.schedule {
        if let Some(s) = schedule_from_raw(file, s, env, errs) {
            schedules.push(s);
        }
    }
    let mode = vm.mode.as_ref().and_then(|m| parse_mode(file, m, errs));
    let tls_port = vm.tls_port.as_ref().and_then(|t| {
        let one = port_spec(file, t, errs)?;
        let p = *one.start();
        if one.start() != one.end() {
            errs.push(file, &t.span(), "tls_port is one port, not a range".into());
            None
        } else if !ports.contains(&p) {
            errs.push(
                file,
                &t.span(),
                format!("tls_port {p} is not one of the VM's ports"),
            );
            None
        } else {
            Some(p)
        }
    });
    let ca_file = vm.ca_file.as_ref().map(|c| PathBuf::from(c.get_ref()));
    Some(Vm {
        name: name.get_ref().clone(),
        server: vm.server.get_ref().clone(),
        ports: ports.into_iter().collect(),
        allow,
        schedules,
        mode,
        tls_port,
        ca_file,
    })
}

fn schedule_from_raw(
    file: usize,
    raw: &RawSchedule,
    env: &Env<'_>,
    errs: &mut Errors<'_>,
) -> Option<Schedule> {
    let allow: Vec<Grantee> = raw
        .allow
        .get_ref()
        .iter()
        .filter_map(|e| grantee(file, e, env.dir, errs))
        .collect();
    let allow = gather_uids(allow);
    if raw.allow.get_ref().is_empty() {
        errs.push(
            file,
            &raw.allow.span(),
            "a schedule with an empty `allow` grants nothing; remove it or name someone".into(),
        );
    }
    let mut days = 0u8;
    match &raw.days {
        None => days = 0x7f,
        Some(list) => {
            if list.get_ref().is_empty() {
                errs.push(
                    file,
                    &list.span(),
                    "empty `days`: leave `days` out for every day".into(),
                );
            }
            for d in list.get_ref() {
                match crate::schedule::parse_day(d.get_ref()) {
                    Some(bit) => days |= 1 << bit,
                    None => errs.push(
                        file,
                        &d.span(),
                        format!(
                            "day `{}`: use mon, tue, wed, thu, fri, sat, sun",
                            d.get_ref()
                        ),
                    ),
                }
            }
        }
    }
    let hours = match &raw.hours {
        None => None,
        Some(h) => match crate::schedule::parse_hours(h.get_ref()) {
            Ok(w) => Some(w),
            Err(e) => {
                errs.push(file, &h.span(), format!("hours `{}`: {e}", h.get_ref()));
                None
            }
        },
    };
    Some(Schedule { allow, days, hours })
}

fn grantee(
    file: usize,
    entry: &Spanned<RawEntry>,
    dir: &dyn Directory,
    errs: &mut Errors<'_>,
) -> Option<Grantee> {
    let text = match entry.get_ref() {
        RawEntry::Uid(uid) => {
            return Some(Grantee {
                principal: Principal::Uid(*uid),
                uids: Uids::One(*uid),
            });
        }
        RawEntry::Text(t) => t.trim(),
    };
    let span = entry.span();
    if text == "@console" {
        return Some(Grantee {
            principal: Principal::Console,
            uids: Uids::None,
        });
    }
    if let Some(num) = text.strip_prefix('#') {
        return match num.parse::<u32>() {
            Ok(uid) if uid != u32::MAX => Some(Grantee {
                principal: Principal::Uid(uid),
                uids: Uids::One(uid),
            }),
            _ => {
                errs.push(
                    file,
                    &span,
                    format!("`{text}`: `#` must be followed by a numeric uid"),
                );
                None
            }
        };
    }
    if let Some(group) = text.strip_prefix('@') {
        return match dir.group_members(group) {
            Ok(Some(uids)) => Some(Grantee {
                principal: Principal::Group(group.to_owned()),
                uids: uids.into(),
            }),
            Ok(None) => {
                errs.unresolved(
                    file,
                    &span,
                    format!("group @{group}"),
                    format!("unknown group `{group}` (looked up through NSS)"),
                );
                None
            }
            Err(e) => {
                errs.unresolved(
                    file,
                    &span,
                    format!("group @{group}"),
                    format!("cannot look up group `{group}`: {e}"),
                );
                None
            }
        };
    }
    if text.is_empty() {
        errs.push(file, &span, "empty `allow` entry".into());
        return None;
    }
    match dir.user_uid(text) {
        Ok(Some(uid)) => Some(Grantee {
            principal: Principal::User(text.to_owned()),
            uids: Uids::One(uid),
        }),
        Ok(None) => {
            errs.unresolved(
                file,
                &span,
                format!("user {text}"),
                format!("unknown user `{text}` (looked up through NSS; write `#UID` for a uid without a passwd entry)"),
            );
            None
        }
        Err(e) => {
            errs.unresolved(
                file,
                &span,
                format!("user {text}"),
                format!("cannot look up user `{text}`: {e}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::FakeDirectory;

    fn dir() -> FakeDirectory {
        FakeDirectory::default()
            .user("myself", 1000)
            .user("ralph", 1001)
            .user("root", 0)
            .group("bookkeeping", &[1002, 1003])
    }

    #[test]
    fn warns_when_only_root_may_serve_local_vms() {
        let local = "[vms.w]\nserver = \"localhost\"\nports = [5930]\n";
        let w = ok(local).listener_warning().expect("a warning");
        assert!(w.contains("vm(s) w") && w.contains("listeners"), "{w}");
        let with = format!("[protect]\nlisteners = [\"ralph\"]\n{local}");
        assert_eq!(ok(&with).listener_warning(), None);
        let remote = "[servers.s]\naddress = \"192.0.2.1\"\n[vms.r]\nserver = \"s\"\nports = [1]\n";
        assert_eq!(ok(remote).listener_warning(), None);
        let l = ok(&with);
        assert_eq!(
            l.listener_uids().into_iter().collect::<Vec<_>>(),
            vec![1001]
        );
        assert_eq!(l.listen_ports().into_iter().collect::<Vec<_>>(), vec![5930]);
    }

    #[test]
    fn console_cannot_listen() {
        let e = parse(
            "[protect]\nlisteners = [\"@console\"]\n",
            Path::new("p.toml"),
            &dir(),
        )
        .expect_err("refused");
        assert!(e.to_string().contains("cannot be a listener"), "{e}");
    }

    fn ok(text: &str) -> Policy {
        parse(text, Path::new("p.toml"), &dir()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        parse(text, Path::new("p.toml"), &dir())
            .expect_err("policy should be rejected")
            .to_string()
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

    #[test]
    fn seed_policy_parses() {
        let p = ok(SEED);
        assert_eq!(p.protect_ports.len(), 11);
        assert_eq!(p.protect_ports.first(), Some(&5930));
        let d = &p.vms["debianx"];
        assert_eq!(d.ports, vec![20002]);
        assert_eq!(d.uids(), [1000, 1002, 1003, 1021].into());
        assert_eq!(
            p.servers["mysrv"].target,
            ServerTarget::Addresses(vec!["192.168.2.2".parse().unwrap()])
        );
        assert_eq!(p.servers["localhost"].target, ServerTarget::Local);
        assert_eq!(p.vms["winlab"].uids(), [1001].into());
    }

    #[test]
    fn empty_policy_is_valid() {
        let p = ok("");
        assert!(p.vms.is_empty() && p.protect_ports.is_empty());
    }

    #[test]
    fn several_addresses_and_ipv6() {
        let p = ok(
            "[servers.s]\naddresses = [\"10.0.0.1\", \"fd00::1\"]\n[vms.v]\nserver=\"s\"\nports=[1]\n",
        );
        assert_eq!(
            p.servers["s"].target,
            ServerTarget::Addresses(vec![
                "10.0.0.1".parse().unwrap(),
                "fd00::1".parse().unwrap()
            ])
        );
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let e = err("[vms.v]\nserver = \"localhost\"\nports = [1]\nallwo = [\"x\"]\n");
        assert!(e.starts_with("p.toml:4:1: "), "{e}");
        assert!(e.contains("allwo"), "{e}");
    }

    #[test]
    fn unknown_user_and_group_are_errors() {
        let e = err(
            "[vms.v]\nserver = \"localhost\"\nports = [1]\nallow = [\"nobody-here\", \"@nogroup-here\"]\n",
        );
        assert!(e.contains("p.toml:4:10: unknown user `nobody-here`"), "{e}");
        assert!(
            e.contains("p.toml:4:25: unknown group `nogroup-here`"),
            "{e}"
        );
    }

    #[test]
    fn bad_ports() {
        for (spec, what) in [
            ("\"20010-20001\"", "bad port range \"20010-20001\""),
            ("0", "bad port 0"),
            ("70000", "bad port 70000"),
            ("\"x\"", "bad port range \"x\""),
            ("1.5", "bad port 1.5"),
        ] {
            let e = err(&format!("[protect]\nports = [{spec}]\n"));
            assert!(e.starts_with("p.toml:2:10: "), "{e}");
            assert!(e.contains(what), "{spec}: {e}");
        }
    }

    #[test]
    fn missing_server() {
        let e = err("[vms.v]\nserver = \"nosuch\"\nports = [1]\n");
        assert!(
            e.starts_with("p.toml:2:10: vm `v` names server `nosuch`"),
            "{e}"
        );
    }

    #[test]
    fn bad_address_and_localhost_redefinition() {
        let e = err(
            "[servers.localhost]\naddress = \"127.0.0.1\"\n[servers.s]\naddress = \"not an ip\"\n",
        );
        assert!(e.contains("p.toml:1:10: `localhost` is built in"), "{e}");
        assert!(
            e.contains(
                "p.toml:4:11: server `s`: `not an ip` is neither an IP address nor a hostname"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_uid_and_all_errors_reported() {
        let e = err("[vms.v]\nserver = \"localhost\"\nports = [0]\nallow = [\"#x\"]\n");
        assert_eq!(e.lines().count(), 2, "{e}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = err("[vms.v\n");
        assert!(e.starts_with("p.toml:1:"), "{e}");
    }

    #[test]
    fn settings() {
        let p = ok("[settings]\nadmins = \"bookkeeping\"\nend_sessions = false\n");
        assert!(!p.settings.end_sessions);
        assert!(p.settings.is_admin(0) && p.settings.is_admin(1002) && !p.settings.is_admin(1000));
        assert!(ok("").settings.end_sessions);
        let e = err("[settings]\nadmins = \"nogroup-here\"\n");
        assert!(
            e.contains("p.toml:2:10: unknown admin group `nogroup-here`"),
            "{e}"
        );
    }

    #[test]
    fn hostnames_resolve_to_every_address() {
        let p = ok("[servers.s]\naddress = \"mysrv.example.lan\"\n");
        assert_eq!(
            p.servers["s"].target,
            ServerTarget::Addresses(vec![
                "192.0.2.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap()
            ])
        );
        assert_eq!(
            p.servers["s"].hostnames,
            vec!["mysrv.example.lan".to_owned()]
        );
        let e = err("[servers.s]\naddresses = [\"10.0.0.1\", \"gone.example.lan\"]\n");
        assert!(
            e.contains("p.toml:2:26: server `s`: hostname `gone.example.lan` does not resolve"),
            "{e}"
        );
    }

    #[test]
    fn schedules_modes_and_console() {
        let p = ok(
            "[settings]\nmode = \"audit\"\ntimezone = \"Europe/Berlin\"\nresolve_interval = \"30s\"\n\
                    [vms.v]\nserver = \"localhost\"\nports = [1]\nmode = \"enforce\"\nallow = [\"@console\"]\n\
                    [[vms.v.schedule]]\nallow = [\"myself\"]\ndays = [\"mon\", \"tue\"]\nhours = \"22:00-06:00\"\n",
        );
        let v = &p.vms["v"];
        assert!(v.allows_console() && v.uses_console());
        assert_eq!(v.schedules[0].days, 0b11);
        assert_eq!(v.schedules[0].hours, Some((1320, 360)));
        assert_eq!(v.schedules[0].describe(), "mon,tue 22:00-06:00");
        assert_eq!(p.settings.mode, Mode::Audit);
        assert_eq!(p.vm_mode(v), Mode::Enforce);
        assert_eq!(p.settings.resolve_interval, Duration::from_secs(30));
        let e = err(
            "[settings]\nmode = \"off\"\ntimezone = \"Mars/Olympus\"\n[vms.v]\nserver = \"localhost\"\nports = [1]\n\
                     [[vms.v.schedule]]\nallow = [\"myself\"]\ndays = [\"mo\"]\nhours = \"9-5\"\n",
        );
        assert!(e.contains("p.toml:2:8: mode `off`"), "{e}");
        assert!(
            e.contains("p.toml:3:12: unknown time zone `Mars/Olympus`"),
            "{e}"
        );
        assert!(e.contains("p.toml:9:9: day `mo`"), "{e}");
        assert!(e.contains("p.toml:10:9: hours `9-5`"), "{e}");
    }

    #[test]
    fn dropins_merge_and_clash() {
        let src = |p: &str, t: &str| Source {
            path: PathBuf::from(p),
            text: t.to_owned(),
        };
        let env = Env {
            dir: &dir(),
            resolver: &FakeResolver,
        };
        let p = parse_sources(
            &[
                src(
                    "main.toml",
                    "[protect]\nports = [5930]\n[vms.a]\nserver = \"localhost\"\nports = [1]\n",
                ),
                src(
                    "policy.d/10-b.toml",
                    "[protect]\nports = [5931]\n[vms.b]\nserver = \"localhost\"\nports = [2]\n",
                ),
            ],
            &env,
        )
        .expect("merges");
        assert_eq!(p.protect_ports, vec![5930, 5931]);
        assert_eq!(p.vms.len(), 2);
        let e = parse_sources(
            &[
                src("main.toml", "[vms.a]\nserver = \"localhost\"\nports = [1]\n[settings]\nend_sessions = false\n"),
                src("policy.d/10-b.toml", "\n[vms.a]\nserver = \"localhost\"\nports = [2]\n[settings]\nend_sessions = true\n"),
            ],
            &env,
        )
        .expect_err("clash")
        .to_string();
        assert!(
            e.contains("policy.d/10-b.toml:2:6: vm `a` is also defined at main.toml:1:6"),
            "{e}"
        );
        assert!(
            e.contains(
                "policy.d/10-b.toml:6:16: setting `end_sessions` is also set at main.toml:5:16"
            ),
            "{e}"
        );
    }

    #[test]
    fn client_settings_and_tls_port() {
        let p = ok(
            "[settings]\nclient = \"spicy --full-screen\"\n[vms.v]\nserver = \"localhost\"\nports = [5900, 5901]\ntls_port = 5901\nca_file = \"/etc/spice/ca.pem\"\n",
        );
        assert_eq!(
            p.settings.client,
            vec!["spicy".to_owned(), "--full-screen".to_owned()]
        );
        assert_eq!(p.vms["v"].tls_port, Some(5901));
        assert_eq!(p.vms["v"].plain_port(), Some(5900));
        let e = err("[vms.v]\nserver = \"localhost\"\nports = [5900]\ntls_port = 5901\n");
        assert!(
            e.contains("p.toml:4:12: tls_port 5901 is not one of the VM's ports"),
            "{e}"
        );
    }

    /// Many `#UID` entries are held as one sorted array, where the first
    /// was; a few stay apart; malformed ones are still errors.
    #[test]
    fn many_numeric_uids_are_held_together() {
        let many: Vec<String> = (0..40)
            .rev()
            .map(|u| format!("\"#{}\"", 5000 + u))
            .collect();
        let text = format!(
            "[vms.a]\nserver = \"localhost\"\nports = [1]\nallow = [\"myself\", {}, \"ralph\"]\n[vms.b]\nserver = \"localhost\"\nports = [2]\nallow = [\"#7\", \"myself\"]\n",
            many.join(", ")
        );
        let dir = crate::directory::FakeDirectory::default()
            .user("myself", 1000)
            .user("ralph", 1001);
        let p = parse(&text, Path::new("p.toml"), &dir).expect("parses");
        let a: Vec<String> = p.vms["a"]
            .allow
            .iter()
            .map(|g| g.principal.to_string())
            .collect();
        assert_eq!(a, ["myself", "40 `#UID` entries", "ralph"]);
        assert_eq!(
            p.vms["a"].allow[1].uids.as_slice(),
            &(5000..5040).collect::<Vec<_>>()[..]
        );
        assert_eq!(p.vms["a"].uids().len(), 42);
        let b: Vec<String> = p.vms["b"]
            .allow
            .iter()
            .map(|g| g.principal.to_string())
            .collect();
        assert_eq!(b, ["#7", "myself"]);
        let bad = text.replace("\"#5003\"", "\"#50x3\"");
        let e = parse(&bad, Path::new("p.toml"), &dir).expect_err("refused");
        assert!(
            e.to_string()
                .contains("`#50x3`: `#` must be followed by a numeric uid"),
            "{e}"
        );
    }

    #[test]
    fn vm_without_ports() {
        let e = err("[vms.v]\nserver = \"localhost\"\nports = []\n");
        assert!(e.contains("vm `v` has no ports"), "{e}");
    }
}
