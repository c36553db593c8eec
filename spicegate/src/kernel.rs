//! Kernel plumbing: bpffs and cgroup2 discovery, loading, pinning, attaching,
//! swapping the rule table, and unloading.
//!
//! Fail-closed by construction: the links and maps live pinned under the pin
//! directory, so enforcement does not depend on this process. A new daemon
//! loads its program against the pinned maps, installs its table, attaches
//! new links and renames them over the pinned ones; while both links exist
//! they consult the same table, so a restart has no gap.
//!
//! Longer than 600 lines: loading, pinning, attaching, swapping and the raw
//! bpf() calls (all through [`sys_bpf`]) are still one module; issue 14
//! splits it into `kernel/` (load, pin, attach, swap, sys).

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
    maps::{ArrayOfMaps, HashMap, IterableMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use spicegate_common::{
    COUNTERS_MAP, DROP_FLOOD_RING, DROP_KINDS, DROP_LOG_RING, DROP_RATE_LIMITED, DROPS_MAP,
    FLOOD_MAP, LAYOUT_VERSION, MARKS_MAP, OVERLAY_MAP, OVERLAY_MAX, OVERLAY_SELECT_ACTIVE,
    OVERLAY_SELECT_GENERATION, OVERLAY_SELECT_MAP, POLICY_MAP, POLICY_SLOT, PROG_BIND4, PROG_BIND6,
    PROG_CONNECT4, PROG_CONNECT6, RATE_LOW_UIDS, RATE_MAP, RATE_NAMED_ENTRIES, RATE_NAMED_MAP,
    RateState, RuleKey, RuleValue, VmCounters,
};

use crate::compile::Compiled;

/// `BPF_NOEXIST`: insert only when the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The kernel object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spicegate"));

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs lives on systemd machines; mounted by us when absent.
const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

/// File names under the pin directory.
#[derive(Debug, Clone)]
pub struct PinPaths {
    pub dir: PathBuf,
}

impl PinPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    fn file(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}_v{LAYOUT_VERSION}"))
    }
    pub fn policy(&self) -> PathBuf {
        self.file("policy")
    }
    pub fn overlay(&self) -> PathBuf {
        self.file("overlay")
    }
    pub fn overlay_select(&self) -> PathBuf {
        self.file("overlay_sel")
    }
    pub fn rate(&self) -> PathBuf {
        self.file("rate")
    }
    pub fn counters(&self) -> PathBuf {
        self.file("counters")
    }
    pub fn rate_named(&self) -> PathBuf {
        self.file("rate_named")
    }
    pub fn drops(&self) -> PathBuf {
        self.file("drops")
    }
    pub fn marks(&self) -> PathBuf {
        self.file("marks")
    }
    pub fn link4(&self) -> PathBuf {
        self.file("connect4")
    }
    pub fn link6(&self) -> PathBuf {
        self.file("connect6")
    }
    pub fn bind4(&self) -> PathBuf {
        self.file("bind4")
    }
    pub fn bind6(&self) -> PathBuf {
        self.file("bind6")
    }
    /// Every link this layout pins, with its program.
    pub fn links(&self) -> [(&'static str, PathBuf); 4] {
        [
            (PROG_CONNECT4, self.link4()),
            (PROG_CONNECT6, self.link6()),
            (PROG_BIND4, self.bind4()),
            (PROG_BIND6, self.bind6()),
        ]
    }
    /// Whether a previous daemon left enforcement pinned here, in this
    /// layout or an older one.
    pub fn has_links(&self) -> bool {
        self.link4().exists() || self.link6().exists() || !self.legacy_links().is_empty()
    }

    /// Links pinned by a daemon of another layout version (an older
    /// release), which are still enforcing until [`retire_legacy`] removes
    /// them.
    pub fn legacy_links(&self) -> Vec<PathBuf> {
        self.legacy_pins()
            .into_iter()
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    ["connect4_v", "connect6_v", "bind4_v", "bind6_v"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
            })
            .collect()
    }

    /// Every pin of another layout version.
    fn legacy_pins(&self) -> Vec<PathBuf> {
        let current = format!("_v{LAYOUT_VERSION}");
        let staging = format!("_v{LAYOUT_VERSION}_new");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.contains("_v") && !n.ends_with(&current) && !n.ends_with(&staging)
                })
            })
            .collect();
        out.sort();
        out
    }
}

