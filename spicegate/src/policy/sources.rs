//! The main policy file and its `policy.d` drop-ins, and loading them.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::validate::parse_sources_with;
use super::*;
use crate::directory::Directory;

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
    parse_sources_with(sources, env, false, true, None)
}

/// [`parse_sources`] with the pieces of a large policy parsed last time
/// taken from `cache` (see [`ParseCache`]); the cache then holds this
/// text's pieces.
pub fn parse_sources_cached(
    sources: &[Source],
    env: &Env<'_>,
    cache: &ParseCache,
) -> Result<Policy, PolicyErrors> {
    parse_sources_with(sources, env, false, true, Some(cache))
}

/// Like [`parse_sources`], but a name that does not resolve (a user or
/// group NSS does not know, a hostname that does not resolve) is not an
/// error: it grants nothing, a server it names guards its VMs' ports on
/// every address with no one granted, and it is listed in
/// [`Policy::unresolved`]. Text errors (syntax, unknown keys, clashes) are
/// still errors. What the daemon enforces at start while LDAP or DNS is
/// down. The pieces of a large policy are kept in (and taken from)
/// `cache`, as [`parse_sources_cached`], for the first reload.
pub fn parse_sources_lenient(
    sources: &[Source],
    env: &Env<'_>,
    cache: &ParseCache,
) -> Result<Policy, PolicyErrors> {
    parse_sources_with(sources, env, true, true, Some(cache))
}

/// The policy in force parsed again for its names only (the resolver
/// thread): like [`parse_sources`] (or, `lenient`, its lenient form) but
/// without looking at the file system. A metrics directory removed
/// since the policy was applied must not stop groups and hostnames from
/// being followed. The pieces of a large policy come from `cache` when
/// given (the text is the one in force, so all of them are there): only
/// the names are looked up again, the TOML is not parsed anew.
pub fn reparse_names(
    sources: &[Source],
    env: &Env<'_>,
    lenient: bool,
    cache: Option<&ParseCache>,
) -> Result<Policy, PolicyErrors> {
    parse_sources_with(sources, env, lenient, false, cache)
}
