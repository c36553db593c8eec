//! Bounded fuzz smoke run by `cargo xtask test`: the checked-in fuzz corpus
//! (fuzz/corpus, grown by `cargo xtask fuzz`) replayed through the same
//! entry points the cargo-fuzz targets use, plus a few thousand proptest
//! inputs. Nothing may panic; a policy that validates must compile or be
//! refused with an error.

use std::{collections::BTreeSet, io, net::IpAddr, path::PathBuf};

use proptest::prelude::*;
use spicegate::{
    compile::{Dynamic, LocalAddrs, compile, decide},
    control::parse_request,
    directory::Directory,
    policy::{Env, Resolver, Source, parse_sources},
};

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

/// What the `policy` fuzz target does with one input.
fn policy_input(data: &[u8]) {
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

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut out = Vec::new();
    for e in
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
    {
        let path = e.expect("corpus entry").path();
        match std::fs::read(&path) {
            Ok(bytes) => out.push(bytes),
            // A running `cargo xtask fuzz` replaces entries as it minimises.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    assert!(!out.is_empty(), "fuzz corpus {} is empty", dir.display());
    out
}

#[test]
fn policy_corpus_replays() {
    for input in corpus("policy") {
        policy_input(&input);
    }
}

#[test]
fn control_corpus_replays() {
    for input in corpus("control") {
        let _ = parse_request(&input);
    }
}

/// TOML-ish fragments, so random inputs reach deep into validation.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[protect]\nports = [".to_owned()),
        Just("[servers.s]\naddress = \"".to_owned()),
        Just("[vms.v]\nserver = \"localhost\"\nports = [".to_owned()),
        Just("[[vms.v.schedule]]\nallow = [\"bob\"]\nhours = \"".to_owned()),
        Just("days = [\"mon\"".to_owned()),
        Just("allow = [\"@staff\", \"#7\", \"@console\"".to_owned()),
        Just("[settings]\nmode = \"audit\"\ntimezone = \"UTC\"\n".to_owned()),
        Just("\"20001-20010\", 5930]\n".to_owned()),
        Just("\n#---\n".to_owned()),
        "[ -~\n]{0,24}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_policies_never_panic(parts in proptest::collection::vec(fragment(), 0..12)) {
        policy_input(parts.concat().as_bytes());
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        policy_input(&data);
        let _ = parse_request(&data);
    }

    #[test]
    fn random_requests_never_panic(body in "[ -~]{0,80}") {
        let _ = parse_request(format!("{{\"cmd\":{body}}}\n").as_bytes());
        let _ = parse_request(format!("{body}\n").as_bytes());
    }
}
