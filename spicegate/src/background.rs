//! The engine's helpers that wait on the outside world, each on its own
//! thread so the engine (timers, grants, the control socket's commands)
//! never does: closing revoked connections (sock_diag), watching this
//! machine's addresses (rtnetlink), and resolving the policy's names again
//! (NSS, DNS). They hand their results to the engine as [`Command`]s.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use crate::{
    compile::Compiled,
    directory::{Directory as _, Nss},
    engine::{CachingResolver, Command},
    events::Endpoint,
    journal::Event,
    policy::{self, Env, ParseCache, Source as PolicySource},
    sockdiag,
};

/// How long after a sweep it runs once more: a connect that passed the
/// hook just before a table swap can reach SYN_SENT only after the first
/// sweep's dump.
pub const RESWEEP_AFTER: Duration = Duration::from_secs(1);

/// Closes established connections the table in force refuses.
pub struct Sweeper {
    tx: mpsc::Sender<Arc<Compiled>>,
}

/// What the sweep looks at.
struct Scope {
    cgroup: PathBuf,
    /// The connect hook's socket marks (pinned map), when they can be read:
    /// then exactly the sockets it let through to a guarded endpoint are
    /// judged, wherever their cgroup went.
    marks: Option<std::os::fd::OwnedFd>,
    /// The connect hook's mark slots (pinned array of socket cookies),
    /// where most marks are; `None` where it cannot be opened.
    slots: Option<std::os::fd::OwnedFd>,
    /// The connect hook's fast marks (pinned hash of socket cookies), for
    /// a socket whose slot was taken, and every mark of a release before
    /// the slots; `None` where it cannot be opened.
    granted: Option<std::os::fd::OwnedFd>,
    /// Counts the connections closed.
    metrics: Arc<crate::metrics::Shared>,
}

