//! The TOML policy: what the admin writes, and its validation.
//!
//! Parsing never touches the kernel. Every error names the file, the line and
//! the column of the offending value; all errors of a file are reported at
//! once, and a policy with any error is never applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
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
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
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
    end_sessions: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
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
    allow: Vec<Spanned<String>>,
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
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(n) => write!(f, "{n}"),
            Self::Group(g) => write!(f, "@{g}"),
            Self::Uid(u) => write!(f, "#{u}"),
        }
    }
}

/// Where a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTarget {
    /// The built-in `localhost`: any address of this machine.
    Local,
    /// IP literals.
    Addresses(Vec<IpAddr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub target: ServerTarget,
}

/// One `allow` entry and the uids it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grantee {
    pub principal: Principal,
    pub uids: BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub server: String,
    pub ports: Vec<u16>,
    pub allow: Vec<Grantee>,
}

impl Vm {
    /// Every uid granted this VM.
    pub fn uids(&self) -> BTreeSet<u32> {
        self.allow.iter().flat_map(|g| g.uids.iter().copied()).collect()
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
}

impl Default for Settings {
    fn default() -> Self {
        Self { admins: None, end_sessions: true }
    }
}

impl Settings {
    /// Whether `uid` may change things through the control socket.
    pub fn is_admin(&self, uid: u32) -> bool {
        uid == 0 || self.admins.as_ref().is_some_and(|(_, uids)| uids.contains(&uid))
    }
}

/// A policy that parsed and validated: safe to compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub source: PathBuf,
    /// Guarded on every destination address; sorted, unique.
    pub protect_ports: Vec<u16>,
    /// Includes the built-in `localhost`.
    pub servers: BTreeMap<String, Server>,
    pub vms: BTreeMap<String, Vm>,
    pub settings: Settings,
}

/// Reads and validates a policy file.
pub fn load(path: &Path, dir: &dyn Directory) -> Result<Policy, PolicyErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: 0,
            col: 0,
            message: format!("cannot read the policy: {e}"),
        }])
    })?;
    parse(&text, path, dir)
}

/// Validates policy text. `path` is only used in error messages.
pub fn parse(text: &str, path: &Path, dir: &dyn Directory) -> Result<Policy, PolicyErrors> {
    let mut errs = Errors { text, file: path, list: Vec::new() };
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            errs.push(&span, e.message().trim_end().to_owned());
            return Err(PolicyErrors(errs.list));
        }
    };

    let mut protect_ports = BTreeSet::new();
    if let Some(protect) = &raw.protect {
        for p in &protect.ports {
            if let Some(range) = port_spec(p, &mut errs) {
                protect_ports.extend(range);
            }
        }
    }

    let mut servers = BTreeMap::new();
    servers.insert(
        LOCALHOST.to_owned(),
        Server { name: LOCALHOST.to_owned(), target: ServerTarget::Local },
    );
    for (name, server) in &raw.servers {
        if name.get_ref() == LOCALHOST {
            errs.push(
                &name.span(),
                "`localhost` is built in (this machine, any local address); pick another name".into(),
            );
            continue;
        }
        if let Some(s) = server_from_raw(name, server, &mut errs) {
            servers.insert(s.name.clone(), s);
        }
    }

    let mut vms = BTreeMap::new();
    for (name, vm) in &raw.vms {
        if !servers.contains_key(vm.server.get_ref())
            && !raw.servers.keys().any(|k| k.get_ref() == vm.server.get_ref())
        {
            let known: Vec<&str> = servers.keys().map(String::as_str).collect();
            errs.push(
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
            if let Some(range) = port_spec(p, &mut errs) {
                ports.extend(range);
            }
        }
        if vm.ports.get_ref().is_empty() {
            errs.push(&vm.ports.span(), format!("vm `{}` has no ports", name.get_ref()));
        }
        let mut allow = Vec::new();
        for entry in &vm.allow {
            if let Some(g) = grantee(entry, dir, &mut errs) {
                allow.push(g);
            }
        }
        vms.insert(
            name.get_ref().clone(),
            Vm {
                name: name.get_ref().clone(),
                server: vm.server.get_ref().clone(),
                ports: ports.into_iter().collect(),
                allow,
            },
        );
    }

    let mut settings = Settings::default();
    if let Some(raw) = &raw.settings {
        if let Some(end) = raw.end_sessions {
            settings.end_sessions = end;
        }
        if let Some(group) = &raw.admins {
            let name = group.get_ref().trim().trim_start_matches('@');
            match dir.group_members(name) {
                Ok(Some(uids)) => settings.admins = Some((name.to_owned(), uids)),
                Ok(None) => errs.push(&group.span(), format!("unknown admin group `{name}` (looked up through NSS)")),
                Err(e) => errs.push(&group.span(), format!("cannot look up group `{name}`: {e}")),
            }
        }
    }

    if !errs.list.is_empty() {
        return Err(PolicyErrors(errs.list));
    }
    Ok(Policy { source: path.to_owned(), protect_ports: protect_ports.into_iter().collect(), servers, vms, settings })
}

struct Errors<'a> {
    text: &'a str,
    file: &'a Path,
    list: Vec<PolicyError>,
}

