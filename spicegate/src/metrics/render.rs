//! The Prometheus text exposition format (version 0.0.4) of the daemon's
//! metrics: pure, so every name, label and line is unit tested here.
//! docs/metrics.md documents each metric; dashboards rely on the names.

use std::fmt::Write as _;

use crate::denials::DropCounts;

/// Label value of `vm` for connects on `[protect]` ports that belong to
/// no VM. An empty label value is the same as no label to Prometheus, and
/// no VM of a policy can have an empty name, so it cannot collide.
pub const NO_VM_LABEL: &str = "";

/// One VM's connect counters, since the daemon started (as `status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmValues {
    /// The VM's policy name; [`NO_VM_LABEL`] for `[protect]` ports.
    pub vm: String,
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
}

/// Everything one metrics file holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    pub vms: Vec<VmValues>,
    pub attached: bool,
    pub table_in_force: bool,
    pub degraded: bool,
    pub unresolved_names: u64,
    /// `drops` of `status`: denials not logged, lines written.
    pub drops: DropCounts,
    pub policy_sha256: String,
    /// Unix seconds of the last successful reload (or of the start).
    pub last_reload_success: u64,
    /// How long the engine took to apply that reload, in seconds.
    pub last_reload_seconds: f64,
    pub reload_failures: u64,
    pub grants: u64,
    pub temporary_grants: u64,
    pub guarded_endpoints: u64,
    pub sessions_closed: u64,
    pub tampering_repaired: u64,
    /// Connects let through whose mark the kernel could not write.
    pub unmarked_connections: u64,
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `# HELP` and `# TYPE` of one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family with one sample and no labels.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// The whole file.
pub fn render(v: &Values) -> String {
    let mut out = String::with_capacity(2048 + v.vms.len() * 200);
    family(
        &mut out,
        "spicegate_connects_total",
        "counter",
        "Connects to guarded endpoints since the daemon started, by VM (vm=\"\": [protect] ports of no VM) and outcome (allowed, denied, audited: let through in audit mode).",
    );
    for vm in &v.vms {
        let name = escape(&vm.vm);
        for (outcome, n) in [
            ("allowed", vm.allowed),
            ("denied", vm.denied),
            ("audited", vm.audited),
        ] {
            let _ = writeln!(
                out,
                "spicegate_connects_total{{vm=\"{name}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    single(
        &mut out,
        "spicegate_attached",
        "gauge",
        "1 when every connect and bind program is attached to the cgroup (read back from the kernel), else 0.",
        flag(v.attached),
    );
    single(
        &mut out,
        "spicegate_table_in_force",
        "gauge",
        "1 when the policy slot and overlays hold what this daemon installed (checked by the watchdog each second), else 0.",
        flag(v.table_in_force),
    );
    single(
        &mut out,
        "spicegate_degraded",
        "gauge",
        "1 when names of the policy did not resolve at start and are granted nothing until they do, else 0.",
        flag(v.degraded),
    );
    single(
        &mut out,
        "spicegate_unresolved_names",
        "gauge",
        "Users, groups and hostnames of the policy that do not resolve now.",
        v.unresolved_names,
    );
    single(
        &mut out,
        "spicegate_denials_rate_limited_total",
        "counter",
        "Denials the kernel's rate limit kept out of the log (each counted in a SUPPRESSED line) since the daemon started.",
        v.drops.rate_limited,
    );
    family(
        &mut out,
        "spicegate_events_dropped_total",
        "counter",
        "Denials that got no DENY line of their own since the daemon started, by reason (log_ring_full, flood_ring_full, queue_full, over_budget).",
    );
    for (reason, n) in [
        ("log_ring_full", v.drops.log_ring_full),
        ("flood_ring_full", v.drops.flood_ring_full),
        ("queue_full", v.drops.queue_full),
        ("over_budget", v.drops.over_budget),
    ] {
        let _ = writeln!(
            out,
            "spicegate_events_dropped_total{{reason=\"{reason}\"}} {n}"
        );
    }
    family(
        &mut out,
        "spicegate_log_lines_total",
        "counter",
        "DENY (and AUDIT) lines and SUPPRESSED summary lines written since the daemon started.",
    );
    let _ = writeln!(
        out,
        "spicegate_log_lines_total{{kind=\"deny\"}} {}",
        v.drops.logged
    );
    let _ = writeln!(
        out,
        "spicegate_log_lines_total{{kind=\"suppressed\"}} {}",
        v.drops.summaries
    );
    family(
        &mut out,
        "spicegate_policy_info",
        "gauge",
        "The policy in force: its sha256 (as `spicegate status` shows it); always 1.",
    );
    let _ = writeln!(
        out,
        "spicegate_policy_info{{sha256=\"{}\"}} 1",
        escape(&v.policy_sha256)
    );
    single(
        &mut out,
        "spicegate_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time of the last reload that applied (or of the daemon's start).",
        v.last_reload_success,
    );
    single(
        &mut out,
        "spicegate_last_reload_duration_seconds",
        "gauge",
        "Seconds the daemon took to put the last applied reload in force (compile and install; 0 for the start).",
        v.last_reload_seconds,
    );
    single(
        &mut out,
        "spicegate_reload_failures_total",
        "counter",
        "Reloads refused (invalid policy, or not installable) since the daemon started; the previous policy stayed in force.",
        v.reload_failures,
    );
    single(
        &mut out,
        "spicegate_grants",
        "gauge",
        "(uid, endpoint) grants in force in the kernel, temporary ones included.",
        v.grants,
    );
    single(
        &mut out,
        "spicegate_temporary_grants",
        "gauge",
        "Temporary grants (spicegate grant) not yet expired.",
        v.temporary_grants,
    );
    single(
        &mut out,
        "spicegate_guarded_endpoints",
        "gauge",
        "(address, port) pairs guarded for VMs.",
        v.guarded_endpoints,
    );
    single(
        &mut out,
        "spicegate_sessions_closed_total",
        "counter",
        "Established connections closed because the user's access ended, since the daemon started.",
        v.sessions_closed,
    );
    single(
        &mut out,
        "spicegate_tampering_repaired_total",
        "counter",
        "Repairs by the watchdog (pins restored, rule table reinstalled, programs re-attached) since the daemon started.",
        v.tampering_repaired,
    );
    single(
        &mut out,
        "spicegate_unmarked_connections_total",
        "counter",
        "Connects let through to a guarded endpoint whose socket the kernel could not mark (no memory): they are not closed when access ends. Since the daemon started.",
        v.unmarked_connections,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Values {
        Values {
            vms: vec![
                VmValues {
                    vm: NO_VM_LABEL.into(),
                    allowed: 0,
                    denied: 4,
                    audited: 0,
                },
                VmValues {
                    vm: "winlab".into(),
                    allowed: 3,
                    denied: 2,
                    audited: 1,
                },
            ],
            attached: true,
            table_in_force: true,
            degraded: false,
            unresolved_names: 0,
            drops: DropCounts {
                rate_limited: 7,
                log_ring_full: 1,
                flood_ring_full: 2,
                queue_full: 3,
                over_budget: 4,
                logged: 5,
                summaries: 6,
            },
            policy_sha256: "ab12".into(),
            last_reload_success: 1_700_000_000,
            last_reload_seconds: 0.0125,
            reload_failures: 2,
            grants: 10,
            temporary_grants: 1,
            guarded_endpoints: 3,
            sessions_closed: 8,
            tampering_repaired: 9,
            unmarked_connections: 10,
        }
    }

    /// The sample lines (not comments) of `text`, as `name{labels} value`.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn fixed_names_and_values() {
        let text = render(&sample());
        for line in [
            "spicegate_connects_total{vm=\"winlab\",outcome=\"allowed\"} 3",
            "spicegate_connects_total{vm=\"winlab\",outcome=\"denied\"} 2",
            "spicegate_connects_total{vm=\"winlab\",outcome=\"audited\"} 1",
            "spicegate_connects_total{vm=\"\",outcome=\"denied\"} 4",
            "spicegate_attached 1",
            "spicegate_table_in_force 1",
            "spicegate_degraded 0",
            "spicegate_unresolved_names 0",
            "spicegate_denials_rate_limited_total 7",
            "spicegate_events_dropped_total{reason=\"log_ring_full\"} 1",
            "spicegate_events_dropped_total{reason=\"flood_ring_full\"} 2",
            "spicegate_events_dropped_total{reason=\"queue_full\"} 3",
            "spicegate_events_dropped_total{reason=\"over_budget\"} 4",
            "spicegate_log_lines_total{kind=\"deny\"} 5",
            "spicegate_log_lines_total{kind=\"suppressed\"} 6",
            "spicegate_policy_info{sha256=\"ab12\"} 1",
            "spicegate_last_reload_success_timestamp_seconds 1700000000",
            "spicegate_last_reload_duration_seconds 0.0125",
            "spicegate_reload_failures_total 2",
            "spicegate_grants 10",
            "spicegate_temporary_grants 1",
            "spicegate_guarded_endpoints 3",
            "spicegate_sessions_closed_total 8",
            "spicegate_tampering_repaired_total 9",
            "spicegate_unmarked_connections_total 10",
        ] {
            assert!(samples(&text).contains(&line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_once_before_its_samples() {
        let text = render(&sample());
        let mut typed: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(!typed.contains(&name), "{name} typed twice");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                typed.push(name);
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().expect("HELP name");
                assert!(!typed.contains(&name), "HELP of {name} after its TYPE");
                continue;
            }
            let name = line.split(['{', ' ']).next().expect("a sample");
            assert_eq!(typed.last(), Some(&name), "sample before its TYPE: {line}");
        }
        assert_eq!(typed.len(), 18, "{typed:?}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn label_values_are_escaped_and_vms_never_labelled_by_user() {
        let mut v = sample();
        v.vms = vec![VmValues {
            vm: "a\"b\\c\nd".into(),
            ..VmValues::default()
        }];
        let text = render(&v);
        assert!(
            text.contains("spicegate_connects_total{vm=\"a\\\"b\\\\c\\nd\",outcome=\"allowed\"} 0"),
            "{text}"
        );
        assert!(!text.contains("user="), "{text}");
        assert!(!text.contains("uid="), "{text}");
    }

    #[test]
    fn an_empty_policy_still_renders_every_family() {
        let text = render(&Values::default());
        assert_eq!(text.matches("# TYPE ").count(), 18);
        assert!(text.contains("spicegate_attached 0\n"));
        assert!(text.contains("spicegate_last_reload_duration_seconds 0\n"));
    }
}
