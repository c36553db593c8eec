//! The state directory (`/var/lib/spicegate`): the last policy that applied
//! cleanly, and the temporary grants.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Keeps the last good policy on its own thread, so that the fsyncs of a
/// large policy are not part of the reload an admin waits for. Copies are
/// written in order (a burst of reloads writes only the newest), and
/// dropping the writer waits for the pending one.
pub struct LastGoodWriter {
    tx: Option<std::sync::mpsc::Sender<std::sync::Arc<Vec<crate::policy::Source>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LastGoodWriter {
    pub fn new(state_dir: PathBuf) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<std::sync::Arc<Vec<crate::policy::Source>>>();
        let thread = std::thread::Builder::new()
            .name("last-good".into())
            .spawn(move || {
                while let Ok(mut sources) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        sources = newer;
                    }
                    if let Err(e) = save_last_good(&state_dir, &sources) {
                        log::warn!(
                            "could not keep a copy of the good policy in {}: {e:#}",
                            state_dir.display()
                        );
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
        }
    }

    pub fn save(&self, sources: std::sync::Arc<Vec<crate::policy::Source>>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(sources);
        }
    }
}

impl Drop for LastGoodWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/spicegate";

/// Writes `bytes` to `path` so that a crash leaves the old or the new file,
/// never a torn one: temp file in the same directory, fsync, rename, fsync
/// of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Where the last good policy is kept: `last-good/policy.toml` and its
/// `last-good/policy.d/`.
pub fn last_good_path(state_dir: &Path) -> PathBuf {
    state_dir.join("last-good").join("policy.toml")
}

/// Keeps a copy of a policy that applied cleanly (main file and drop-ins).
/// Built beside the old copy and renamed into place.
pub fn save_last_good(state_dir: &Path, sources: &[crate::policy::Source]) -> anyhow::Result<()> {
    let dir = state_dir.join("last-good");
    let new = state_dir.join("last-good.new");
    let old = state_dir.join("last-good.old");
    let _ = fs::remove_dir_all(&new);
    fs::create_dir_all(new.join("policy.d"))
        .with_context(|| format!("creating {}", new.display()))?;
    for (i, s) in sources.iter().enumerate() {
        let target = if i == 0 {
            new.join("policy.toml")
        } else {
            new.join("policy.d")
                .join(s.path.file_name().unwrap_or_default())
        };
        write_atomic(&target, s.text.as_bytes())?;
    }
    let _ = fs::remove_dir_all(&old);
    if dir.exists() {
        fs::rename(&dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    fs::rename(&new, &dir)
        .with_context(|| format!("renaming {} to {}", new.display(), dir.display()))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}