/// After this daemon's links are attached: detaches the links an older
/// release pinned and removes its map pins. Until then both programs ran
/// side by side, and a connect had to pass both, so the upgrade had no
/// unguarded moment. Returns the names removed.
pub fn retire_legacy(paths: &PinPaths) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for pin in paths.legacy_links() {
        let link = obj_get(&pin).with_context(|| format!("opening old link {}", pin.display()))?;
        link_detach(link.as_fd()).with_context(|| format!("detaching {}", pin.display()))?;
        fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        removed.push(
            pin.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    for pin in paths.legacy_pins() {
        fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        removed.push(
            pin.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    Ok(removed)
}

/// The cgroup v2 mount point, read from /proc/self/mountinfo.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_root_from(&info).ok_or_else(|| {
        anyhow!("no cgroup2 filesystem is mounted (see /proc/self/mountinfo); mount one or pass --cgroup PATH")
    })
}

/// Parses mountinfo text: `id parent maj:min root mountpoint opts... - fstype source opts`.
pub fn cgroup2_root_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        // Only the mount of the whole hierarchy, not a bind of a subtree.
        if fields.get(3) != Some(&"/") {
            return None;
        }
        Some(PathBuf::from(unescape_mountinfo(fields.get(4)?)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(fs_magic(path)? == BPF_FS_MAGIC)
}

/// The filesystem type (`f_type` of statfs) `path` lives on.
fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, st a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is i64 here but narrower on other architectures"
    )]
    Ok(st.f_type as i64)
}

/// Checks that `cgroup` is a cgroup v2 directory the programs can attach to,
/// before anything is loaded or pinned.
pub fn check_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    match fs_magic(cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) if cgroup.is_dir() => Ok(()),
        Ok(_) => bail!(
            "{} is not a cgroup v2 directory; pass --cgroup a directory under the cgroup2 mount ({})",
            cgroup.display(),
            cgroup2_root().map_or_else(|e| format!("{e:#}"), |p| p.display().to_string())
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "cgroup {} does not exist; create it (mkdir) or leave out --cgroup to guard the whole machine",
            cgroup.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cgroup {}", cgroup.display())),
    }
}

/// Makes sure the pin directory can live on bpffs: mounts bpffs on
/// /sys/fs/bpf when the pin directory is under it and nothing is mounted
/// there (systemd does this at boot; minimal systems may not).
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            bail!("pin directory {} has no existing parent", pin_dir.display());
        }
    }
    if is_bpffs(&probe).with_context(|| format!("statfs {}", probe.display()))? {
        return Ok(());
    }
    let default = Path::new(BPFFS_DEFAULT);
    if pin_dir.starts_with(default) && default.is_dir() && !is_bpffs(default)? {
        nix::mount::mount(
            Some("bpf"),
            default,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .with_context(|| format!("mounting bpffs on {BPFFS_DEFAULT}"))?;
        log::info!("mounted bpffs on {BPFFS_DEFAULT}");
        return Ok(());
    }
    bail!(
        "pin directory {} is not on a BPF filesystem; mount one (`mount -t bpf bpf {BPFFS_DEFAULT}`) or pass --pin-dir under it",
        pin_dir.display()
    )
}

/// An exclusive lock on the pin directory, so two daemons never fight over
/// the same pins. Held for the daemon's lifetime.
#[derive(Debug)]
pub struct PinLock {
    _fd: OwnedFd,
}

pub fn lock_pin_dir(paths: &PinPaths) -> anyhow::Result<PinLock> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.dir)
        .with_context(|| format!("creating pin directory {}", paths.dir.display()))?;
    let dir =
        fs::File::open(&paths.dir).with_context(|| format!("opening {}", paths.dir.display()))?;
    let fd: OwnedFd = dir.into();
    // SAFETY: fd is a valid open descriptor.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another spicegate daemon is running on pin directory {}",
                paths.dir.display()
            );
        }
        return Err(e).context("locking the pin directory");
    }
    Ok(PinLock { _fd: fd })
}

