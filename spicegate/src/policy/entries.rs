//! Servers, VMs, schedules and `allow` entries, one by one.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use toml::Spanned;

use super::*;
use super::{
    errors::*,
    raw::*,
    validate::{parse_mode, port_spec},
};
use crate::directory::Directory;

pub(super) fn server_from_raw(
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
pub(super) fn is_hostname(s: &str) -> bool {
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

pub(super) fn vm_from_raw(
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
    let allow = allow_from_raw(file, &vm.allow, env.dir, errs);
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

/// A VM's `allow` list: what [`gather_uids`] makes of its entries, but a
/// list of many `#UID` entries goes straight into one sorted array
/// instead of a [`Grantee`] each first.
fn allow_from_raw(
    file: usize,
    raw: &RawAllow,
    dir: &dyn Directory,
    errs: &mut Errors<'_>,
) -> Vec<Grantee> {
    if raw.uids.len() <= UIDS_APART {
        let allow = raw
            .entries()
            .filter_map(|e| match e {
                RawItem::Uid(uid) => Some(Grantee {
                    principal: Principal::Uid(uid),
                    uids: Uids::One(uid),
                }),
                RawItem::Other(e) => grantee(file, e, dir, errs),
            })
            .collect();
        return gather_uids(allow);
    }
    let mut uids = raw.uids.clone();
    let mut out = Vec::with_capacity(raw.others.len() + 1);
    // The gathered entry stands where the first `#UID` was: after the
    // other entries written before it (those that resolved).
    let mut at = None;
    for (before, e) in &raw.others {
        if *before > 0 {
            at.get_or_insert(out.len());
        }
        match grantee(file, e, dir, errs) {
            Some(Grantee {
                principal: Principal::Uid(u),
                ..
            }) => {
                at.get_or_insert(out.len());
                uids.push(u);
            }
            Some(g) => out.push(g),
            None => {}
        }
    }
    let at = at.unwrap_or(out.len());
    let numeric = uids.len();
    out.insert(at, gathered(numeric, uids));
    out
}

pub(super) fn schedule_from_raw(
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
                match super::windows::parse_day(d.get_ref()) {
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
        Some(h) => match super::windows::parse_hours(h.get_ref()) {
            Ok(w) => Some(w),
            Err(e) => {
                errs.push(file, &h.span(), format!("hours `{}`: {e}", h.get_ref()));
                None
            }
        },
    };
    Some(Schedule { allow, days, hours })
}

pub(super) fn grantee(
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
