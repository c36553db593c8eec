//! `cargo xtask deb`: the Debian package.
//!
//! Assembled by hand in a staging directory and built with
//! `dpkg-deb --build --root-owner-group`: a page of code with no tool to
//! install, where cargo-deb would be one more thing to build on every
//! machine (and its systemd and maintainer-script handling would have to be
//! bent to what spicegate needs anyway: never unload on upgrade, unload on
//! removal). The maintainer scripts are plain files in packaging/deb/; they
//! do what debhelper's systemd snippets do (deb-systemd-helper,
//! deb-systemd-invoke), by hand. `cargo xtask test` runs lintian on the
//! result (xtask/src/packaging.rs).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::util::{Step, cargo, output, run, shown, target_dir, workspace};

#[derive(Debug, clap::Args)]
pub struct DebArgs {
    /// Package this spicegate binary instead of building one with
    /// `cargo build --release --bins`.
    #[arg(long, value_name = "PATH")]
    bin: Option<PathBuf>,
    /// Package version [default: the workspace version from Cargo.toml].
    /// For testing upgrades.
    #[arg(long, value_name = "VERSION")]
    deb_version: Option<String>,
    /// Where the .deb goes [default: target/debian].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

impl DebArgs {
    /// Package `bin` (a binary already built) into `out`, at the workspace
    /// version.
    pub fn prebuilt(bin: PathBuf, out: PathBuf) -> Self {
        Self {
            bin: Some(bin),
            deb_version: None,
            out: Some(out),
        }
    }
}

/// Files installed under /etc: dpkg keeps the admin's edits (conffiles).
const CONFFILE_ROOT: &str = "etc";

/// The Maintainer: of the package and of its changelog entry.
const MAINTAINER: &str = "spicegate maintainers <spicegate@example.invalid>";

/// The systemd units in packaging/, installed in /lib/systemd/system.
/// spicegate-reload.path is disabled by default (postinst records it with
/// `deb-systemd-helper update-state` and never enables it);
/// spicegate-reload.service is static, started by the path unit.
pub const UNITS: &[&str] = &[
    "spicegate.service",
    "spicegate-reload.path",
    "spicegate-reload.service",
];

/// The lintian overrides, installed as /usr/share/lintian/overrides/spicegate
/// when the file exists. Every override needs a comment above it saying why
/// (`cargo xtask test` checks).
pub const LINTIAN_OVERRIDES: &str = "packaging/deb/lintian-overrides";

/// Builds the package and returns its path.
pub fn deb(args: &DebArgs) -> anyhow::Result<PathBuf> {
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("gzip", "gzip"),
        ("strip", "binutils"),
        ("md5sum", "coreutils"),
    ] {
        if output(Command::new(tool).arg("--version")).is_none() {
            bail!("`{tool}` is missing: run `cargo xtask setup` (or `apt-get install {package}`)");
        }
    }
    let bin = match &args.bin {
        Some(b) => {
            if !b.is_file() {
                bail!("--bin {}: no such file", b.display());
            }
            b.clone()
        }
        None => crate::build::build(&crate::build::BuildArgs { release: true })?,
    };
    let version = match &args.deb_version {
        Some(v) => v.clone(),
        None => debian_version(&workspace_version()?),
    };
    if version.is_empty()
        || !version.starts_with(|c: char| c.is_ascii_digit())
        || !version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-:".contains(c))
    {
        bail!("`{version}` is not a Debian version (digits first, then [A-Za-z0-9.+~-:])");
    }
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("`dpkg --print-architecture` failed"))?;
    let out = match &args.out {
        Some(o) => o.clone(),
        None => target_dir()?.join("debian"),
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let step = Step::start("deb");
    let name = format!("spicegate_{version}_{arch}");
    let staging = out.join(&name);
    let built = assemble(&staging, &bin, &version, &arch).and_then(|()| {
        let deb = out.join(format!("{name}.deb"));
        // Its progress line goes to stderr: stdout is only the path.
        run(Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&staging)
            .arg(&deb)
            .stdout(std::io::stderr()))?;
        Ok(deb)
    });
    let _ = fs::remove_dir_all(&staging);
    step.finish(built.is_ok());
    built
}

