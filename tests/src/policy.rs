//! Policy files written for one test and removed after it.

use std::{
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug)]
pub struct PolicyFile {
    path: PathBuf,
}

impl PolicyFile {
    pub fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "spicegate-test-{}-{}.toml",
            std::process::id(),
            crate::next_id()
        ));
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
