use super::*;
use crate::directory::Nss;

#[test]
fn wire_format() {
    let r: Request = serde_json::from_str(r#"{"cmd":"why","user":"bob","addr":"::1","port":5930}"#)
        .expect("parses");
    assert_eq!(
        r,
        Request::Why {
            user: "bob".into(),
            addr: "::1".parse().expect("ip"),
            port: 5930
        }
    );
    assert!(
        serde_json::from_str::<Request>(r#"{"cmd":"revoke","user":"b","vm":"v","x":1}"#).is_err()
    );
    assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
    for junk in [
        r#"{"cmd":"status","x":1}"#,
        r#"{"cmd":"reload","policy":"/tmp/evil.toml"}"#,
        r#"{"cmd":"list","uid":0}"#,
        r#"{"cmd":"events","all":true}"#,
        r#"{"cmd":"report","uid":0}"#,
    ] {
        assert!(
            serde_json::from_str::<Request>(junk).is_err(),
            "{junk} must be refused, not read as a plain request"
        );
    }
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"cmd":"report","after":7}"#).ok(),
        Some(Request::Report { after: Some(7) })
    );
    assert!(!Request::Report { after: None }.needs_admin());
    for plain in ["status", "reload", "list", "events", "report"] {
        assert!(
            serde_json::from_str::<Request>(&format!(r#"{{"cmd":"{plain}"}}"#)).is_ok(),
            "{plain}"
        );
    }
    assert_eq!(
        serde_json::to_string(&Request::Status {}).expect("json"),
        r#"{"cmd":"status"}"#
    );
    assert!(Request::Reload {}.needs_admin() && !Request::Events {}.needs_admin());
}

#[test]
fn fills_names_where_the_engine_left_them_out() {
    let dir = crate::directory::FakeDirectory::default().user("bob", 1001);
    let mut s = status();
    s.console_user = Some(UserRef {
        uid: 1001,
        user: None,
    });
    s.vms[0].users[0].user = None;
    s.vms[0].users[1].user = Some("kept".into());
    s.vms[0].schedule_users[0].user = None;
    fill_user_names(&mut s, &dir, &mut std::collections::HashMap::new());
    let name = |u: &Option<String>| u.clone().unwrap_or_default();
    assert_eq!(name(&s.console_user.expect("console").user), "bob");
    assert_eq!(name(&s.vms[0].users[0].user), "#7");
    assert_eq!(name(&s.vms[0].users[1].user), "kept");
    assert_eq!(name(&s.vms[0].schedule_users[0].user), "bob");
    let mut l = ListAnswer {
        client: vec![],
        uid: 1001,
        user: None,
        vms: vec![],
    };
    fill_user_names(&mut l, &dir, &mut std::collections::HashMap::new());
    assert_eq!(l.user.as_deref(), Some("bob"));
}

#[test]
fn resolves_users() {
    assert_eq!(resolve_user("#1021", &Nss), Ok(1021));
    assert_eq!(resolve_user("root", &Nss), Ok(0));
    assert!(resolve_user("#x", &Nss).is_err());
    assert!(resolve_user("no-such-user-sg", &Nss).is_err());
}

// The answers' formats. Each expected document is written as the daemon
// wrote it before the answers were typed (with `json!`, through a sorted
// `serde_json::Value`), so these pin field names, nesting, null against
// absent and the order of the fields (alphabetical: `same` also checks
// that serializing the typed answer gives the same text as serializing it
// through a `Value`).

/// `typed` serializes to exactly `expected` (text included), and reads
/// back as itself.
fn same<T>(typed: &T, expected: &serde_json::Value)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(typed).expect("serializes");
    assert_eq!(text, expected.to_string());
    let via_value = serde_json::to_value(typed).expect("to value");
    assert_eq!(
        text,
        via_value.to_string(),
        "fields not in alphabetical order"
    );
    assert_eq!(
        serde_json::to_string_pretty(typed).expect("pretty"),
        serde_json::to_string_pretty(expected).expect("pretty")
    );
    assert_eq!(
        &serde_json::from_str::<T>(&text).expect("reads back"),
        typed
    );
}

fn status() -> Status {
    use crate::{compile::Via, denials::DropCounts, policy::Mode};
    Status {
        attached: true,
        cgroup: "/sys/fs/cgroup/vms".into(),
        console_user: None,
        counts: Counts {
            grants: 3,
            guarded_endpoints: 2,
            kernel_entries: 9,
            ports_guarded_everywhere: 1,
            vms: 2,
        },
        degraded: true,
        drops: DropCounts {
            flood_ring_full: 1,
            log_ring_full: 2,
            logged: 3,
            over_budget: 4,
            queue_full: 5,
            rate_limited: 6,
            summaries: 7,
        },
        last_reload: LastReload {
            at: "2026-01-05T10:00:00Z".into(),
            at_unix: 1_767_607_200,
            message: "started".into(),
            ok: true,
        },
        listeners: Listeners {
            ports: vec![5930, 5931],
            users: vec![UserRef {
                uid: 64055,
                user: Some("libvirt-qemu".into()),
            }],
        },
        mode: OverallMode::Mixed,
        pin_dir: "/sys/fs/bpf/spicegate".into(),
        policy: PolicyStatus {
            admins: Some("vmadmins".into()),
            end_sessions: true,
            files: vec!["/etc/spicegate/policy.toml".into()],
            loaded_at: "2026-01-05T10:00:00Z".into(),
            loaded_at_unix: 1_767_607_200,
            path: "/etc/spicegate/policy.toml".into(),
            sha256: "ab12".into(),
            source: "file".into(),
        },
        protect_audited: 0,
        protect_denied: 4,
        running: true,
        started_at: "2026-01-05T10:00:00Z".into(),
        status_format: 2,
        table: TableStatus {
            generation: 3,
            last_change: Some(LastChange {
                grants: 1,
                how: "overlay".into(),
                map_writes: 2,
                ms: 0.25,
                overlay_entries: 1,
            }),
            map_writes: 40,
            overlay_entries: 1,
        },
        table_in_force: true,
        temporary_grants: vec![TemporaryGrant {
            active: true,
            expires: None,
            expires_in_secs: None,
            expires_unix: None,
            uid: 1002,
            user: "carol".into(),
            vm: "win".into(),
        }],
        time_zone: "Europe/Paris".into(),
        unresolved: vec![UnresolvedName {
            at: "/etc/spicegate/policy.toml:3:10".into(),
            name: "user gone".into(),
            why: "no such user".into(),
        }],
        version: "0.1.0".into(),
        vms: vec![VmStatus {
            allowed: 10,
            audited: 0,
            denied: 2,
            endpoints: vec!["192.0.2.7:5930".into(), "localhost:5931".into()],
            mode: Mode::Audit,
            name: "win".into(),
            schedule_users: vec![ScheduleUser {
                next_change: Some("2026-01-05T18:00:00Z".into()),
                next_change_unix: Some(1_767_636_000),
                open_now: true,
                uid: 1001,
                user: Some("bob".into()),
            }],
            schedule_users_total: 1,
            schedules: vec!["mon-fri 08:00-18:00: bob".into()],
            server: "kvm1".into(),
            users: vec![
                VmUser {
                    temporary: false,
                    uid: 7,
                    user: Some("#7".into()),
                    via: Via::Policy,
                },
                VmUser {
                    temporary: true,
                    uid: 1002,
                    user: Some("carol".into()),
                    via: Via::Temporary,
                },
            ],
            users_total: 2,
        }],
    }
}

#[test]
fn the_status_document_keeps_its_format() {
    // As views.rs built it with `json!` (docs/status.md).
    let expected = serde_json::json!({
        "version": "0.1.0",
        "status_format": 2,
        "running": true,
        "attached": true,
        "table_in_force": true,
        "mode": "mixed",
        "degraded": true,
        "unresolved": [{ "name": "user gone", "at": "/etc/spicegate/policy.toml:3:10", "why": "no such user" }],
        "console_user": null,
        "time_zone": "Europe/Paris",
        "cgroup": "/sys/fs/cgroup/vms",
        "pin_dir": "/sys/fs/bpf/spicegate",
        "started_at": "2026-01-05T10:00:00Z",
        "policy": {
            "path": "/etc/spicegate/policy.toml",
            "source": "file",
            "sha256": "ab12",
            "loaded_at": "2026-01-05T10:00:00Z",
            "loaded_at_unix": 1_767_607_200,
            "end_sessions": true,
            "admins": "vmadmins",
            "files": ["/etc/spicegate/policy.toml"],
        },
        "last_reload": { "at": "2026-01-05T10:00:00Z", "at_unix": 1_767_607_200, "ok": true, "message": "started" },
        "counts": {
            "vms": 2,
            "guarded_endpoints": 2,
            "ports_guarded_everywhere": 1,
            "grants": 3,
            "kernel_entries": 9,
        },
        "table": {
            "generation": 3,
            "overlay_entries": 1,
            "map_writes": 40,
            "last_change": { "how": "overlay", "grants": 1, "overlay_entries": 1, "map_writes": 2, "ms": 0.25 },
        },
        "protect_denied": 4,
        "listeners": {
            "ports": [5930, 5931],
            "users": [{ "uid": 64055, "user": "libvirt-qemu" }],
        },
        "drops": {
            "rate_limited": 6, "log_ring_full": 2, "flood_ring_full": 1, "queue_full": 5,
            "over_budget": 4, "logged": 3, "summaries": 7,
        },
        "protect_audited": 0,
        "vms": [{
            "name": "win",
            "server": "kvm1",
            "mode": "audit",
            "endpoints": ["192.0.2.7:5930", "localhost:5931"],
            "users": [
                { "uid": 7, "user": "#7", "temporary": false, "via": "policy" },
                { "uid": 1002, "user": "carol", "temporary": true, "via": "temporary" },
            ],
            "users_total": 2,
            "schedules": ["mon-fri 08:00-18:00: bob"],
            "schedule_users": [{
                "uid": 1001, "user": "bob", "open_now": true,
                "next_change": "2026-01-05T18:00:00Z", "next_change_unix": 1_767_636_000,
            }],
            "schedule_users_total": 1,
            "allowed": 10,
            "denied": 2,
            "audited": 0,
        }],
        "temporary_grants": [{
            "user": "carol", "uid": 1002, "vm": "win",
            "expires": null, "expires_unix": null, "expires_in_secs": null, "active": true,
        }],
    });
    let mut s = status();
    same(&s, &expected);
    // Before the first change, and with someone at the console.
    s.table.last_change = None;
    s.console_user = Some(UserRef {
        uid: 1001,
        user: Some("bob".into()),
    });
    let mut expected = expected;
    expected["table"]["last_change"] = serde_json::Value::Null;
    expected["console_user"] = serde_json::json!({ "uid": 1001, "user": "bob" });
    same(&s, &expected);
    // Without a daemon.
    same(
        &NotRunningStatus {
            attached: false,
            error: "not running".into(),
            running: false,
        },
        &serde_json::json!({ "running": false, "attached": false, "error": "not running" }),
    );
}

#[test]
fn the_answers_keep_their_format() {
    use crate::compile::Via;
    let vm = ListVm {
        addresses: vec!["192.0.2.7".into()],
        allowed_now: true,
        ca_file: None,
        console_only: false,
        host: "kvm1.lan".into(),
        name: "win".into(),
        next_change: Some("2026-01-05T18:00:00Z".into()),
        port: None,
        schedules: vec!["mon-fri 08:00-18:00".into()],
        server: "kvm1".into(),
        tls: true,
        tls_port: Some(5931),
        via: Some("schedule".into()),
    };
    same(
        &ListAnswer {
            client: vec!["remote-viewer".into()],
            uid: 1001,
            user: Some("bob".into()),
            vms: vec![vm],
        },
        &serde_json::json!({
            "uid": 1001,
            "user": "bob",
            "client": ["remote-viewer"],
            "vms": [{
                "name": "win", "server": "kvm1", "host": "kvm1.lan", "addresses": ["192.0.2.7"],
                "port": null, "tls_port": 5931, "tls": true, "ca_file": null, "allowed_now": true,
                "via": "schedule", "schedules": ["mon-fri 08:00-18:00"], "console_only": false,
                "next_change": "2026-01-05T18:00:00Z",
            }],
        }),
    );
    same(
        &UsersPage {
            next_after: Some(7),
            users: vec![VmUser {
                temporary: false,
                uid: 7,
                user: Some("#7".into()),
                via: Via::Console,
            }],
            users_total: 2,
            vm: "win".into(),
        },
        &serde_json::json!({
            "vm": "win", "users_total": 2,
            "users": [{ "uid": 7, "user": "#7", "temporary": false, "via": "console" }],
            "next_after": 7,
        }),
    );
    let verdict = crate::explain::Verdict {
        allow: false,
        vm: None,
        reason: "no rule".into(),
        short: "not granted".into(),
    };
    // `bind` is absent, not null, when the port is no guarded local port.
    same(
        &WhyAnswer::new(verdict.clone(), None),
        &serde_json::json!({ "allow": false, "vm": null, "reason": "no rule", "short": "not granted" }),
    );
    same(
        &WhyAnswer::new(verdict, Some("root always may".into())),
        &serde_json::json!({
            "allow": false, "vm": null, "reason": "no rule", "short": "not granted",
            "bind": "root always may",
        }),
    );
    same(
        &GrantAnswer {
            expires: Some("2026-01-05T18:00:00Z".into()),
            expires_unix: Some(1_767_636_000),
            uid: 1002,
            user: "carol".into(),
            vm: "win".into(),
        },
        &serde_json::json!({
            "user": "carol", "uid": 1002, "vm": "win",
            "expires": "2026-01-05T18:00:00Z", "expires_unix": 1_767_636_000,
        }),
    );
    same(
        &RevokeAnswer {
            uid: 1002,
            user: "carol".into(),
            vm: "win".into(),
        },
        &serde_json::json!({ "user": "carol", "uid": 1002, "vm": "win" }),
    );
    same(
        &ReloadAnswer {
            changes: vec!["+ carol may open win".into()],
            sha256: "ab12".into(),
            summary: "1 vm(s)".into(),
        },
        &serde_json::json!({ "summary": "1 vm(s)", "sha256": "ab12", "changes": ["+ carol may open win"] }),
    );
}

#[test]
fn the_response_line_keeps_its_format() {
    let line = |r: &Response<Answer>| serde_json::to_string(r).expect("json");
    assert_eq!(
        line(&Response::ok(Answer::Streaming("streaming events".into()))),
        r#"{"ok":true,"result":"streaming events"}"#
    );
    assert_eq!(
        line(&Response::err("permission denied")),
        r#"{"ok":false,"error":"permission denied"}"#
    );
    let grant = GrantAnswer {
        expires: None,
        expires_unix: None,
        uid: 1,
        user: "a".into(),
        vm: "v".into(),
    };
    let text = line(&Response::ok(Answer::Grant(grant.clone())));
    assert_eq!(
        text,
        r#"{"ok":true,"result":{"expires":null,"expires_unix":null,"uid":1,"user":"a","vm":"v"}}"#
    );
    let read: Response<GrantAnswer> = serde_json::from_str(&text).expect("reads");
    assert_eq!(read.result, Some(grant));
    let refused: Response<Status> =
        serde_json::from_str(r#"{"ok":false,"error":"busy"}"#).expect("reads");
    assert_eq!(
        (refused.ok, refused.error.as_deref()),
        (false, Some("busy"))
    );
    assert!(refused.result.is_none());
}
