//! Bounded fuzz smoke run by `cargo xtask test`: the checked-in fuzz corpus
//! (fuzz/corpus, grown by `cargo xtask fuzz`) replayed through the same
//! entry points the cargo-fuzz targets use, plus a few thousand proptest
//! inputs. Nothing may panic; a policy that validates must compile or be
//! refused with an error.

use std::{io, path::PathBuf};

use proptest::prelude::*;
use spicegate::{control::parse_request, fuzzing::policy_input};

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
