//! Prometheus metrics, written to a file for node_exporter's textfile
//! collector (`[settings] metrics_file`): no listening port.
//!
//! The engine owns the state and publishes a small [`Snapshot`] into
//! [`Shared`] once a second (after its watchdog pass) and counts reload
//! failures and repairs there; the sweeper counts the connections it
//! closes. The writer thread ([`writer::start`]) reads that, the kernel's
//! counters through pinned maps of its own, and writes the file every
//! [`writer::PERIOD`]: neither the engine nor the control socket ever
//! waits on the file system for it. docs/metrics.md lists every metric.

pub mod render;
pub mod writer;

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use spicegate_common::VmCounters;

use crate::kernel::KernelDrops;

/// What the engine knows and the writer cannot read from the kernel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub policy_sha256: String,
    pub degraded: bool,
    pub unresolved_names: u64,
    pub grants: u64,
    pub temporary_grants: u64,
    pub guarded_endpoints: u64,
}

/// Between the engine (and the sweeper) and the metrics writer.
#[derive(Debug)]
pub struct Shared {
    snapshot: Mutex<Snapshot>,
    table_in_force: AtomicBool,
    reload_failures: AtomicU64,
    tampering_repaired: AtomicU64,
    sessions_closed: AtomicU64,
    /// Unix seconds of the last successful reload (or of the start).
    last_reload_success: AtomicU64,
    /// How long the engine took to apply it, in microseconds.
    last_reload_micros: AtomicU64,
    /// Kernel counters when this daemon started: metrics count since then,
    /// like `status`.
    pub counters_at_start: BTreeMap<u32, VmCounters>,
    pub drops_at_start: KernelDrops,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn new(counters_at_start: BTreeMap<u32, VmCounters>, drops_at_start: KernelDrops) -> Self {
        Self {
            snapshot: Mutex::new(Snapshot::default()),
            table_in_force: AtomicBool::new(true),
            reload_failures: AtomicU64::new(0),
            tampering_repaired: AtomicU64::new(0),
            sessions_closed: AtomicU64::new(0),
            last_reload_success: AtomicU64::new(0),
            last_reload_micros: AtomicU64::new(0),
            counters_at_start,
            drops_at_start,
        }
    }

    /// The engine's view, replaced whole.
    pub fn publish(&self, snapshot: Snapshot) {
        *locked(&self.snapshot) = snapshot;
    }

    pub fn snapshot(&self) -> Snapshot {
        locked(&self.snapshot).clone()
    }

    /// The watchdog's verdict after its pass (a repaired table is in force).
    pub fn set_table_in_force(&self, ok: bool) {
        self.table_in_force.store(ok, Ordering::Relaxed);
    }

    pub fn table_in_force(&self) -> bool {
        self.table_in_force.load(Ordering::Relaxed)
    }

    /// A reload (or the start) applied at `unix`, in `took`.
    pub fn reload_ok(&self, unix: u64, took: std::time::Duration) {
        self.last_reload_success.store(unix, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.last_reload_micros.store(micros, Ordering::Relaxed);
    }

    /// Unix seconds and duration in seconds of the last applied reload.
    pub fn last_reload(&self) -> (u64, f64) {
        let micros = self.last_reload_micros.load(Ordering::Relaxed);
        (
            self.last_reload_success.load(Ordering::Relaxed),
            micros as f64 / 1e6,
        )
    }

    pub fn reload_failed(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// One repair of the watchdog (pins, table or links restored).
    pub fn repaired(&self) {
        self.tampering_repaired.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tampering_repaired(&self) -> u64 {
        self.tampering_repaired.load(Ordering::Relaxed)
    }

    /// One connection the sweeper closed because access ended.
    pub fn session_closed(&self) {
        self.sessions_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sessions_closed(&self) -> u64 {
        self.sessions_closed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{directory::FakeDirectory, policy::parse};

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("p.toml"), &FakeDirectory::default())
            .expect_err("policy should be rejected")
            .to_string()
    }

    #[test]
    fn metrics_file_is_off_by_default_and_read_when_set() {
        let p = parse("", Path::new("p.toml"), &FakeDirectory::default()).expect("empty policy");
        assert_eq!(p.settings.metrics_file, None);
        let dir = std::env::temp_dir();
        let file = dir.join("spicegate.prom");
        let text = format!("[settings]\nmetrics_file = \"{}\"\n", file.display());
        let p = parse(&text, Path::new("p.toml"), &FakeDirectory::default()).expect("valid");
        assert_eq!(p.settings.metrics_file, Some(file));
    }

    #[test]
    fn following_names_does_not_look_at_the_metrics_directory() {
        use crate::policy::{Env, Source, SystemResolver, reparse_names};
        let text = "[settings]\nmetrics_file = \"/nonexistent-spicegate-dir/spicegate.prom\"\n";
        let sources = [Source {
            path: "p.toml".into(),
            text: text.into(),
        }];
        let dir = FakeDirectory::default();
        let env = Env {
            dir: &dir,
            resolver: &SystemResolver,
        };
        // The policy was applied while the directory existed; it went since.
        for lenient in [false, true] {
            let p = reparse_names(&sources, &env, lenient, None).expect("names only");
            assert_eq!(
                p.settings.metrics_file.as_deref(),
                Some(Path::new("/nonexistent-spicegate-dir/spicegate.prom"))
            );
        }
        assert!(parse_err(text).contains("cannot be used"));
        // Relative paths are refused by every parse.
        let rel = [Source {
            path: "p.toml".into(),
            text: "[settings]\nmetrics_file = \"x.prom\"\n".into(),
        }];
        assert!(reparse_names(&rel, &env, true, None).is_err());
    }

    #[test]
    fn metrics_file_errors_say_where_and_what_to_fix() {
        let e = parse_err("[settings]\nmetrics_file = \"spicegate.prom\"\n");
        assert!(
            e.contains("p.toml:2:16: metrics_file `spicegate.prom`: use an absolute path"),
            "{e}"
        );
        let e = parse_err(
            "[settings]\nmode = \"enforce\"\nmetrics_file = \"/nonexistent-spicegate-dir/x/spicegate.prom\"\n",
        );
        assert!(
            e.contains("p.toml:3:16: metrics_file `/nonexistent-spicegate-dir/x/spicegate.prom`: its directory /nonexistent-spicegate-dir/x cannot be used"),
            "{e}"
        );
        assert!(e.contains("create it"), "{e}");
        let e = parse_err("[settings]\nmetrics_file = \"/tmp/spicegate.txt\"\n");
        assert!(e.contains("ending in `.prom`"), "{e}");
        let e = parse_err("[settings]\nmetrics_file = \"/tmp/\"\n");
        assert!(e.contains("ending in `.prom`"), "{e}");
        let e = parse_err("[settings]\nmetrics_file = \"/tmp/../tmp/a.prom\"\n");
        assert!(e.contains("without `..`"), "{e}");
        let e = parse_err("[settings]\nmetrics_file = \"/etc/passwd/a.prom\"\n");
        assert!(e.contains("/etc/passwd is not a directory"), "{e}");
    }
}
