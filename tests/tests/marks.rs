//! Root integration tests for how the connect hook marks the sockets it
//! lets through to a guarded endpoint, which is how the sweep finds the
//! connections to close when access ends (SECURITY.md, "Closing
//! connections"): a fast mark (the socket's cookie in `SPICEGATE_GRANTED`)
//! that the release hook removes with the socket, and socket storage
//! (`SPICEGATE_MARKS`) when the fast marks are full.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use spicegate_tests::{
    Listener, TestUser,
    bypass::{pinned_map_len, write_pinned_map},
    lab::{Lab, vm},
    require_root, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

/// `GRANTED_ENTRIES` of spicegate-common: the capacity of the fast marks.
const GRANTED_ENTRIES: u64 = 16_384;

fn granted(lab: &Lab) -> PathBuf {
    lab.pin.path().join("granted_v2")
}

fn fast_marks(map: &Path) -> usize {
    pinned_map_len(map, 8).expect("counting the fast marks")
}

#[test]
fn a_granted_connect_is_marked_fast_and_the_mark_goes_with_the_socket() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = Lab::start(PROBE, &vm("v", l.port(), &[&user.name]));
    let map = granted(&lab);
    assert_eq!(fast_marks(&map), 0, "fast marks before any connect");

    let held = lab.hold(&user, l.port());
    assert_eq!(fast_marks(&map), 1, "the granted connection's fast mark");
    drop(held); // kills the probe: its socket is released
    assert!(
        wait_until(Duration::from_secs(5), || fast_marks(&map) == 0),
        "the release hook left {} fast mark(s) of a closed socket",
        fast_marks(&map)
    );
}

#[test]
fn with_the_fast_marks_full_a_revoked_connection_is_still_closed() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = Lab::start(PROBE, &vm("v", l.port(), &[&user.name]));
    let map = granted(&lab);

    // What someone holding that many granted connections open would do:
    // fill the fast marks (cookies count up from 1; these never occur).
    for i in 0..GRANTED_ENTRIES {
        let cookie = (u64::MAX - i).to_ne_bytes();
        write_pinned_map(&map, &cookie, &0u32.to_ne_bytes()).expect("filling the fast marks");
    }
    assert_eq!(fast_marks(&map) as u64, GRANTED_ENTRIES);

    let mut held = lab.hold(&user, l.port());
    assert_eq!(
        fast_marks(&map) as u64,
        GRANTED_ENTRIES,
        "a full map took another mark"
    );
    // The policy without the user: the connection must be closed all the
    // same (its mark went to socket storage).
    lab.reload_to(&vm("v", l.port(), &[]));
    assert!(
        held.wait_closed(Duration::from_secs(3)).is_some(),
        "the revoked connection marked in socket storage stayed open; daemon log:\n{}",
        lab.log()
    );
}
