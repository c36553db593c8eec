//! Unit tests of the compiler, the grant changes and the model.

use std::path::Path;

use super::*;
use crate::policy::parse;

use crate::policy::tests::SEED;

fn policy(text: &str) -> Policy {
    parse(text, Path::new("p.toml"), &crate::policy::tests::dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

#[test]
fn local_networks_fold_into_localhost() {
    let mut local = LocalAddrs::new();
    local.insert_net(ip("198.18.7.9"), 24);
    local.insert_net(ip("2001:db8:7::"), 64);
    local.insert_net(ip("127.0.0.0"), 8); // built in: not listed
    local.insert_net(ip("10.1.1.1"), 32); // a single address
    let c = compile(&policy(SEED), &local, &Dynamic::default()).expect("compiles");
    // winlab on localhost:5930 allows ralph (1001) only.
    for a in [
        "198.18.7.1",
        "198.18.7.255",
        "::ffff:198.18.7.77",
        "2001:db8:7::1",
        "2001:db8:7:0:ffff:ffff:ffff:ffff",
        "10.1.1.1",
    ] {
        assert!(table_is_local(&c, ip(a)), "{a} is local");
        assert!(!decide(&c, 1000, ip(a), 5930), "{a}:5930 is winlab's");
        assert!(decide(&c, 1001, ip(a), 5930), "{a}:5930 ralph");
    }
    for a in [
        "198.18.8.1",
        "2001:db8:8::1",
        "10.1.1.2",
        "::ffff:198.18.6.255",
    ] {
        assert!(!table_is_local(&c, ip(a)), "{a} is not local");
    }
    assert_eq!(
        c.rules.get(&RuleKey::local_nets()).map(|v| v.flags),
        Some(2),
        "two prefix lengths: /120 (v4 /24) and /64"
    );
}

#[test]
fn more_local_network_lengths_than_the_program_checks_are_refused() {
    let mut local = LocalAddrs::new();
    for len in [16u8, 20, 24, 28, 30] {
        local.insert_net(ip("198.18.0.0"), len);
    }
    let e = compile(&policy(SEED), &local, &Dynamic::default()).expect_err("5 lengths");
    assert!(e.to_string().contains("5 different prefix lengths"), "{e}");
}

#[test]
fn seed_decisions() {
    let local: LocalAddrs = [ip("10.9.9.9")].into();
    let c = compile(&policy(SEED), &local, &Dynamic::default()).expect("compiles");
    let d = |uid, a: &str, port| decide(&c, uid, ip(a), port);
    // debianx on mysrv:20002
    assert!(d(1000, "192.168.2.2", 20002));
    assert!(d(1003, "192.168.2.2", 20002));
    assert!(d(1021, "192.168.2.2", 20002));
    assert!(
        d(1000, "::ffff:192.168.2.2", 20002),
        "mapped form decided like IPv4"
    );
    assert!(!d(1001, "192.168.2.2", 20002));
    assert!(!d(0, "192.168.2.2", 20002), "root is not special");
    // 20002 is also a [protect] port: guarded everywhere, granted nowhere else.
    assert!(!d(1000, "192.168.2.3", 20002));
    // winlab on localhost:5930, every local spelling.
    for a in [
        "127.0.0.1",
        "127.0.0.2",
        "0.0.0.0",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "10.9.9.9",
    ] {
        assert!(d(1001, a, 5930), "{a}");
        assert!(!d(1000, a, 5930), "{a}");
    }
    // 5930 is protected everywhere: a remote 5930 is denied even to ralph.
    assert!(!d(1001, "192.168.2.2", 5930));
    // Unguarded ports pass.
    assert!(d(1000, "192.168.2.2", 22));
    assert!(d(1000, "127.0.0.1", 20011));
}

#[test]
fn vm_port_guarded_only_on_its_server() {
    let p = policy(
        "[servers.s]\naddress=\"192.0.2.1\"\n[vms.v]\nserver=\"s\"\nports=[40000]\nallow=[\"myself\"]\n",
    );
    let local = LocalAddrs::new();
    let c = compile(&p, &local, &Dynamic::default()).expect("compiles");
    assert!(!decide(&c, 1001, ip("192.0.2.1"), 40000));
    assert!(decide(&c, 1000, ip("192.0.2.1"), 40000));
    assert!(
        decide(&c, 1001, ip("127.0.0.1"), 40000),
        "other destinations untouched"
    );
    assert!(
        decide(&c, 1001, ip("192.0.2.2"), 40000),
        "other destinations untouched"
    );
}

#[test]
fn server_on_a_local_address_guards_every_local_spelling() {
    // This machine is 192.168.2.2: 127.0.0.1:20002 reaches the same listener.
    let local: LocalAddrs = [ip("192.168.2.2")].into();
    let c = compile(&policy(SEED), &local, &Dynamic::default()).expect("compiles");
    assert!(!decide(&c, 1001, ip("127.0.0.1"), 20002));
    assert!(decide(&c, 1000, ip("127.0.0.1"), 20002));
    assert!(decide(&c, 1000, ip("192.168.2.2"), 20002));
}

#[test]
fn vm_ids_are_stable_and_distinct() {
    let a = vm_ids(["debianx", "winlab"].into_iter());
    let b = vm_ids(["winlab", "other", "debianx"].into_iter());
    assert_eq!(a["debianx"], b["debianx"]);
    assert_eq!(a["winlab"], b["winlab"]);
    assert_ne!(a["debianx"], a["winlab"]);
    assert!(a.values().all(|id| *id != NO_VM));
}

#[test]
fn temporary_grants_add_to_the_policy() {
    let local = LocalAddrs::new();
    let g = |uid, vm: &str| TempGrant {
        uid,
        user: String::new(),
        vm: vm.into(),
        expires: None,
        granted_at: 0,
        granted_by: 0,
    };
    let temp = [g(4242, "winlab"), g(4243, "no-such-vm")];
    let c = compile(
        &policy(SEED),
        &local,
        &Dynamic {
            temp: &temp,
            ..Dynamic::default()
        },
    )
    .expect("compiles");
    assert!(decide(&c, 4242, ip("127.0.0.1"), 5930));
    assert!(!decide(&c, 4242, ip("192.168.2.2"), 20002));
    assert!(!decide(&c, 4243, ip("127.0.0.1"), 5930));
    let info = &c.endpoints[&(Dest::Local, 5930)];
    assert!(info.temp_uids.contains(&4242) && info.uids.contains(&1001));
}

#[test]
fn audit_mode_lets_through_and_console_grants() {
    let p = policy(
        "[settings]\nmode=\"audit\"\n[protect]\nports=[9]\n[vms.a]\nserver=\"localhost\"\nports=[1]\n\
         [vms.e]\nserver=\"localhost\"\nports=[2]\nmode=\"enforce\"\nallow=[\"@console\"]\n",
    );
    let local = LocalAddrs::new();
    let c = compile(
        &p,
        &local,
        &Dynamic {
            console: Some(77),
            ..Dynamic::default()
        },
    )
    .expect("compiles");
    assert!(
        decide(&c, 5, ip("127.0.0.1"), 1),
        "audit VM lets everyone through"
    );
    assert!(
        decide(&c, 5, ip("10.0.0.1"), 9),
        "global audit covers [protect]"
    );
    assert!(
        !decide(&c, 5, ip("127.0.0.1"), 2),
        "an enforce VM still refuses"
    );
    assert!(
        decide(&c, 77, ip("127.0.0.1"), 2),
        "the console user is granted"
    );
    let c = compile(&p, &local, &Dynamic::default()).expect("compiles");
    assert!(
        !decide(&c, 77, ip("127.0.0.1"), 2),
        "nobody at the console, nobody granted"
    );
}

/// A change worked out pair by pair is the same as a full compile, and
/// the grant delta between the two tables is exactly the change.
#[test]
fn recompiling_pairs_matches_a_full_compile() {
    let p = policy(
        r##"
[servers.two]
addresses = ["192.168.2.2", "2001:db8::2"]
[vms.debianx]
server = "two"
ports = [20002, 20003]
allow = ["myself", "@bookkeeping", "@console"]
[vms.winlab]
server = "localhost"
ports = [5930]
allow = ["ralph"]
[[vms.winlab.schedule]]
allow = ["#1021"]
days = ["mon"]
"##,
    );
    let local = LocalAddrs::new();
    let temp = vec![
        TempGrant {
            uid: 4242,
            user: "#4242".into(),
            vm: "winlab".into(),
            expires: None,
            granted_at: 0,
            granted_by: 0,
        },
        TempGrant {
            uid: 1000,
            user: "myself".into(),
            vm: "debianx".into(),
            expires: None,
            granted_at: 0,
            granted_by: 0,
        },
    ];
    let before = Dynamic {
        temp: &temp[1..],
        scheduled: BTreeSet::new(),
        console: Some(1001),
    };
    let after = Dynamic {
        temp: &temp,
        scheduled: [("winlab".to_owned(), 1021)].into(),
        console: Some(1003),
    };
    let old = compile(&p, &local, &before).expect("compiles");
    let full = compile(&p, &local, &after).expect("compiles");
    let pairs: BTreeSet<(String, u32)> = [
        ("winlab".to_owned(), 4242),
        ("winlab".to_owned(), 1021),
        ("debianx".to_owned(), 1000),
    ]
    .into();
    let quick = recompile_pairs(&old, &p, &after, &pairs, true).expect("recompiles");
    assert_eq!(quick, full);
    let delta = grant_delta(&old, &quick, 100).expect("only grants changed");
    // 4242 and 1021 gain winlab; the console moves from 1001 (ralph, not
    // otherwise on debianx) to 1003 (already in @bookkeeping): 1001 loses
    // debianx and keeps winlab. One word each (both VMs are in block 0),
    // with all its new bits.
    let slot = |vm: &str| {
        quick
            .endpoints
            .values()
            .find(|i| i.vm == vm)
            .map(|i| i.slot)
            .expect("vm has endpoints")
    };
    let (debianx, winlab) = (1u64 << slot("debianx"), 1u64 << slot("winlab"));
    let words: BTreeMap<u32, u64> = delta
        .iter()
        .map(|(k, v)| {
            assert_eq!((k.kind, k.port), (spicegate_common::KIND_GRANT, 0));
            (k.uid, v.word())
        })
        .collect();
    assert_eq!(
        words,
        [(1001, winlab), (1021, winlab), (4242, winlab)].into(),
        "debianx {debianx:#x}, winlab {winlab:#x}"
    );
    assert_eq!(delta.len(), 3);
    assert!(grant_delta(&old, &quick, 2).is_none(), "over the limit");
    let moved = compile(&policy(SEED), &local, &before).expect("compiles");
    assert!(
        grant_delta(&old, &moved, 100).is_none(),
        "endpoints changed"
    );
}

#[test]
fn clash_is_an_error() {
    let p = policy(
        "[servers.a]\naddress=\"127.0.0.2\"\n[vms.x]\nserver=\"a\"\nports=[1]\n[vms.y]\nserver=\"localhost\"\nports=[1]\n",
    );
    let e = compile(&p, &LocalAddrs::new(), &Dynamic::default()).expect_err("clash");
    assert!(e.to_string().contains("both claim localhost:1"), "{e}");
}

#[test]
fn empty_policy_has_empty_table() {
    let c = compile(&policy(""), &[ip("10.0.0.1")].into(), &Dynamic::default()).expect("compiles");
    assert!(c.rules.is_empty());
    assert!(c.grant_words().is_empty());
    assert_eq!(Compiled::capacity(0), 64);
}

#[test]
fn table_contents_and_capacity() {
    let c = compile(&policy(SEED), &LocalAddrs::new(), &Dynamic::default()).expect("compiles");
    // 11 port entries (20001-20010, 5930), 2 endpoints, 4+1 grants,
    // and the same 11 ports for binds (all on this machine or in
    // [protect]).
    assert_eq!(c.rules.len(), 11 + 2 + 11);
    assert_eq!(c.listen_ports.len(), 11);
    assert_eq!(c.grant_count(), 5);
    // The 4 + 1 grants of two VMs (slots 0 and 1, block 0) by 5 uids:
    // one word per uid, with one bit each.
    let words: BTreeMap<u32, u64> = c
        .grant_words()
        .iter()
        .map(|(k, v)| (k.uid, v.word()))
        .collect();
    assert_eq!(words.len(), 5, "{words:?}");
    assert_eq!(words.values().map(|w| w.count_ones()).sum::<u32>(), 5);
    assert!(c.entry_bound() >= c.rules.len() + words.len());
    let n = c.rules.len() + words.len();
    assert!(Compiled::capacity(n) as usize >= n + n / 4);
    // Each endpoint's entry carries its VM's slot.
    for ((dest, port), info) in &c.endpoints {
        let e = c
            .rules
            .get(&RuleKey::endpoint(dest_key(*dest), *port))
            .expect("endpoint entry");
        assert_eq!(e.flags >> spicegate_common::ENDPOINT_SLOT_SHIFT, info.slot);
    }
    // The endpoints of a VM share its uids.
    let mut shared = c.endpoints.values().collect::<Vec<_>>();
    shared.dedup_by(|a, b| Arc::ptr_eq(a, b));
    assert_eq!(shared.len(), 2);
    let names: Vec<&str> = c.vm_names.values().map(String::as_str).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"debianx") && names.contains(&"winlab"));
}

