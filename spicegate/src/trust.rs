//! Files only root may change: the policy, its `policy.d`, the state
//! directory and the grants file. Like sshd's StrictModes, a file (or a
//! directory above it) that someone else could write is refused: otherwise
//! a `chmod 666` or a careless push lets any user grant himself every VM.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Refuses `path` (a file or a directory) unless root owns it and only root
/// can write it, and the same holds for every directory above it (a
/// root-owned directory with the sticky bit, like /tmp, is fine above it).
/// The error names the path, the owner or the mode, and the fix.
pub fn check(path: &Path, what: &str) -> Result<(), String> {
    let real = fs::canonicalize(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    check_one(&real, what, false)?;
    for dir in real.ancestors().skip(1) {
        check_one(dir, &format!("directory above the {what}"), true)?;
    }
    Ok(())
}

fn check_one(path: &Path, what: &str, above: bool) -> Result<(), String> {
    let md = fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mode = md.permissions().mode() & 0o7777;
    if md.uid() != 0 {
        return Err(format!(
            "refusing {what} {}: it is owned by uid {}, not root, so that user could change who may open what; `chown root {}`",
            path.display(),
            md.uid(),
            path.display()
        ));
    }
    let sticky_dir = md.is_dir() && mode & STICKY != 0;
    if mode & GROUP_OR_OTHER_WRITE != 0 && !(above && sticky_dir) {
        return Err(format!(
            "refusing {what} {}: it is writable by group or others (mode {mode:04o}), so any of them could change who may open what; `chmod go-w {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// [`check`] for every file a policy is read from, and for its `policy.d`.
pub fn check_policy(files: &[PathBuf], dropin_dir: &Path) -> Result<(), String> {
    for f in files {
        check(f, "policy file")?;
    }
    if dropin_dir.exists() {
        check(dropin_dir, "policy.d directory")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sg-trust-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        d
    }

    #[test]
    fn modes() {
        // Ownership needs root to arrange; unit tests run as any user, so
        // only the mode checks run here (the root tests cover owners).
        if nix::unistd::geteuid().as_raw() != 0 {
            return;
        }
        let d = dir();
        let f = d.join("policy.toml");
        fs::write(&f, "").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(check(&f, "policy file"), Ok(()));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = check(&f, "policy file").expect_err("0666 refused");
        assert!(e.contains("mode 0666") && e.contains("chmod go-w"), "{e}");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check(&f, "policy file").expect_err("a world-writable directory above");
        assert!(e.contains("mode 0777"), "{e}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).expect("chmod");
        assert_eq!(check(&f, "policy file"), Ok(()), "sticky like /tmp is fine");
        let _ = fs::remove_dir_all(&d);
    }
}