impl Sweeper {
    /// Starts the sweeper for the sockets the hook marked (the pinned maps
    /// of `paths`: fast marks and socket storage), or, where the socket
    /// storage cannot be read, the client sockets of `cgroup`'s subtree.
    /// Each connection closed is counted in `metrics`.
    pub fn start(
        cgroup: PathBuf,
        paths: &crate::kernel::PinPaths,
        metrics: Arc<crate::metrics::Shared>,
    ) -> anyhow::Result<Self> {
        // Each map that cannot be opened is said, and the sweep goes on
        // with the others.
        let open = |path: PathBuf, what: &str, instead: &str| {
            crate::kernel::open_pinned(&path)
                .inspect_err(|e| {
                    log::warn!("cannot open the {what} {} ({e}); {instead}", path.display());
                })
                .ok()
        };
        let slots = open(
            paths.mark_slots(),
            "socket mark slots",
            "only the other marks are read",
        );
        let granted = open(
            paths.granted(),
            "fast socket marks",
            "only the other marks are read",
        );
        let marks = open(
            paths.marks(),
            "socket marks",
            "closing revoked connections by cgroup instead",
        );
        let mut scope = Scope {
            cgroup,
            marks,
            slots,
            granted,
            metrics,
        };
        let (tx, rx) = mpsc::channel::<Arc<Compiled>>();
        std::thread::Builder::new()
            .name("sg-sweeper".into())
            .spawn(move || {
                let mut pending: Option<Arc<Compiled>> = None;
                loop {
                    // The newest table wins; older ones queued behind it are
                    // superseded.
                    let table = match pending.take() {
                        Some(t) => t,
                        None => match rx.recv() {
                            Ok(t) => t,
                            Err(_) => return,
                        },
                    };
                    let table = rx.try_iter().last().unwrap_or(table);
                    sweep(&mut scope, &table);
                    match rx.recv_timeout(RESWEEP_AFTER) {
                        Ok(newer) => pending = Some(newer),
                        Err(mpsc::RecvTimeoutError::Timeout) => sweep(&mut scope, &table),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Sweeps against `table` now, and once more a second later. Returns at
    /// once.
    pub fn sweep(&self, table: Arc<Compiled>) {
        let _ = self.tx.send(table);
    }
}

impl Scope {
    /// Whether the hook left a fast mark on the socket with `cookie`: in
    /// its slot, or in the hash. A lookup that fails (not ENOENT) counts as
    /// marked: the sweep then judges the socket rather than let it keep
    /// access.
    fn fast_marked(&self, cookie: u64) -> bool {
        use std::os::fd::AsRawFd as _;
        if let Some(fd) = &self.slots {
            let slot = spicegate_common::mark_slot(cookie);
            match crate::kernel::map_lookup::<u32, u64>(fd.as_raw_fd(), &slot) {
                Ok(Some(held)) if held == cookie => return true,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        let Some(fd) = &self.granted else {
            return false;
        };
        !matches!(
            crate::kernel::map_lookup::<u64, u32>(fd.as_raw_fd(), &cookie),
            Ok(None)
        )
    }
}

/// One pass: closes every socket the hook let through to a guarded
/// endpoint whose connect the table refuses now.
fn sweep(scope: &mut Scope, table: &Compiled) {
    use std::os::fd::AsFd as _;
    let dumped = match &scope.marks {
        Some(fd) => sockdiag::tcp_sockets(Some(fd.as_fd())),
        None => sockdiag::tcp_sockets(None),
    };
    let sockets = match dumped {
        Ok(s) => s,
        Err(e) if scope.marks.is_some() => {
            log::warn!(
                "this kernel does not report socket marks ({e}); closing revoked connections by cgroup instead"
            );
            scope.marks = None;
            return sweep(scope, table);
        }
        Err(e) => {
            log::warn!("cannot list connections to close revoked ones: {e}");
            return;
        }
    };
    let by_marks = scope.marks.is_some();
    let in_scope = (!by_marks).then(|| sockdiag::cgroup_ids(&scope.cgroup));
    for s in sockets {
        // A socket no process holds (inode 0: an orphan finishing its
        // close, or a time-wait entry) carries no one's access; its
        // reported uid is 0 and closing it would only log noise.
        if s.inode == 0 {
            continue;
        }
        if crate::compile::decide(table, s.uid, s.dst, s.dport) {
            continue;
        }
        if by_marks {
            // Only client sockets the hook let through: never the server
            // side of a connection, whatever its peer's port.
            if s.marked.is_none() && !scope.fast_marked(s.cookie) {
                continue;
            }
        } else if let (Some(ids), Some(id)) = (&in_scope, s.cgroup_id)
            && !ids.contains(&id)
        {
            continue;
        }
        let user = Nss
            .user_name(s.uid)
            .unwrap_or_else(|| format!("#{}", s.uid));
        let dst = Endpoint(crate::compile::canonical(s.dst), s.dport).to_string();
        match sockdiag::destroy(&s) {
            Ok(()) => {
                scope.metrics.session_closed();
                log::warn!(
                    SPICEGATE_EVENT = Event::Closed,
                    SPICEGATE_UID = s.uid,
                    SPICEGATE_USER = user.as_str(),
                    SPICEGATE_DST = dst.as_str();
                    "CLOSED uid={} user={user} dst={dst} src={}: access ended",
                    s.uid,
                    Endpoint(crate::compile::canonical(s.src), s.sport)
                );
            }
            Err(e) => log::error!(
                "could not close a revoked connection of {user} to {}: {e}",
                Endpoint(s.dst, s.dport)
            ),
        }
    }
}

/// Re-reads this machine's addresses every `interval` and tells the engine
/// (which compares them with the ones in force).
pub fn watch_addresses(interval: Duration, engine: mpsc::Sender<Command>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("sg-addrs".into())
        .spawn(move || {
            let mut last = None;
            loop {
                std::thread::sleep(interval);
                let Ok(now) = crate::hostaddrs::current() else {
                    continue;
                };
                if last.as_ref() == Some(&now) {
                    continue;
                }
                last = Some(now.clone());
                if engine.send(Command::Addresses(now)).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// What the resolver thread resolves: the sources of the policy in force.
pub struct ResolveJob {
    /// `None`: the policy in force looks up no names; nothing to do.
    pub sources: Option<Arc<Vec<PolicySource>>>,
    pub sha256: String,
    pub interval: Duration,
    /// When these sources were resolved last (a reload resolves them, so
    /// the next re-resolution is an interval after it).
    pub resolved_at: std::time::Instant,
    /// Some names did not resolve: try every [`DEGRADED_RETRY`] at most,
    /// and apply what resolves even while others still do not.
    pub degraded: bool,
}

impl ResolveJob {
    /// The job for the policy just put in force (resolved now).
    pub fn of(loaded: &crate::engine::Loaded) -> Self {
        Self {
            sources: loaded.sources.clone(),
            sha256: loaded.sha256.clone(),
            interval: loaded.policy.settings.resolve_interval,
            resolved_at: std::time::Instant::now(),
            degraded: !loaded.policy.unresolved.is_empty(),
        }
    }
}

/// How often names are tried again while some do not resolve.
pub const DEGRADED_RETRY: Duration = Duration::from_secs(10);

/// Resolves the hostnames and groups of the policy in force again every
/// `resolve_interval`, and hands the result to the engine.
pub fn watch_names(
    job: Arc<Mutex<ResolveJob>>,
    resolver: Arc<CachingResolver>,
    pieces: Arc<ParseCache>,
    engine: mpsc::Sender<Command>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("sg-resolver".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let (sources, sha256, degraded) = {
                    let j = job
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let interval = if j.degraded {
                        j.interval.min(DEGRADED_RETRY)
                    } else {
                        j.interval
                    };
                    let Some(sources) = &j.sources else {
                        continue;
                    };
                    if last.max(j.resolved_at).elapsed() < interval {
                        continue;
                    }
                    (Arc::clone(sources), j.sha256.clone(), j.degraded)
                };
                last = std::time::Instant::now();
                let env = Env {
                    dir: &Nss,
                    resolver: &*resolver,
                };
                // Running normally, a name that stops resolving keeps the
                // policy in force; degraded, whatever resolves is applied.
                // Names only: nothing on the file system (a metrics
                // directory removed since) stops them being followed.
                // The pieces come from the reloads' cache: at a million
                // grants, parsing the 11 MB anew every interval cost 80 ms
                // of CPU and left 9 MB more resident for good.
                let parsed = policy::reparse_names(&sources, &env, degraded, Some(&pieces));
                match parsed {
                    Ok(policy) => {
                        let cmd = Command::Resolved {
                            sha256,
                            policy: Box::new(policy),
                        };
                        if engine.send(cmd).is_err() {
                            return;
                        }
                    }
                    Err(e) => log::warn!(
                        "re-reading groups and hostnames failed; the policy in force stays:\n{e}"
                    ),
                }
            }
        })?;
    Ok(())
}

/// What the name logger writes.
enum NameJob {
    /// One line per change of `diff`, each after `prefix`.
    Changes {
        prefix: &'static str,
        diff: crate::diff::Diff,
    },
    /// `console user: A -> B`.
    Console { from: Option<u32>, to: Option<u32> },
}

/// Writes the log lines that name users, on its own thread: looking a
/// name up may wait on NSS (LDAP, SSSD), which the engine never does.
#[derive(Clone)]
pub struct NameLog {
    tx: mpsc::Sender<NameJob>,
}

impl NameLog {
    pub fn start() -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel::<NameJob>();
        std::thread::Builder::new()
            .name("sg-namelog".into())
            .spawn(move || {
                let name = |u: Option<u32>| {
                    u.map_or_else(
                        || "nobody".to_owned(),
                        |u| Nss.user_name(u).unwrap_or_else(|| format!("#{u}")),
                    )
                };
                for job in rx {
                    match job {
                        NameJob::Changes { prefix, diff } => {
                            for line in diff.lines(&Nss) {
                                log::info!("{prefix}{line}");
                            }
                        }
                        NameJob::Console { from, to } => {
                            log::info!("console user: {} -> {}", name(from), name(to));
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Logs `prefix` + each change line.
    pub fn changes(&self, prefix: &'static str, diff: crate::diff::Diff) {
        if !diff.is_empty() {
            let _ = self.tx.send(NameJob::Changes { prefix, diff });
        }
    }

    pub fn console(&self, from: Option<u32>, to: Option<u32>) {
        let _ = self.tx.send(NameJob::Console { from, to });
    }
}
