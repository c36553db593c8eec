use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use crate::{
    compile::{Compiled, Dest, compile},
    directory::{Directory, Nss},
    hostaddrs, policy,
};

/// Arguments of `spicegate check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy file to validate.
    #[arg(value_name = "FILE", default_value = super::DEFAULT_POLICY)]
    file: PathBuf,
    /// Also show who would gain and lose which VM compared with the policy
    /// the running daemon enforces (temporary grants aside).
    #[arg(long)]
    diff: bool,
}

pub fn check(args: &CheckArgs, socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    let policy = match policy::load(&args.file, &Nss) {
        Ok(p) => p,
        Err(errs) => {
            eprintln!("{errs}");
            eprintln!(
                "{}: {} error(s); nothing would be enforced",
                args.file.display(),
                errs.0.len()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let local = hostaddrs::current()?;
    let compiled = match compile(&policy, &local, &crate::compile::Dynamic::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", describe(&policy, &compiled, &Nss));
    if args.diff {
        let running: crate::control::Status =
            super::client::call(socket, &crate::control::Request::Status {})?;
        let mut old = std::collections::BTreeSet::new();
        for vm in &running.vms {
            let mut add = |u: &crate::control::VmUser| {
                if !u.temporary {
                    old.insert((vm.name.clone(), u.uid));
                }
            };
            if vm.users.len() < vm.users_total {
                // status lists the first users only: fetch them all.
                super::client::vm_users(socket, &vm.name, |u| {
                    add(&u);
                    Ok(())
                })?;
            } else {
                vm.users.iter().for_each(add);
            }
        }
        let new = crate::diff::access_pairs(&compiled);
        let lines = crate::diff::diff_lines(&old, &new, &Nss);
        println!("compared with the running policy:");
        if lines.is_empty() {
            println!("no change in who may open what");
        }
        for l in lines {
            println!("{l}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Human summary: who may reach which VM at which address:port.
pub fn describe(policy: &policy::Policy, c: &Compiled, dir: &dyn Directory) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", policy.source.display());
    if let Some(w) = policy.listener_warning() {
        let _ = writeln!(out, "warning: {w}");
    }
    if c.guarded_everywhere.is_empty() {
        let _ = writeln!(out, "guarded on every destination: (none)");
    } else {
        let _ = writeln!(
            out,
            "guarded on every destination: ports {}",
            ranges(&c.guarded_everywhere)
        );
    }
    if !c.listen_ports.is_empty() {
        let who: Vec<String> = std::iter::once("root".to_owned())
            .chain(c.listeners.iter().map(|u| match dir.user_name(*u) {
                Some(n) => format!("{n}({u})"),
                None => format!("#{u}"),
            }))
            .collect();
        let _ = writeln!(
            out,
            "may bind ports {} (any local address): {}",
            ranges(&c.listen_ports),
            who.join(", ")
        );
    }
    for vm in policy.vms.values() {
        let _ = writeln!(out, "vm {} (server {}):", vm.name, vm.server);
        for ((dest, port), info) in c.endpoints.iter().filter(|(_, i)| i.vm == vm.name) {
            // At most CHECK_USERS names per endpoint: each is an NSS
            // lookup, and a million-grant policy lists nobody by reading.
            let mut users: Vec<String> = info
                .uids
                .iter()
                .take(CHECK_USERS)
                .map(|u| match dir.user_name(*u) {
                    Some(n) => format!("{n}({u})"),
                    None => format!("#{u}"),
                })
                .collect();
            if info.uids.len() > CHECK_USERS {
                users.push(format!("and {} more", info.uids.len() - CHECK_USERS));
            }
            let shown = match dest {
                Dest::Local => format!("localhost:{port} (any local address)"),
                d => format!("{d}:{port}"),
            };
            let who = if users.is_empty() {
                "(no one)".to_owned()
            } else {
                users.join(", ")
            };
            let _ = writeln!(out, "  {shown} -> allow {who}");
        }
        for g in &vm.allow {
            if matches!(g.principal, policy::Principal::Group(_)) {
                let _ = writeln!(out, "  {} = {} member(s)", g.principal, g.uids.len());
            }
        }
    }
    let _ = writeln!(
        out,
        "{} vm(s), {} guarded endpoint(s), {} grant(s), {} kernel entries; everything else passes",
        policy.vms.len(),
        c.endpoints.len(),
        c.grant_count(),
        c.rules.len() + c.grant_words().len()
    );
    out
}

/// Users `check` names per endpoint (the rest are counted).
const CHECK_USERS: usize = 100;

/// `[5930, 20001, 20002, 20003]` -> `5930, 20001-20003`.
fn ranges(ports: &[u16]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let start = ports[i];
        let mut end = start;
        while i + 1 < ports.len() && ports[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = ports[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{compile::LocalAddrs, directory::FakeDirectory};

    #[test]
    fn describes_the_seed_policy() {
        let dir = FakeDirectory::default()
            .user("myself", 1000)
            .user("ralph", 1001)
            .group("bookkeeping", &[1002]);
        let text = "[protect]\nports = [\"20001-20010\", 5930]\n[servers.mysrv]\naddress = \"192.168.2.2\"\n\
                    [vms.debianx]\nserver = \"mysrv\"\nports = [20002]\nallow = [\"myself\", \"@bookkeeping\", \"#1021\"]\n\
                    [vms.winlab]\nserver = \"localhost\"\nports = [5930]\nallow = [\"ralph\"]\n";
        let p = policy::parse(text, Path::new("p.toml"), &dir).expect("valid");
        let c =
            compile(&p, &LocalAddrs::new(), &crate::compile::Dynamic::default()).expect("compiles");
        let out = describe(&p, &c, &dir);
        assert!(
            out.contains("guarded on every destination: ports 5930, 20001-20010"),
            "{out}"
        );
        assert!(
            out.contains("192.168.2.2:20002 -> allow myself(1000), #1002, #1021"),
            "{out}"
        );
        assert!(
            out.contains("localhost:5930 (any local address) -> allow ralph(1001)"),
            "{out}"
        );
        assert!(out.contains("@bookkeeping = 1 member(s)"), "{out}");
    }
}
