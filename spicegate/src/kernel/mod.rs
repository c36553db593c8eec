//! Kernel plumbing: loading the program, swapping the rule table, and the
//! maps the daemon reads.
//!
//! Fail-closed by construction: the links and maps live pinned under the pin
//! directory, so enforcement does not depend on this process. A new daemon
//! loads its program against the pinned maps, installs its table, attaches
//! new links and renames them over the pinned ones; while both links exist
//! they consult the same table, so a restart has no gap.
//!
//! - this module: [`Kernel`]: load, install a table, attach, re-pin;
//! - `overlays`: grants changed since the table was built;
//! - `pins`: the pin directory, upgrades from older layouts, unloading;
//! - `ports`: the port prefilter, kept a superset of the table's ports;
//! - `mounts`: finding cgroup2, mounting bpffs, locking the pin directory;
//! - `readers`: counters and drops read by other threads;
//! - `fill`: streaming a compiled policy into a new table;
//! - `sys`: the raw bpf(2) calls aya does not make for us.

mod fill;
mod mounts;
mod overlays;
mod pins;
mod ports;
mod readers;
mod sys;
#[cfg(test)]
mod tests;

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::DirBuilderExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink},
};
use spicegate_common::{
    COUNTERS_MAP, DROP_FLOOD_RING, DROP_KINDS, DROP_LOG_RING, DROP_MARK_FAILED, DROP_RATE_LIMITED,
    DROPS_MAP, FLOOD_MAP, GRANTED_MAP, KEPT_LAYOUT_VERSION, LAYOUT_VERSION, MARK_SLOTS_MAP,
    MARKS_MAP, OVERLAY_MAP, OVERLAY_MAX, OVERLAY_SELECT_ACTIVE, OVERLAY_SELECT_GENERATION,
    OVERLAY_SELECT_MAP, POLICY_MAP, POLICY_SLOT, PORTS_MAP, PROG_BIND4, PROG_BIND6, PROG_CONNECT4,
    PROG_CONNECT6, PROG_RELEASE, RATE_LOW_UIDS, RATE_MAP, RATE_NAMED_ENTRIES, RATE_NAMED_MAP,
    RateState, RuleKey, RuleValue, VmCounters,
};

use crate::compile::{Compiled, UidHasher};

pub(crate) use self::sys::{map_freeze, map_lookup, sys_bpf};
pub use self::{
    mounts::{PinLock, cgroup2_root, cgroup2_root_from, check_cgroup, ensure_bpffs, lock_pin_dir},
    pins::{
        LinkState, PinPaths, Unloaded, attached, link_state, open_pinned, retire_legacy, unload,
    },
    readers::{CountersReader, DropsReader, KernelDrops},
};
use self::{
    overlays::{NewOverlays, Overlays},
    pins::staging,
    readers::{read_counters, read_drops},
    sys::{map_lookup_u32, map_update_u32},
};

/// The kernel object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spicegate"));

type RuleTable = HashMap<MapData, RuleKey, RuleValue>;

