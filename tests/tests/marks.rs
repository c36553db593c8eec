//! Root integration tests for how the connect hook marks the sockets it
//! lets through to a guarded endpoint, which is how the sweep finds the
//! connections to close when access ends (SECURITY.md, "Closing
//! connections"): the socket's cookie in its slot of `SPICEGATE_MARK_SLOTS`,
//! or in the hash `SPICEGATE_GRANTED` when that slot is taken, both
//! cleared by the release hook with the socket; socket storage
//! (`SPICEGATE_MARKS`) when the hash is full too.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use spicegate_tests::{
    Listener, TestUser,
    bypass::{pinned_map_len, pinned_u64_array, write_pinned_map, write_pinned_u64_array},
    lab::{Lab, vm},
    require_root, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

/// `GRANTED_ENTRIES` of spicegate-common: the capacity of the fast marks.
const GRANTED_ENTRIES: u64 = 16_384;
/// `MARK_SLOTS` of spicegate-common.
const MARK_SLOTS: u32 = 65_536;

fn granted(lab: &Lab) -> PathBuf {
    lab.pin.path().join("granted_v2")
}

fn slots(lab: &Lab) -> PathBuf {
    lab.pin.path().join("mark_slots_v2")
}

fn fast_marks(map: &Path) -> usize {
    pinned_map_len(map, 8).expect("counting the fast marks")
}

/// The cookies held in the mark slots.
fn slot_marks(map: &Path) -> Vec<u64> {
    let slots = pinned_u64_array(map, MARK_SLOTS).expect("reading the mark slots");
    slots.into_iter().filter(|c| *c != 0).collect()
}

/// What someone holding that many granted connections open would do: take
/// every mark slot (with cookies far above any this boot will reach).
fn take_every_slot(map: &Path) {
    write_pinned_u64_array(map, (0..MARK_SLOTS).map(|i| (i, u64::MAX - u64::from(i))))
        .expect("filling the mark slots");
}

#[test]
fn a_granted_connect_takes_a_mark_slot_and_the_mark_goes_with_the_socket() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = Lab::start(PROBE, &vm("v", l.port(), &[&user.name]));
    let (slots, hash) = (slots(&lab), granted(&lab));
    assert_eq!(
        slot_marks(&slots),
        Vec::<u64>::new(),
        "mark slots before any connect"
    );

    let held = lab.hold(&user, l.port());
    let marks = slot_marks(&slots);
    assert_eq!(marks.len(), 1, "the granted connection's mark slot");
    assert_eq!(
        fast_marks(&hash),
        0,
        "a free slot, yet the mark went to the hash"
    );
    drop(held); // kills the probe: its socket is released
    assert!(
        wait_until(Duration::from_secs(5), || slot_marks(&slots).is_empty()),
        "the release hook left the mark slot of a closed socket: {:?}",
        slot_marks(&slots)
    );
}

#[test]
fn with_its_slot_taken_the_mark_goes_to_the_hash_and_goes_with_the_socket() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = Lab::start(PROBE, &vm("v", l.port(), &[&user.name]));
    let (slots, hash) = (slots(&lab), granted(&lab));
    take_every_slot(&slots);

    let held = lab.hold(&user, l.port());
    assert_eq!(fast_marks(&hash), 1, "the granted connection's fast mark");
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || fast_marks(&hash) == 0),
        "the release hook left {} fast mark(s) of a closed socket",
        fast_marks(&hash)
    );
    assert_eq!(
        slot_marks(&slots).len(),
        MARK_SLOTS as usize,
        "the release hook cleared a slot another socket held"
    );
}

#[test]
fn with_the_slots_and_the_fast_marks_full_a_revoked_connection_is_still_closed() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = Lab::start(PROBE, &vm("v", l.port(), &[&user.name]));
    let (slots, map) = (slots(&lab), granted(&lab));

    take_every_slot(&slots);
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

#[test]
fn a_revoked_connection_marked_in_its_slot_is_closed() {
    require_root();
    let user = TestUser::new();
    let l = Listener::loopback_keeping_connections();
    let lab = Lab::start(PROBE, &vm("v", l.port(), &[&user.name]));
    let mut held = lab.hold(&user, l.port());
    assert_eq!(
        slot_marks(&slots(&lab)).len(),
        1,
        "the connection's mark slot"
    );
    lab.reload_to(&vm("v", l.port(), &[]));
    assert!(
        held.wait_closed(Duration::from_secs(3)).is_some(),
        "the revoked connection marked in its slot stayed open; daemon log:\n{}",
        lab.log()
    );
}
