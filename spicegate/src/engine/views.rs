//! The answers: `status`, `list`, and the pages of users and of the
//! report. Names are filled in off the engine.

use super::*;
use crate::compile::Via;

impl Engine {
    /// A page of [`USERS_PAGE`] users who may open `vm` now, after uid
    /// `after`; `next_after` is set while there are more.
    pub(super) fn users_page(&self, vm: &str, after: Option<u32>) -> Result<Value, String> {
        let Some(v) = self.loaded.policy.vms.get(vm) else {
            return Err(format!("no vm `{vm}` in the policy"));
        };
        let info = self.compiled.endpoints.values().find(|i| i.vm == vm);
        let (users, next_after) = match info {
            None => (Vec::new(), None),
            Some(i) => {
                let range = match after {
                    Some(a) => i
                        .uids
                        .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
                    None => i.uids.range(..),
                };
                let page: Vec<u32> = range.take(USERS_PAGE + 1).copied().collect();
                let more = page.len() > USERS_PAGE;
                let page = &page[..page.len().min(USERS_PAGE)];
                (
                    page.iter().map(|u| user_entry(i, v, *u)).collect(),
                    more.then(|| page.last().copied()).flatten(),
                )
            }
        };
        Ok(json!({
            "vm": vm,
            "users_total": info.map_or(0, |i| i.uids.len()),
            "users": users,
            "next_after": next_after,
        }))
    }

    /// A page of `report` (see report.rs): bounded, names left out.
    pub(super) fn report_page(&self, after: Option<u32>, only: Option<u32>) -> crate::report::Page {
        let now = u64::try_from(self.clock()).unwrap_or(0);
        let temp = self.grants.active(now);
        crate::report::page(&self.loaded.policy, &temp, true, after, only)
    }

    /// `list`: the VMs `uid` may open now or later, and how to reach them.
    /// Answers for that uid only.
    pub fn list(&self, uid: u32) -> Value {
        let clock = self.clock();
        let tz = schedule::zone(&self.loaded.policy);
        let mut vms = Vec::new();
        for vm in self.loaded.policy.vms.values() {
            let info = self.compiled.endpoints.values().find(|i| i.vm == vm.name);
            let now = info.is_some_and(|i| i.uids.contains(&uid));
            let in_schedule =
                schedule::named_in_schedule(&self.loaded.policy, &vm.name, uid, self.console);
            let console_vm = vm.uses_console();
            if !now && !in_schedule && !console_vm {
                continue;
            }
            let via = info.map(|i| i.via(vm, uid).map_or("none", Via::as_str));
            let next = in_schedule
                .then(|| {
                    schedule::next_change(
                        &self.loaded.policy,
                        &vm.name,
                        uid,
                        clock,
                        &tz,
                        self.console,
                    )
                })
                .flatten();
            // A temporary grant ends at its expiry, whatever the schedule.
            let next = if via == Some("temporary") {
                self.grants
                    .active(u64::try_from(clock).unwrap_or(0))
                    .iter()
                    .filter(|g| g.uid == uid && g.vm == vm.name)
                    .filter_map(|g| g.expires)
                    .max()
                    .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
            } else {
                next
            };
            let server = self.loaded.policy.servers.get(&vm.server);
            let (host, addresses) = match server.map(|s| (&s.target, &s.hostnames)) {
                Some((policy::ServerTarget::Addresses(a), names)) => (
                    names
                        .first()
                        .cloned()
                        .or_else(|| a.first().map(ToString::to_string))
                        .unwrap_or_default(),
                    a.iter().map(ToString::to_string).collect::<Vec<_>>(),
                ),
                _ => ("localhost".to_owned(), vec![]),
            };
            vms.push(json!({
                "name": vm.name,
                "server": vm.server,
                "host": host,
                "addresses": addresses,
                "port": vm.plain_port(),
                "tls_port": vm.tls_port,
                "tls": vm.tls_port.is_some(),
                "ca_file": vm.ca_file,
                "allowed_now": now,
                "via": via,
                "schedules": vm.schedules.iter().map(policy::Schedule::describe).collect::<Vec<_>>(),
                "console_only": console_vm && !now && !in_schedule,
                "next_change": next.map(|t| rfc3339(u64::try_from(t).unwrap_or(0))),
            }));
        }
        json!({
            "uid": uid,
            // Filled in by the control handler (NSS is not asked here).
            "user": Value::Null,
            "client": self.loaded.policy.settings.client,
            "vms": vms,
        })
    }