type RuleTable = HashMap<MapData, RuleKey, RuleValue>;

/// The two overlays (see [`spicegate_common::OVERLAY_MAP`]).
struct Overlays {
    /// Holding them keeps their descriptors open.
    _maps: [RuleTable; 2],
    fds: [i32; 2],
    /// Their kernel ids, to check the slots still hold them.
    ids: [u32; 2],
    /// Which one is in force.
    active: u32,
}

/// Writes `ops` into an overlay: each key with `generation` in its pad
/// byte, updated to its value or deleted (a missing key is no error).
fn write_ops(fd: i32, generation: u8, ops: &[(RuleKey, Option<RuleValue>)]) -> anyhow::Result<()> {
    for (k, v) in ops {
        let mut k = *k;
        k._pad = generation;
        match v {
            Some(v) => crate::fill::map_update_elem(fd, &k, v)?,
            None => match crate::fill::map_delete_elem(fd, &k) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => r?,
            },
        }
    }
    Ok(())
}

/// The loaded program and its maps.
pub struct Kernel {
    ebpf: Ebpf,
    paths: PinPaths,
    /// Kernel id of the rule table this daemon put in the policy slot.
    table_id: Option<u32>,
    /// Generation of that table (1..=255; 0 before the first install).
    generation: u32,
    /// The two overlays this daemon put in the overlay slots, and which
    /// one is in force; `None` until the first install, or when they must
    /// be made again (a failed write left them apart).
    overlays: Option<Overlays>,
    /// What both overlays hold (keys without the generation).
    overlay: std::collections::BTreeMap<RuleKey, RuleValue>,
    /// Map writes since start: entries written into rule tables and
    /// overlays, and the slot updates that swapped them in.
    writes: u64,
    /// uids this daemon put in the map of named uids.
    named: std::collections::HashSet<u32>,
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
            .map_pin_path(COUNTERS_MAP, paths.counters())
            .load(EBPF_OBJECT)
            .context(
                "loading the eBPF object (is this kernel >= 5.10 with BTF, and are we root?)",
            )?;
        for name in [PROG_CONNECT4, PROG_CONNECT6, PROG_BIND4, PROG_BIND6] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        Ok(Self {
            ebpf,
            paths: paths.clone(),
            table_id: None,
            generation: 0,
            overlays: None,
            overlay: std::collections::BTreeMap::new(),
            writes: 0,
            named: std::collections::HashSet::new(),
        })
    }

    /// Atomically replaces the rule table: a fresh inner map is filled
    /// completely, frozen (no `bpf()` write can change it afterwards, root's
    /// included), then swapped into the policy slot with one update. The
    /// new table has a new generation, so the same swap retires every
    /// overlay entry; the overlays are emptied after. On any error the
    /// table in force stays as it was.
    pub fn install(&mut self, compiled: &Compiled) -> anyhow::Result<()> {
        let capacity = compiled.capacity();
        let entries = compiled.entry_count();
        let generation = self.next_generation()?;
        let t0 = std::time::Instant::now();
        let mut table = RuleTable::create(capacity, 0)
            .with_context(|| format!("creating a rule table of {capacity} entries"))?;
        let t1 = std::time::Instant::now();
        crate::fill::fill(&mut table, compiled, generation)
            .context("filling the new rule table")?;
        let t2 = std::time::Instant::now();
        let data = IterableMap::map(&table);
        map_freeze(data.fd().as_fd()).context("freezing the new rule table")?;
        let id = data.info().context("reading the new rule table's id")?.id();
        let mut outer = self.outer()?;
        outer
            .set(POLICY_SLOT, &table, 0)
            .context("swapping in the new rule table")?;
        let old_generation = std::mem::replace(&mut self.generation, generation);
        self.table_id = Some(id);
        self.writes += entries as u64 + 1;
        if let Err(e) = self.select(OVERLAY_SELECT_GENERATION, generation) {
            log::warn!("could not record the table's generation for the next daemon: {e:#}");
        }
        // The old overlay entries decide nothing now (their generation is
        // gone); empty the overlays for the new table.
        if let Err(e) = self.reset_overlays(old_generation) {
            log::error!(
                "could not empty the overlays; grants change by whole tables until the next apply: {e:#}"
            );
            self.overlays = None;
        }
        log::debug!(
            "installed table {id} (generation {generation}) of {entries} entries (capacity {capacity}): create {:.1} ms, fill {:.1} ms, freeze and swap {:.1} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            t2.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Puts a change of grants in force through the overlays: `delta`
    /// holds each changed grant with its new value (revoked ones flagged
    /// [`spicegate_common::GRANT_REVOKED`]). The change is written into the
    /// standby overlay, the selector flips (atomic), and the same change
    /// goes into the other overlay. Map writes: twice the change, plus one.
    ///
    /// Returns `Ok(false)`, having changed nothing, when the overlays cannot
    /// take it (they would overflow, or must be made again): build a new
    /// table instead. On error the kernel decides as before.
    pub fn apply_delta(&mut self, delta: &[(RuleKey, RuleValue)]) -> anyhow::Result<bool> {
        let Some(ov) = &self.overlays else {
            return Ok(false);
        };
        if self.table_id.is_none() {
            return Ok(false);
        }
        // An entry already in the overlay goes back to what the table says;
        // any other becomes an overlay entry.
        let mut ops: Vec<(RuleKey, Option<RuleValue>)> = Vec::with_capacity(delta.len());
        let mut len = self.overlay.len();
        for (k, v) in delta {
            if self.overlay.contains_key(k) {
                ops.push((*k, None));
                len -= 1;
            } else {
                ops.push((*k, Some(*v)));
                len += 1;
            }
        }
        if len > OVERLAY_MAX {
            return Ok(false);
        }
        let standby = 1 - ov.active;
        let generation = u8::try_from(self.generation).unwrap_or(0);
        let result = write_ops(ov.fds[standby as usize], generation, &ops);
        self.writes += ops.len() as u64;
        if let Err(e) = result {
            // The standby is not in force: nothing changed, but it no
            // longer matches the other.
            self.overlays = None;
            return Err(e).context("writing the standby overlay");
        }
        let empty = if len == 0 {
            spicegate_common::OVERLAY_EMPTY
        } else {
            0
        };
        self.select(OVERLAY_SELECT_ACTIVE, standby | empty)
            .context("flipping the overlay selector")?;
        self.writes += 1;
        let old = ov.fds[ov.active as usize];
        for (k, v) in &ops {
            match v {
                Some(v) => self.overlay.insert(*k, *v),
                None => self.overlay.remove(k),
            };
        }
        if let Some(ov) = &mut self.overlays {
            ov.active = standby;
        }
        let result = write_ops(old, generation, &ops);
        self.writes += ops.len() as u64;
        if let Err(e) = result {
            // In force and right; the standby is not: make both again at
            // the next change (through a new table).
            self.overlays = None;
            log::error!("the change is in force, but writing the standby overlay failed: {e:#}");
        }
        Ok(true)
    }

    /// Makes the next [`Kernel::install`] put two fresh overlays in the
    /// overlay slots (after tampering).
    pub fn discard_overlays(&mut self) {
        self.overlays = None;
    }

    /// Generation of the table in force, entries in its overlay, and map
    /// writes since start.
    pub fn table_stats(&self) -> (u32, usize, u64) {
        (self.generation, self.overlay.len(), self.writes)
    }

    fn select_fd(&self) -> anyhow::Result<i32> {
        match self.ebpf.map(OVERLAY_SELECT_MAP) {
            Some(aya::maps::Map::Array(data)) => Ok(data.fd().as_fd().as_raw_fd()),
            Some(_) => bail!("map {OVERLAY_SELECT_MAP} is not an array"),
            None => bail!("map {OVERLAY_SELECT_MAP} missing"),
        }
    }

    fn overlay_fd(&self) -> anyhow::Result<i32> {
        match self.ebpf.map(OVERLAY_MAP) {
            Some(aya::maps::Map::ArrayOfMaps(data)) => Ok(data.fd().as_fd().as_raw_fd()),
            Some(_) => bail!("map {OVERLAY_MAP} is not an array of maps"),
            None => bail!("map {OVERLAY_MAP} missing"),
        }
    }

    fn select(&self, slot: u32, value: u32) -> anyhow::Result<()> {
        map_update_u32(self.select_fd()?, slot, value)
            .with_context(|| format!("writing slot {slot} of {OVERLAY_SELECT_MAP}"))
    }

    /// The generation after the one in force: after ours, or after the one
    /// a previous daemon recorded (so its overlay entries never match).
    fn next_generation(&self) -> anyhow::Result<u32> {
        let current = if self.generation != 0 {
            self.generation
        } else {
            map_lookup_u32(self.select_fd()?, OVERLAY_SELECT_GENERATION)
                .context("reading the generation in force")?
                .unwrap_or(0)
                % 256
        };
        Ok(current % 255 + 1)
    }

    /// Empty overlays for a new table: the entries of `old_generation` are
    /// deleted from ours; the first time (or after a failed write), two
    /// fresh maps take the overlay slots, so nothing a previous daemon
    /// left there survives.
    fn reset_overlays(&mut self, old_generation: u32) -> anyhow::Result<()> {
        let keys: Vec<RuleKey> = std::mem::take(&mut self.overlay).into_keys().collect();
        if let Some(ov) = &self.overlays {
            // Nothing in force is in them any more: the program may skip them.
            self.select(
                OVERLAY_SELECT_ACTIVE,
                ov.active | spicegate_common::OVERLAY_EMPTY,
            )?;
            let g = u8::try_from(old_generation).unwrap_or(0);
            let ops: Vec<(RuleKey, Option<RuleValue>)> = keys.iter().map(|k| (*k, None)).collect();
            let fresh = ov.fds.iter().try_for_each(|fd| write_ops(*fd, g, &ops));
            self.writes += 2 * ops.len() as u64;
            if fresh.is_ok() {
                return Ok(());
            }
            self.overlays = None;
        }
        let capacity = u32::try_from(OVERLAY_MAX + OVERLAY_MAX / 4).unwrap_or(u32::MAX);
        let a = RuleTable::create(capacity, 0).context("creating an overlay")?;
        let b = RuleTable::create(capacity, 0).context("creating an overlay")?;
        let fds = [
            IterableMap::map(&a).fd().as_fd().as_raw_fd(),
            IterableMap::map(&b).fd().as_fd().as_raw_fd(),
        ];
        let ids = [
            IterableMap::map(&a).info()?.id(),
            IterableMap::map(&b).info()?.id(),
        ];
        {
            let map = self
                .ebpf
                .map_mut(OVERLAY_MAP)
                .ok_or_else(|| anyhow!("map {OVERLAY_MAP} missing"))?;
            let mut outer: ArrayOfMaps<&mut MapData, RuleTable> = ArrayOfMaps::try_from(map)?;
            outer.set(0, &a, 0).context("placing overlay 0")?;
            outer.set(1, &b, 0).context("placing overlay 1")?;
        }
        self.select(OVERLAY_SELECT_ACTIVE, spicegate_common::OVERLAY_EMPTY)?;
        self.writes += 3;
        self.overlays = Some(Overlays {
            _maps: [a, b],
            fds,
            ids,
            active: 0,
        });
        Ok(())
    }

    /// Whether both overlay slots hold our overlays and both overlays hold
    /// exactly what they should: they are not frozen (a change writes
    /// them), so root's `bpf()` could write a grant there; the watchdog
    /// puts a new table in force when one is found.
    fn overlays_intact(&self) -> anyhow::Result<bool> {
        let Some(ov) = &self.overlays else {
            return Ok(true);
        };
        let outer = self.overlay_fd()?;
        let generation = u8::try_from(self.generation).unwrap_or(0);
        for slot in 0..2 {
            if map_lookup_u32(outer, slot)? != Some(ov.ids[slot as usize]) {
                return Ok(false);
            }
            let table = &ov._maps[slot as usize];
            let mut n = 0;
            for entry in table.iter() {
                let (mut k, v) = entry.context("reading an overlay")?;
                n += 1;
                if k._pad != generation {
                    return Ok(false);
                }
                k._pad = 0;
                if self.overlay.get(&k) != Some(&v) {
                    return Ok(false);
                }
            }
            if n != self.overlay.len() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn outer(&mut self) -> anyhow::Result<ArrayOfMaps<&mut MapData, RuleTable>> {
        let map = self
            .ebpf
            .map_mut(POLICY_MAP)
            .ok_or_else(|| anyhow!("map {POLICY_MAP} missing"))?;
        Ok(ArrayOfMaps::try_from(map)?)
    }

    /// Whether the policy slot still holds the table this daemon installed
    /// (someone with `bpf()` rights could have emptied or replaced it; an
    /// empty slot lets every connect through).
    ///
    /// Reads the inner map's id straight from the slot: turning it into a
    /// file descriptor (BPF_MAP_GET_FD_BY_ID) would need CAP_SYS_ADMIN,
    /// which the service does not have.
    pub fn table_intact(&self) -> anyhow::Result<bool> {
        let want = self.table_id;
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
        self.overlays_intact()
    }

    /// Attaches connect4, connect6, bind4 and bind6 to `cgroup` and pins the links,
    /// replacing links a previous daemon pinned (which then detach).
    pub fn attach(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let cg = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for (name, pin) in self.paths.links() {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            // `Single` creates a bpf_link, which the kernel runs alongside
            // other links (multi); AllowMultiple is refused for links.
            let id = prog
                .attach(cg.as_fd(), CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
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
    /// its denials. Entries are only added (the map is bounded); returns how
    /// many uids did not fit.
    pub fn name_uids(&mut self, uids: impl Iterator<Item = u32>) -> anyhow::Result<usize> {
        let map = self
            .ebpf
            .map_mut(RATE_NAMED_MAP)
            .ok_or_else(|| anyhow!("map {RATE_NAMED_MAP} missing"))?;
        let mut named: HashMap<&mut MapData, u32, RateState> = HashMap::try_from(map)?;
        let mut full = 0;
        for uid in uids.filter(|u| *u >= RATE_LOW_UIDS) {
            if self.named.contains(&uid) {
                continue;
            }
            match named.insert(uid, RateState::default(), BPF_NOEXIST) {
                Ok(()) => {
                    self.named.insert(uid);
                }
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    self.named.insert(uid);
                }
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    full += 1;
                }
                Err(e) => return Err(e).context("naming a uid for the rate limit"),
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

fn read_drops<T: std::borrow::Borrow<MapData>>(
    table: &PerCpuArray<T, u64>,
) -> anyhow::Result<KernelDrops> {
    let mut sums = [0u64; DROP_KINDS as usize];
    for (i, sum) in sums.iter_mut().enumerate() {
        let per_cpu = table
            .get(&(i as u32), 0)
            .context("reading the drop counters")?;
        *sum = per_cpu.iter().fold(0u64, |a, c| a.saturating_add(*c));
    }
    Ok(KernelDrops {
        rate_limited: sums[DROP_RATE_LIMITED as usize],
        log_ring_full: sums[DROP_LOG_RING as usize],
        flood_ring_full: sums[DROP_FLOOD_RING as usize],
    })
}

fn read_counters<T: std::borrow::Borrow<MapData>>(
    table: &PerCpuHashMap<T, u32, VmCounters>,
) -> anyhow::Result<std::collections::BTreeMap<u32, VmCounters>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in table.iter() {
        let (vm, per_cpu) = entry.context("reading counters")?;
        let sum = per_cpu
            .iter()
            .fold(VmCounters::default(), |a, c| VmCounters {
                allowed: a.allowed + c.allowed,
                denied: a.denied + c.denied,
                audited: a.audited + c.audited,
            });
        out.insert(vm, sum);
    }
    Ok(out)
}

/// The pinned per-VM counters, opened on their own for the metrics
/// writer thread (the engine keeps the loaded object).
pub struct CountersReader(PerCpuHashMap<MapData, u32, VmCounters>);

impl CountersReader {
    pub fn open(paths: &PinPaths) -> anyhow::Result<Self> {
        let data = MapData::from_pin(paths.counters())
            .with_context(|| format!("opening {}", paths.counters().display()))?;
        let map = aya::maps::Map::PerCpuHashMap(data);
        Ok(Self(PerCpuHashMap::try_from(map)?))
    }

    /// Per-VM counters summed over CPUs, read from the kernel now.
    pub fn read(&self) -> anyhow::Result<std::collections::BTreeMap<u32, VmCounters>> {
        read_counters(&self.0)
    }
}

/// The pinned drop counters, opened on their own for the event writer
/// thread (the engine keeps the loaded object).
pub struct DropsReader(PerCpuArray<MapData, u64>);

impl DropsReader {
    pub fn open(paths: &PinPaths) -> anyhow::Result<Self> {
        let data = MapData::from_pin(paths.drops())
            .with_context(|| format!("opening {}", paths.drops().display()))?;
        let map = aya::maps::Map::PerCpuArray(data);
        Ok(Self(PerCpuArray::try_from(map)?))
    }

    pub fn read(&self) -> anyhow::Result<KernelDrops> {
        read_drops(&self.0)
    }
}

/// Denials the kernel did not log, by reason, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelDrops {
    /// Kept out of the log by the rate limit (each is in a summary line).
    pub rate_limited: u64,
    /// The aya-log ring had no room for the DENY record.
    pub log_ring_full: u64,
    /// The flood ring had no room for the summary record.
    pub flood_ring_full: u64,
}

impl KernelDrops {
    pub fn since(self, then: Self) -> Self {
        Self {
            rate_limited: self.rate_limited.saturating_sub(then.rate_limited),
            log_ring_full: self.log_ring_full.saturating_sub(then.log_ring_full),
            flood_ring_full: self.flood_ring_full.saturating_sub(then.flood_ring_full),
        }
    }
}

/// Where a new link is pinned before it is renamed over the live one.
/// bpffs refuses names containing dots (they are reserved).
fn staging(pin: &Path) -> PathBuf {
    let mut name = pin
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push("_new");
    pin.with_file_name(name)
}

/// The `u32` value at `key` of a map (for an array of maps: the id of the
/// inner map in that slot); `None` for an empty slot.
fn map_lookup_u32(fd: i32, key: u32) -> io::Result<Option<u32>> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = 0u32;
    let mut attr = LookupAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: &raw const key as u64,
        value: &raw mut value as u64,
        flags: 0,
    };
    // SAFETY: key and value point at 4-byte locals that outlive the call,
    // the key and value sizes of an array of maps.
    match unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One bpf(2) call with `attr`, the command's attribute struct; the
/// kernel reads (and for some commands writes back) `size_of::<T>()` bytes.
///
/// # Safety
/// `attr` must be the repr(C) layout the command expects, and every pointer
/// in it valid for what the command reads or writes.
pub(crate) unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: the caller vouches for attr's layout and pointers.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Makes a map read-only for `bpf()` callers (BPF_MAP_FREEZE); the
/// program, which only reads it, is unaffected.
pub(crate) fn map_freeze(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    const BPF_MAP_FREEZE: libc::c_long = 22;
    #[repr(C)]
    struct FreezeAttr {
        map_fd: u32,
        _pad: [u32; 15],
    }
    let mut attr = FreezeAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: [0; 15],
    };
    // SAFETY: bpf(BPF_MAP_FREEZE) reads `size` bytes of a valid attr.
    unsafe { sys_bpf(BPF_MAP_FREEZE, &mut attr) }.map(drop)
}

/// Writes `value` at `key` of a `u32` array (BPF_MAP_UPDATE_ELEM).
fn map_update_u32(fd: i32, key: u32, value: u32) -> io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    #[repr(C)]
    struct UpdateAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = UpdateAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: &raw const key as u64,
        value: &raw const value as u64,
        flags: 0,
    };
    // SAFETY: key and value point at 4-byte locals that outlive the call,
    // the key and value sizes of a u32 array.
    unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// Forcibly detaches a link, even if some process still holds it open.
fn link_detach(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
        _pad: [u32; 15],
    }
    let mut attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
        _pad: [0; 15],
    };
    // SAFETY: bpf(BPF_LINK_DETACH) reads `size` bytes of a valid attr.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Where a pinned link is attached, read back from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the link has been detached.
    pub cgroup_id: u64,
}

/// Reads a pinned cgroup link's info (BPF_OBJ_GET_INFO_BY_FD).
pub fn link_state(pin: &Path) -> io::Result<LinkState> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = obj_get(pin)?;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the union
    // whose cgroup member starts with cgroup_id.
    let mut info = [0u64; 32];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most info_len bytes into `info`.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(LinkState {
        link_id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        cgroup_id: info[2],
    })
}