#[test]
fn too_large_is_refused() {
    let mut allow = String::new();
    for uid in 0..2000 {
        allow.push_str(&format!("\"#{uid}\","));
    }
    let p = policy(&format!(
        "[vms.v]\nserver=\"localhost\"\nports=[\"1-2100\"]\nallow=[{allow}]\n"
    ));
    // 4.2 million grants, but one word of grants per uid: 6,200 entries.
    let c = compile(&p, &LocalAddrs::new(), &Dynamic::default()).expect("compiles");
    assert_eq!(c.grant_count(), 4_200_000);
    assert_eq!(c.rules.len() + c.grant_words().len(), 2100 * 3 + 2000);
    // 40 addresses x 65,535 ports: 5.2 million endpoint and port entries.
    let addrs: Vec<String> = (1..=40).map(|i| format!("\"10.0.0.{i}\"")).collect();
    let p = policy(&format!(
        "[servers.s]\naddresses=[{}]\n[vms.v]\nserver=\"s\"\nports=[\"1-65535\"]\nallow=[\"#1\"]\n",
        addrs.join(",")
    ));
    let e = compile(&p, &LocalAddrs::new(), &Dynamic::default()).expect_err("5.2M entries");
    assert!(matches!(e, CompileError::TooLarge { .. }), "{e}");
}

