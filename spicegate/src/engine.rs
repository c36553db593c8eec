//! The daemon's one owner of the kernel state. It runs on a thread of its
//! own ([`run`]) with the timers (expiry, schedules, watchdog); the control
//! socket, signals and the helper threads (addresses, names, logind) send it
//! [`Command`]s, and no one else touches the maps. It never waits on NSS,
//! DNS or netlink dumps: those run on the threads of background.rs.
//!
//! Longer than 600 lines: the engine still holds its views (status, list,
//! users) and the apply/grant logic side by side; the split into
//! `daemon/` (loop, access changes, grants, views) is issue 14's, done after
//! the million-grant rework that changes how a grant is applied.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use spicegate_common::VmCounters;
use tokio::sync::oneshot;

use crate::{
    background::{NameLog, ResolveJob, Sweeper},
    compile::{Compiled, Dest, Dynamic, LocalAddrs, compile, grant_delta, recompile_pairs},
    diff::Diff,
    directory::Nss,
    explain::explain,
    grants::{GrantStore, TempGrant, now_unix, rfc3339},
    hostaddrs,
    journal::Event,
    kernel::{self, Kernel, PinPaths},
    policy::{self, Env, Mode, Policy, Resolver, Settings, Source as PolicySource},
    schedule, state,
};

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// Requests to the engine.
pub enum Command {
    Status {
        reply: Reply<Value>,
    },
    /// Apply a policy read by a [`Loader`] off the engine thread.
    Reload {
        loaded: Box<Result<Loaded, String>>,
        reply: Reply<Value>,
    },
    Why {
        uid: u32,
        user: String,
        addr: IpAddr,
        port: u16,
        reply: Reply<Value>,
    },
    Grant {
        uid: u32,
        user: String,
        vm: String,
        for_secs: Option<u64>,
        by: u32,
        reply: Reply<Value>,
    },
    Revoke {
        uid: u32,
        user: String,
        vm: String,
        reply: Reply<Value>,
    },
    List {
        uid: u32,
        reply: Reply<Value>,
    },
    /// One page of who may open a VM now: uids above `after`.
    Users {
        vm: String,
        after: Option<u32>,
        reply: Reply<Value>,
    },
    /// One page of `spicegate report` (users above `after`; with `only`,
    /// that user's row alone).
    Report {
        after: Option<u32>,
        only: Option<u32>,
        reply: Reply<crate::report::Page>,
    },
    /// SIGHUP: apply a policy read off the engine thread.
    Sighup {
        loaded: Box<Result<Loaded, String>>,
    },
    /// The console user changed (logind watcher).
    Console(Option<u32>),
    /// This machine's addresses as the address watcher read them.
    Addresses(LocalAddrs),
    /// The policy in force, its names resolved again by the resolver
    /// thread (for the policy with this digest).
    Resolved {
        sha256: String,
        policy: Box<Policy>,
    },
    /// Stop the engine thread.
    Stop,
}

/// Where the policy in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    File,
    /// The policy file was broken at start; the last good copy is enforced.
    LastGood,
}

pub struct Config {
    pub policy_path: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup: PathBuf,
    pub paths: PinPaths,
    /// Test hook: a file holding seconds added to the wall clock for
    /// schedules (re-read on every tick, so a test can jump the clock).
    pub clock_offset_file: Option<PathBuf>,
    /// How long a start waits for the policy's names ([`NAMES_AT_START`]).
    pub names_timeout: Duration,
}

/// The clock schedules and expiries are evaluated with.
pub fn clock_now(offset_file: Option<&Path>) -> i64 {
    let offset = offset_file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| t.trim().parse::<i64>().ok())
        .unwrap_or(0);
    i64::try_from(now_unix())
        .unwrap_or(i64::MAX)
        .saturating_add(offset)
}

/// Hostname resolution that keeps a name's last addresses when it stops
/// resolving (and reports it), but refuses a name it never resolved.
#[derive(Default)]
pub struct CachingResolver {
    last: Mutex<HashMap<String, Vec<IpAddr>>>,
    failing: Mutex<BTreeSet<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Resolver for CachingResolver {
    fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        match policy::SystemResolver.resolve(host) {
            Ok(addrs) => {
                if locked(&self.failing).remove(host) {
                    log::info!("hostname {host} resolves again: {addrs:?}");
                }
                locked(&self.last).insert(host.to_owned(), addrs.clone());
                Ok(addrs)
            }
            Err(e) => match locked(&self.last).get(host).cloned() {
                Some(addrs) => {
                    if locked(&self.failing).insert(host.to_owned()) {
                        log::warn!(
                            "hostname {host} no longer resolves ({e}); keeping its last addresses {addrs:?}"
                        );
                    }
                    Ok(addrs)
                }
                None => Err(e),
            },
        }
    }
}

/// A policy read from disk, validated.
pub struct Loaded {
    pub policy: Policy,
    /// Shared with the resolver thread and the last-good writer, not
    /// copied: the text of a large policy is megabytes.
    pub sources: Arc<Vec<PolicySource>>,
    pub sha256: String,
}

