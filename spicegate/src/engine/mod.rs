//! The daemon's one owner of the kernel state. It runs on a thread of its
//! own ([`run`]) with the timers (expiry, schedules, watchdog); the control
//! socket, signals and the helper threads (addresses, names, logind) send it
//! [`Command`]s, and no one else touches the maps. It never waits on NSS,
//! DNS or netlink dumps: those run on the threads of background.rs.
//!
//! - this module: the commands, the engine, its start and its loop;
//! - `loading`: reading and resolving the policy (off the engine thread);
//! - `changes`: putting a new policy or a grant change in force;
//! - `timers`: the watchdog, expiries, schedule edges, the console;
//! - `access`: temporary grants and revokes;
//! - `views`: `status`, `list` and the pages of users.

mod access;
mod changes;
mod loading;
mod timers;
mod views;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use sha2::{Digest as _, Sha256};
use spicegate_common::VmCounters;
use tokio::sync::oneshot;

use crate::{
    background::{NameLog, ResolveJob, Sweeper},
    compile::{Compiled, Dest, Dynamic, LocalAddrs, compile, grant_delta, recompile_pairs},
    diff::Diff,
    directory::Nss,
    grants::{GrantStore, TempGrant, now_unix, rfc3339},
    hostaddrs,
    journal::Event,
    kernel::{self, Kernel, PinPaths},
    policy::{self, Env, Mode, ParseCache, Policy, Resolver, Settings, Source as PolicySource},
    proto::{
        GrantAnswer, LastChange, LastReload, ListAnswer, RevokeAnswer, Status, UsersPage, WhyAnswer,
    },
    schedule, state,
};

/// Where the engine sends its answer to a [`Command`].
pub type Reply<T> = oneshot::Sender<Result<T, String>>;
use self::loading::{
    TRIM_DELAY, locked, log_unresolved, named_uids, new_policy_uids, trusted_state_dir,
};
pub use self::{
    changes::Reloaded,
    loading::{
        CachingResolver, Loaded, Loader, NAMES_AT_START, load_policy, load_policy_at_start,
        release_free_memory,
    },
};
pub use crate::proto::{STATUS_FORMAT, STATUS_USERS, USERS_PAGE};

/// Requests to the engine.
pub enum Command {
    Status {
        reply: Reply<Status>,
    },
    /// Apply a policy read by a [`Loader`] off the engine thread.
    Reload {
        loaded: Box<Result<Loaded, String>>,
        reply: Reply<Reloaded>,
    },
    Why {
        query: WhyQuery,
        reply: Reply<WhyAnswer>,
    },
    Grant {
        uid: u32,
        user: String,
        vm: String,
        for_secs: Option<u64>,
        by: u32,
        reply: Reply<GrantAnswer>,
    },
    Revoke {
        uid: u32,
        user: String,
        vm: String,
        reply: Reply<RevokeAnswer>,
    },
    List {
        uid: u32,
        reply: Reply<ListAnswer>,
    },
    /// One page of who may open a VM now: uids above `after`.
    Users {
        vm: String,
        after: Option<u32>,
        reply: Reply<UsersPage>,
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

/// `why`: a user (its uid resolved, its name as asked) and an endpoint.
pub struct WhyQuery {
    pub uid: u32,
    pub user: String,
    pub addr: IpAddr,
    pub port: u16,
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
    last_reload: LastReload,
    started_at: u64,
    counters_at_start: BTreeMap<u32, VmCounters>,
    resolver: Arc<CachingResolver>,
    /// The parsed pieces of the policy read at start, for the first
    /// reload (see [`ParseCache`]).
    pieces: Arc<ParseCache>,
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
    /// Connects let through unmarked that the watchdog has reported.
    unmarked_seen: u64,
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
    last_change: Option<LastChange>,
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
        Arc<ParseCache>,
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
        // Filled by the start's parse, so that the first reload parses
        // only the pieces that changed, as every later one does.
        let pieces = Arc::new(ParseCache::default());
        let (loaded, source) = match load_policy_at_start(
            &cfg.policy_path,
            &resolver,
            &pieces,
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
                    load_policy_at_start(&last, &resolver, &pieces, cfg.names_timeout)
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
            state_ok, grants, resolver, pieces, loaded, source, local, scheduled, compiled,
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
        let (state_ok, grants, resolver, pieces, loaded, source, local, scheduled, compiled) =
            prepared?;
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
        let resolve_job = Arc::new(Mutex::new(ResolveJob::of(&loaded)));
        log_unresolved(&loaded.policy);
        let metrics = Arc::new(crate::metrics::Shared::new(
            counters_at_start.clone(),
            drops_at_start,
        ));
        metrics.reload_ok(now, Duration::ZERO);
        let sweeper = Sweeper::start(cfg.cgroup.clone(), &cfg.paths, Arc::clone(&metrics))?;
        let mut engine = Self {
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
            last_reload: LastReload {
                at: rfc3339(now),
                at_unix: now,
                message: "started".into(),
                ok: true,
            },
            started_at: now,
            counters_at_start,
            resolver,
            pieces,
            resolve_job,
            sweeper,
            names: NameLog::start()?,
            state_ok,
            denial_stats: None,
            drops_at_start,
            unmarked_seen: drops_at_start.mark_failed,
            console: None,
            scheduled,
            last_good,
            trim_at: None,
            phases: Vec::new(),
            last_change: None,
            metrics,
        };
        engine.hand_over_sources(engine.source == Source::File);
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
    /// The parsed pieces of the policy read at start, for the reloads'
    /// [`Loader`].
    pub fn parse_cache(&self) -> Arc<ParseCache> {
        Arc::clone(&self.pieces)
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

    /// Gives the text of the policy just put in force to the last-good
    /// writer (`save`, when it was read from the policy file) and to the
    /// resolver thread, then lets it go unless the resolver will read it
    /// again: a policy that looks up no names ([`Policy::looks_up_names`])
    /// reads the same every time, and its text (11 MB at a million `#UID`
    /// grants) would be held for nothing.
    fn hand_over_sources(&mut self, save: bool) {
        if let Some(sources) = &self.loaded.sources
            && save
            && self.state_ok.is_ok()
        {
            self.last_good.save(Arc::clone(sources));
        }
        if !self.loaded.policy.looks_up_names() {
            self.loaded.sources = None;
        }
        *locked(&self.resolve_job) = ResolveJob::of(&self.loaded);
    }

    fn clock(&self) -> i64 {
        clock_now(self.cfg.clock_offset_file.as_deref())
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
            Command::Why { query, reply } => {
                let _ = reply.send(Ok(self.why(&query)));
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
                let _ = reply.send(self.revoke(uid, user, vm));
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