/// Whether both links are pinned and attached to `cgroup` right now.
pub fn attached(paths: &PinPaths, cgroup: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(cg) = fs::metadata(cgroup) else {
        return false;
    };
    paths
        .links()
        .iter()
        .all(|(_, pin)| link_state(pin).is_ok_and(|s| s.cgroup_id == cg.ino()))
}

/// What `unload` removed.
#[derive(Debug, Default)]
pub struct Unloaded {
    pub links: usize,
    pub pins: usize,
}

/// Detaches the links and removes every pin and the pin directory.
pub fn unload(paths: &PinPaths) -> anyhow::Result<Unloaded> {
    let mut done = Unloaded::default();
    if !paths.dir.exists() {
        return Ok(done);
    }
    let mut links: Vec<PathBuf> = paths
        .links()
        .into_iter()
        .flat_map(|(_, p)| [staging(&p), p])
        .collect();
    links.extend(paths.legacy_links());
    for pin in links {
        if !pin.exists() {
            continue;
        }
        let link =
            obj_get(&pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
        link_detach(link.as_fd()).with_context(|| format!("detaching {}", pin.display()))?;
        fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        done.links += 1;
    }
    for entry in
        fs::read_dir(&paths.dir).with_context(|| format!("listing {}", paths.dir.display()))?
    {
        let entry = entry?;
        fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
        done.pins += 1;
    }
    fs::remove_dir(&paths.dir).with_context(|| format!("removing {}", paths.dir.display()))?;
    Ok(done)
}

/// Opens a pinned map or link (for another thread's own handle).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    obj_get(path)
}

