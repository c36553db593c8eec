//! The metrics writer thread: every [`PERIOD`] it gathers the values
//! (kernel counters through its own pinned-map handles, the engine's
//! [`Snapshot`](super::Snapshot), the denial log's counters) and replaces
//! `[settings] metrics_file` atomically. It is the only thread that
//! touches that file, so a slow or full disk delays nothing else.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;

use super::{
    Shared,
    render::{NO_VM_LABEL, Values, VmValues, render},
};
use crate::{
    denials::{DropCounts, Stats},
    kernel::{self, CountersReader, DropsReader, PinPaths},
    policy::Settings,
};

/// How often the file is written.
pub const PERIOD: Duration = Duration::from_secs(5);

/// Mode of the file: node_exporter runs as user `prometheus` on Debian.
pub const MODE: u32 = 0o644;

/// Where the writer reads from.
pub struct Sources {
    pub shared: Arc<Shared>,
    /// The settings in force (`metrics_file`), replaced by each reload.
    pub settings: Arc<RwLock<Settings>>,
    /// VM id -> policy name of the table in force.
    pub vm_names: Arc<RwLock<BTreeMap<u32, String>>>,
    pub denial_stats: Arc<Stats>,
    pub paths: PinPaths,
    pub cgroup: PathBuf,
}

/// Starts the writer thread. It runs until the daemon exits; with no
/// `metrics_file` set it only looks at the settings every [`PERIOD`].
pub fn start(src: Sources) -> anyhow::Result<()> {
    let counters = CountersReader::open(&src.paths).context("opening counters for metrics")?;
    let drops = DropsReader::open(&src.paths).context("opening drop counters for metrics")?;
    std::thread::Builder::new()
        .name("sg-metrics".into())
        .spawn(move || {
            let mut writer = Writer {
                src,
                counters,
                drops,
                current: None,
                failing: None,
            };
            loop {
                writer.pass();
                std::thread::sleep(PERIOD);
            }
        })
        .context("starting the metrics writer thread")?;
    Ok(())
}

struct Writer {
    src: Sources,
    counters: CountersReader,
    drops: DropsReader,
    /// The file written last.
    current: Option<PathBuf>,
    /// The last error, logged once until it changes or clears.
    failing: Option<String>,
}

impl Writer {
    fn pass(&mut self) {
        let want = self
            .src
            .settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .metrics_file
            .clone();
        if want != self.current {
            if let Some(old) = self.current.take() {
                // A file nobody updates would be exported as if current.
                match fs::remove_file(&old) {
                    Ok(()) => log::info!(
                        "METRICS: no longer writing {} (metrics_file changed); removed it",
                        old.display()
                    ),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => log::warn!(
                        "METRICS: metrics_file changed but the old file {} could not be removed: {e}; remove it by hand, node_exporter still exports it",
                        old.display()
                    ),
                }
            }
            self.failing = None;
            if let Some(p) = &want {
                log::info!(
                    "METRICS: writing Prometheus metrics to {} every {} s",
                    p.display(),
                    PERIOD.as_secs()
                );
            }
            self.current.clone_from(&want);
        }
        let Some(path) = want else { return };
        let result = self
            .values()
            .and_then(|v| write_atomic(&path, render(&v).as_bytes()));
        match (result, self.failing.is_some()) {
            (Ok(()), true) => {
                self.failing = None;
                log::info!("METRICS: {} written again", path.display());
            }
            (Ok(()), false) => {}
            (Err(e), _) => {
                let e = format!("{e:#}");
                if self.failing.as_deref() != Some(e.as_str()) {
                    log::error!(
                        "METRICS: cannot write {}: {e}; retrying every {} s (under systemd the unit needs ReadWritePaths= for its directory: docs/metrics.md)",
                        path.display(),
                        PERIOD.as_secs()
                    );
                    self.failing = Some(e);
                }
            }
        }
    }

