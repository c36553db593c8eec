use std::{path::Path, time::Duration};

use super::*;
use crate::directory::FakeDirectory;

/// The seed policy's users: also used by the compiler's tests.
pub(crate) fn dir() -> FakeDirectory {
    FakeDirectory::default()
        .user("myself", 1000)
        .user("ralph", 1001)
        .user("root", 0)
        .group("bookkeeping", &[1002, 1003])
}

#[test]
fn warns_when_only_root_may_serve_local_vms() {
    let local = "[vms.w]\nserver = \"localhost\"\nports = [5930]\n";
    let w = ok(local).listener_warning().expect("a warning");
    assert!(w.contains("vm(s) w") && w.contains("listeners"), "{w}");
    let with = format!("[protect]\nlisteners = [\"ralph\"]\n{local}");
    assert_eq!(ok(&with).listener_warning(), None);
    let remote = "[servers.s]\naddress = \"192.0.2.1\"\n[vms.r]\nserver = \"s\"\nports = [1]\n";
    assert_eq!(ok(remote).listener_warning(), None);
    let l = ok(&with);
    assert_eq!(
        l.listener_uids().into_iter().collect::<Vec<_>>(),
        vec![1001]
    );
    assert_eq!(l.listen_ports().into_iter().collect::<Vec<_>>(), vec![5930]);
}

#[test]
fn console_cannot_listen() {
    let e = parse(
        "[protect]\nlisteners = [\"@console\"]\n",
        Path::new("p.toml"),
        &dir(),
    )
    .expect_err("refused");
    assert!(e.to_string().contains("cannot be a listener"), "{e}");
}