impl Errors<'_> {
    fn push(&mut self, span: &Range<usize>, message: String) {
        let (line, col) = line_col(self.text, span.start);
        self.list.push(PolicyError { file: self.file.to_owned(), line, col, message });
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

fn port_spec(value: &Spanned<toml::Value>, errs: &mut Errors<'_>) -> Option<std::ops::RangeInclusive<u16>> {
    let span = value.span();
    let bad = |errs: &mut Errors<'_>, what: String| {
        errs.push(&span, format!("{what}: a port is 1-65535, a range is \"LOW-HIGH\" with LOW <= HIGH"));
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

fn server_from_raw(name: &Spanned<String>, raw: &RawServer, errs: &mut Errors<'_>) -> Option<Server> {
    let mut literals: Vec<&Spanned<String>> = Vec::new();
    if let Some(a) = &raw.address {
        literals.push(a);
    }
    if let Some(list) = &raw.addresses {
        literals.extend(list.get_ref().iter());
        if list.get_ref().is_empty() {
            errs.push(&list.span(), format!("server `{}` has an empty `addresses` list", name.get_ref()));
        }
    }
    if literals.is_empty() {
        errs.push(
            &name.span(),
            format!("server `{}` needs `address = \"...\"` or `addresses = [...]`", name.get_ref()),
        );
        return None;
    }
    let mut addrs = Vec::new();
    let mut ok = true;
    for lit in literals {
        match lit.get_ref().trim().parse::<IpAddr>() {
            Ok(ip) => addrs.push(ip),
            Err(_) => {
                ok = false;
                errs.push(
                    &lit.span(),
                    format!(
                        "server `{}`: `{}` is not an IPv4 or IPv6 address literal",
                        name.get_ref(),
                        lit.get_ref()
                    ),
                );
            }
        }
    }
    addrs.sort();
    addrs.dedup();
    ok.then(|| Server { name: name.get_ref().clone(), target: ServerTarget::Addresses(addrs) })
}

fn grantee(entry: &Spanned<String>, dir: &dyn Directory, errs: &mut Errors<'_>) -> Option<Grantee> {
    let text = entry.get_ref().trim();
    let span = entry.span();
    if let Some(num) = text.strip_prefix('#') {
        return match num.parse::<u32>() {
            Ok(uid) if uid != u32::MAX => Some(Grantee { principal: Principal::Uid(uid), uids: [uid].into() }),
            _ => {
                errs.push(&span, format!("`{text}`: `#` must be followed by a numeric uid"));
                None
            }
        };
    }
    if let Some(group) = text.strip_prefix('@') {
        return match dir.group_members(group) {
            Ok(Some(uids)) => Some(Grantee { principal: Principal::Group(group.to_owned()), uids }),
            Ok(None) => {
                errs.push(&span, format!("unknown group `{group}` (looked up through NSS)"));
                None
            }
            Err(e) => {
                errs.push(&span, format!("cannot look up group `{group}`: {e}"));
                None
            }
        };
    }
    if text.is_empty() {
        errs.push(&span, "empty `allow` entry".into());
        return None;
    }
    match dir.user_uid(text) {
        Ok(Some(uid)) => Some(Grantee { principal: Principal::User(text.to_owned()), uids: [uid].into() }),
        Ok(None) => {
            errs.push(
                &span,
                format!("unknown user `{text}` (looked up through NSS; write `#UID` for a uid without a passwd entry)"),
            );
            None
        }
        Err(e) => {
            errs.push(&span, format!("cannot look up user `{text}`: {e}"));
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

    fn ok(text: &str) -> Policy {
        parse(text, Path::new("p.toml"), &dir()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        parse(text, Path::new("p.toml"), &dir()).expect_err("policy should be rejected").to_string()
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
        assert_eq!(p.servers["mysrv"].target, ServerTarget::Addresses(vec!["192.168.2.2".parse().unwrap()]));
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
        let p = ok("[servers.s]\naddresses = [\"10.0.0.1\", \"fd00::1\"]\n[vms.v]\nserver=\"s\"\nports=[1]\n");
        assert_eq!(
            p.servers["s"].target,
            ServerTarget::Addresses(vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()])
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
        let e = err("[vms.v]\nserver = \"localhost\"\nports = [1]\nallow = [\"nobody-here\", \"@nogroup-here\"]\n");
        assert!(e.contains("p.toml:4:10: unknown user `nobody-here`"), "{e}");
        assert!(e.contains("p.toml:4:25: unknown group `nogroup-here`"), "{e}");
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
        assert!(e.starts_with("p.toml:2:10: vm `v` names server `nosuch`"), "{e}");
    }

    #[test]
    fn bad_address_and_localhost_redefinition() {
        let e = err("[servers.localhost]\naddress = \"127.0.0.1\"\n[servers.s]\naddress = \"not-an-ip\"\n");
        assert!(e.contains("p.toml:1:10: `localhost` is built in"), "{e}");
        assert!(e.contains("p.toml:4:11: server `s`: `not-an-ip` is not an IPv4 or IPv6"), "{e}");
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
        assert!(e.contains("p.toml:2:10: unknown admin group `nogroup-here`"), "{e}");
    }

    #[test]
    fn vm_without_ports() {
        let e = err("[vms.v]\nserver = \"localhost\"\nports = []\n");
        assert!(e.contains("vm `v` has no ports"), "{e}");
    }
}
