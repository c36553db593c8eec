//! Policy files written for one test and removed after it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use spicegate_testkit::{TempDir, unique_name};

#[derive(Debug)]
pub struct PolicyFile {
    path: PathBuf,
}

impl PolicyFile {
    pub fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name("spicegate-test")));
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing policy {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the contents (for reload tests).
    pub fn rewrite(&self, contents: &str) {
        fs::write(&self.path, contents)
            .unwrap_or_else(|e| panic!("rewriting policy {}: {e}", self.path.display()));
    }

    /// 1-based line number of the first line containing `needle`, for
    /// checking `FILE:LINE:` diagnostics.
    pub fn line_of(&self, needle: &str) -> usize {
        let text = fs::read_to_string(&self.path).expect("reading back the policy");
        text.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{needle:?} not in policy {}", self.path.display()))
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "[harness] LEFTOVER policy file {}: {e}",
                self.path.display()
            );
        }
    }
}

/// A directory of its own (root's, mode 0755) for a main policy file, its
/// `policy.d` (0755) and the daemon's clock-offset file (see
/// `--clock-offset-file`); removed on drop.
#[derive(Debug)]
pub struct PolicyDir {
    dir: TempDir,
}

impl PolicyDir {
    pub fn new(main: &str) -> Self {
        let d = Self {
            dir: TempDir::unique("sg-policy").unwrap_or_else(|e| panic!("{e}")),
        };
        fs::create_dir(d.dropins())
            .unwrap_or_else(|e| panic!("creating {}: {e}", d.dropins().display()));
        for p in [d.dir().to_owned(), d.dropins()] {
            d.chmod(&p, 0o755);
        }
        fs::write(d.main(), main).expect("writing the policy");
        d.chmod(&d.main(), 0o644);
        d.set_offset(0);
        d
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn main(&self) -> PathBuf {
        self.dir().join("policy.toml")
    }

    pub fn dropins(&self) -> PathBuf {
        self.dir().join("policy.d")
    }

    pub fn chmod(&self, p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
    }

    /// The file `--clock-offset-file` points the daemon at.
    pub fn clock(&self) -> PathBuf {
        self.dir().join("clock-offset")
    }

    /// Seconds the daemon adds to the clock, replaced atomically (it reads
    /// the file four times a second).
    pub fn set_offset(&self, secs: i64) {
        let tmp = self.dir().join("clock-offset.tmp");
        fs::write(&tmp, secs.to_string()).expect("writing the clock offset");
        fs::rename(&tmp, self.clock()).expect("placing the clock offset");
    }

    /// Makes the daemon's clock read `unix` at the start of the current
    /// real second; returns `(unix, the real instant of that start)`.
    pub fn set_clock(&self, unix: i64) -> (i64, std::time::Instant) {
        let now = std::time::Instant::now();
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970");
        let real = i64::try_from(since.as_secs()).expect("seconds fit i64");
        self.set_offset(unix - real);
        (
            unix,
            now - std::time::Duration::from_nanos(u64::from(since.subsec_nanos())),
        )
    }
}
