//! Root integration tests for large policies: answers stay small and
//! quick however many users a VM has.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::time::{Duration, Instant};

use serde_json::Value;
use spicegate_tests::{
    Listener,
    bypass::{cgroup_prog_ids, prog_name_and_verified_insns},
    lab::{Lab, text},
    require_root,
};

const PROBE: &str = env!("CARGO_BIN_EXE_sg-probe");

#[test]
fn status_lists_100_users_per_vm_and_pages_the_rest() {
    require_root();
    let l = Listener::loopback();
    // 2,500 numeric uids: no passwd entries, so the names are `#UID`.
    let allow: Vec<String> = (300_000..302_500).map(|u| format!("\"#{u}\"")).collect();
    let lab = Lab::start(
        PROBE,
        &format!(
            "[vms.big]\nserver = \"localhost\"\nports = [{}]\nallow = [{}]\n",
            l.port(),
            allow.join(", ")
        ),
    );

    let start = Instant::now();
    let out = lab.pin.ctl(["status", "--json"]);
    let took = start.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(st["status_format"], 2);
    let vm = &st["vms"][0];
    assert_eq!(vm["users_total"], 2500, "{vm}");
    assert_eq!(vm["users"].as_array().map(Vec::len), Some(100));
    assert_eq!(vm["users"][0]["user"], "#300000");
    eprintln!("[test] status --json with 2,500 users: {took:?}");
    assert!(took < Duration::from_secs(2), "status took {took:?}");

    let plain = lab.pin.ctl(["status"]);
    assert!(
        text(&plain.stdout).contains("and 2400 more (`spicegate status --vm big --users`)"),
        "{}",
        text(&plain.stdout)
    );

    let out = lab.pin.ctl(["status", "--vm", "big", "--users"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2500, "every user, in pages");
    assert_eq!(lines[0], "300000 #300000 policy");
    assert_eq!(lines[2499], "302499 #302499 policy");
    let unknown = lab.pin.ctl(["status", "--vm", "nope", "--users"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no vm `nope`"),
        "{}",
        text(&unknown.stderr)
    );
}

/// At 100,000 grants, a `grant` and a `revoke` reach the kernel through
/// the overlays: the table in force stays the same map (same id, same
/// generation), both overlays hold exactly the changed word of grants, and the
/// daemon's count of map writes grows by the change (twice, and the
/// selector), not by the table.
/// Real connects of a real uid show each change in force.
#[test]
fn a_one_grant_change_writes_in_proportion_to_the_change_not_the_table() {
    use spicegate_tests::{
        Outcome, TestUser,
        bypass::{inner_map_len, outer_map_slot, pinned},
    };
    require_root();
    let l = Listener::loopback();
    let alice = TestUser::new();
    let bob = TestUser::new();
    // Ten VMs of 10,000 numeric uids each: one on this machine (alice is
    // one of its users), nine on documentation addresses (TEST-NET-2) nothing connects
    // to.
    let mut policy = String::new();
    for i in 0..10u32 {
        let base = 400_000 + i * 10_000;
        let mut allow: Vec<String> = (base..base + 10_000).map(|u| format!("\"#{u}\"")).collect();
        let server = if i == 0 {
            allow.push(format!("\"{}\"", alice.name));
            "localhost".to_owned()
        } else {
            policy.push_str(&format!("[servers.far{i}]\naddress = \"198.51.100.{i}\"\n"));
            format!("far{i}")
        };
        policy.push_str(&format!(
            "[vms.v{i}]\nserver = \"{server}\"\nports = [{}]\nallow = [{}]\n",
            l.port(),
            allow.join(", ")
        ));
    }
    let lab = Lab::start(PROBE, &policy);
    let policy_pin = pinned(lab.pin.path(), "policy").expect("policy map pinned");
    let overlay_pin = pinned(lab.pin.path(), "overlay_v").expect("overlay map pinned");
    let probe = |u: &TestUser| {
        lab.probe()
            .as_user(u)
            .connect(format!("127.0.0.1:{}", l.port()))
            .outcome()
    };
    let status = || -> Value {
        let out = lab.pin.ctl(["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    };

    let st = status();
    assert_eq!(st["counts"]["grants"], 100_001, "{}", st["counts"]);
    let generation = st["table"]["generation"].as_u64().expect("generation");
    let writes_at_start = st["table"]["map_writes"].as_u64().expect("map_writes");
    let table_id = outer_map_slot(&policy_pin, 0).expect("policy slot");
    eprintln!(
        "[test] start: table {table_id:?}, generation {generation}, {writes_at_start} map writes"
    );
    assert!(
        writes_at_start > 100_000,
        "the first table is written whole"
    );
    assert_eq!(probe(&alice), Outcome::Allowed);
    assert_eq!(probe(&bob), Outcome::Denied);

    let mut changes = Vec::new();
    for (args, bob_then, overlay_then) in [
        (
            vec!["grant", bob.name.as_str(), "v0"],
            Outcome::Allowed,
            1usize,
        ),
        (vec!["revoke", bob.name.as_str(), "v0"], Outcome::Denied, 0),
    ] {
        let before = status()["table"]["map_writes"].as_u64().unwrap_or(0);
        let out = lab.pin.ctl(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let st = status();
        let t = &st["table"];
        let writes = t["map_writes"].as_u64().unwrap_or(0) - before;
        eprintln!("[test] {args:?}: {t}, {writes} map writes");
        assert_eq!(t["last_change"]["how"], "overlay", "{t}");
        assert_eq!(t["generation"].as_u64(), Some(generation), "same table");
        assert_eq!(
            outer_map_slot(&policy_pin, 0).expect("policy slot"),
            table_id
        );
        // One grant on one endpoint: the entry in each of the two
        // overlays, and the selector.
        assert_eq!(writes, 3, "{args:?} cost {writes} map writes");
        for slot in 0..2 {
            let in_kernel = inner_map_len(&overlay_pin, slot, 24).expect("overlay");
            assert_eq!(in_kernel, Some(overlay_then), "entries of overlay {slot}");
        }
        assert_eq!(probe(&bob), bob_then, "bob after {args:?}");
        assert_eq!(probe(&alice), Outcome::Allowed, "alice after {args:?}");
        changes.push(t["last_change"]["ms"].as_f64().unwrap_or(f64::NAN));
    }
    eprintln!("[test] kernel side of grant, revoke: {changes:?} ms (debug build)");
}

/// The verifier's work is most of what a start costs: keep it bounded.
/// With the DENY record inlined at every refusal and sized at run time,
/// each connect program took some 27,000 instructions to verify and each
/// bind program 23,200 (about 20 ms each here); now 3,700-4,100 and
/// 2,600 (spicegate-ebpf/src/report.rs says how). A count, not a time:
/// the same on a busy machine.
#[test]
fn the_kernel_programs_stay_cheap_to_verify() {
    require_root();
    let l = Listener::loopback();
    let lab = Lab::start(
        PROBE,
        &format!(
            "[vms.one]\nserver = \"localhost\"\nports = [{}]\nallow = [\"root\"]\n",
            l.port()
        ),
    );
    // connect4, connect6, bind4, bind6 (enum bpf_attach_type).
    let mut seen = Vec::new();
    for attach_type in [10, 11, 8, 9] {
        let ids = cgroup_prog_ids(lab.cg.path(), attach_type, false)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY type {attach_type}: {e}"));
        assert_eq!(
            ids.len(),
            1,
            "one program on attach type {attach_type}: {ids:?}"
        );
        let (name, verified) = prog_name_and_verified_insns(ids[0])
            .unwrap_or_else(|e| panic!("bpf_prog_info of program {}: {e}", ids[0]));
        eprintln!("[test] {name}: the verifier walked {verified} instructions");
        assert!(
            verified > 0,
            "{name}: this kernel reports no verified_insns"
        );
        seen.push((name, verified));
    }
    let over: Vec<_> = seen.iter().filter(|(_, v)| *v > 8_000).collect();
    assert!(
        over.is_empty(),
        "programs whose verification grew past 8,000 instructions (a start pays for it): {over:?}"
    );
}
