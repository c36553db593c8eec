//! What the `policy` fuzz target (fuzz/fuzz_targets/policy.rs) does with
//! one input, here so that the fuzz smoke test (spicegate/tests/
//! fuzz_smoke.rs) replays the corpus through exactly the same code.
//! Not part of the daemon.

use std::{collections::BTreeSet, io, net::IpAddr, path::PathBuf};

use crate::{
    compile::{Dynamic, LocalAddrs, compile, decide},
    directory::Directory,
    policy::{Env, Resolver, Source, parse_sources},
};

/// A fixed directory: root, alice (1000), bob (1001), group staff.
struct Dir;
impl Directory for Dir {
    fn user_uid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(match name {
            "root" => Some(0),
            "alice" => Some(1000),
            "bob" => Some(1001),
            _ => None,
        })
    }
    fn group_members(&self, name: &str) -> io::Result<Option<BTreeSet<u32>>> {
        Ok((name == "staff").then(|| [1000, 1001].into()))
    }
    fn user_name(&self, _: u32) -> Option<String> {
        None
    }
}

/// A fixed resolver: only `kvm.example.lan`.
struct Res;
impl Resolver for Res {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        if host == "kvm.example.lan" {
            Ok(vec![IpAddr::from([192, 0, 2, 7])])
        } else {
            Err("unknown".into())
        }
    }
}

/// Arbitrary bytes as a policy (a main file, and a drop-in after a
/// `\n#---\n` line): validation must not panic, and a policy it accepts
/// must compile or be refused with an error, and then decide.
pub fn policy_input(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (main, dropin) = text.split_once("\n#---\n").unwrap_or((text, ""));
    let mut sources = vec![Source {
        path: PathBuf::from("policy.toml"),
        text: main.to_owned(),
    }];
    if !dropin.is_empty() {
        sources.push(Source {
            path: PathBuf::from("policy.d/10.toml"),
            text: dropin.to_owned(),
        });
    }
    let Ok(policy) = parse_sources(
        &sources,
        &Env {
            dir: &Dir,
            resolver: &Res,
        },
    ) else {
        return;
    };
    let local: LocalAddrs = [IpAddr::from([10, 0, 0, 1])].into();
    if let Ok(c) = compile(
        &policy,
        &local,
        &Dynamic {
            console: Some(1000),
            ..Dynamic::default()
        },
    ) {
        for port in [5930u16, 20002] {
            let _ = decide(&c, 1000, IpAddr::from([127, 0, 0, 1]), port);
        }
    }
}
