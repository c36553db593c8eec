//! `spicegate check FILE`: validation without the kernel (no root needed).

use spicegate_tests::{PolicyFile, spicegate};

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(policy: &PolicyFile) -> Checked {
    let out = spicegate([std::ffi::OsStr::new("check"), policy.path().as_os_str()]);
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts exit 1 and a `FILE:LINE:COL:` diagnostic pointing at the line
/// containing `needle`.
fn expect_error_at(text: &str, needle: &str) {
    let policy = PolicyFile::new(text);
    let line = policy.line_of(needle);
    let r = check(&policy);
    assert_eq!(
        r.code,
        Some(1),
        "spicegate check should exit 1 on:\n{text}\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let prefix = format!("{}:{line}:", policy.path().display());
    let at = r.stderr.find(&prefix).unwrap_or_else(|| {
        panic!(
            "stderr should point at {prefix} (the line with {needle:?}) for:\n{text}\nstderr:\n{}",
            r.stderr
        )
    });
    let rest = &r.stderr[at + prefix.len()..];
    let col: String = rest.chars().take_while(char::is_ascii_digit).collect();
    assert!(
        !col.is_empty() && rest[col.len()..].starts_with(':'),
        "expected FILE:LINE:COL: at {prefix}, got: {}",
        rest.lines().next().unwrap_or_default()
    );
}

const GOOD: &str = r##"[protect]
ports = ["20001-20010", 5930]

[servers.mysrv]
address = "192.0.2.10"

[vms.debianx]
server = "mysrv"
ports = [20002]
allow = ["root", "#1021"]

[vms.winlab]
server = "localhost"
ports = [5930]
allow = ["root"]
"##;

#[test]
fn good_policy_is_described() {
    let policy = PolicyFile::new(GOOD);
    let r = check(&policy);
    assert_eq!(
        r.code,
        Some(0),
        "spicegate check on a good policy: stderr: {}",
        r.stderr
    );
    for want in [
        "debianx",
        "winlab",
        "192.0.2.10:20002",
        "root",
        "1021",
        "5930",
    ] {
        assert!(
            r.stdout.contains(want),
            "`spicegate check` output should mention {want:?}:\n{}",
            r.stdout
        );
    }
}

#[test]
fn unknown_key_is_reported_at_its_line() {
    expect_error_at(&GOOD.replace("ports = [20002]", "portz = [20002]"), "portz");
}

#[test]
fn unknown_user_is_reported_at_its_line() {
    let name = "sg-no-such-user-x";
    assert!(
        matches!(nix::unistd::User::from_name(name), Ok(None)),
        "{name} exists on this machine; pick another name"
    );
    expect_error_at(&GOOD.replace("\"#1021\"", &format!("\"{name}\"")), name);
}

#[test]
fn unknown_group_is_reported_at_its_line() {
    let name = "sg-no-such-group-x";
    assert!(
        matches!(nix::unistd::Group::from_name(name), Ok(None)),
        "{name} exists on this machine"
    );
    let text = GOOD.replace("allow = [\"root\"]\n", &format!("allow = [\"@{name}\"]\n"));
    expect_error_at(&text, name);
}

#[test]
fn reversed_port_range_is_reported_at_its_line() {
    expect_error_at(
        &GOOD.replace("\"20001-20010\"", "\"20010-20001\""),
        "20010-20001",
    );
}

#[test]
fn vm_naming_a_missing_server_is_reported_at_its_line() {
    expect_error_at(
        &GOOD.replace("server = \"mysrv\"", "server = \"nosuchsrv\""),
        "nosuchsrv",
    );
}
