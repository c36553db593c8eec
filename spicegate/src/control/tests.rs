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
    let mut v = serde_json::json!({
        "console_user": { "uid": 1001, "user": null },
        "vms": [{ "users": [{ "uid": 7, "user": null }, { "uid": 1001, "user": "kept" }] }],
        "uid": 1001, "user": null,
    });
    fill_user_names(&mut v, &dir, &mut std::collections::HashMap::new());
    assert_eq!(v["console_user"]["user"], "bob");
    assert_eq!(v["vms"][0]["users"][0]["user"], "#7");
    assert_eq!(v["vms"][0]["users"][1]["user"], "kept");
    assert_eq!(v["user"], "bob");
}

#[test]
fn resolves_users() {
    assert_eq!(resolve_user("#1021", &Nss), Ok(1021));
    assert_eq!(resolve_user("root", &Nss), Ok(0));
    assert!(resolve_user("#x", &Nss).is_err());
    assert!(resolve_user("no-such-user-sg", &Nss).is_err());
}