/// Loads (verifies) one of the object's programs.
fn verify(program: &mut aya::programs::Program) -> anyhow::Result<()> {
    match program {
        aya::programs::Program::CgroupSockAddr(p) => p.load()?,
        aya::programs::Program::CgroupSock(p) => p.load()?,
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    Ok(())
}

/// The loaded program and its maps.
pub struct Kernel {
    ebpf: Ebpf,
    paths: PinPaths,
    /// The rule table this daemon put in the policy slot; `None` before
    /// the first install.
    table: Option<Installed>,
    /// Generation of that table (1..=255; 0 before the first install).
    generation: u32,
    /// The two overlays this daemon put in the overlay slots, and which
    /// one is in force; `None` until the first install, or when they must
    /// be made again (a failed write left them apart).
    overlays: Option<Overlays>,
    /// What both overlays hold (keys without the generation).
    overlay: std::collections::BTreeMap<RuleKey, RuleValue>,
    /// The ports of the table this daemon installed: the port prefilter
    /// must cover them.
    ports: Box<spicegate_common::PortBits>,
    /// Map writes since start: entries written into rule tables and
    /// overlays, and the slot updates that swapped them in.
    writes: u64,
    /// uids this daemon put in the map of named uids. Every reload asks
    /// about each uid of the policy again (200,000 questions at 100,000
    /// grants): a multiplicative hash answers several times faster than
    /// the default SipHash.
    named: std::collections::HashSet<u32, std::hash::BuildHasherDefault<UidHasher>>,
    /// Whether `named` holds what the map held when this daemon first
    /// named uids.
    named_read: bool,
}

/// A rule table this daemon installed (frozen), kept open: where
/// [`Kernel::apply_delta`] reads what a word of grants is without the
/// overlays.
struct Installed {
    map: RuleTable,
    /// Its kernel id, to check the policy slot still holds it.
    id: u32,
    /// Its entries.
    entries: usize,
}

impl Kernel {
    /// Loads the program, reusing the maps pinned under `paths` (creating and
    /// pinning them on first start). Nothing is attached yet.
    ///
    /// The aya-log ring buffer is deliberately not pinned: each program gets
    /// a fresh one, so records an older program left behind (possibly in an
    /// older format) can never reach this daemon's parser. Denials that
    /// happen while no daemon runs are still enforced, but not logged.
    pub fn load(paths: &PinPaths) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this binary was built with SPICEGATE_SKIP_EBPF=1 and carries no kernel program; rebuild with `cargo xtask build`"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(POLICY_MAP, paths.policy())
            .map_pin_path(OVERLAY_MAP, paths.overlay())
            .map_pin_path(OVERLAY_SELECT_MAP, paths.overlay_select())
            .map_pin_path(RATE_MAP, paths.rate())
            .map_pin_path(RATE_NAMED_MAP, paths.rate_named())
            .map_pin_path(DROPS_MAP, paths.drops())
            .map_pin_path(MARKS_MAP, paths.marks())
            .map_pin_path(GRANTED_MAP, paths.granted())
            .map_pin_path(MARK_SLOTS_MAP, paths.mark_slots())
            .map_pin_path(PORTS_MAP, paths.ports())
            .map_pin_path(COUNTERS_MAP, paths.counters())
            .load(EBPF_OBJECT)
            .context(
                "loading the eBPF object (is this kernel >= 5.10 with BTF, and are we root?)",
            )?;
        // The verifier takes most of the load time (7-19 ms for each
        // connect and bind program, most of it the DENY record: see
        // `spicegate_report_denial`), and privileged loads run in parallel.
        // The policy is read and compiled beside this load (Engine::start),
        // so the programs get every CPU but one: measured on 2 vCPUs, one
        // thread each made a 1,000,000-grant start 11 % slower (the parse
        // lost its CPU) for 16 % off a 100-grant one.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1);
        let mut programs: Vec<_> = ebpf.programs_mut().collect();
        let per_thread = programs.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let loading: Vec<_> = programs
                .chunks_mut(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk.iter_mut().try_for_each(|(name, program)| {
                            verify(program).with_context(|| format!("verifying program {name}"))
                        })
                    })
                })
                .collect();
            loading.into_iter().try_for_each(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow!("a program-loading thread panicked")))
            })
        })?;
        Ok(Self {
            ebpf,
            paths: paths.clone(),
            table: None,
            generation: 0,
            overlays: None,
            overlay: std::collections::BTreeMap::new(),
            ports: Box::default(),
            writes: 0,
            named: std::collections::HashSet::default(),
            named_read: false,
        })
    }

    /// Atomically replaces the rule table: a fresh inner map is filled
    /// completely, frozen (no `bpf()` write can change it afterwards, root's
    /// included), then swapped into the policy slot with one update. The
    /// new table has a new generation, so the same swap retires every
    /// overlay entry; the overlays are emptied after. The port prefilter
    /// takes the new table's ports before the swap (with the old ones),
    /// and drops the old ones after. On any error the table in force stays
    /// as it was.
    pub fn install(&mut self, compiled: &Compiled) -> anyhow::Result<()> {
        let t0 = std::time::Instant::now();
        let words = compiled.grant_words();
        let entries = compiled.rules.len() + words.len();
        let capacity = Compiled::capacity(entries);
        let generation = self.next_generation()?;
        let tw = std::time::Instant::now();
        let mut table = RuleTable::create(capacity, 0)
            .with_context(|| format!("creating a rule table of {capacity} entries"))?;
        let t1 = std::time::Instant::now();
        fill::fill(&mut table, compiled, &words, generation)
            .context("filling the new rule table")?;
        drop(words);
        let t2 = std::time::Instant::now();
        let data = IterableMap::map(&table);
        map_freeze(data.fd().as_fd()).context("freezing the new rule table")?;
        let id = data.info().context("reading the new rule table's id")?.id();
        let ports = ports::ports_of(compiled);
        let widened = self.read_ports()?.union(&ports);
        self.write_ports(&widened)
            .context("adding the new table's ports to the port prefilter")?;
        // The first install of this daemon puts two fresh overlays in the
        // overlay slots too. With no table in force (a first start) nothing
        // decides by them, so they are placed beside the table, and the
        // install goes on as soon as the three slots hold their maps: each
        // map-in-map update then waits for an RCU grace period (~16 ms
        // here) that only matters to programs that read the old, empty
        // slot (see `set_slots_visible`). A table in force may have grants
        // in its overlay: then they are placed after the swap has waited.
        let new_overlays = match self.overlays {
            Some(_) => None,
            None => NewOverlays::create()
                .inspect_err(|e| log::debug!("creating the overlays before the swap: {e:#}"))
                .ok(),
        };
        let policy = self.map_fd(POLICY_MAP)?;
        let table_fd = data.fd().as_fd().as_raw_fd();
        let mut updates = vec![(policy, POLICY_SLOT, table_fd)];
        let beside = match &new_overlays {
            Some(new) => map_lookup_u32(policy, POLICY_SLOT)
                .context("reading the policy slot")?
                .is_none()
                .then_some(new),
            None => None,
        };
        let mut results = match beside {
            Some(new) => {
                let mut ids = vec![id];
                for (update, id) in new.slot_updates(self.map_fd(OVERLAY_MAP)?) {
                    updates.push(update);
                    ids.push(id);
                }
                overlays::set_slots_visible(&updates, &ids)
            }
            _ => overlays::set_slots_together(&updates),
        }
        .into_iter();
        let swapped = results.next();
        // Placed with the table when both went in (else `reset_overlays`
        // places them after).
        let placed = updates.len() > 1 && results.all(|r| r.is_ok());
        swapped
            .unwrap_or_else(|| Err(io::Error::other("no result")))
            .context("swapping in the new rule table")?;
        // The swap returned after every program that could see the old
        // table finished (the kernel waits for them on a map-in-map
        // update; with no old table, there was none): its ports can go.
        if let Err(e) = self.write_ports(&ports) {
            log::warn!(
                "could not drop the old table's ports from the port prefilter (connects to them cost a table lookup until the next install): {e:#}"
            );
        }
        self.ports = ports;
        let old_generation = std::mem::replace(&mut self.generation, generation);
        self.table = Some(Installed {
            map: table,
            id,
            entries,
        });
        self.writes += entries as u64 + 1;
        if let Err(e) = self.select(OVERLAY_SELECT_GENERATION, generation) {
            log::warn!("could not record the table's generation for the next daemon: {e:#}");
        }
        // The old overlay entries decide nothing now (their generation is
        // gone); empty the overlays for the new table.
        if let Err(e) = self.reset_overlays(old_generation, new_overlays, placed) {
            log::error!(
                "could not empty the overlays; grants change by whole tables until the next apply: {e:#}"
            );
            self.overlays = None;
        }
        log::debug!(
            "installed table {id} (generation {generation}) of {entries} entries (capacity {capacity}): words {:.1} ms, create {:.1} ms, fill {:.1} ms, freeze and swap {:.1} ms",
            (tw - t0).as_secs_f64() * 1e3,
            (t1 - tw).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            t2.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// The file descriptor of this object's map `name` (an array, an array
    /// of maps or a hash map), for the raw calls of [`sys`].
    pub(super) fn map_fd(&self, name: &str) -> anyhow::Result<i32> {
        use aya::maps::Map;
        match self.ebpf.map(name) {
            Some(Map::Array(data) | Map::ArrayOfMaps(data) | Map::HashMap(data)) => {
                Ok(data.fd().as_fd().as_raw_fd())
            }
            Some(_) => bail!("map {name} is not an array, an array of maps or a hash map"),
            None => bail!("map {name} missing"),
        }
    }

    /// Whether the policy slot still holds the table this daemon installed
    /// (someone with `bpf()` rights could have emptied or replaced it; an
    /// empty slot lets every connect through).
    ///
    /// Reads the inner map's id straight from the slot: turning it into a
    /// file descriptor (BPF_MAP_GET_FD_BY_ID) would need CAP_SYS_ADMIN,
    /// which the service does not have.
    pub fn table_intact(&self) -> anyhow::Result<bool> {
        let want = self.table.as_ref().map(|t| t.id);
        let map = self
            .ebpf
            .map(POLICY_MAP)
            .ok_or_else(|| anyhow!("map {POLICY_MAP} missing"))?;
        let fd = match map {
            aya::maps::Map::ArrayOfMaps(data) => data.fd().as_fd().as_raw_fd(),
            _ => bail!("map {POLICY_MAP} is not an array of maps"),
        };
        let id = map_lookup_u32(fd, POLICY_SLOT).context("reading the policy slot")?;
        if id.is_none() || id != want {
            return Ok(false);
        }
        // A cleared bit would let connects to that port go unchecked.
        if want.is_some() && !self.read_ports()?.covers(&self.ports) {
            return Ok(false);
        }
        self.overlays_intact()
    }

    /// Attaches the release program, then connect4, connect6, bind4 and
    /// bind6, to `cgroup` and pins the links,
    /// replacing links a previous daemon pinned (which then detach).
    pub fn attach(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let cg = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for (name, pin) in self.paths.links() {
            let link = self
                .attach_one(name, &cg)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let tmp = staging(&pin);
            let _ = fs::remove_file(&tmp);
            let pinned = link
                .pin(&tmp)
                .with_context(|| format!("pinning link at {}", tmp.display()))?;
            // rename() over the old pin drops the old link, detaching the
            // previous program only after ours is attached.
            fs::rename(&tmp, &pin)
                .with_context(|| format!("renaming {} over {}", tmp.display(), pin.display()))?;
            drop(pinned);
        }
        Ok(())
    }

    /// Attaches program `name` to the cgroup `cg` with a link of its own.
    fn attach_one(&mut self, name: &str, cg: &fs::File) -> anyhow::Result<FdLink> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?;
        // `Single` creates a bpf_link, which the kernel runs alongside
        // other links (multi); AllowMultiple is refused for links.
        Ok(if name == PROG_RELEASE {
            let prog: &mut CgroupSock = program.try_into()?;
            let id = prog.attach(cg.as_fd(), CgroupAttachMode::Single)?;
            prog.take_link(id)?.try_into()?
        } else {
            let prog: &mut CgroupSockAddr = program.try_into()?;
            let id = prog.attach(cg.as_fd(), CgroupAttachMode::Single)?;
            prog.take_link(id)?.try_into()?
        })
    }

    /// Pins again any map whose pin someone removed. Returns the names.
    pub fn repin_missing(&self) -> anyhow::Result<Vec<&'static str>> {
        let mut done = Vec::new();
        for (name, path) in [
            (POLICY_MAP, self.paths.policy()),
            (OVERLAY_MAP, self.paths.overlay()),
            (OVERLAY_SELECT_MAP, self.paths.overlay_select()),
            (RATE_MAP, self.paths.rate()),
            (RATE_NAMED_MAP, self.paths.rate_named()),
            (DROPS_MAP, self.paths.drops()),
            (MARKS_MAP, self.paths.marks()),
            (GRANTED_MAP, self.paths.granted()),
            (MARK_SLOTS_MAP, self.paths.mark_slots()),
            (PORTS_MAP, self.paths.ports()),
            (COUNTERS_MAP, self.paths.counters()),
        ] {
            if path.exists() {
                continue;
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.paths.dir)?;
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| anyhow!("map {name} missing"))?;
            map.pin(&path)
                .with_context(|| format!("re-pinning {name} at {}", path.display()))?;
            done.push(name);
        }
        Ok(done)
    }

    /// Per-VM counters summed over CPUs, read from the kernel now.
    pub fn counters(&self) -> anyhow::Result<std::collections::BTreeMap<u32, VmCounters>> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or_else(|| anyhow!("map {COUNTERS_MAP} missing"))?;
        read_counters(&PerCpuHashMap::try_from(map)?)
    }

    /// Denials the kernel did not log, summed over CPUs (since the maps
    /// were created).
    pub fn drops(&self) -> anyhow::Result<KernelDrops> {
        let map = self
            .ebpf
            .map(DROPS_MAP)
            .ok_or_else(|| anyhow!("map {DROPS_MAP} missing"))?;
        read_drops(&PerCpuArray::try_from(map)?)
    }

    /// Gives each uid at or above the low range that the policy names its
    /// own rate-limit slot, so a flood from other high uids cannot silence
    /// its denials. Entries are only added (the map is bounded), and an
    /// entry a previous daemon added keeps its state (the map outlives
    /// restarts and upgrades); returns how many uids did not fit.
    ///
    /// The uids new to the map go in with one BPF_MAP_UPDATE_BATCH instead
    /// of one update each: at 100,000 grants (1,000 high uids) this step of
    /// a start took 1.6-2.4 ms before, 1.1-1.4 ms now, most of it walking
    /// the 200,000 uids of the allow lists and the table.
    pub fn name_uids(&mut self, uids: impl Iterator<Item = u32>) -> anyhow::Result<usize> {
        let map = self
            .ebpf
            .map(RATE_NAMED_MAP)
            .ok_or_else(|| anyhow!("map {RATE_NAMED_MAP} missing"))?;
        if !self.named_read {
            // The kernel never adds entries, so what is there was named by
            // this daemon or an earlier one.
            let named: HashMap<&MapData, u32, RateState> = HashMap::try_from(map)?;
            for uid in named.keys() {
                self.named
                    .insert(uid.context("reading the map of named uids")?);
            }
            self.named_read = true;
        }
        let fd = self.map_fd(RATE_NAMED_MAP)?;
        let fresh: Vec<u32> = uids
            .filter(|u| *u >= RATE_LOW_UIDS && self.named.insert(*u))
            .collect();
        let states = vec![RateState::default(); fresh.len()];
        let mut batched = true;
        let mut full = 0;
        let mut at = 0;
        while at < fresh.len() {
            let (n, result) = if batched {
                sys::map_update_batch(fd, &fresh[at..], &states[at..])
            } else {
                (0, sys::map_update(fd, &fresh[at], &states[at]))
            };
            at += n;
            match result {
                Ok(()) if !batched => at += 1,
                Ok(()) => {}
                Err(e)
                    if batched
                        && n == 0
                        && matches!(e.raw_os_error(), Some(libc::EINVAL | sys::ENOTSUPP)) =>
                {
                    batched = false;
                }
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                    self.named.remove(&fresh[at]);
                    full += 1;
                    at += 1;
                }
                Err(e) => {
                    for uid in &fresh[at..] {
                        self.named.remove(uid);
                    }
                    return Err(e).context("naming a uid for the rate limit");
                }
            }
        }
        if full > 0 {
            log::warn!(
                "{full} named uid(s) at or above {RATE_LOW_UIDS} share the flood budget: the map of named uids is full ({RATE_NAMED_ENTRIES})"
            );
        }
        Ok(full)
    }

    /// The ring of denials the rate limit kept out of the log.
    pub fn take_flood_ring(&mut self) -> anyhow::Result<RingBuf<aya::maps::MapData>> {
        let map = self
            .ebpf
            .take_map(FLOOD_MAP)
            .ok_or_else(|| anyhow!("map {FLOOD_MAP} missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Hands the aya-log ring buffer to `sink`.
    pub fn logger<T: log::Log>(&mut self, sink: T) -> anyhow::Result<aya_log::EbpfLogger<T>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, sink)
            .context("opening the kernel event ring buffer")
    }
}