/// The version of the workspace (`[workspace.package] version`), as cargo
/// resolves it for the spicegate package.
fn workspace_version() -> anyhow::Result<String> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let json = output(&mut cmd).ok_or_else(|| anyhow!("`{}` failed", shown(&cmd)))?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("reading `cargo metadata` output")?;
    meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "spicegate"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("`cargo metadata` lists no spicegate package with a version"))
}

/// Cargo's `1.2.0-rc.1` sorts before `1.2.0`; in Debian that is `1.2.0~rc.1`.
fn debian_version(cargo_version: &str) -> String {
    let (base, build) = cargo_version
        .split_once('+')
        .map_or((cargo_version, None), |(b, m)| (b, Some(m)));
    let mut v = base.replacen('-', "~", 1);
    if let Some(build) = build {
        v.push('+');
        v.push_str(build);
    }
    v
}

/// Fills `staging` with the package tree and its DEBIAN/ control files.
fn assemble(staging: &Path, bin: &Path, version: &str, arch: &str) -> anyhow::Result<()> {
    let ws = workspace();
    let packaging = ws.join("packaging");
    if staging.exists() {
        fs::remove_dir_all(staging)
            .with_context(|| format!("removing old staging dir {}", staging.display()))?;
    }

    // The binary, stripped: the debug information is most of its size (the
    // eBPF object is data and stays).
    let sbin = staging.join("usr/sbin/spicegate");
    install(bin, &sbin, 0o755)?;
    run(Command::new("strip")
        .args(["--strip-unneeded", "--remove-section=.comment"])
        .arg(&sbin))?;

    for unit in UNITS {
        install(
            &packaging.join(unit),
            &staging.join("lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    // Guards nothing until the admin writes a policy: installing locks
    // nobody out.
    install(
        &packaging.join("policy.toml"),
        &staging.join("etc/spicegate/policy.toml"),
        0o644,
    )?;
    install(
        &packaging.join("spicegate-notify.desktop"),
        &staging.join("etc/xdg/autostart/spicegate-notify.desktop"),
        0o644,
    )?;

    // Man pages and completions come from the binary's own clap
    // definitions, so they match the packaged version.
    let mut scratch = staging.as_os_str().to_owned();
    scratch.push("-generated");
    let scratch = PathBuf::from(scratch);
    let _ = fs::remove_dir_all(&scratch);
    let generated = generate(&sbin, &scratch, staging);
    let _ = fs::remove_dir_all(&scratch);
    generated?;

    let doc = staging.join("usr/share/doc/spicegate");
    install(&ws.join("README.md"), &doc.join("README.md"), 0o644)?;
    install(&ws.join("docs/policy.md"), &doc.join("policy.md"), 0o644)?;
    install(&ws.join("docs/status.md"), &doc.join("status.md"), 0o644)?;
    install(&ws.join("docs/metrics.md"), &doc.join("metrics.md"), 0o644)?;
    // Alert rules for the metrics file (docs/metrics.md): data for the
    // admin's Prometheus to include, not configuration of this package.
    install(
        &packaging.join("prometheus/spicegate-rules.yml"),
        &staging.join("usr/share/spicegate/prometheus/spicegate-rules.yml"),
        0o644,
    )?;
    install(
        &ws.join("docs/deploying.md"),
        &doc.join("deploying.md"),
        0o644,
    )?;
    install(&packaging.join("copyright"), &doc.join("copyright"), 0o644)?;
    let changelog = doc.join(changelog_name(version));
    write(
        &changelog,
        &changelog_entry(version, &changelog_date()?),
        0o644,
    )?;
    run(Command::new("gzip").args(["-9n"]).arg(&changelog))?;
    let overrides = ws.join(LINTIAN_OVERRIDES);
    if overrides.exists() {
        install(
            &overrides,
            &staging.join("usr/share/lintian/overrides/spicegate"),
            0o644,
        )?;
    }

    // Control area.
    let debian = staging.join("DEBIAN");
    let conffiles = files_under(&staging.join(CONFFILE_ROOT))?
        .iter()
        .map(|p| format!("/{}\n", rel(staging, p)))
        .collect::<String>();
    write(&debian.join("conffiles"), &conffiles, 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &packaging.join("deb").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    write(&debian.join("md5sums"), &md5sums(staging)?, 0o644)?;
    let control = format!(
        "Package: spicegate\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {size}\n\
         Depends: libc6, init-system-helpers (>= 1.54~)\n\
         Section: admin\n\
         Priority: optional\n\
         Description: per-user access to Spice consoles, enforced in the kernel\n \
         spicegate decides, with an eBPF program on the cgroup v2 root's connect\n \
         hooks, which Unix user on this machine may open the Spice console of\n \
         which virtual machine. A TOML policy (/etc/spicegate/policy.toml) names\n \
         the VMs, their servers and ports, and who may reach them; every refused\n \
         connect is logged. Enforcement is pinned in the kernel and survives\n \
         restarts of the daemon.\n \
         .\n \
         The shipped policy guards nothing: edit it, then `systemctl reload\n \
         spicegate`.\n",
        size = installed_size_kib(staging)?,
    );
    write(&debian.join("control"), &control, 0o644)?;

    dirs_0755(staging)?;
    verify_units(staging)?;
    Ok(())
}

/// Where Debian policy (12.7) wants the changelog: `changelog.gz` for a
/// native version (no Debian revision: what `cargo xtask deb` makes from
/// the workspace version), `changelog.Debian.gz` when the version has a
/// revision (`--deb-version 1.2.0-1`). lintian flags the other name.
fn changelog_name(version: &str) -> &'static str {
    if version.contains('-') {
        "changelog.Debian"
    } else {
        "changelog"
    }
}

/// The package's changelog: one entry, for the version being built.
fn changelog_entry(version: &str, date: &str) -> String {
    format!(
        "spicegate ({version}) unstable; urgency=medium\n\
         \n  \
         * spicegate {version}, packaged by `cargo xtask deb`. The changes are in\n    \
         the project's history (git log).\n\
         \n \
         -- {MAINTAINER}  {date}\n"
    )
}

/// The changelog's date (RFC 5322, as `date -R` prints it): of
/// SOURCE_DATE_EPOCH when set, else of the last commit, else now; so the
/// same tree gives the same package.
fn changelog_date() -> anyhow::Result<String> {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| {
            output(Command::new("git").arg("-C").arg(workspace()).args([
                "log",
                "-1",
                "--format=%ct",
            ]))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
        });
    let mut cmd = Command::new("date");
    cmd.args(["-u", "-R"]);
    if let Some(epoch) = epoch {
        if !epoch.chars().all(|c| c.is_ascii_digit()) {
            bail!("SOURCE_DATE_EPOCH={epoch:?} is not a number of seconds");
        }
        cmd.arg(format!("--date=@{epoch}"));
    }
    output(&mut cmd)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("`{}` failed", shown(&cmd)))
}

/// `spicegate generate man|completions` into `scratch`, then into place.
fn generate(sbin: &Path, scratch: &Path, staging: &Path) -> anyhow::Result<()> {
    let man = scratch.join("man");
    let comp = scratch.join("completions");
    run(Command::new(sbin).args(["generate", "man"]).arg(&man))?;
    run(Command::new(sbin)
        .args(["generate", "completions"])
        .arg(&comp))?;

    let man8 = staging.join("usr/share/man/man8");
    let pages = files_under(&man)?;
    if pages.is_empty() {
        bail!("`spicegate generate man` wrote no pages");
    }
    for page in pages {
        let name = page
            .file_name()
            .ok_or_else(|| anyhow!("odd man page path {}", page.display()))?;
        let dest = man8.join(name);
        install(&page, &dest, 0o644)?;
        // -n: no name or timestamp inside, so the same page gives the same bytes.
        run(Command::new("gzip").args(["-9n"]).arg(&dest))?;
    }

    for (generated, dest) in [
        (
            "spicegate.bash",
            "usr/share/bash-completion/completions/spicegate",
        ),
        ("_spicegate", "usr/share/zsh/vendor-completions/_spicegate"),
        (
            "spicegate.fish",
            "usr/share/fish/vendor_completions.d/spicegate.fish",
        ),
    ] {
        install(&comp.join(generated), &staging.join(dest), 0o644).with_context(|| {
            format!("`spicegate generate completions` did not write {generated}")
        })?;
    }
    Ok(())
}

/// `systemd-analyze verify` of the units as installed, one at a time so a
/// problem names its unit. Skipped, saying so, when systemd-analyze is not
/// installed.
fn verify_units(staging: &Path) -> anyhow::Result<()> {
    UNITS.iter().try_for_each(|unit| verify_unit(staging, unit))
}

fn verify_unit(staging: &Path, unit: &str) -> anyhow::Result<()> {
    let path = staging.join("lib/systemd/system").join(unit);
    let mut cmd = Command::new("systemd-analyze");
    // --man=no: the pages are in the package, not on this machine yet.
    cmd.args(["verify", "--man=no"]);
    // spicegate.service (DefaultDependencies=no) against the staged tree,
    // so its ExecStart= must exist in the package. The reload units have
    // systemd's default dependencies (sysinit.target, ...), which only a
    // real system has: verified against this machine's units (their own
    // directory, the staged one, comes first on the search path), their
    // ExecStart= being the machine's /bin/sh.
    if unit == "spicegate.service" {
        cmd.arg(format!("--root={}", staging.display()));
    }
    cmd.arg(&path);
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "xtask: systemd-analyze not installed: {unit} was not verified (`apt-get install systemd`)"
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("running `{}`", shown(&cmd))),
    };
    // verify reports some problems (unknown keys, bad values) as warnings
    // and still exits 0: any output is a failure here.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "`{}` found problems in packaging/{unit}:\n{}",
            shown(&cmd),
            said.trim_end()
        );
    }
    eprintln!("xtask: systemd-analyze verify: {unit} ok");
    Ok(())
}

