//! `spicegate why`: the decision the kernel takes for a user and an
//! endpoint, and the policy entry that decides it. Pure.

use std::net::IpAddr;

use spicegate_common::{PORT_GUARD_ALL, RuleKey};

use crate::compile::Via;
use crate::{
    compile::{Compiled, Dest, canonical, decide},
    events::Endpoint,
    grants::TempGrant,
    policy::Policy,
};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub allow: bool,
    /// The VM the endpoint belongs to, if any.
    pub vm: Option<String>,
    /// One sentence naming the deciding entry.
    pub reason: String,
    /// A few words for the person at the keyboard: "not granted",
    /// "outside mon,tue", "only for the console user".
    pub short: String,
}

/// Whether `uid` may listen on `port` (bind it): `None` when the port is not
/// a guarded local port, else a sentence.
pub fn explain_bind(c: &Compiled, uid: u32, user: &str, port: u16) -> Option<String> {
    if c.listen_ports.binary_search(&port).is_err() {
        return None;
    }
    Some(if uid == 0 {
        format!("{user} may listen on port {port}: root always may")
    } else if c.listeners.binary_search(&uid).is_ok() {
        format!("{user} may listen on port {port}: a `[protect] listeners` entry")
    } else {
        format!(
            "{user} may not listen on port {port} (on any address): only root and `[protect] listeners` may serve a guarded local port"
        )
    })
}

/// How the kernel folds a destination, given the table in force.
pub fn kernel_dest(c: &Compiled, ip: IpAddr) -> Dest {
    if crate::compile::table_is_local(c, ip) {
        Dest::Local
    } else {
        Dest::Remote(canonical(ip))
    }
}

/// What `why` needs besides the table.
pub struct Context<'a> {
    pub policy: &'a Policy,
    pub temp: &'a [TempGrant],
    pub tz: &'a jiff::tz::TimeZone,
    /// Unix seconds of the daemon's clock.
    pub now: i64,
    pub console: Option<u32>,
}

