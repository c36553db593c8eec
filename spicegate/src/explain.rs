//! `spicegate why`: the decision the kernel takes for a user and an
//! endpoint, and the policy entry that decides it. Pure.

use std::net::IpAddr;

use spicegate_common::{PORT_GUARD_ALL, RuleKey};

use crate::{
    compile::{Compiled, Dest, canonical, decide, key_addr},
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
}

/// How the kernel folds a destination, given the table in force.
pub fn kernel_dest(c: &Compiled, ip: IpAddr) -> Dest {
    let ip = canonical(ip);
    if ip.is_loopback() || ip.is_unspecified() || c.rules.contains_key(&RuleKey::local(key_addr(ip))) {
        Dest::Local
    } else {
        Dest::Remote(ip)
    }
}

pub fn explain(c: &Compiled, policy: &Policy, temp: &[TempGrant], uid: u32, user: &str, ip: IpAddr, port: u16) -> Verdict {
    let allow = decide(c, uid, ip, port);
    let ep = Endpoint(canonical(ip), port);
    let Some(port_rule) = c.rules.get(&RuleKey::port(port)) else {
        return Verdict { allow, vm: None, reason: format!("not guarded: no rule guards port {port}") };
    };
    let dest = kernel_dest(c, ip);
    let info = c.endpoints.get(&(dest, port));
    let everywhere = port_rule.flags & PORT_GUARD_ALL != 0;
    let local_note = if dest == Dest::Local && !matches!(canonical(ip), a if a.is_loopback()) {
        " (a local address: decided as localhost)"
    } else {
        ""
    };
    let Some(info) = info else {
        if everywhere {
            return Verdict {
                allow,
                vm: None,
                reason: format!(
                    "[protect] guards port {port} on every address and no VM grants {user} {ep}{local_note}"
                ),
            };
        }
        return Verdict {
            allow,
            vm: None,
            reason: format!("not guarded: port {port} is guarded only on other addresses than {ep}"),
        };
    };
    let vm = Some(info.vm.clone());
    if allow {
        if info.temp_uids.contains(&uid) {
            let until = temp
                .iter()
                .find(|g| g.uid == uid && g.vm == info.vm)
                .and_then(|g| g.expires)
                .map_or_else(|| "until revoked".to_owned(), |e| format!("until {}", crate::grants::rfc3339(e)));
            return Verdict { allow, vm, reason: format!("temporary grant of vm `{}` to {user}, {until}", info.vm) };
        }
        let via: Vec<String> = policy
            .vms
            .get(&info.vm)
            .map(|v| v.allow.iter().filter(|g| g.uids.contains(&uid)).map(|g| format!("`{}`", g.principal)).collect())
            .unwrap_or_default();
        return Verdict {
            allow,
            vm,
            reason: format!("vm `{}` allows {user} (allow entry {}){local_note}", info.vm, via.join(", ")),
        };
    }
    Verdict { allow, vm, reason: format!("vm `{}` ({ep}) does not allow {user}{local_note}", info.vm) }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        compile::{LocalAddrs, compile},
        directory::FakeDirectory,
        policy::parse,
    };

    #[test]
    fn explains_each_kind_of_decision() {
        let dir = FakeDirectory::default().user("myself", 1000).user("ralph", 1001).group("bk", &[1002]);
        let p = parse(
            "[protect]\nports=[5930, 20001]\n[servers.s]\naddress=\"192.168.2.2\"\n\
             [vms.d]\nserver=\"s\"\nports=[20002]\nallow=[\"myself\", \"@bk\"]\n\
             [vms.w]\nserver=\"localhost\"\nports=[5930]\nallow=[\"ralph\"]\n",
            Path::new("p.toml"),
            &dir,
        )
        .expect("valid");
        let temp = vec![TempGrant { uid: 7, user: "seven".into(), vm: "w".into(), expires: None, granted_at: 0, granted_by: 0 }];
        let c = compile(&p, &LocalAddrs::new(), &temp).expect("compiles");
        let why = |uid, user, ip: &str, port| explain(&c, &p, &temp, uid, user, ip.parse().expect("ip"), port);

        let v = why(1002, "anne", "192.168.2.2", 20002);
        assert!(v.allow && v.reason.contains("allow entry `@bk`"), "{v:?}");
        let v = why(1001, "ralph", "192.168.2.2", 20002);
        assert!(!v.allow && v.reason == "vm `d` (192.168.2.2:20002) does not allow ralph", "{v:?}");
        let v = why(1000, "myself", "10.0.0.1", 20001);
        assert!(!v.allow && v.reason.starts_with("[protect] guards port 20001"), "{v:?}");
        let v = why(1000, "myself", "10.0.0.1", 20002);
        assert!(v.allow && v.reason.starts_with("not guarded: port 20002 is guarded only on other"), "{v:?}");
        let v = why(1000, "myself", "10.0.0.1", 22);
        assert!(v.allow && v.reason == "not guarded: no rule guards port 22", "{v:?}");
        let v = why(7, "seven", "::1", 5930);
        assert!(v.allow && v.reason.contains("temporary grant of vm `w` to seven, until revoked"), "{v:?}");
        assert_eq!(v.vm.as_deref(), Some("w"));
    }
}