fn install(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(src, dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dest.display()))
}

fn write(dest: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(dest, text).with_context(|| format!("writing {}", dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dest.display()))
}

/// Every regular file below `dir` (none when it does not exist), sorted.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `path` relative to `root`, with `/` separators.
fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Installed files other than conffiles, as `md5sum` prints them (what
/// `dpkg --verify` and debsums check).
fn md5sums(staging: &Path) -> anyhow::Result<String> {
    let files: Vec<String> = files_under(staging)?
        .iter()
        .map(|p| rel(staging, p))
        .filter(|r| !r.starts_with("DEBIAN/") && !r.starts_with(&format!("{CONFFILE_ROOT}/")))
        .collect();
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(staging).arg("--").args(&files);
    output(&mut cmd).ok_or_else(|| anyhow!("`md5sum` failed in {}", staging.display()))
}

/// Installed-Size: KiB of the installed files, each rounded up.
fn installed_size_kib(staging: &Path) -> anyhow::Result<u64> {
    let mut kib = 0;
    for f in files_under(staging)? {
        if rel(staging, &f).starts_with("DEBIAN/") {
            continue;
        }
        kib += fs::metadata(&f)?.len().div_ceil(1024);
    }
    Ok(kib)
}

/// Directories 0755 whatever the umask, as a package's directories are.
fn dirs_0755(root: &Path) -> anyhow::Result<()> {
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", d.display()))?;
        for entry in fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{changelog_entry, changelog_name, debian_version};

    #[test]
    fn cargo_versions_become_debian_versions() {
        assert_eq!(debian_version("0.1.0"), "0.1.0");
        assert_eq!(debian_version("1.2.0-rc.1"), "1.2.0~rc.1");
        assert_eq!(debian_version("1.2.0-rc.1+g1234"), "1.2.0~rc.1+g1234");
    }

    #[test]
    fn changelog_is_named_as_policy_wants() {
        // Native: what the workspace version becomes.
        assert_eq!(changelog_name("0.1.0"), "changelog");
        assert_eq!(changelog_name("1.2.0~rc.1+boottest1"), "changelog");
        // With a Debian revision.
        assert_eq!(changelog_name("0.1.0-1"), "changelog.Debian");
    }

    #[test]
    fn changelog_entry_is_debian_changelog_format() {
        let entry = changelog_entry("0.1.0", "Tue, 01 Dec 2026 17:21:32 +0000");
        let lines: Vec<&str> = entry.lines().collect();
        assert_eq!(lines[0], "spicegate (0.1.0) unstable; urgency=medium");
        assert_eq!(lines[1], "");
        assert!(lines[2].starts_with("  * "), "{entry}");
        assert!(lines[3].starts_with("    "), "{entry}");
        assert_eq!(lines[4], "");
        assert_eq!(
            lines[5],
            " -- spicegate maintainers <spicegate@example.invalid>  Tue, 01 Dec 2026 17:21:32 +0000"
        );
        assert_eq!(lines.len(), 6);
        // The text (not the trailer, which is as long as it is) fits 80
        // columns.
        assert!(lines[..5].iter().all(|l| l.len() <= 80), "{entry}");
    }
}
