//! The answers: `status`, `list`, `why`, and the pages of users and of
//! the report (their types in proto/). Names are filled in off the
//! engine.

use super::*;
use crate::{
    compile::Via,
    explain::{Context, explain, explain_bind},
    proto::{
        Counts, ListVm, Listeners, OverallMode, PolicyStatus, ScheduleUser, TableStatus,
        TemporaryGrant, UnresolvedName, UserRef, VmStatus, VmUser,
    },
};

impl Engine {
    /// A page of [`USERS_PAGE`] users who may open `vm` now, after uid
    /// `after`; `next_after` is set while there are more.
    pub(super) fn users_page(&self, vm: &str, after: Option<u32>) -> Result<UsersPage, String> {
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
        Ok(UsersPage {
            next_after,
            users,
            users_total: info.map_or(0, |i| i.uids.len()),
            vm: vm.to_owned(),
        })
    }

    /// `why`: the kernel's decision for the query, and the entry behind it.
    pub(super) fn why(&self, q: &WhyQuery) -> WhyAnswer {
        let clock = self.clock();
        let ctx = Context {
            policy: &self.loaded.policy,
            temp: &self.grants.active(u64::try_from(clock).unwrap_or(0)),
            tz: &schedule::zone(&self.loaded.policy),
            now: clock,
            console: self.console,
        };
        WhyAnswer::new(
            explain(&self.compiled, &ctx, q.uid, &q.user, q.addr, q.port),
            explain_bind(&self.compiled, q.uid, &q.user, q.port),
        )
    }

    /// A page of `report` (see report.rs): bounded, names left out.
    pub(super) fn report_page(&self, after: Option<u32>, only: Option<u32>) -> crate::report::Page {
        let now = u64::try_from(self.clock()).unwrap_or(0);
        let temp = self.grants.active(now);
        crate::report::page(&self.loaded.policy, &temp, true, after, only)
    }

    /// `list`: the VMs `uid` may open now or later, and how to reach them.
    /// Answers for that uid only.
    pub fn list(&self, uid: u32) -> ListAnswer {
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
            vms.push(ListVm {
                addresses,
                allowed_now: now,
                ca_file: vm.ca_file.clone(),
                console_only: console_vm && !now && !in_schedule,
                host,
                name: vm.name.clone(),
                next_change: next.map(|t| rfc3339(u64::try_from(t).unwrap_or(0))),
                port: vm.plain_port(),
                schedules: vm
                    .schedules
                    .iter()
                    .map(policy::Schedule::describe)
                    .collect(),
                server: vm.server.clone(),
                tls: vm.tls_port.is_some(),
                tls_port: vm.tls_port,
                via: via.map(str::to_owned),
            });
        }
        ListAnswer {
            client: self.loaded.policy.settings.client.clone(),
            uid,
            // Filled in by the control handler (NSS is not asked here).
            user: None,
            vms,
        }
    }

    /// The `status` document. Field names are stable (docs/status.md).
    pub fn status(&self) -> Status {
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
        // Names (`user: None`) are filled in by the control handler, off
        // this thread (see control::fill_user_names).
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
            let users: Vec<VmUser> = info
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
            let windows: Vec<ScheduleUser> = named
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
                    ScheduleUser {
                        next_change: next.map(|t| rfc3339(u64::try_from(t).unwrap_or(0))),
                        next_change_unix: next,
                        open_now: open,
                        uid: *u,
                        user: None,
                    }
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
            vms.push(VmStatus {
                allowed,
                audited,
                denied,
                endpoints,
                mode: self.loaded.policy.vm_mode(vm),
                name: vm.name.clone(),
                schedule_users: windows,
                schedule_users_total: named.len(),
                schedules,
                server: vm.server.clone(),
                users,
                users_total,
            });
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
            (true, true) => OverallMode::Mixed,
            (false, true) => OverallMode::Audit,
            _ => OverallMode::Enforce,
        };
        let temporary: Vec<TemporaryGrant> = self
            .grants
            .active(now)
            .iter()
            .map(|g| TemporaryGrant {
                active: self.loaded.policy.vms.contains_key(&g.vm),
                expires: g.expires.map(rfc3339),
                expires_in_secs: g.expires.map(|e| e.saturating_sub(now)),
                expires_unix: g.expires,
                uid: g.uid,
                user: g.user.clone(),
                vm: g.vm.clone(),
            })
            .collect();
        let policy = &self.loaded.policy;
        let (generation, overlay_entries, map_writes) = self.kernel.table_stats();
        Status {
            attached: kernel::attached(&self.cfg.paths, &self.cfg.cgroup),
            cgroup: self.cfg.cgroup.clone(),
            console_user: self.console.map(|uid| UserRef { uid, user: None }),
            counts: Counts {
                grants: self.compiled.grant_count(),
                guarded_endpoints: self.compiled.endpoints.len(),
                kernel_entries: self.kernel.table_entries(),
                ports_guarded_everywhere: self.compiled.guarded_everywhere.len(),
                vms: policy.vms.len(),
            },
            // Names of the policy that did not resolve (a start while NSS
            // or DNS was down): granted nothing until they do.
            degraded: !policy.unresolved.is_empty(),
            drops: crate::denials::DropCounts::new(
                self.kernel
                    .drops()
                    .unwrap_or_default()
                    .since(self.drops_at_start),
                self.denial_stats
                    .as_deref()
                    .unwrap_or(&crate::denials::Stats::default()),
            ),
            last_reload: self.last_reload.clone(),
            listeners: Listeners {
                ports: self.compiled.listen_ports.clone(),
                users: self
                    .compiled
                    .listeners
                    .iter()
                    .map(|&uid| UserRef { uid, user: None })
                    .collect(),
            },
            mode,
            pin_dir: self.cfg.paths.dir.clone(),
            policy: PolicyStatus {
                admins: policy.settings.admins.as_ref().map(|(g, _)| g.clone()),
                end_sessions: policy.settings.end_sessions,
                files: policy.files.clone(),
                loaded_at: rfc3339(self.loaded_at),
                loaded_at_unix: self.loaded_at,
                path: self.cfg.policy_path.clone(),
                sha256: self.loaded.sha256.clone(),
                source: match self.source {
                    Source::File => "file",
                    Source::LastGood => "last-good",
                }
                .to_owned(),
            },
            protect_audited,
            protect_denied,
            running: true,
            started_at: rfc3339(self.started_at),
            // docs/status.md: 2 lists at most STATUS_USERS users per VM.
            status_format: STATUS_FORMAT,
            // How changes reach the kernel: the table in force (its
            // generation), the overlay of grants changed since it was
            // built, and what the last change cost.
            table: TableStatus {
                generation,
                last_change: self.last_change.clone(),
                map_writes,
                overlay_entries,
            },
            // The policy slot holds the table this daemon installed (the
            // watchdog puts it back within a second if not).
            table_in_force: self.kernel.table_intact().unwrap_or(false),
            temporary_grants: temporary,
            time_zone: tz.iana_name().unwrap_or("system").to_owned(),
            unresolved: policy.unresolved.iter().map(UnresolvedName::from).collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            vms,
        }
    }
}

/// One `users[]` entry of `status`; the name is filled in off the engine.
pub(super) fn user_entry(i: &crate::compile::EndpointInfo, vm: &policy::Vm, u: u32) -> VmUser {
    let via = i.via(vm, u).unwrap_or(Via::Policy);
    VmUser {
        temporary: via == Via::Temporary,
        uid: u,
        user: None,
        via,
    }
}
