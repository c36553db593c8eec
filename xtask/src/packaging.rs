//! The packaging checks of `cargo xtask test` (also alone: `cargo xtask
//! test --only packaging`): build the .deb from the binary the suite built
//! (`cargo xtask deb --bin`, which runs `systemd-analyze verify` on the
//! units), run lintian on it, and `ansible-playbook --syntax-check` on
//! examples/ansible. Nothing here needs root or touches the kernel.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    deb::{DebArgs, LINTIAN_OVERRIDES},
    util::{output, shown, target_dir, workspace},
};

/// Runs every packaging check on a package of `bin`; the error lists what
/// failed.
pub fn check(bin: &Path) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    // Its own directory: a `cargo xtask deb` in target/debian is left alone.
    let out = target_dir()?.join("debian-check");
    match crate::deb::deb(&DebArgs::prebuilt(bin.to_path_buf(), out)) {
        Ok(deb) => {
            if let Err(e) = lintian(&deb) {
                eprintln!("xtask: {e:#}");
                failed.push("lintian");
            }
        }
        Err(e) => {
            eprintln!("xtask: {e:#}");
            failed.push("deb (systemd-analyze verify)");
        }
    }
    if let Err(e) = ansible_syntax_check() {
        eprintln!("xtask: {e:#}");
        failed.push("ansible-playbook --syntax-check");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("packaging checks failed: {}", failed.join(", "))
    }
}

/// lintian on `deb`: fails on any error or warning it reports. A tag may
/// only be silenced in packaging/deb/lintian-overrides, with a comment
/// above it saying why.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    if output(Command::new("lintian").arg("--print-version")).is_none() {
        bail!("`lintian` is missing: run `cargo xtask setup` (or `apt-get install lintian`)");
    }
    let overrides = workspace().join(LINTIAN_OVERRIDES);
    if overrides.exists() {
        let text = fs::read_to_string(&overrides)
            .with_context(|| format!("reading {}", overrides.display()))?;
        let bare = overrides_without_reason(&text);
        if !bare.is_empty() {
            bail!(
                "{LINTIAN_OVERRIDES}: every override needs a comment above it saying why; none for: {}",
                bare.join("; ")
            );
        }
    }
    let mut cmd = Command::new("lintian");
    // --no-cfg: the same checks whoever runs it. --display-info: the I:
    // tags too, for reading (they do not fail). --fail-on: exit 2 on E:
    // and W: (overridden tags do not count).
    cmd.args([
        "--no-cfg",
        "--display-info",
        "--fail-on",
        "error,warning",
        "--tag-display-limit",
        "0",
    ])
    .arg(deb);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", shown(&cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines() {
        eprintln!("lintian: {line}");
    }
    // As root it says so on stderr ("running with root privileges is not
    // recommended!"): shown, not a failure.
    for line in stderr.lines() {
        eprintln!("lintian: {line}");
    }
    let tags = failing_tags(&stdout);
    if !out.status.success() || !tags.is_empty() {
        bail!(
            "`{}` failed ({}): {} error(s)/warning(s); fix them, or override one in {LINTIAN_OVERRIDES} with a comment saying why",
            shown(&cmd),
            out.status,
            tags.len()
        );
    }
    eprintln!("xtask: lintian: no errors, no warnings");
    Ok(())
}

/// The E: and W: lines of lintian's output.
fn failing_tags(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect()
}

/// The overrides (non-comment, non-blank lines) with no comment line right
/// above them (a comment may cover several overrides in a row).
fn overrides_without_reason(text: &str) -> Vec<&str> {
    let mut bare = Vec::new();
    let mut covered = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            covered = false;
        } else if line.starts_with('#') {
            covered = true;
        } else if !covered {
            bare.push(line);
        }
    }
    bare
}

/// The example playbook, inventory and README (examples/ansible).
fn ansible_dir() -> PathBuf {
    workspace().join("examples/ansible")
}

/// `ansible-playbook --syntax-check` of examples/ansible/site.yml with its
/// example inventory. ansible's own files (temporary files, fact cache) go
/// to the target directory, not to ~/.ansible.
fn ansible_syntax_check() -> anyhow::Result<()> {
    if output(Command::new("ansible-playbook").arg("--version")).is_none() {
        bail!(
            "`ansible-playbook` is missing: run `cargo xtask setup` (or `apt-get install ansible-core`)"
        );
    }
    let dir = ansible_dir();
    let home = target_dir()?.join("ansible-home");
    fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let mut cmd = Command::new("ansible-playbook");
    cmd.current_dir(&dir)
        .args(["--syntax-check", "-i", "inventory.example.ini", "site.yml"])
        .env("ANSIBLE_HOME", &home)
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        // The playbook's own ansible.cfg, if any, not one of this machine.
        .env_remove("ANSIBLE_CONFIG");
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", shown(&cmd)))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in said.lines() {
        eprintln!("ansible: {line}");
    }
    if !out.status.success() {
        return Err(anyhow!("`{}` failed ({})", shown(&cmd), out.status))
            .with_context(|| format!("in {}", dir.display()));
    }
    // Warnings (an unknown module option, a deprecated form) exit 0.
    if said.contains("[WARNING]") || said.contains("[DEPRECATION WARNING]") {
        bail!("`{}` in {} warned (see above)", shown(&cmd), dir.display());
    }
    eprintln!("xtask: ansible-playbook --syntax-check: examples/ansible/site.yml ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{failing_tags, overrides_without_reason};

    #[test]
    fn every_override_needs_a_reason() {
        let text = "\
# why: the first two\n\
spicegate: tag-one\n\
spicegate: tag-two [usr/sbin/spicegate]\n\
\n\
spicegate: tag-three\n\
# why: four\n\
spicegate: tag-four\n";
        assert_eq!(overrides_without_reason(text), ["spicegate: tag-three"]);
        assert!(overrides_without_reason("# only a comment\n\n").is_empty());
    }

    #[test]
    fn errors_and_warnings_fail_info_does_not() {
        let out = "\
E: spicegate: no-changelog usr/share/doc/spicegate/changelog.gz (native package)\n\
W: spicegate: copyright-without-copyright-notice\n\
I: spicegate: hardening-no-fortify-functions [usr/sbin/spicegate]\n\
N: a note\n";
        assert_eq!(failing_tags(out).len(), 2);
        assert!(failing_tags("I: spicegate: x\n").is_empty());
    }
}
