//! From the raw files to the model: names defined twice, settings,
//! ports; every error with its file, line and column.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
    path::Path,
    sync::Arc,
    time::Duration,
};

use toml::Spanned;

use super::*;
use super::{cache::Pass, entries::*, errors::*, raw::*};

pub(super) fn parse_sources_with(
    sources: &[Source],
    env: &Env<'_>,
    lenient: bool,
    check_paths: bool,
    cache: Option<&ParseCache>,
) -> Result<Policy, PolicyErrors> {
    let mut errs = Errors {
        sources,
        views: Vec::new(),
        list: Vec::new(),
        lenient,
        check_paths,
        unresolved: Vec::new(),
    };
    let mut raws: Vec<(usize, Arc<RawPolicy>)> = Vec::new();
    let mut pass = Pass::new(cache);
    for (i, src) in sources.iter().enumerate() {
        // A very large text a piece at a time (see policy_split), each
        // piece parsed last time taken from the cache; any trouble, and
        // it is parsed whole, for the exact errors.
        let pieces = crate::policy_split::split(&src.text).and_then(|docs| {
            docs.into_iter()
                .map(|d| Some((pass.piece(&d.text)?, d.map)))
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
            Ok(raw) => raws.push((view, Arc::new(raw))),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                errs.push(view, &span, e.message().trim_end().to_owned());
            }
        }
    }
    pass.finish();
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

pub(super) fn parse_mode(file: usize, v: &Spanned<String>, errs: &mut Errors<'_>) -> Option<Mode> {
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

pub(super) fn settings_from_raw(
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

pub(super) fn port_spec(
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
