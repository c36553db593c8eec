//! Reading and resolving the policy: done off the engine thread (by the
//! loader, or at start with a time limit), so the engine never waits on
//! the name service.

use super::*;

/// Hostname resolution that keeps a name's last addresses when it stops
/// resolving (and reports it), but refuses a name it never resolved.
#[derive(Default)]
pub struct CachingResolver {
    last: Mutex<HashMap<String, Vec<IpAddr>>>,
    failing: Mutex<BTreeSet<String>>,
}

pub(super) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    /// The text, shared with the resolver thread and the last-good writer,
    /// not copied: the text of a large policy is megabytes. `None` once
    /// the engine has handed it over and nothing in the policy is looked
    /// up again (see `Engine::hand_over_sources`).
    pub sources: Option<Arc<Vec<PolicySource>>>,
    pub sha256: String,
}

/// Reads and validates a policy and its policy.d, the pieces of a large
/// policy parsed last time taken from `pieces`; the error text lists
/// every problem.
pub fn load_policy(
    path: &Path,
    resolver: &dyn Resolver,
    pieces: &ParseCache,
) -> Result<Loaded, String> {
    let t = Instant::now();
    let sources = policy::read_sources(path).map_err(|e| e.to_string())?;
    let read = t.elapsed();
    // The digest (shown by `status`) is computed next to the parse: on a
    // large policy that is a tenth of a reload, on the other core.
    let (policy, sha256) = std::thread::scope(|scope| {
        let sha256 = scope.spawn(|| digest(&sources));
        let policy = policy::parse_sources_cached(
            &sources,
            &Env {
                dir: &Nss,
                resolver,
            },
            pieces,
        );
        (policy, sha256.join())
    });
    let counts = pieces.last();
    log::debug!(
        "policy read in {:.1} ms, parsed and checked in {:.1} ms ({} piece(s) parsed, {} reused)",
        read.as_secs_f64() * 1e3,
        (t.elapsed() - read).as_secs_f64() * 1e3,
        counts.parsed,
        counts.reused
    );
    let policy = policy.map_err(|e| e.to_string())?;
    let sha256 = sha256.map_err(|_| "computing the policy's digest failed".to_owned())?;
    Ok(Loaded {
        policy,
        sources: Some(Arc::new(sources)),
        sha256,
    })
}

pub(super) fn digest(sources: &[PolicySource]) -> String {
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
pub(super) struct NoNames;

pub(super) const NO_ANSWER: &str = "the name service did not answer in time; still trying";

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
/// The pieces of a large policy are left in `pieces` for the first reload.
pub fn load_policy_at_start(
    path: &Path,
    resolver: &Arc<CachingResolver>,
    pieces: &Arc<ParseCache>,
    timeout: Duration,
) -> Result<Loaded, String> {
    let sources = Arc::new(policy::read_sources(path).map_err(|e| e.to_string())?);
    let (tx, rx) = mpsc::channel();
    {
        let sources = Arc::clone(&sources);
        let resolver = Arc::clone(resolver);
        let pieces = Arc::clone(pieces);
        std::thread::Builder::new()
            .name("sg-start-names".into())
            .spawn(move || {
                let env = Env {
                    dir: &Nss,
                    resolver: &*resolver,
                };
                let _ = tx.send(policy::parse_sources_lenient(&sources, &env, &pieces));
            })
            .map_err(|e| format!("starting the name lookups: {e}"))?;
    }
    // The digest (shown by `status`) while the policy is parsed.
    let sha256 = digest(&sources);
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
                pieces,
            )
            .map_err(|e| e.to_string())?
        }
    };
    Ok(Loaded {
        policy,
        sources: Some(sources),
        sha256,
    })
}

/// How long after a reload the freed heap is handed back: reloads in quick
/// succession (an admin's edit-reload loop, a script) reuse it instead of
/// faulting fresh pages in each time (~20-30 ms at 100,000 grants).
pub(super) const TRIM_DELAY: Duration = Duration::from_secs(2);

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

/// Creates the state directory (mode 0700) when missing, and checks that
/// only root can change it and the grants file in it.
pub(super) fn trusted_state_dir(dir: &Path) -> Result<(), String> {
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
pub(super) fn log_unresolved(policy: &Policy) {
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
    /// The parsed pieces of the last policy read, for the next reload.
    pub pieces: Arc<ParseCache>,
}

impl Loader {
    /// `pieces`: those of the policy read at start
    /// ([`super::Engine::parse_cache`]).
    pub fn new(path: PathBuf, resolver: Arc<CachingResolver>, pieces: Arc<ParseCache>) -> Self {
        Self {
            path,
            resolver,
            pieces,
        }
    }

    pub fn load(&self) -> Result<Loaded, String> {
        load_policy(&self.path, &*self.resolver, &self.pieces)
    }
}

/// Every uid the policy or the table names (policy principals, grants,
/// schedules, temporary grants): the ones whose denials keep a budget of
/// their own in the kernel.
pub(super) fn named_uids<'a>(
    policy: &'a Policy,
    compiled: &'a Compiled,
) -> impl Iterator<Item = u32> + 'a {
    pub(super) fn high(u: &u32) -> bool {
        *u >= spicegate_common::RATE_LOW_UIDS
    }
    // Straight from the `allow` lists (no set per VM: the kernel side
    // skips the uids it named before).
    let from_vms = policy.vms.values().flat_map(|vm| {
        vm.allow
            .iter()
            .chain(vm.schedules.iter().flat_map(|s| s.allow.iter()))
            .flat_map(|g| g.uids.iter().copied())
            .filter(high)
    });
    let from_table = compiled
        .endpoints
        .values()
        .flat_map(|i| i.uids.iter().copied().filter(high));
    from_vms.chain(from_table)
}

/// The uids [`named_uids`] gives for the VMs of `new` that `old` does not
/// have as they are (their `allow` lists and schedules compared: a
/// 10,000-uid list is one slice comparison), so a reload that changes
/// one VM names the uids of that VM only.
pub(super) fn new_policy_uids<'a>(
    old: &'a Policy,
    new: &'a Policy,
) -> impl Iterator<Item = u32> + 'a {
    new.vms
        .values()
        .filter(move |vm| {
            old.vms
                .get(&vm.name)
                .is_none_or(|o| o.allow != vm.allow || o.schedules != vm.schedules)
        })
        .flat_map(|vm| {
            vm.allow
                .iter()
                .chain(vm.schedules.iter().flat_map(|s| s.allow.iter()))
                .flat_map(|g| g.uids.iter().copied())
        })
        .filter(|u| *u >= spicegate_common::RATE_LOW_UIDS)
}
