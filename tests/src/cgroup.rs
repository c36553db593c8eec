//! Child cgroups: the tests attach spicegate to a cgroup that holds only the
//! probes they start, so nothing else on the machine is decided. The guard
//! is the test kit's [`Cgroup`].

use std::path::{Path, PathBuf};

use spicegate_testkit::cgroup::Cgroup;

/// The cgroup2 mount point (see [`spicegate_testkit::cgroup::cgroup2_root`]).
pub fn cgroup2_root() -> PathBuf {
    spicegate_testkit::cgroup::cgroup2_root().unwrap_or_else(|e| panic!("{e}"))
}

/// A uniquely named child `spicegate-test-<pid>-<n>` of the cgroup2 root.
/// Drop kills whatever is left in it, waits for it to empty and removes it;
/// removing the cgroup also releases any BPF link still attached to it.
#[derive(Debug)]
pub struct TestCgroup(Cgroup);

impl TestCgroup {
    pub fn new() -> Self {
        let name = spicegate_testkit::unique_name("spicegate-test");
        Self(Cgroup::top_level(&name).unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}