/// A uid's grants on VMs of one block share one word; VMs past the 64th
/// go to the next block; a delta carries the whole new word.
#[test]
fn words_of_grants_span_blocks_and_a_delta_carries_the_whole_word() {
    let mut text = String::new();
    for i in 0..70u16 {
        let allow = if i == 0 || i == 1 || i == 69 {
            "\"#7\""
        } else {
            "\"#8\""
        };
        text.push_str(&format!(
            "[vms.v{i:02}]\nserver = \"localhost\"\nports = [{}]\nallow = [{allow}]\n",
            30_000 + i
        ));
    }
    let p = policy(&text);
    let local = LocalAddrs::new();
    let c = compile(&p, &local, &Dynamic::default()).expect("compiles");
    let words: BTreeMap<(u32, u16), u64> = c
        .grant_words()
        .iter()
        .map(|(k, v)| ((k.uid, k.port), v.word()))
        .collect();
    // VMs are given slots in name order: v00 is slot 0, v69 slot 69.
    assert_eq!(words[&(7, 0)], 0b11);
    assert_eq!(words[&(7, 1)], 1 << 5);
    assert_eq!(words[&(8, 0)], !0b11);
    assert_eq!(words[&(8, 1)], 0b1_1111);
    assert_eq!(words.len(), 4);
    assert!(decide(&c, 7, ip("127.0.0.1"), 30_069));
    assert!(!decide(&c, 7, ip("127.0.0.1"), 30_068));

    // A temporary grant of v02 to 7: one word, with v00 and v01 still in.
    let temp = [TempGrant {
        uid: 7,
        user: "#7".into(),
        vm: "v02".into(),
        expires: None,
        granted_at: 0,
        granted_by: 0,
    }];
    let dynamic = Dynamic {
        temp: &temp,
        ..Dynamic::default()
    };
    let pairs: BTreeSet<(String, u32)> = [("v02".to_owned(), 7)].into();
    let next = recompile_pairs(&c, &p, &dynamic, &pairs, false).expect("recompiles");
    let delta = grant_delta(&c, &next, 10).expect("only grants changed");
    assert_eq!(delta.len(), 1);
    assert_eq!((delta[0].0.uid, delta[0].0.port), (7, 0));
    assert_eq!(delta[0].1.word(), 0b111);
}