fn ok(text: &str) -> Policy {
    parse(text, Path::new("p.toml"), &dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    parse(text, Path::new("p.toml"), &dir())
        .expect_err("policy should be rejected")
        .to_string()
}

/// The seed scenario (the example policy's shape): also used by the
/// compiler's tests.
pub(crate) const SEED: &str = r##"
[protect]
ports = ["20001-20010", 5930]

[servers.mysrv]
address = "192.168.2.2"

[vms.debianx]
server = "mysrv"
ports = [20002]
allow = ["myself", "@bookkeeping", "#1021"]

[vms.winlab]
server = "localhost"
ports = [5930]
allow = ["ralph"]
"##;

#[test]
fn seed_policy_parses() {
    let p = ok(SEED);
    assert_eq!(p.protect_ports.len(), 11);
    assert_eq!(p.protect_ports.first(), Some(&5930));
    let d = &p.vms["debianx"];
    assert_eq!(d.ports, vec![20002]);
    assert_eq!(d.uids(), [1000, 1002, 1003, 1021].into());
    assert_eq!(
        p.servers["mysrv"].target,
        ServerTarget::Addresses(vec!["192.168.2.2".parse().unwrap()])
    );
    assert_eq!(p.servers["localhost"].target, ServerTarget::Local);
    assert_eq!(p.vms["winlab"].uids(), [1001].into());
}

#[test]
fn empty_policy_is_valid() {
    let p = ok("");
    assert!(p.vms.is_empty() && p.protect_ports.is_empty());
}

#[test]
fn several_addresses_and_ipv6() {
    let p = ok(
        "[servers.s]\naddresses = [\"10.0.0.1\", \"fd00::1\"]\n[vms.v]\nserver=\"s\"\nports=[1]\n",
    );
    assert_eq!(
        p.servers["s"].target,
        ServerTarget::Addresses(vec![
            "10.0.0.1".parse().unwrap(),
            "fd00::1".parse().unwrap()
        ])
    );
}

#[test]
fn unknown_key_is_an_error_with_position() {
    let e = err("[vms.v]\nserver = \"localhost\"\nports = [1]\nallwo = [\"x\"]\n");
    assert!(e.starts_with("p.toml:4:1: "), "{e}");
    assert!(e.contains("allwo"), "{e}");
}

#[test]
fn unknown_user_and_group_are_errors() {
    let e = err(
        "[vms.v]\nserver = \"localhost\"\nports = [1]\nallow = [\"nobody-here\", \"@nogroup-here\"]\n",
    );
    assert!(e.contains("p.toml:4:10: unknown user `nobody-here`"), "{e}");
    assert!(
        e.contains("p.toml:4:25: unknown group `nogroup-here`"),
        "{e}"
    );
}

#[test]
fn bad_ports() {
    for (spec, what) in [
        ("\"20010-20001\"", "bad port range \"20010-20001\""),
        ("0", "bad port 0"),
        ("70000", "bad port 70000"),
        ("\"x\"", "bad port range \"x\""),
        ("1.5", "bad port 1.5"),
    ] {
        let e = err(&format!("[protect]\nports = [{spec}]\n"));
        assert!(e.starts_with("p.toml:2:10: "), "{e}");
        assert!(e.contains(what), "{spec}: {e}");
    }
}

#[test]
fn missing_server() {
    let e = err("[vms.v]\nserver = \"nosuch\"\nports = [1]\n");
    assert!(
        e.starts_with("p.toml:2:10: vm `v` names server `nosuch`"),
        "{e}"
    );
}

#[test]
fn bad_address_and_localhost_redefinition() {
    let e =
        err("[servers.localhost]\naddress = \"127.0.0.1\"\n[servers.s]\naddress = \"not an ip\"\n");
    assert!(e.contains("p.toml:1:10: `localhost` is built in"), "{e}");
    assert!(
        e.contains("p.toml:4:11: server `s`: `not an ip` is neither an IP address nor a hostname"),
        "{e}"
    );
}

#[test]
fn bad_uid_and_all_errors_reported() {
    let e = err("[vms.v]\nserver = \"localhost\"\nports = [0]\nallow = [\"#x\"]\n");
    assert_eq!(e.lines().count(), 2, "{e}");
}

#[test]
fn syntax_error_has_position() {
    let e = err("[vms.v\n");
    assert!(e.starts_with("p.toml:1:"), "{e}");
}

#[test]
fn settings() {
    let p = ok("[settings]\nadmins = \"bookkeeping\"\nend_sessions = false\n");
    assert!(!p.settings.end_sessions);
    assert!(p.settings.is_admin(0) && p.settings.is_admin(1002) && !p.settings.is_admin(1000));
    assert!(ok("").settings.end_sessions);
    let e = err("[settings]\nadmins = \"nogroup-here\"\n");
    assert!(
        e.contains("p.toml:2:10: unknown admin group `nogroup-here`"),
        "{e}"
    );
}

#[test]
fn hostnames_resolve_to_every_address() {
    let p = ok("[servers.s]\naddress = \"mysrv.example.lan\"\n");
    assert_eq!(
        p.servers["s"].target,
        ServerTarget::Addresses(vec![
            "192.0.2.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap()
        ])
    );
    assert_eq!(
        p.servers["s"].hostnames,
        vec!["mysrv.example.lan".to_owned()]
    );
    let e = err("[servers.s]\naddresses = [\"10.0.0.1\", \"gone.example.lan\"]\n");
    assert!(
        e.contains("p.toml:2:26: server `s`: hostname `gone.example.lan` does not resolve"),
        "{e}"
    );
}

#[test]
fn schedules_modes_and_console() {
    let p = ok(
        "[settings]\nmode = \"audit\"\ntimezone = \"Europe/Berlin\"\nresolve_interval = \"30s\"\n\
                [vms.v]\nserver = \"localhost\"\nports = [1]\nmode = \"enforce\"\nallow = [\"@console\"]\n\
                [[vms.v.schedule]]\nallow = [\"myself\"]\ndays = [\"mon\", \"tue\"]\nhours = \"22:00-06:00\"\n",
    );
    let v = &p.vms["v"];
    assert!(v.allows_console() && v.uses_console());
    assert_eq!(v.schedules[0].days, 0b11);
    assert_eq!(v.schedules[0].hours, Some((1320, 360)));
    assert_eq!(v.schedules[0].describe(), "mon,tue 22:00-06:00");
    assert_eq!(p.settings.mode, Mode::Audit);
    assert_eq!(p.vm_mode(v), Mode::Enforce);
    assert_eq!(p.settings.resolve_interval, Duration::from_secs(30));
    let e = err(
        "[settings]\nmode = \"off\"\ntimezone = \"Mars/Olympus\"\n[vms.v]\nserver = \"localhost\"\nports = [1]\n\
                 [[vms.v.schedule]]\nallow = [\"myself\"]\ndays = [\"mo\"]\nhours = \"9-5\"\n",
    );
    assert!(e.contains("p.toml:2:8: mode `off`"), "{e}");
    assert!(
        e.contains("p.toml:3:12: unknown time zone `Mars/Olympus`"),
        "{e}"
    );
    assert!(e.contains("p.toml:9:9: day `mo`"), "{e}");
    assert!(e.contains("p.toml:10:9: hours `9-5`"), "{e}");
}

#[test]
fn dropins_merge_and_clash() {
    let src = |p: &str, t: &str| Source {
        path: PathBuf::from(p),
        text: t.to_owned(),
    };
    let env = Env {
        dir: &dir(),
        resolver: &FakeResolver,
    };
    let p = parse_sources(
        &[
            src(
                "main.toml",
                "[protect]\nports = [5930]\n[vms.a]\nserver = \"localhost\"\nports = [1]\n",
            ),
            src(
                "policy.d/10-b.toml",
                "[protect]\nports = [5931]\n[vms.b]\nserver = \"localhost\"\nports = [2]\n",
            ),
        ],
        &env,
    )
    .expect("merges");
    assert_eq!(p.protect_ports, vec![5930, 5931]);
    assert_eq!(p.vms.len(), 2);
    let e = parse_sources(
        &[
            src(
                "main.toml",
                "[vms.a]\nserver = \"localhost\"\nports = [1]\n[settings]\nend_sessions = false\n",
            ),
            src(
                "policy.d/10-b.toml",
                "\n[vms.a]\nserver = \"localhost\"\nports = [2]\n[settings]\nend_sessions = true\n",
            ),
        ],
        &env,
    )
    .expect_err("clash")
    .to_string();
    assert!(
        e.contains("policy.d/10-b.toml:2:6: vm `a` is also defined at main.toml:1:6"),
        "{e}"
    );
    assert!(
        e.contains("policy.d/10-b.toml:6:16: setting `end_sessions` is also set at main.toml:5:16"),
        "{e}"
    );
}

#[test]
fn client_settings_and_tls_port() {
    let p = ok(
        "[settings]\nclient = \"spicy --full-screen\"\n[vms.v]\nserver = \"localhost\"\nports = [5900, 5901]\ntls_port = 5901\nca_file = \"/etc/spice/ca.pem\"\n",
    );
    assert_eq!(
        p.settings.client,
        vec!["spicy".to_owned(), "--full-screen".to_owned()]
    );
    assert_eq!(p.vms["v"].tls_port, Some(5901));
    assert_eq!(p.vms["v"].plain_port(), Some(5900));
    let e = err("[vms.v]\nserver = \"localhost\"\nports = [5900]\ntls_port = 5901\n");
    assert!(
        e.contains("p.toml:4:12: tls_port 5901 is not one of the VM's ports"),
        "{e}"
    );
}

/// Many `#UID` entries are held as one sorted array, where the first
/// was; a few stay apart; malformed ones are still errors.
#[test]
fn many_numeric_uids_are_held_together() {
    let many: Vec<String> = (0..40)
        .rev()
        .map(|u| format!("\"#{}\"", 5000 + u))
        .collect();
    let text = format!(
        "[vms.a]\nserver = \"localhost\"\nports = [1]\nallow = [\"myself\", {}, \"ralph\"]\n[vms.b]\nserver = \"localhost\"\nports = [2]\nallow = [\"#7\", \"myself\"]\n",
        many.join(", ")
    );
    let dir = crate::directory::FakeDirectory::default()
        .user("myself", 1000)
        .user("ralph", 1001);
    let p = parse(&text, Path::new("p.toml"), &dir).expect("parses");
    let a: Vec<String> = p.vms["a"]
        .allow
        .iter()
        .map(|g| g.principal.to_string())
        .collect();
    assert_eq!(a, ["myself", "40 `#UID` entries", "ralph"]);
    assert_eq!(
        p.vms["a"].allow[1].uids.as_slice(),
        &(5000..5040).collect::<Vec<_>>()[..]
    );
    assert_eq!(p.vms["a"].uids().len(), 42);
    let b: Vec<String> = p.vms["b"]
        .allow
        .iter()
        .map(|g| g.principal.to_string())
        .collect();
    assert_eq!(b, ["#7", "myself"]);
    let bad = text.replace("\"#5003\"", "\"#50x3\"");
    let e = parse(&bad, Path::new("p.toml"), &dir).expect_err("refused");
    assert!(
        e.to_string()
            .contains("`#50x3`: `#` must be followed by a numeric uid"),
        "{e}"
    );
}

#[test]
fn vm_without_ports() {
    let e = err("[vms.v]\nserver = \"localhost\"\nports = []\n");
    assert!(e.contains("vm `v` has no ports"), "{e}");
}

/// Only a policy that names users, groups or hostnames is read again by the
/// resolver thread (the daemon lets the text of any other go).
#[test]
fn looks_up_names_only_with_users_groups_or_hostnames() {
    let vm = |allow: &str| {
        format!("[vms.v]\nserver = \"localhost\"\nports = [5900]\nallow = [{allow}]\n")
    };
    for fixed in [
        vm("\"#1000\", \"#1001\", \"@console\""),
        format!(
            "[servers.s]\naddresses = [\"192.0.2.1\", \"2001:db8::1\"]\n{}",
            vm("\"#7\"").replace("localhost", "s")
        ),
    ] {
        assert!(!ok(&fixed).looks_up_names(), "{fixed}");
    }
    for named in [
        vm("\"myself\""),
        vm("\"@bookkeeping\""),
        format!(
            "{}[[vms.v.schedule]]\nallow = [\"ralph\"]\ndays = [\"mon\"]\n",
            vm("\"#7\"")
        ),
        format!("[protect]\nlisteners = [\"ralph\"]\n{}", vm("\"#7\"")),
        format!(
            "[servers.s]\naddress = \"mysrv.example.lan\"\n{}",
            vm("\"#7\"").replace("localhost", "s")
        ),
    ] {
        assert!(ok(&named).looks_up_names(), "{named}");
    }
}