pub fn explain(
    c: &Compiled,
    ctx: &Context<'_>,
    uid: u32,
    user: &str,
    ip: IpAddr,
    port: u16,
) -> Verdict {
    let allow_now = decide(c, uid, ip, port);
    let ep = Endpoint(canonical(ip), port);
    let Some(port_rule) = c.rules.get(&RuleKey::port(port)) else {
        return Verdict {
            allow: allow_now,
            vm: None,
            reason: format!("not guarded: no rule guards port {port}"),
            short: "not guarded".into(),
        };
    };
    let dest = kernel_dest(c, ip);
    let info = c.endpoints.get(&(dest, port));
    let everywhere = port_rule.flags & PORT_GUARD_ALL != 0;
    let local_note =
        if dest == Dest::Local && !canonical(ip).is_loopback() && !canonical(ip).is_unspecified() {
            " (a local address: decided as localhost)"
        } else {
            ""
        };
    let audit_note = " [audit mode: logged, not refused]";
    let Some(info) = info else {
        if everywhere {
            let audit = port_rule.flags & spicegate_common::PORT_AUDIT != 0;
            return Verdict {
                allow: allow_now,
                vm: None,
                reason: format!(
                    "[protect] guards port {port} on every address and no VM grants {user} {ep}{local_note}{}",
                    if audit { audit_note } else { "" }
                ),
                short: format!("port {port} is protected and no VM there is granted to you"),
            };
        }
        return Verdict {
            allow: allow_now,
            vm: None,
            reason: format!(
                "not guarded: port {port} is guarded only on other addresses than {ep}"
            ),
            short: "not guarded".into(),
        };
    };
    let vm = Some(info.vm.clone());
    let granted = info.uids.contains(&uid);
    let window = |uid: u32| -> String {
        match crate::schedule::next_change(ctx.policy, &info.vm, uid, ctx.now, ctx.tz, ctx.console)
        {
            Some(t) => crate::grants::rfc3339(u64::try_from(t).unwrap_or(0)),
            None => "not within 8 days".into(),
        }
    };
    let in_schedule = crate::schedule::named_in_schedule(ctx.policy, &info.vm, uid, ctx.console);
    let schedules_text = || -> String {
        ctx.policy
            .vms
            .get(&info.vm)
            .map(|v| {
                v.schedules
                    .iter()
                    .map(crate::policy::Schedule::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    };
    let vm_def = ctx.policy.vms.get(&info.vm);
    let via = if granted {
        // An endpoint's VM is always in the policy it was compiled from.
        Some(vm_def.and_then(|v| info.via(v, uid)).unwrap_or(Via::Policy))
    } else {
        None
    };
    match via {
        Some(Via::Temporary) => {
            let until = ctx
                .temp
                .iter()
                .find(|g| g.uid == uid && g.vm == info.vm)
                .and_then(|g| g.expires)
                .map_or_else(
                    || "until revoked".to_owned(),
                    |e| format!("until {}", crate::grants::rfc3339(e)),
                );
            return Verdict {
                allow: true,
                vm,
                reason: format!("temporary grant of vm `{}` to {user}, {until}", info.vm),
                short: format!("granted temporarily, {until}"),
            };
        }
        Some(Via::Policy) => {
            let entries: Vec<String> = vm_def
                .map(|v| {
                    v.allow
                        .iter()
                        .filter(|g| g.uids.contains(&uid))
                        .map(|g| match g.principal {
                            crate::policy::Principal::Uids(_) => format!("`#{uid}`"),
                            _ => format!("`{}`", g.principal),
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Verdict {
                allow: true,
                vm,
                reason: format!(
                    "vm `{}` allows {user} (allow entry {}){local_note}",
                    info.vm,
                    entries.join(", ")
                ),
                short: "granted".into(),
            };
        }
        Some(Via::Console) => {
            return Verdict {
                allow: true,
                vm,
                reason: format!(
                    "vm `{}` allows `@console`, and {user} holds the active session on seat0",
                    info.vm
                ),
                short: "granted to the console user".into(),
            };
        }
        Some(Via::Schedule) => {
            return Verdict {
                allow: true,
                vm,
                reason: format!(
                    "vm `{}` allows {user} by schedule ({}); access ends {}",
                    info.vm,
                    schedules_text(),
                    window(uid)
                ),
                short: format!("granted until {}", window(uid)),
            };
        }
        None => {}
    }
    let audit = if info.mode == crate::policy::Mode::Audit {
        audit_note
    } else {
        ""
    };
    let short = if in_schedule {
        format!("outside {} (next access {})", schedules_text(), window(uid))
    } else if ctx
        .policy
        .vms
        .get(&info.vm)
        .is_some_and(crate::policy::Vm::allows_console)
    {
        "only for the console user".to_owned()
    } else {
        "not granted".to_owned()
    };
    let reason = if in_schedule {
        format!(
            "vm `{}` allows {user} only by schedule ({}), not now; access next begins {}{audit}",
            info.vm,
            schedules_text(),
            window(uid)
        )
    } else if ctx
        .policy
        .vms
        .get(&info.vm)
        .is_some_and(crate::policy::Vm::allows_console)
    {
        format!(
            "vm `{}` ({ep}) allows only `@console` (the active seat0 session user), and {user} is not it{audit}",
            info.vm
        )
    } else {
        format!(
            "vm `{}` ({ep}) does not allow {user}{local_note}{audit}",
            info.vm
        )
    };
    Verdict {
        allow: allow_now,
        vm,
        reason,
        short,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        compile::{Dynamic, LocalAddrs, compile},
        directory::FakeDirectory,
        policy::parse,
    };

    #[test]
    fn explains_each_kind_of_decision() {
        let dir = FakeDirectory::default()
            .user("myself", 1000)
            .user("ralph", 1001)
            .group("bk", &[1002]);
        let p = parse(
            "[protect]\nports=[5930, 20001]\n[servers.s]\naddress=\"192.168.2.2\"\n\
             [vms.d]\nserver=\"s\"\nports=[20002]\nallow=[\"myself\", \"@bk\"]\n\
             [vms.w]\nserver=\"localhost\"\nports=[5930]\nallow=[\"ralph\"]\n",
            Path::new("p.toml"),
            &dir,
        )
        .expect("valid");
        let temp = vec![TempGrant {
            uid: 7,
            user: "seven".into(),
            vm: "w".into(),
            expires: None,
            granted_at: 0,
            granted_by: 0,
        }];
        let c = compile(
            &p,
            &LocalAddrs::new(),
            &Dynamic {
                temp: &temp,
                ..Dynamic::default()
            },
        )
        .expect("compiles");
        let tz = jiff::tz::TimeZone::UTC;
        let ctx = Context {
            policy: &p,
            temp: &temp,
            tz: &tz,
            now: 0,
            console: None,
        };
        let why =
            |uid, user, ip: &str, port| explain(&c, &ctx, uid, user, ip.parse().expect("ip"), port);

        let v = why(1002, "anne", "192.168.2.2", 20002);
        assert!(v.allow && v.reason.contains("allow entry `@bk`"), "{v:?}");
        let v = why(1001, "ralph", "192.168.2.2", 20002);
        assert!(
            !v.allow && v.reason == "vm `d` (192.168.2.2:20002) does not allow ralph",
            "{v:?}"
        );
        let v = why(1000, "myself", "10.0.0.1", 20001);
        assert!(
            !v.allow && v.reason.starts_with("[protect] guards port 20001"),
            "{v:?}"
        );
        let v = why(1000, "myself", "10.0.0.1", 20002);
        assert!(
            v.allow
                && v.reason
                    .starts_with("not guarded: port 20002 is guarded only on other"),
            "{v:?}"
        );
        let v = why(1000, "myself", "10.0.0.1", 22);
        assert!(
            v.allow && v.reason == "not guarded: no rule guards port 22",
            "{v:?}"
        );
        let v = why(7, "seven", "::1", 5930);
        assert!(
            v.allow
                && v.reason
                    .contains("temporary grant of vm `w` to seven, until revoked"),
            "{v:?}"
        );
        assert_eq!(v.vm.as_deref(), Some("w"));
    }
}
