//! Child cgroups: the tests attach spicegate to a cgroup that holds only the
//! probes they start, so nothing else on the machine is decided.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

/// The cgroup2 mount point, from /proc/self/mountinfo (it is not always
/// /sys/fs/cgroup: hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <super opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mount_point) = left.split_whitespace().nth(4) {
            return PathBuf::from(unescape_mountinfo(mount_point));
        }
    }
    panic!("no cgroup2 mount in /proc/self/mountinfo: spicegate needs cgroup v2");
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

/// A uniquely named child of the cgroup2 root. Drop kills whatever is left
/// in it (cgroup.kill), waits for it to empty and removes it; removing the
/// cgroup also releases any BPF link still attached to it.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        let path = cgroup2_root().join(format!(
            "spicegate-test-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating test cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn procs(&self) -> Vec<String> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.procs().is_empty() {
            if let Err(e) = fs::write(self.path.join("cgroup.kill"), "1") {
                eprintln!(
                    "[harness] cannot kill the processes of {}: {e}",
                    self.path.display()
                );
            }
            if !crate::wait_until(Duration::from_secs(5), || self.procs().is_empty()) {
                eprintln!(
                    "[harness] {} still holds {:?} after cgroup.kill",
                    self.path.display(),
                    self.procs()
                );
            }
        }
        // A killed task leaves the cgroup a moment after it vanishes from
        // cgroup.procs; rmdir says EBUSY until then.
        let mut last = None;
        let removed = crate::wait_until(Duration::from_secs(5), || {
            match fs::remove_dir(&self.path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => {
                    last = Some(e);
                    false
                }
            }
        });
        if !removed {
            eprintln!(
                "[harness] LEFTOVER cgroup {}: rmdir failed: {last:?}",
                self.path.display()
            );
        }
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