    /// The `status` document. Field names are stable (docs/status.md).
    pub fn status(&self) -> Value {
        let counters = self.kernel.counters().unwrap_or_default();
        let since = |id: u32| {
            let now = counters.get(&id).copied().unwrap_or_default();
            let then = self.counters_at_start.get(&id).copied().unwrap_or_default();
            (
                now.allowed.saturating_sub(then.allowed),
                now.denied.saturating_sub(then.denied),
                now.audited.saturating_sub(then.audited),
            )
        };
        let clock = self.clock();
        let tz = schedule::zone(&self.loaded.policy);
        // Names are filled in by the control handler, off this thread
        // (see control::fill_user_names).
        let name = |_: u32| Value::Null;
        let ids: BTreeMap<&str, u32> = self
            .compiled
            .vm_names
            .iter()
            .map(|(id, n)| (n.as_str(), *id))
            .collect();
        let mut vms = Vec::new();
        for vm in self.loaded.policy.vms.values() {
            let eps: Vec<(&(Dest, u16), _)> = self
                .compiled
                .endpoints
                .iter()
                .filter(|(_, i)| i.vm == vm.name)
                .collect();
            let endpoints: Vec<String> = eps
                .iter()
                .map(|((d, p), _)| match d {
                    Dest::Local => format!("localhost:{p}"),
                    d => format!("{d}:{p}"),
                })
                .collect();
            let info = eps.first().map(|(_, i)| *i);
            let users: Vec<Value> = info
                .map(|i| {
                    i.uids
                        .iter()
                        .take(STATUS_USERS)
                        .map(|u| user_entry(i, vm, *u))
                        .collect()
                })
                .unwrap_or_default();
            let users_total = info.map_or(0, |i| i.uids.len());
            // Everyone a schedule names, with when their access next changes.
            let mut named: BTreeSet<u32> = vm
                .schedules
                .iter()
                .flat_map(|s| s.allow.iter().flat_map(|g| g.uids.iter().copied()))
                .collect();
            named.extend(self.console.filter(|_| {
                vm.schedules.iter().any(|s| {
                    s.allow
                        .iter()
                        .any(|g| g.principal == policy::Principal::Console)
                })
            }));
            let windows: Vec<Value> = named
                .iter()
                .take(STATUS_USERS)
                .map(|u| {
                    let open = self.scheduled.contains(&(vm.name.clone(), *u));
                    let next = schedule::next_change(
                        &self.loaded.policy,
                        &vm.name,
                        *u,
                        clock,
                        &tz,
                        self.console,
                    );
                    json!({
                        "uid": u, "user": name(*u), "open_now": open,
                        "next_change": next.map(|t| rfc3339(u64::try_from(t).unwrap_or(0))),
                        "next_change_unix": next,
                    })
                })
                .collect();
            let schedules: Vec<String> = vm
                .schedules
                .iter()
                .map(|s| {
                    let who: Vec<String> =
                        s.allow.iter().map(|g| g.principal.to_string()).collect();
                    format!("{}: {}", s.describe(), who.join(", "))
                })
                .collect();
            let (allowed, denied, audited) =
                ids.get(vm.name.as_str()).map_or((0, 0, 0), |id| since(*id));
            vms.push(json!({
                "name": vm.name,
                "server": vm.server,
                "mode": self.loaded.policy.vm_mode(vm),
                "endpoints": endpoints,
                "users": users,
                "users_total": users_total,
                "schedules": schedules,
                "schedule_users": windows,
                "schedule_users_total": named.len(),
                "allowed": allowed,
                "denied": denied,
                "audited": audited,
            }));
        }
        let (_, protect_denied, protect_audited) = since(spicegate_common::NO_VM);
        let now = u64::try_from(clock).unwrap_or(0);
        let modes: BTreeSet<Mode> = self
            .loaded
            .policy
            .vms
            .values()
            .map(|v| self.loaded.policy.vm_mode(v))
            .chain([self.loaded.policy.settings.mode])
            .collect();
        let mode = match (modes.contains(&Mode::Enforce), modes.contains(&Mode::Audit)) {
            (true, true) => "mixed",
            (false, true) => "audit",
            _ => "enforce",
        };
        let temporary: Vec<Value> = self
            .grants
            .active(now)
            .iter()
            .map(|g| {
                json!({
                    "user": g.user, "uid": g.uid, "vm": g.vm,
                    "expires": g.expires.map(rfc3339), "expires_unix": g.expires,
                    "expires_in_secs": g.expires.map(|e| e.saturating_sub(now)),
                    "active": self.loaded.policy.vms.contains_key(&g.vm),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            // docs/status.md: 2 lists at most STATUS_USERS users per VM.
            "status_format": STATUS_FORMAT,
            "running": true,
            "attached": kernel::attached(&self.cfg.paths, &self.cfg.cgroup),
            // The policy slot holds the table this daemon installed (the
            // watchdog puts it back within a second if not).
            "table_in_force": self.kernel.table_intact().unwrap_or(false),
            "mode": mode,
            // Names of the policy that did not resolve (a start while NSS
            // or DNS was down): granted nothing until they do.
            "degraded": !self.loaded.policy.unresolved.is_empty(),
            "unresolved": self.loaded.policy.unresolved,
            "console_user": self.console.map(|u| json!({ "uid": u, "user": name(u) })),
            "time_zone": tz.iana_name().unwrap_or("system"),
            "cgroup": self.cfg.cgroup,
            "pin_dir": self.cfg.paths.dir,
            "started_at": rfc3339(self.started_at),
            "policy": {
                "path": self.cfg.policy_path,
                "source": match self.source { Source::File => "file", Source::LastGood => "last-good" },
                "sha256": self.loaded.sha256,
                "loaded_at": rfc3339(self.loaded_at),
                "loaded_at_unix": self.loaded_at,
                "end_sessions": self.loaded.policy.settings.end_sessions,
                "admins": self.loaded.policy.settings.admins.as_ref().map(|(g, _)| g.clone()),
                "files": self.loaded.policy.files,
            },
            "last_reload": self.last_reload,
            "counts": {
                "vms": self.loaded.policy.vms.len(),
                "guarded_endpoints": self.compiled.endpoints.len(),
                "ports_guarded_everywhere": self.compiled.guarded_everywhere.len(),
                "grants": self.compiled.grant_count(),
                "kernel_entries": self.compiled.entry_count(),
            },
            // How changes reach the kernel: the table in force (its
            // generation), the overlay of grants changed since it was
            // built, and what the last change cost.
            "table": {
                "generation": self.kernel.table_stats().0,
                "overlay_entries": self.kernel.table_stats().1,
                "map_writes": self.kernel.table_stats().2,
                "last_change": self.last_change,
            },
            "protect_denied": protect_denied,
            // Who may bind the guarded local ports besides root.
            "listeners": {
                "ports": self.compiled.listen_ports,
                "users": self.compiled.listeners.iter().map(|u| json!({ "uid": u, "user": Value::Null })).collect::<Vec<_>>(),
            },
            // Denials not logged since this daemon started, by reason.
            "drops": crate::denials::DropCounts::new(
                self.kernel.drops().unwrap_or_default().since(self.drops_at_start),
                self.denial_stats.as_deref().unwrap_or(&crate::denials::Stats::default()),
            ),
            "protect_audited": protect_audited,
            "vms": vms,
            "temporary_grants": temporary,
        })
    }
}

/// Version of the `status` document (docs/status.md).
pub const STATUS_FORMAT: u32 = 2;

/// Users listed per VM by `status` (and schedule users); the rest are
/// counted (`users_total`) and paged by `status --vm NAME --users`.
pub const STATUS_USERS: usize = 100;

/// Users per page of `status --vm NAME --users`.
pub const USERS_PAGE: usize = 1000;

/// One `users[]` entry of `status`; the name is filled in off the engine.
pub(super) fn user_entry(i: &crate::compile::EndpointInfo, vm: &policy::Vm, u: u32) -> Value {
    let via = i.via(vm, u).unwrap_or(Via::Policy);
    json!({ "uid": u, "user": Value::Null, "temporary": via == Via::Temporary, "via": via })
}
