//! Root integration tests for large policies: answers stay small and
//! quick however many users a VM has.
//!
//! Run as root, one test at a time: `cargo xtask test`.

use std::time::{Duration, Instant};

use serde_json::Value;
use spicegate_tests::{Daemon, Listener, PinDir, PolicyFile, TestCgroup, require_root};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn status_lists_100_users_per_vm_and_pages_the_rest() {
    require_root();
    let l = Listener::loopback();
    // 2,500 numeric uids: no passwd entries, so the names are `#UID`.
    let allow: Vec<String> = (300_000..302_500).map(|u| format!("\"#{u}\"")).collect();
    let policy = PolicyFile::new(&format!(
        "[vms.big]\nserver = \"localhost\"\nports = [{}]\nallow = [{}]\n",
        l.port(),
        allow.join(", ")
    ));
    let cg = TestCgroup::new();
    let pin = PinDir::new();
    let _daemon = Daemon::start(policy.path(), Some(cg.path()), &pin);

    let start = Instant::now();
    let out = pin.ctl(["status", "--json"]);
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

    let plain = pin.ctl(["status"]);
    assert!(
        text(&plain.stdout).contains("and 2400 more (`spicegate status --vm big --users`)"),
        "{}",
        text(&plain.stdout)
    );

    let out = pin.ctl(["status", "--vm", "big", "--users"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2500, "every user, in pages");
    assert_eq!(lines[0], "300000 #300000 policy");
    assert_eq!(lines[2499], "302499 #302499 policy");
    let unknown = pin.ctl(["status", "--vm", "nope", "--users"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no vm `nope`"),
        "{}",
        text(&unknown.stderr)
    );
}