/// 65,536 VMs with endpoints each take a slot; a VM without ports after
/// them takes none and is no error; one more with an endpoint is refused.
#[test]
fn vm_slots_run_out_only_for_vms_with_endpoints() {
    let mut p = policy(
        "[servers.a]\naddress = \"192.0.2.1\"\n[servers.b]\naddress = \"192.0.2.2\"\n\
         [vms.model]\nserver = \"a\"\nports = [1]\nallow = [\"#7\"]\n",
    );
    let model = p.vms.remove("model").expect("the model VM");
    let vm = |i: usize, server: &str, ports: Vec<u16>| crate::policy::Vm {
        name: format!("v{i:05}"),
        server: server.to_owned(),
        ports,
        ..model.clone()
    };
    for i in 0..MAX_VM_SLOTS {
        let (server, port) = if i < 60_000 {
            ("a", i)
        } else {
            ("b", i - 60_000)
        };
        let v = vm(i, server, vec![u16::try_from(port + 1).expect("port")]);
        p.vms.insert(v.name.clone(), v);
    }
    let last = vm(MAX_VM_SLOTS, "b", Vec::new());
    p.vms.insert(last.name.clone(), last);
    let c = compile(&p, &LocalAddrs::new(), &Dynamic::default()).expect("compiles");
    assert_eq!(c.vms_by_slot().len(), MAX_VM_SLOTS);
    p.vms
        .get_mut(&format!("v{MAX_VM_SLOTS:05}"))
        .expect("the last VM")
        .ports = vec![60_001];
    assert!(matches!(
        compile(&p, &LocalAddrs::new(), &Dynamic::default()),
        Err(CompileError::TooManyVms { .. })
    ));
}
