//! Child cgroups: the tests and the benchmark attach spicegate to cgroups
//! that hold only the processes they start, so nothing else on the machine
//! is decided.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{context, log_prefix, wait_until};

/// The cgroup2 mount point, from /proc/self/mountinfo (it is not always
/// /sys/fs/cgroup: hybrid hosts mount it at /sys/fs/cgroup/unified). A
/// mount of the whole hierarchy (root `/`) is preferred to a bind mount of
/// a part of it.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| context("reading /proc/self/mountinfo", e))?;
    // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <super opts>"
    let mounts: Vec<(&str, &str)> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next() != Some("cgroup2") {
                return None;
            }
            let mut fields = left.split_whitespace().skip(3);
            Some((fields.next()?, fields.next()?))
        })
        .collect();
    mounts
        .iter()
        .find(|(root, _)| *root == "/")
        .or_else(|| mounts.first())
        .map(|(_, mount_point)| PathBuf::from(unescape_mountinfo(mount_point)))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 mount in /proc/self/mountinfo: spicegate needs cgroup v2",
            )
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
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup this process created. Drop kills whatever is left in it
/// (cgroup.kill), waits for it to empty and removes it; removing the cgroup
/// also releases any BPF link still attached to it. A cgroup made inside
/// another guard's must be dropped first.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the directory `path` (below the cgroup2 mount).
    pub fn create(path: PathBuf) -> io::Result<Self> {
        fs::create_dir(&path)
            .map_err(|e| context(format!("creating cgroup {}", path.display()), e))?;
        Ok(Self { path })
    }

    /// `<cgroup2 mount>/<name>`.
    pub fn top_level(name: &str) -> io::Result<Self> {
        Self::create(cgroup2_root()?.join(name))
    }

    /// A cgroup below this one.
    pub fn child(&self, name: &str) -> io::Result<Self> {
        Self::create(self.path.join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in it.
    pub fn procs(&self) -> Vec<String> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let p = log_prefix();
        if !self.procs().is_empty() {
            if let Err(e) = fs::write(self.path.join("cgroup.kill"), "1") {
                eprintln!(
                    "{p} cannot kill the processes of {}: {e}",
                    self.path.display()
                );
            }
            if !wait_until(Duration::from_secs(5), || self.procs().is_empty()) {
                eprintln!(
                    "{p} {} still holds {:?} after cgroup.kill",
                    self.path.display(),
                    self.procs()
                );
            }
        }
        if let Err(e) = rmdir(&self.path) {
            eprintln!("{p} LEFTOVER cgroup {}: {e}", self.path.display());
        }
    }
}

/// Removes the (empty) cgroup directory `path`, trying for 5 s: a killed
/// task leaves the cgroup a moment after it vanishes from cgroup.procs,
/// and rmdir says EBUSY until then. A cgroup already gone is no error.
pub fn rmdir(path: &Path) -> io::Result<()> {
    let mut last = None;
    let removed = wait_until(Duration::from_secs(5), || match fs::remove_dir(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            last = Some(e);
            false
        }
    });
    match last {
        Some(e) if !removed => Err(context(format!("rmdir {}", path.display()), e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(
            unescape_mountinfo("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }
}