/// Opens a pinned object (BPF_OBJ_GET).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u32; 11],
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: [0; 11],
    };
    // SAFETY: bpf(BPF_OBJ_GET) reads a valid attr whose path outlives the call.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_root_from(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_unified_and_skips_subtree_binds() {
        let info = "\
50 1 0:40 /user.slice /mnt/bind rw - cgroup2 cgroup2 rw
29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_root_from(info),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_root_from("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    /// The embedded object's maps and programs carry exactly the names
    /// spicegate-common gives them (a rename on one side only would make
    /// the daemon miss a map at load, or pin it under the wrong name).
    /// Needs no root: the object is parsed, not loaded.
    #[test]
    fn the_kernel_object_uses_the_shared_names() {
        use spicegate_common::{OVERLAY_MAP, OVERLAY_SELECT_MAP};
        if EBPF_OBJECT.is_empty() {
            eprintln!("built with SPICEGATE_SKIP_EBPF=1: no kernel object to check");
            return;
        }
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let mut maps: Vec<&str> = obj.maps.keys().map(String::as_str).collect();
        maps.sort_unstable();
        for name in [
            POLICY_MAP,
            OVERLAY_MAP,
            OVERLAY_SELECT_MAP,
            RATE_MAP,
            RATE_NAMED_MAP,
            MARKS_MAP,
            DROPS_MAP,
            FLOOD_MAP,
            COUNTERS_MAP,
            spicegate_common::LOG_MAP,
        ] {
            assert!(
                maps.contains(&name),
                "map {name} not in the object: {maps:?}"
            );
        }
        let mut progs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        progs.sort_unstable();
        assert_eq!(
            progs,
            [PROG_BIND4, PROG_BIND6, PROG_CONNECT4, PROG_CONNECT6],
            "programs of the object"
        );
    }

    #[test]
    fn pin_names_carry_the_layout_version() {
        let p = PinPaths::new("/sys/fs/bpf/x");
        assert_eq!(
            p.policy(),
            PathBuf::from(format!("/sys/fs/bpf/x/policy_v{LAYOUT_VERSION}"))
        );
    }
}