    /// The values now. An unreadable kernel counter fails the pass rather
    /// than write zeros (a counter going down reads as a reset).
    fn values(&self) -> anyhow::Result<Values> {
        let s = &self.src;
        let snap = s.shared.snapshot();
        let (last_reload_success, last_reload_seconds) = s.shared.last_reload();
        let now = self
            .counters
            .read()
            .context("reading the per-VM counters")?;
        let drops = self
            .drops
            .read()
            .context("reading the drop counters")?
            .since(s.shared.drops_at_start);
        let since = |id: u32, vm: String| {
            let n = now.get(&id).copied().unwrap_or_default();
            let t = s
                .shared
                .counters_at_start
                .get(&id)
                .copied()
                .unwrap_or_default();
            VmValues {
                vm,
                allowed: n.allowed.saturating_sub(t.allowed),
                denied: n.denied.saturating_sub(t.denied),
                audited: n.audited.saturating_sub(t.audited),
            }
        };
        let mut names: Vec<(u32, String)> = s
            .vm_names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        names.sort_by(|a, b| a.1.cmp(&b.1));
        let mut vms = vec![since(spicegate_common::NO_VM, NO_VM_LABEL.to_owned())];
        vms.extend(names.into_iter().map(|(id, n)| since(id, n)));
        Ok(Values {
            vms,
            attached: kernel::attached(&s.paths, &s.cgroup),
            table_in_force: s.shared.table_in_force(),
            degraded: snap.degraded,
            unresolved_names: snap.unresolved_names,
            drops: DropCounts::new(drops, &s.denial_stats),
            unmarked_connections: drops.mark_failed,
            policy_sha256: snap.policy_sha256,
            last_reload_success,
            last_reload_seconds,
            reload_failures: s.shared.reload_failures(),
            grants: snap.grants,
            temporary_grants: snap.temporary_grants,
            guarded_endpoints: snap.guarded_endpoints,
            sessions_closed: s.shared.sessions_closed(),
            tampering_repaired: s.shared.tampering_repaired(),
        })
    }
}

/// Replaces `path` with `bytes` atomically: a temporary file made in the
/// same directory with O_CREAT|O_EXCL|O_NOFOLLOW (never through a link
/// someone planted), mode [`MODE`] whatever the umask, renamed over
/// `path` (which replaces a link at `path`, not its target). No fsync:
/// the file is rewritten every few seconds and worth nothing after a
/// crash. The temporary name starts with `.` and does not end in
/// `.prom`, so node_exporter never reads a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    let mut file = match open() {
        Ok(f) => f,
        // Left by a crashed writer with our pid, or planted: unlinking
        // removes the name (a link, not its target); then try once more.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)
                .with_context(|| format!("removing the stale {}", tmp.display()))?;
            open().with_context(|| format!("creating {}", tmp.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", tmp.display())),
    };
    let written = (|| -> io::Result<()> {
        file.set_permissions(fs::Permissions::from_mode(MODE))?;
        file.write_all(bytes)?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "sg-metrics-unit-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            fs::create_dir(&p).expect("temp dir");
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn writes_mode_0644_and_replaces_the_file() {
        let d = TempDir::new();
        let f = d.0.join("spicegate.prom");
        write_atomic(&f, b"a 1\n").expect("first write");
        write_atomic(&f, b"a 2\n").expect("second write");
        assert_eq!(fs::read_to_string(&f).expect("read"), "a 2\n");
        assert_eq!(fs::metadata(&f).expect("meta").mode() & 0o7777, 0o644);
        let left: Vec<_> = fs::read_dir(&d.0).expect("ls").collect();
        assert_eq!(left.len(), 1, "temporary files left: {left:?}");
    }

    #[test]
    fn never_writes_through_planted_links() {
        let d = TempDir::new();
        let victim = d.0.join("victim");
        fs::write(&victim, "precious").expect("victim");
        let f = d.0.join("spicegate.prom");
        // A link at the temporary name and one at the file itself.
        let tmp =
            d.0.join(format!(".spicegate.prom.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("tmp link");
        std::os::unix::fs::symlink(&victim, &f).expect("file link");
        write_atomic(&f, b"a 1\n").expect("write");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious");
        assert!(fs::symlink_metadata(&f).expect("meta").is_file());
        assert_eq!(fs::read_to_string(&f).expect("read"), "a 1\n");
        assert!(!tmp.exists() && fs::symlink_metadata(&tmp).is_err());
    }

    #[test]
    fn a_missing_directory_is_an_error_that_names_the_file() {
        let e = write_atomic(Path::new("/nonexistent-sg-dir/spicegate.prom"), b"x")
            .expect_err("no directory");
        assert!(format!("{e:#}").contains("/nonexistent-sg-dir/"), "{e:#}");
    }
}
