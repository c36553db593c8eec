//! Finding cgroup2 (never hard-coded: hybrid layouts mount it elsewhere),
//! making sure bpffs is there, and locking the pin directory.

use super::*;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs lives on systemd machines; mounted by us when absent.
const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

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
pub(super) fn unescape_mountinfo(s: &str) -> String {
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
