//! The pin directory: what is pinned under which name, upgrades from the
//! pins of older layouts, where links are attached, and unloading.

use super::sys::{link_detach, obj_get};
use super::*;

/// What this layout pins, by name, with the layout version its pin name
/// carries: the maps layout 3 did not change keep their layout-2 pins, so
/// an upgrade adopts them (see [`spicegate_common::KEPT_LAYOUT_VERSION`]).
const PINNED: [(&str, u32); 16] = [
    ("policy", LAYOUT_VERSION),
    ("overlay", LAYOUT_VERSION),
    ("overlay_sel", LAYOUT_VERSION),
    ("ports", LAYOUT_VERSION),
    ("release", LAYOUT_VERSION),
    ("connect4", LAYOUT_VERSION),
    ("connect6", LAYOUT_VERSION),
    ("bind4", LAYOUT_VERSION),
    ("bind6", LAYOUT_VERSION),
    ("rate", KEPT_LAYOUT_VERSION),
    ("rate_named", KEPT_LAYOUT_VERSION),
    ("drops", KEPT_LAYOUT_VERSION),
    ("marks", KEPT_LAYOUT_VERSION),
    ("granted", KEPT_LAYOUT_VERSION),
    ("mark_slots", KEPT_LAYOUT_VERSION),
    ("counters", KEPT_LAYOUT_VERSION),
];

/// The pin file name of `what` (`policy_v3`, `marks_v2`...).
fn pin_name(what: &str) -> String {
    let version = PINNED
        .iter()
        .find(|(name, _)| *name == what)
        .map_or(LAYOUT_VERSION, |(_, v)| *v);
    format!("{what}_v{version}")
}

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
        self.dir.join(pin_name(what))
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
    pub fn granted(&self) -> PathBuf {
        self.file("granted")
    }
    pub fn mark_slots(&self) -> PathBuf {
        self.file("mark_slots")
    }
    pub fn ports(&self) -> PathBuf {
        self.file("ports")
    }
    pub fn release(&self) -> PathBuf {
        self.file("release")
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
    /// Every link this layout pins, with its program. The release link
    /// comes first, so it is attached before a connect hook marks anything.
    pub fn links(&self) -> [(&'static str, PathBuf); 5] {
        [
            (PROG_RELEASE, self.release()),
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
                    [
                        "connect4_v",
                        "connect6_v",
                        "bind4_v",
                        "bind6_v",
                        "release_v",
                    ]
                    .iter()
                    .any(|p| n.starts_with(p))
                })
            })
            .collect()
    }

    /// Every pin of another layout: a versioned name this layout does not
    /// pin (nor stage a link under).
    pub(super) fn legacy_pins(&self) -> Vec<PathBuf> {
        let current: Vec<String> = PINNED.iter().map(|(w, _)| pin_name(w)).collect();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.contains("_v")
                        && !current
                            .iter()
                            .any(|c| n == c || n.strip_suffix("_new") == Some(c))
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

/// Where a new link is pinned before it is renamed over the live one.
/// bpffs refuses names containing dots (they are reserved).
pub(super) fn staging(pin: &Path) -> PathBuf {
    let mut name = pin
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push("_new");
    pin.with_file_name(name)
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