/// Reads and validates a policy and its policy.d; the error text lists
/// every problem.
pub fn load_policy(path: &Path, resolver: &dyn Resolver) -> Result<Loaded, String> {
    let sources = policy::read_sources(path).map_err(|e| e.to_string())?;
    // The digest (shown by `status`) is computed next to the parse: on a
    // large policy that is a tenth of a reload, on the other core.
    let (policy, sha256) = std::thread::scope(|scope| {
        let digest = scope.spawn(|| {
            let mut h = Sha256::new();
            for s in &sources {
                h.update(s.text.as_bytes());
            }
            h.finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
        let policy = policy::parse_sources(
            &sources,
            &Env {
                dir: &Nss,
                resolver,
            },
        );
        (policy, digest.join())
    });
    let policy = policy.map_err(|e| e.to_string())?;
    let sha256 = sha256.map_err(|_| "computing the policy's digest failed".to_owned())?;
    Ok(Loaded {
        policy,
        sources: Arc::new(sources),
        sha256,
    })
}

fn digest(sources: &[PolicySource]) -> String {
    let mut h = Sha256::new();
    for s in sources {
        h.update(s.text.as_bytes());
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// A directory and resolver that know no name: what a start whose name
/// service does not answer in time enforces with.
struct NoNames;

const NO_ANSWER: &str = "the name service did not answer in time; still trying";

impl crate::directory::Directory for NoNames {
    fn user_uid(&self, _: &str) -> std::io::Result<Option<u32>> {
        Err(std::io::Error::other(NO_ANSWER))
    }
    fn group_members(&self, _: &str) -> std::io::Result<Option<BTreeSet<u32>>> {
        Err(std::io::Error::other(NO_ANSWER))
    }
    fn user_name(&self, _: u32) -> Option<String> {
        None
    }
}

impl Resolver for NoNames {
    fn resolve(&self, _: &str) -> Result<Vec<IpAddr>, String> {
        Err(NO_ANSWER.into())
    }
}

/// How long a start waits for NSS and DNS before it enforces without the
/// names that have not answered.
pub const NAMES_AT_START: Duration = Duration::from_secs(5);

/// The policy as a start enforces it: text errors are errors, but names
/// that do not resolve are left out (granted nothing; see
/// [`policy::parse_sources_lenient`]), and a name service that does not
/// answer within `timeout` is not waited for. The background resolver
/// fills them in later.
pub fn load_policy_at_start(
    path: &Path,
    resolver: &Arc<CachingResolver>,
    timeout: Duration,
) -> Result<Loaded, String> {
    let sources = policy::read_sources(path).map_err(|e| e.to_string())?;
    let sha256 = digest(&sources);
    let (tx, rx) = mpsc::channel();
    {
        let sources = sources.clone();
        let resolver = Arc::clone(resolver);
        std::thread::Builder::new()
            .name("sg-start-names".into())
            .spawn(move || {
                let env = Env {
                    dir: &Nss,
                    resolver: &*resolver,
                };
                let _ = tx.send(policy::parse_sources_lenient(&sources, &env));
            })
            .map_err(|e| format!("starting the name lookups: {e}"))?;
    }
    let policy = match rx.recv_timeout(timeout) {
        Ok(parsed) => parsed.map_err(|e| e.to_string())?,
        Err(_) => {
            log::warn!(
                "the policy's names did not resolve within {} s (NSS or DNS hangs); enforcing without them and resolving in the background",
                timeout.as_secs()
            );
            policy::parse_sources_lenient(
                &sources,
                &Env {
                    dir: &NoNames,
                    resolver: &NoNames,
                },
            )
            .map_err(|e| e.to_string())?
        }
    };
    Ok(Loaded {
        policy,
        sources: Arc::new(sources),
        sha256,
    })
}

/// How long after a reload the freed heap is handed back: reloads in quick
/// succession (an admin's edit-reload loop, a script) reuse it instead of
/// faulting fresh pages in each time (~20-30 ms at 100,000 grants).
const TRIM_DELAY: Duration = Duration::from_secs(2);

/// Hands the heap glibc keeps after a big parse or table build back to the
/// kernel. Without it a daemon that once parsed a 100,000-grant policy keeps
/// the peak of that parse resident for good.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub struct Engine {
    kernel: Kernel,
    cfg: Config,
    loaded: Loaded,
    source: Source,
    loaded_at: u64,
    local: LocalAddrs,
    compiled: Arc<Compiled>,
    grants: GrantStore,
    vm_names: Arc<RwLock<BTreeMap<u32, String>>>,
    settings: Arc<RwLock<Settings>>,
    last_reload: Value,
    started_at: u64,
    counters_at_start: BTreeMap<u32, VmCounters>,
    resolver: Arc<CachingResolver>,
    /// What the resolver thread re-resolves (the sources in force).
    resolve_job: Arc<Mutex<ResolveJob>>,
    sweeper: Sweeper,
    /// Writes the log lines that name users (NSS) off this thread.
    names: NameLog,
    /// Whether only root can change the state directory and the grants
    /// file; if not, neither is read or written.
    state_ok: Result<(), String>,
    /// The denial log's counters (set once the pipeline runs).
    denial_stats: Option<Arc<crate::denials::Stats>>,
    /// Kernel drop counters when this daemon started.
    drops_at_start: kernel::KernelDrops,
    /// uid of the active seat0 session, from the logind watcher.
    console: Option<u32>,
    /// Schedule grants in force.
    scheduled: BTreeSet<(String, u32)>,
    last_good: state::LastGoodWriter,
    /// When to hand freed heap back to the kernel (see [`TRIM_DELAY`]).
    trim_at: Option<Instant>,
    /// How long the steps of the last apply took, for `--verbose` logs.
    phases: Vec<(&'static str, Duration)>,
    /// How the last change reached the kernel, for `status`.
    last_change: Value,
    /// What the metrics writer reads (docs/metrics.md).
    metrics: Arc<crate::metrics::Shared>,
}

impl Engine {
    /// Validates the policy (falling back to the last good one), loads the
    /// program against the pinned maps, installs the table and attaches.
    /// Everything `start` needs from the policy, the state directory and
    /// the machine, compiled; nothing in the kernel yet.
    #[expect(clippy::type_complexity, reason = "one private call site")]
    fn prepare(
        cfg: &Config,
    ) -> anyhow::Result<(
        Result<(), String>,
        GrantStore,
        Arc<CachingResolver>,
        Loaded,
        Source,
        LocalAddrs,
        BTreeSet<(String, u32)>,
        Compiled,
    )> {
        let state_ok = trusted_state_dir(&cfg.state_dir);
        let grants = match &state_ok {
            Ok(()) => GrantStore::load(&cfg.state_dir)?,
            Err(e) => {
                log::error!(
                    "STATE UNTRUSTED: {e}; temporary grants and the last good copy of the policy are off until it is fixed and the daemon restarted"
                );
                GrantStore::empty(&cfg.state_dir)?
            }
        };
        let resolver = Arc::new(CachingResolver::default());
        let (loaded, source) = match load_policy_at_start(
            &cfg.policy_path,
            &resolver,
            cfg.names_timeout,
        ) {
            Ok(l) => (l, Source::File),
            Err(e) => {
                let last = state::last_good_path(&cfg.state_dir);
                if !last.exists() || state_ok.is_err() {
                    return Err(anyhow!(
                        "{e}\npolicy {} rejected and no last good policy in {}; nothing changed",
                        cfg.policy_path.display(),
                        cfg.state_dir.display()
                    ));
                }
                log::error!("{e}");
                log::error!(
                    "POLICY INVALID: {} is broken; enforcing the last good policy from {} until it is fixed and reloaded",
                    cfg.policy_path.display(),
                    last.display()
                );
                (
                    load_policy_at_start(&last, &resolver, cfg.names_timeout)
                        .map_err(|e2| anyhow!("{e}\nthe last good policy is broken too: {e2}"))?,
                    Source::LastGood,
                )
            }
        };
        let local = hostaddrs::current().context("listing this machine's addresses")?;
        let clock = clock_now(cfg.clock_offset_file.as_deref());
        let scheduled =
            schedule::scheduled(&loaded.policy, clock, &schedule::zone(&loaded.policy), None);
        let temp = grants.active(u64::try_from(clock).unwrap_or(0));
        let dynamic = Dynamic {
            temp: &temp,
            scheduled: scheduled.clone(),
            console: None,
        };
        let compiled = compile(&loaded.policy, &local, &dynamic)
            .with_context(|| cfg.policy_path.display().to_string())?;

        Ok((
            state_ok, grants, resolver, loaded, source, local, scheduled, compiled,
        ))
    }

    pub fn start(cfg: Config) -> anyhow::Result<Self> {
        // Loading the program (BTF, the verifier) and reading the policy
        // are independent: done side by side, they cost the longer of the
        // two instead of the sum.
        let (kernel, prepared) = std::thread::scope(|s| {
            let kernel = s.spawn(|| -> anyhow::Result<Kernel> {
                kernel::ensure_bpffs(&cfg.paths.dir)?;
                Kernel::load(&cfg.paths)
            });
            let prepared = Self::prepare(&cfg);
            let kernel = kernel
                .join()
                .unwrap_or_else(|_| Err(anyhow!("loading the program panicked")));
            (kernel, prepared)
        });
        let (state_ok, grants, resolver, loaded, source, local, scheduled, compiled) = prepared?;
        let mut kernel = kernel?;
        let now = now_unix();
        // Table first, links second: a fresh attach never runs without its
        // table, and on adoption the old links see the new table at once.
        kernel.install(&compiled)?;
        kernel.attach(&cfg.cgroup)?;
        // An upgrade from a release with another pin layout: its links ran
        // beside ours until now (a connect had to pass both); ours are in
        // force, so they go.
        match kernel::retire_legacy(&cfg.paths) {
            Ok(gone) if !gone.is_empty() => log::info!(
                "upgraded the pinned enforcement to layout v{}: removed the previous release's {}",
                spicegate_common::LAYOUT_VERSION,
                gone.join(", ")
            ),
            Ok(_) => {}
            Err(e) => log::error!(
                "could not remove the previous release's pins from {} (they keep enforcing its last table beside ours): {e:#}",
                cfg.paths.dir.display()
            ),
        }
        if let Err(e) = kernel.name_uids(named_uids(&loaded.policy, &compiled)) {
            log::warn!("could not give the policy's uids their own denial budget: {e:#}");
        }
        let counters_at_start = kernel.counters().unwrap_or_default();
        let drops_at_start = kernel.drops().unwrap_or_default();
        let last_good = state::LastGoodWriter::new(cfg.state_dir.clone());

        let settings = Arc::new(RwLock::new(loaded.policy.settings.clone()));
        let vm_names = Arc::new(RwLock::new(compiled.vm_names.clone()));
        let resolve_job = Arc::new(Mutex::new(ResolveJob {
            sources: Arc::clone(&loaded.sources),
            sha256: loaded.sha256.clone(),
            interval: loaded.policy.settings.resolve_interval,
            resolved_at: Instant::now(),
            degraded: !loaded.policy.unresolved.is_empty(),
        }));
        log_unresolved(&loaded.policy);
        let metrics = Arc::new(crate::metrics::Shared::new(
            counters_at_start.clone(),
            drops_at_start,
        ));
        metrics.reload_ok(now, Duration::ZERO);
        let sweeper = Sweeper::start(cfg.cgroup.clone(), &cfg.paths.marks(), Arc::clone(&metrics))?;
        let engine = Self {
            kernel,
            cfg,
            loaded,
            source,
            loaded_at: now,
            local,
            compiled: Arc::new(compiled),
            grants,
            vm_names,
            settings,
            last_reload: json!({ "at": rfc3339(now), "at_unix": now, "ok": true, "message": "started" }),
            started_at: now,
            counters_at_start,
            resolver,
            resolve_job,
            sweeper,
            names: NameLog::start()?,
            state_ok,
            denial_stats: None,
            drops_at_start,
            console: None,
            scheduled,
            last_good,
            trim_at: None,
            phases: Vec::new(),
            last_change: Value::Null,
            metrics,
        };
        if engine.source == Source::File {
            engine.save_last_good();
        }
        engine.sweep();
        engine.publish_metrics();
        Ok(engine)
    }

    pub fn kernel_mut(&mut self) -> &mut Kernel {
        &mut self.kernel
    }
    pub fn vm_names(&self) -> Arc<RwLock<BTreeMap<u32, String>>> {
        Arc::clone(&self.vm_names)
    }
    pub fn settings(&self) -> Arc<RwLock<Settings>> {
        Arc::clone(&self.settings)
    }
    pub fn source(&self) -> Source {
        self.source
    }
    /// The resolver reloads parse with (shared with the resolver thread).
    pub fn resolver(&self) -> Arc<CachingResolver> {
        Arc::clone(&self.resolver)
    }
    /// The denial log's counters, for `status`.
    pub fn set_denial_stats(&mut self, stats: Arc<crate::denials::Stats>) {
        self.denial_stats = Some(stats);
    }
    /// What the metrics writer reads.
    pub fn metrics(&self) -> Arc<crate::metrics::Shared> {
        Arc::clone(&self.metrics)
    }
    /// Hands the metrics writer the engine's view (once a second, after
    /// the watchdog): counts only, nothing that waits.
    pub fn publish_metrics(&self) {
        let now = u64::try_from(self.clock()).unwrap_or(0);
        self.metrics.publish(crate::metrics::Snapshot {
            policy_sha256: self.loaded.sha256.clone(),
            degraded: !self.loaded.policy.unresolved.is_empty(),
            unresolved_names: self.loaded.policy.unresolved.len() as u64,
            grants: self.compiled.grant_count() as u64,
            temporary_grants: self.grants.active(now).len() as u64,
            guarded_endpoints: self.compiled.endpoints.len() as u64,
        });
    }
    /// What the resolver thread works on.
    pub fn resolve_job(&self) -> Arc<Mutex<ResolveJob>> {
        Arc::clone(&self.resolve_job)
    }

    pub fn summary(&self) -> String {
        let c = &self.compiled;
        format!(
            "{} vm(s), {} guarded endpoint(s), {} port(s) guarded everywhere, {} grant(s)",
            c.vm_names.len(),
            c.endpoints.len(),
            c.guarded_everywhere.len(),
            c.grant_count()
        )
    }

    fn save_last_good(&self) {
        if self.state_ok.is_ok() {
            self.last_good.save(Arc::clone(&self.loaded.sources));
        }
    }

    fn clock(&self) -> i64 {
        clock_now(self.cfg.clock_offset_file.as_deref())
    }

    /// Compiles and installs; on error nothing in the kernel changed.
    fn apply(
        &mut self,
        loaded: Option<Loaded>,
        local: Option<LocalAddrs>,
    ) -> anyhow::Result<Arc<Compiled>> {
        let started = Instant::now();
        let policy = loaded.as_ref().map_or(&self.loaded.policy, |l| &l.policy);
        let local_ref = local.as_ref().unwrap_or(&self.local);
        let clock = self.clock();
        let scheduled = schedule::scheduled(policy, clock, &schedule::zone(policy), self.console);
        let temp = self.grants.active(u64::try_from(clock).unwrap_or(0));
        let dynamic = Dynamic {
            temp: &temp,
            scheduled: scheduled.clone(),
            console: self.console,
        };
        let t = Instant::now();
        let compiled = compile(policy, local_ref, &dynamic)?;
        self.phases.push(("compile", t.elapsed()));
        self.scheduled = scheduled;
        let named: Vec<u32> = named_uids(policy, &compiled).collect();
        let t = Instant::now();
        self.install(&compiled, started)?;
        self.phases.push(("install", t.elapsed()));
        if let Err(e) = self.kernel.name_uids(named.into_iter()) {
            log::warn!("could not give the policy's uids their own denial budget: {e:#}");
        }
        let t = Instant::now();
        *self
            .vm_names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = compiled.vm_names.clone();
        let old = std::mem::replace(&mut self.compiled, Arc::new(compiled));
        if let Some(l) = loaded {
            *self
                .settings
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = l.policy.settings.clone();
            self.loaded = l;
            self.loaded_at = now_unix();
            self.source = Source::File;
            self.save_last_good();
            *locked(&self.resolve_job) = ResolveJob {
                sources: Arc::clone(&self.loaded.sources),
                sha256: self.loaded.sha256.clone(),
                interval: self.loaded.policy.settings.resolve_interval,
                resolved_at: Instant::now(),
                degraded: !self.loaded.policy.unresolved.is_empty(),
            };
        }
        if let Some(l) = local {
            self.local = l;
        }
        self.phases.push(("keep", t.elapsed()));
        let t = Instant::now();
        self.sweep();
        self.phases.push(("sweep", t.elapsed()));
        Ok(old)
    }

    /// Puts `new` in force, atomically, the cheapest way: when only grants
    /// changed, and few, through the overlays of the table in force (cost
    /// in proportion to the change); otherwise a new table. On error the
    /// kernel decides as before.
    /// `started`: when working out the change began (the daemon's side of
    /// it, for `status` `table.last_change.ms`).
    fn install(&mut self, new: &Compiled, started: Instant) -> anyhow::Result<()> {
        let t = started;
        let limit = spicegate_common::OVERLAY_MAX;
        let (generation, _, writes_before) = self.kernel.table_stats();
        if generation != 0
            && let Some(delta) = grant_delta(&self.compiled, new, limit)
            && self.kernel.apply_delta(&delta)?
        {
            let (_, len, writes) = self.kernel.table_stats();
            self.note_change("overlay", delta.len(), len, writes - writes_before, t);
            return Ok(());
        }
        self.kernel.install(new)?;
        let (_, len, writes) = self.kernel.table_stats();
        self.note_change("table", new.grant_count(), len, writes - writes_before, t);
        Ok(())
    }

    fn note_change(&mut self, how: &str, grants: usize, overlay: usize, writes: u64, t: Instant) {
        let ms = t.elapsed().as_secs_f64() * 1e3;
        log::debug!(
            "kernel change: {how}, {grants} grant(s), overlay {overlay} entries, {writes} map writes, {ms:.2} ms"
        );
        self.last_change = json!({
            "how": how,
            "grants": grants,
            "overlay_entries": overlay,
            "map_writes": writes,
            "ms": (ms * 100.0).round() / 100.0,
        });
    }

    /// A grant, revoke, expiry, schedule edge or console switch: works out
    /// the access of the (vm, uid) `pairs` again (plus those whose schedule
    /// window opened or closed, and the console user's when it changed)
    /// and puts the result in force. On error nothing changed.
    fn apply_pairs(
        &mut self,
        mut pairs: BTreeSet<(String, u32)>,
        console_changed: bool,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        self.phases.clear();
        let clock = self.clock();
        let policy = &self.loaded.policy;
        let scheduled = schedule::scheduled(policy, clock, &schedule::zone(policy), self.console);
        pairs.extend(self.scheduled.symmetric_difference(&scheduled).cloned());
        let temp = self.grants.active(u64::try_from(clock).unwrap_or(0));
        let dynamic = Dynamic {
            temp: &temp,
            scheduled,
            console: self.console,
        };
        let t = Instant::now();
        let next = recompile_pairs(&self.compiled, policy, &dynamic, &pairs, console_changed)?;
        self.phases.push(("compile", t.elapsed()));
        let t = Instant::now();
        self.install(&next, started)?;
        self.phases.push(("install", t.elapsed()));
        let high = pairs
            .iter()
            .map(|(_, u)| *u)
            .chain(dynamic.console)
            .filter(|u| *u >= spicegate_common::RATE_LOW_UIDS);
        if let Err(e) = self.kernel.name_uids(high) {
            log::warn!("could not give the policy's uids their own denial budget: {e:#}");
        }
        self.scheduled = dynamic.scheduled;
        self.compiled = Arc::new(next);
        self.sweep();
        Ok(())
    }

    /// Has the sweeper close established connections the table in force
    /// refuses (unless `end_sessions = false`), now and once more a second
    /// later. Returns at once.
    fn sweep(&self) {
        if self.loaded.policy.settings.end_sessions {
            self.sweeper.sweep(Arc::clone(&self.compiled));
        }
    }

    /// `reload` and SIGHUP.
    /// `loaded` was read and parsed off this thread (see [`Loader`]).
    pub fn reload(&mut self, why: &str, loaded: Result<Loaded, String>) -> Result<Value, String> {
        let now = now_unix();
        let start = Instant::now();
        self.phases.clear();
        let result = loaded.and_then(|l| {
            let sha = l.sha256.clone();
            self.apply(Some(l), None)
                .map(|old| (old, sha))
                .map_err(|e| format!("{e:#}"))
        });
        match result {
            Ok((old, sha)) => {
                let t = Instant::now();
                let diff = Diff::of_tables(&old, &self.compiled);
                drop(old);
                self.trim_soon();
                self.phases.push(("diff", t.elapsed()));
                if let Some(w) = self.loaded.policy.listener_warning() {
                    log::warn!("{w}");
                }
                log::info!(
                    SPICEGATE_EVENT = Event::Reload;
                    "reloaded policy {} ({why}) in {} ms: {}",
                    self.cfg.policy_path.display(),
                    start.elapsed().as_millis(),
                    self.summary()
                );
                log::debug!(
                    "reload phases: {}",
                    self.phases
                        .iter()
                        .map(|(what, d)| format!("{what} {:.1} ms", d.as_secs_f64() * 1e3))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.names.changes("access change: ", diff.clone());
                self.metrics.reload_ok(now, start.elapsed());
                self.last_reload = json!({ "at": rfc3339(now), "at_unix": now, "ok": true, "message": format!("reloaded ({why})") });
                // The control handler renders `diff` as `changes` lines
                // (names need NSS, which this thread does not wait on).
                Ok(json!({ "summary": self.summary(), "diff": diff, "sha256": sha }))
            }
            Err(e) => {
                log::error!(SPICEGATE_EVENT = Event::ReloadRefused; "reload refused ({why}), the previous policy stays in force:\n{e}");
                self.metrics.reload_failed();
                self.last_reload = json!({ "at": rfc3339(now), "at_unix": now, "ok": false, "message": e.clone() });
                Err(format!("{e}\nthe previous policy stays in force"))
            }
        }
    }

    /// This machine's addresses as the watcher read them; reapplies when
    /// they changed.
    pub fn addresses(&mut self, now: LocalAddrs) {
        if now == self.local {
            return;
        }
        match self.apply(None, Some(now)) {
            Ok(_) => log::info!("this machine's addresses changed; local endpoints updated"),
            Err(e) => log::error!(
                "this machine's addresses changed but the table could not be updated: {e:#}"
            ),
        }
    }

    /// Once a second: checks that the programs are still attached and the
    /// maps still pinned, and restores them if someone removed them. This is
    /// the "small scheduled job checking the rights settings" of the
    /// iptables days, built in.
    pub fn watchdog(&mut self) {
        // Pins first: re-attaching pins the links into the same directory.
        match self.kernel.repin_missing() {
            Ok(names) if !names.is_empty() => {
                self.metrics.repaired();
                log::error!(
                    SPICEGATE_EVENT = Event::Tampering;
                    "TAMPERING: pins of {} were removed by someone else; pinned again in {}",
                    names.join(", "),
                    self.cfg.paths.dir.display()
                );
            }
            Ok(_) => {}
            Err(e) => {
                log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: a map pin was removed and could not be restored: {e:#}")
            }
        }
        let in_force = match self.kernel.table_intact() {
            Ok(true) => true,
            Ok(false) => {
                log::error!(
                    SPICEGATE_EVENT = Event::Tampering;
                    "TAMPERING: the rule table in {} (or its overlays) was emptied, replaced or written by someone else; installing the policy again",
                    self.cfg.paths.policy().display()
                );
                let compiled = Arc::clone(&self.compiled);
                // Fresh overlays too: someone may have written into ours.
                self.kernel.discard_overlays();
                match self.kernel.install(&compiled) {
                    Ok(()) => {
                        self.metrics.repaired();
                        log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: rule table restored");
                        true
                    }
                    Err(e) => {
                        log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: could not restore the rule table: {e:#}");
                        false
                    }
                }
            }
            Err(e) => {
                log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: cannot read the policy slot: {e:#}");
                false
            }
        };
        self.metrics.set_table_in_force(in_force);
        if !kernel::attached(&self.cfg.paths, &self.cfg.cgroup) {
            log::error!(
                SPICEGATE_EVENT = Event::Tampering;
                "TAMPERING: spicegate's connect programs are no longer attached to {} (detached or unpinned by someone else); re-attaching",
                self.cfg.cgroup.display()
            );
            let compiled = Arc::clone(&self.compiled);
            match self
                .kernel
                .install(&compiled)
                .and_then(|()| self.kernel.attach(&self.cfg.cgroup))
            {
                Ok(()) => {
                    self.metrics.repaired();
                    log::error!(
                        SPICEGATE_EVENT = Event::Tampering;
                        "TAMPERING: enforcement restored on {}",
                        self.cfg.cgroup.display()
                    );
                }
                Err(e) => {
                    log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: could not restore enforcement: {e:#}")
                }
            }
        }
    }

    /// Several times a second: expiries, schedule windows and the periodic
    /// re-resolution of hostnames and groups. Everything is computed from the
    /// clock now, so a clock jump or a DST change takes effect at once.
    pub fn tick(&mut self) {
        if self.trim_at.is_some_and(|t| Instant::now() >= t) {
            self.trim_at = None;
            release_free_memory();
        }
        self.expire_grants();
        let clock = self.clock();
        let scheduled = schedule::scheduled(
            &self.loaded.policy,
            clock,
            &schedule::zone(&self.loaded.policy),
            self.console,
        );
        if scheduled != self.scheduled {
            let old = self.scheduled.clone();
            match self.apply_pairs(BTreeSet::new(), false) {
                Ok(_) => self
                    .names
                    .changes("schedule: ", Diff::of_pairs(&old, &scheduled)),
                Err(e) => log::error!("schedule change not applied: {e:#}"),
            }
        }
    }

    /// The resolver thread's result: applies it when names changed and it
    /// was made for the policy still in force.
    fn resolved(&mut self, sha256: &str, policy: Policy) {
        if sha256 != self.loaded.sha256 {
            return;
        }
        let was: BTreeSet<String> = self
            .loaded
            .policy
            .unresolved
            .iter()
            .map(|u| u.name.clone())
            .collect();
        let now: BTreeSet<String> = policy.unresolved.iter().map(|u| u.name.clone()).collect();
        for name in was.difference(&now) {
            log::warn!("RESOLVED: {name} resolves again; the policy is enforced with it");
        }
        if !was.is_empty() && now.is_empty() {
            log::warn!("no longer degraded: every name of the policy resolves");
        }
        match policy {
            policy if policy == self.loaded.policy => {}
            policy => {
                let loaded = Loaded {
                    policy,
                    sources: Arc::clone(&self.loaded.sources),
                    sha256: self.loaded.sha256.clone(),
                };
                let source = self.source;
                match self.apply(Some(loaded), None) {
                    Ok(old) => {
                        self.names.changes(
                            "groups or hostnames changed: ",
                            Diff::of_tables(&old, &self.compiled),
                        );
                        log::info!(
                            "groups or hostnames changed; policy re-applied: {}",
                            self.summary()
                        );
                    }
                    Err(e) => log::error!(
                        "groups or hostnames changed but the table could not be updated: {e:#}"
                    ),
                }
                self.source = source;
            }
        }
    }

    /// The console user changed (logind).
    pub fn set_console(&mut self, uid: Option<u32>) {
        if uid == self.console {
            return;
        }
        self.names.console(self.console, uid);
        self.console = uid;
        if !self
            .loaded
            .policy
            .vms
            .values()
            .any(policy::Vm::uses_console)
        {
            return;
        }
        if let Err(e) = self.apply_pairs(BTreeSet::new(), true) {
            log::error!("console change not applied: {e:#}");
        }
    }

    /// Drops expired temporary grants and reapplies.
    fn expire_grants(&mut self) {
        let now = u64::try_from(self.clock()).unwrap_or(0);
        if self.grants.next_expiry().is_none_or(|t| t > now) {
            return;
        }
        let gone = self.grants.expire(now);
        // Access ends first; the file follows on the writer's thread (an
        // expired grant left in it is dropped when it is read).
        let pairs = gone.iter().map(|g| (g.vm.clone(), g.uid)).collect();
        let applied = self.apply_pairs(pairs, false);
        if self.state_ok.is_ok() {
            self.grants.save_in_background();
        }
        match applied {
            Ok(_) => {
                for g in gone {
                    log::info!(
                        "temporary grant expired: {} ({}) on vm {}",
                        g.user,
                        g.uid,
                        g.vm
                    );
                }
            }
            Err(e) => log::error!(
                "expiring temporary grants failed; they stay in the kernel until the next apply: {e:#}"
            ),
        }
    }

    /// Hands freed heap back [`TRIM_DELAY`] from now (or sooner if a trim
    /// is due already): a large answer's document is freed by then.
    fn trim_soon(&mut self) {
        let at = Instant::now() + TRIM_DELAY;
        self.trim_at = Some(self.trim_at.map_or(at, |t| t.min(at)));
    }

    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Status { reply } => {
                let _ = reply.send(Ok(self.status()));
                self.trim_soon();
            }
            Command::Reload { loaded, reply } => {
                let _ = reply.send(self.reload("spicegate reload", *loaded));
            }
            Command::Sighup { loaded } => {
                let _ = self.reload("SIGHUP", *loaded);
            }
            Command::Console(uid) => self.set_console(uid),
            Command::Addresses(local) => self.addresses(local),
            Command::Resolved { sha256, policy } => self.resolved(&sha256, *policy),
            Command::Stop => {}
            Command::Why {
                uid,
                user,
                addr,
                port,
                reply,
            } => {
                let clock = self.clock();
                let ctx = crate::explain::Context {
                    policy: &self.loaded.policy,
                    temp: &self.grants.active(u64::try_from(clock).unwrap_or(0)),
                    tz: &schedule::zone(&self.loaded.policy),
                    now: clock,
                    console: self.console,
                };
                let v = explain(&self.compiled, &ctx, uid, &user, addr, port);
                let bind = crate::explain::explain_bind(&self.compiled, uid, &user, port);
                let v = serde_json::to_value(v).map(|mut v| {
                    if let (Some(o), Some(b)) = (v.as_object_mut(), bind) {
                        o.insert("bind".into(), Value::String(b));
                    }
                    v
                });
                let _ = reply.send(v.map_err(|e| e.to_string()));
            }
            Command::Grant {
                uid,
                user,
                vm,
                for_secs,
                by,
                reply,
            } => {
                let _ = reply.send(self.grant(uid, user, vm, for_secs, by));
            }
            Command::Revoke {
                uid,
                user,
                vm,
                reply,
            } => {
                let _ = reply.send(self.revoke(uid, &user, &vm));
            }
            Command::List { uid, reply } => {
                let _ = reply.send(Ok(self.list(uid)));
            }
            Command::Users { vm, after, reply } => {
                let _ = reply.send(self.users_page(&vm, after));
                self.trim_soon();
            }
            Command::Report { after, only, reply } => {
                let _ = reply.send(Ok(self.report_page(after, only)));
                self.trim_soon();
            }
        }
    }

    fn grant(
        &mut self,
        uid: u32,
        user: String,
        vm: String,
        for_secs: Option<u64>,
        by: u32,
    ) -> Result<Value, String> {
        if let Err(e) = &self.state_ok {
            return Err(format!(
                "grant refused: temporary grants are off because {e}; fix it and restart the daemon"
            ));
        }
        if !self.loaded.policy.vms.contains_key(&vm) {
            let known: Vec<&str> = self.loaded.policy.vms.keys().map(String::as_str).collect();
            return Err(format!(
                "no vm `{vm}` in the policy (vms: {})",
                known.join(", ")
            ));
        }
        if let Some(s) = for_secs
            && !(1..=crate::grants::MAX_GRANT_SECS).contains(&s)
        {
            return Err(format!(
                "a temporary grant lasts from 1 second to 10 years ({} s), not {s} s; for longer, put the user in the policy",
                crate::grants::MAX_GRANT_SECS
            ));
        }
        let now = u64::try_from(self.clock()).unwrap_or(0);
        let expires = for_secs.map(|s| now.saturating_add(s));
        let before = self.grants.grants.clone();
        self.grants.upsert(TempGrant {
            uid,
            user: user.clone(),
            vm: vm.clone(),
            expires,
            granted_at: now,
            granted_by: by,
        });
        // Saved first: a grant that could not survive a restart is refused
        // rather than half-applied.
        if let Err(e) = self.grants.save() {
            self.grants.grants = before;
            return Err(format!(
                "grant refused, nothing changed: cannot save it: {e:#}"
            ));
        }
        if let Err(e) = self.apply_pairs([(vm.clone(), uid)].into(), false) {
            self.grants.grants = before;
            let _ = self.grants.save();
            return Err(format!("grant not applied, nothing changed: {e:#}"));
        }
        let until = expires.map_or_else(
            || "until revoked".to_owned(),
            |e| format!("until {}", rfc3339(e)),
        );
        log::info!(
            "temporary grant: {user} ({uid}) may open vm {vm} {until} (granted by uid {by})"
        );
        Ok(
            json!({ "user": user, "uid": uid, "vm": vm, "expires": expires.map(rfc3339), "expires_unix": expires }),
        )
    }

    fn revoke(&mut self, uid: u32, user: &str, vm: &str) -> Result<Value, String> {
        let before = self.grants.grants.clone();
        if !self.grants.remove(uid, vm) {
            return Err(format!(
                "{user} has no temporary grant on vm `{vm}` (policy grants are changed in the policy file)"
            ));
        }
        if let Err(e) = self.apply_pairs([(vm.to_owned(), uid)].into(), false) {
            self.grants.grants = before;
            return Err(format!("revoke not applied, nothing changed: {e:#}"));
        }
        // Access is gone in the kernel already; a failed save only means the
        // grant would come back after a restart, so say it loudly.
        if let Err(e) = self.grants.save() {
            log::error!(
                "temporary grant revoked in the kernel but {e:#}; it would return after a restart: fix the state directory and revoke again"
            );
            return Err(format!(
                "revoked in the kernel, but not saved (it would return after a restart): {e:#}"
            ));
        }
        log::info!("temporary grant revoked: {user} ({uid}) on vm {vm}");
        Ok(json!({ "user": user, "uid": uid, "vm": vm }))
    }

    /// A page of [`USERS_PAGE`] users who may open `vm` now, after uid
    /// `after`; `next_after` is set while there are more.
    fn users_page(&self, vm: &str, after: Option<u32>) -> Result<Value, String> {
        let Some(v) = self.loaded.policy.vms.get(vm) else {
            return Err(format!("no vm `{vm}` in the policy"));
        };
        let info = self.compiled.endpoints.values().find(|i| i.vm == vm);
        let policy_uids = v.uids();
        let (users, next_after) = match info {
            None => (Vec::new(), None),
            Some(i) => {
                let range = match after {
                    Some(a) => i
                        .uids
                        .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
                    None => i.uids.range(..),
                };
                let page: Vec<u32> = range.take(USERS_PAGE + 1).copied().collect();
                let more = page.len() > USERS_PAGE;
                let page = &page[..page.len().min(USERS_PAGE)];
                (
                    page.iter()
                        .map(|u| user_entry(i, &policy_uids, *u))
                        .collect(),
                    more.then(|| page.last().copied()).flatten(),
                )
            }
        };
        Ok(json!({
            "vm": vm,
            "users_total": info.map_or(0, |i| i.uids.len()),
            "users": users,
            "next_after": next_after,
        }))
    }

    /// A page of `report` (see report.rs): bounded, names left out.
    fn report_page(&self, after: Option<u32>, only: Option<u32>) -> crate::report::Page {
        let now = u64::try_from(self.clock()).unwrap_or(0);
        let temp = self.grants.active(now);
        crate::report::page(&self.loaded.policy, &temp, true, after, only)
    }

    /// `list`: the VMs `uid` may open now or later, and how to reach them.
    /// Answers for that uid only.
    pub fn list(&self, uid: u32) -> Value {
        let clock = self.clock();
        let tz = schedule::zone(&self.loaded.policy);
        let mut vms = Vec::new();
        for vm in self.loaded.policy.vms.values() {
            let info = self.compiled.endpoints.values().find(|i| i.vm == vm.name);
            let now = info.is_some_and(|i| i.uids.contains(&uid));
            let in_schedule =
                schedule::named_in_schedule(&self.loaded.policy, &vm.name, uid, self.console);
            let console_vm = vm.uses_console();
            if !now && !in_schedule && !console_vm {
                continue;
            }
            let via = info.map(|i| {
                if !i.uids.contains(&uid) {
                    "none"
                } else if i.temp_uids.contains(&uid) {
                    "temporary"
                } else if vm.uids().contains(&uid) {
                    "policy"
                } else if i.console_uid == Some(uid) {
                    "console"
                } else {
                    "schedule"
                }
            });
            let next = in_schedule
                .then(|| {
                    schedule::next_change(
                        &self.loaded.policy,
                        &vm.name,
                        uid,
                        clock,
                        &tz,
                        self.console,
                    )
                })
                .flatten();
            // A temporary grant ends at its expiry, whatever the schedule.
            let next = if via == Some("temporary") {
                self.grants
                    .active(u64::try_from(clock).unwrap_or(0))
                    .iter()
                    .filter(|g| g.uid == uid && g.vm == vm.name)
                    .filter_map(|g| g.expires)
                    .max()
                    .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
            } else {
                next
            };
            let server = self.loaded.policy.servers.get(&vm.server);
            let (host, addresses) = match server.map(|s| (&s.target, &s.hostnames)) {
                Some((policy::ServerTarget::Addresses(a), names)) => (
                    names
                        .first()
                        .cloned()
                        .or_else(|| a.first().map(ToString::to_string))
                        .unwrap_or_default(),
                    a.iter().map(ToString::to_string).collect::<Vec<_>>(),
                ),
                _ => ("localhost".to_owned(), vec![]),
            };
            vms.push(json!({
                "name": vm.name,
                "server": vm.server,
                "host": host,
                "addresses": addresses,
                "port": vm.plain_port(),
                "tls_port": vm.tls_port,
                "tls": vm.tls_port.is_some(),
                "ca_file": vm.ca_file,
                "allowed_now": now,
                "via": via,
                "schedules": vm.schedules.iter().map(policy::Schedule::describe).collect::<Vec<_>>(),
                "console_only": console_vm && !now && !in_schedule,
                "next_change": next.map(|t| rfc3339(u64::try_from(t).unwrap_or(0))),
            }));
        }
        json!({
            "uid": uid,
            // Filled in by the control handler (NSS is not asked here).
            "user": Value::Null,
            "client": self.loaded.policy.settings.client,
            "vms": vms,
        })
    }

    /// The `status` document. Field names are stable (docs/status.md).
    pub fn status(&self) -> Value {
        let counters = self.kernel.counters().unwrap_or_default();
        let since = |id: u32| {
            let now = counters.get(&id).copied().unwrap_or_default();
            let then = self.counters_at_start.get(&id).copied().unwrap_or_default();
            (
                now.allowed.saturating_sub(then.allowed),
                now.denied.saturating_sub(then.denied),
                now.audited.saturating_sub(then.audited),
            )
        };
        let clock = self.clock();
        let tz = schedule::zone(&self.loaded.policy);
        // Names are filled in by the control handler, off this thread
        // (see control::fill_user_names).
        let name = |_: u32| Value::Null;
        let ids: BTreeMap<&str, u32> = self
            .compiled
            .vm_names
            .iter()
            .map(|(id, n)| (n.as_str(), *id))
            .collect();
        let mut vms = Vec::new();
        for vm in self.loaded.policy.vms.values() {
            let eps: Vec<(&(Dest, u16), _)> = self
                .compiled
                .endpoints
                .iter()
                .filter(|(_, i)| i.vm == vm.name)
                .collect();
            let endpoints: Vec<String> = eps
                .iter()
                .map(|((d, p), _)| match d {
                    Dest::Local => format!("localhost:{p}"),
                    d => format!("{d}:{p}"),
                })
                .collect();
            let info = eps.first().map(|(_, i)| *i);
            let policy_uids = vm.uids();
            let users: Vec<Value> = info
                .map(|i| {
                    i.uids
                        .iter()
                        .take(STATUS_USERS)
                        .map(|u| user_entry(i, &policy_uids, *u))
                        .collect()
                })
                .unwrap_or_default();
            let users_total = info.map_or(0, |i| i.uids.len());
            // Everyone a schedule names, with when their access next changes.
            let mut named: BTreeSet<u32> = vm
                .schedules
                .iter()
                .flat_map(|s| s.allow.iter().flat_map(|g| g.uids.iter().copied()))
                .collect();
            named.extend(self.console.filter(|_| {
                vm.schedules.iter().any(|s| {
                    s.allow
                        .iter()
                        .any(|g| g.principal == policy::Principal::Console)
                })
            }));
            let windows: Vec<Value> = named
                .iter()
                .take(STATUS_USERS)
                .map(|u| {
                    let open = self.scheduled.contains(&(vm.name.clone(), *u));
                    let next = schedule::next_change(
                        &self.loaded.policy,
                        &vm.name,
                        *u,
                        clock,
                        &tz,
                        self.console,
                    );
                    json!({
                        "uid": u, "user": name(*u), "open_now": open,
                        "next_change": next.map(|t| rfc3339(u64::try_from(t).unwrap_or(0))),
                        "next_change_unix": next,
                    })
                })
                .collect();
            let schedules: Vec<String> = vm
                .schedules
                .iter()
                .map(|s| {
                    let who: Vec<String> =
                        s.allow.iter().map(|g| g.principal.to_string()).collect();
                    format!("{}: {}", s.describe(), who.join(", "))
                })
                .collect();
            let (allowed, denied, audited) =
                ids.get(vm.name.as_str()).map_or((0, 0, 0), |id| since(*id));
            vms.push(json!({
                "name": vm.name,
                "server": vm.server,
                "mode": self.loaded.policy.vm_mode(vm),
                "endpoints": endpoints,
                "users": users,
                "users_total": users_total,
                "schedules": schedules,
                "schedule_users": windows,
                "schedule_users_total": named.len(),
                "allowed": allowed,
                "denied": denied,
                "audited": audited,
            }));
        }
        let (_, protect_denied, protect_audited) = since(spicegate_common::NO_VM);
        let now = u64::try_from(clock).unwrap_or(0);
        let modes: BTreeSet<Mode> = self
            .loaded
            .policy
            .vms
            .values()
            .map(|v| self.loaded.policy.vm_mode(v))
            .chain([self.loaded.policy.settings.mode])
            .collect();
        let mode = match (modes.contains(&Mode::Enforce), modes.contains(&Mode::Audit)) {
            (true, true) => "mixed",
            (false, true) => "audit",
            _ => "enforce",
        };
        let temporary: Vec<Value> = self
            .grants
            .active(now)
            .iter()
            .map(|g| {
                json!({
                    "user": g.user, "uid": g.uid, "vm": g.vm,
                    "expires": g.expires.map(rfc3339), "expires_unix": g.expires,
                    "expires_in_secs": g.expires.map(|e| e.saturating_sub(now)),
                    "active": self.loaded.policy.vms.contains_key(&g.vm),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            // docs/status.md: 2 lists at most STATUS_USERS users per VM.
            "status_format": STATUS_FORMAT,
            "running": true,
            "attached": kernel::attached(&self.cfg.paths, &self.cfg.cgroup),
            // The policy slot holds the table this daemon installed (the
            // watchdog puts it back within a second if not).
            "table_in_force": self.kernel.table_intact().unwrap_or(false),
            "mode": mode,
            // Names of the policy that did not resolve (a start while NSS
            // or DNS was down): granted nothing until they do.
            "degraded": !self.loaded.policy.unresolved.is_empty(),
            "unresolved": self.loaded.policy.unresolved,
            "console_user": self.console.map(|u| json!({ "uid": u, "user": name(u) })),
            "time_zone": tz.iana_name().unwrap_or("system"),
            "cgroup": self.cfg.cgroup,
            "pin_dir": self.cfg.paths.dir,
            "started_at": rfc3339(self.started_at),
            "policy": {
                "path": self.cfg.policy_path,
                "source": match self.source { Source::File => "file", Source::LastGood => "last-good" },
                "sha256": self.loaded.sha256,
                "loaded_at": rfc3339(self.loaded_at),
                "loaded_at_unix": self.loaded_at,
                "end_sessions": self.loaded.policy.settings.end_sessions,
                "admins": self.loaded.policy.settings.admins.as_ref().map(|(g, _)| g.clone()),
                "files": self.loaded.policy.files,
            },
            "last_reload": self.last_reload,
            "counts": {
                "vms": self.loaded.policy.vms.len(),
                "guarded_endpoints": self.compiled.endpoints.len(),
                "ports_guarded_everywhere": self.compiled.guarded_everywhere.len(),
                "grants": self.compiled.grant_count(),
                "kernel_entries": self.compiled.entry_count(),
            },
            // How changes reach the kernel: the table in force (its
            // generation), the overlay of grants changed since it was
            // built, and what the last change cost.
            "table": {
                "generation": self.kernel.table_stats().0,
                "overlay_entries": self.kernel.table_stats().1,
                "map_writes": self.kernel.table_stats().2,
                "last_change": self.last_change,
            },
            "protect_denied": protect_denied,
            // Who may bind the guarded local ports besides root.
            "listeners": {
                "ports": self.compiled.listen_ports,
                "users": self.compiled.listeners.iter().map(|u| json!({ "uid": u, "user": Value::Null })).collect::<Vec<_>>(),
            },
            // Denials not logged since this daemon started, by reason.
            "drops": crate::denials::DropCounts::new(
                self.kernel.drops().unwrap_or_default().since(self.drops_at_start),
                self.denial_stats.as_deref().unwrap_or(&crate::denials::Stats::default()),
            ),
            "protect_audited": protect_audited,
            "vms": vms,
            "temporary_grants": temporary,
        })
    }
}

/// Creates the state directory (mode 0700) when missing, and checks that
/// only root can change it and the grants file in it.
fn trusted_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;
    crate::trust::check(dir, "state directory")?;
    let grants = dir.join("grants.json");
    if grants.exists() {
        crate::trust::check(&grants, "grants file")?;
    }
    Ok(())
}

/// Says which names of a policy in force do not resolve.
fn log_unresolved(policy: &Policy) {
    if let Some(w) = policy.listener_warning() {
        log::warn!("{w}");
    }
    if policy.unresolved.is_empty() {
        return;
    }
    log::warn!(
        "DEGRADED: {} name(s) of the policy do not resolve; the rest is enforced, they are granted nothing (ports of a server that does not resolve are guarded on every address), and the daemon keeps trying",
        policy.unresolved.len()
    );
    for u in &policy.unresolved {
        log::warn!("UNRESOLVED {} at {}: {}", u.name, u.at, u.why);
    }
}

/// Reads and parses the policy file, off the engine thread (NSS and DNS
/// may hang); the engine only applies the result.
pub struct Loader {
    pub path: PathBuf,
    pub resolver: Arc<CachingResolver>,
}

impl Loader {
    pub fn load(&self) -> Result<Loaded, String> {
        load_policy(&self.path, &*self.resolver)
    }
}

/// Every uid the policy or the table names (policy principals, grants,
/// schedules, temporary grants): the ones whose denials keep a budget of
/// their own in the kernel.
fn named_uids<'a>(policy: &'a Policy, compiled: &'a Compiled) -> impl Iterator<Item = u32> + 'a {
    fn high(u: &u32) -> bool {
        *u >= spicegate_common::RATE_LOW_UIDS
    }
    let from_vms = policy.vms.values().flat_map(|vm| {
        vm.uids()
            .into_iter()
            .chain(
                vm.schedules
                    .iter()
                    .flat_map(|s| s.allow.iter().flat_map(|g| g.uids.iter().copied())),
            )
            .filter(high)
            .collect::<Vec<u32>>()
    });
    let from_table = compiled
        .endpoints
        .values()
        .flat_map(|i| i.uids.iter().copied().filter(high));
    from_vms.chain(from_table)
}

/// Version of the `status` document (docs/status.md).
pub const STATUS_FORMAT: u32 = 2;

/// Users listed per VM by `status` (and schedule users); the rest are
/// counted (`users_total`) and paged by `status --vm NAME --users`.
pub const STATUS_USERS: usize = 100;

/// Users per page of `status --vm NAME --users`.
pub const USERS_PAGE: usize = 1000;

/// One `users[]` entry of `status`; the name is filled in off the engine.
fn user_entry(i: &crate::compile::EndpointInfo, policy_uids: &BTreeSet<u32>, u: u32) -> Value {
    let via = if i.temp_uids.contains(&u) {
        "temporary"
    } else if i.console_uid == Some(u) && !policy_uids.contains(&u) {
        "console"
    } else if i.scheduled_uids.contains(&u) && !policy_uids.contains(&u) {
        "schedule"
    } else {
        "policy"
    };
    json!({ "uid": u, "user": Value::Null, "temporary": via == "temporary", "via": via })
}

/// Timer periods of the engine thread.
pub struct Timers {
    /// Grant expiry, schedule windows, console: within a second.
    pub expiry: Duration,
    /// Pins, links and the table in force checked.
    pub watchdog: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            expiry: Duration::from_millis(250),
            watchdog: Duration::from_secs(1),
        }
    }
}

/// The engine thread: commands and timers, nothing else. Whatever waits on
/// the outside world (the event log, NSS, DNS, netlink dumps) runs on other
/// threads and reaches it as a [`Command`], so a flood of denials or a hung
/// name service cannot delay an expiry.
pub fn run(mut engine: Engine, rx: &mpsc::Receiver<Command>, timers: &Timers) {
    let mut next_expiry = Instant::now();
    let mut next_watchdog = Instant::now() + timers.watchdog;
    loop {
        let now = Instant::now();
        if now >= next_expiry {
            engine.tick();
            next_expiry = Instant::now() + timers.expiry;
        }
        if now >= next_watchdog {
            engine.watchdog();
            engine.publish_metrics();
            next_watchdog = Instant::now() + timers.watchdog;
        }
        let wait = next_expiry
            .min(next_watchdog)
            .saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(cmd) => engine.handle(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    drop(engine);
}
