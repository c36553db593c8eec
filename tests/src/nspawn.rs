//! Booting a real Debian with systemd in a container, for the service test.
//!
//! About 600 lines: the rootfs cache, the container and its guards, and
//! the package installs, in the order a boot needs them.
//!
//! The root file system is debootstrapped once into a cache outside the
//! repository (`/var/cache/spicegate-tests/rootfs-<codename>`, the host's
//! suite from the host's mirror) and reused: each [`Container`] runs on an
//! overlay of it, so every run starts from the same clean tree and leaves
//! the cache untouched.
//!
//! The container gets what spicegate needs and nothing of the host's BPF or
//! network state: its own bpffs instance (mounted by the harness, bound on
//! /sys/fs/bpf; pins die with it), its own network namespace, and a cgroup
//! of its own (a child of the host's cgroup2 root holding nspawn and the
//! container; the container sees it as its cgroup root through a cgroup
//! namespace, so `spicegate run` attaches there and decides only the
//! container's processes). There is no host systemd to drive the container
//! (`machinectl`, `systemd-run -M`): the test puts a script and a oneshot
//! unit into the tree; the unit runs after boot, writes its results into a
//! bound directory and powers the container off.
//!
//! Drop kills whatever is left in the container's cgroup, unmounts the
//! overlay and the bpffs, and removes the cgroups and every temporary
//! directory.

use std::{
    fs,
    io::Read as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// Where the debootstrapped trees are kept between runs.
pub const CACHE_DIR: &str = "/var/cache/spicegate-tests";

/// Packages beyond `--variant=minbase`: a booting systemd, D-Bus (systemctl
/// and logind), and the tools the scenario uses.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2,python3,util-linux,procps";

/// Marks a cached tree as complete (debootstrap finished).
const COMPLETE: &str = ".spicegate-rootfs-complete";

/// The host's Debian suite (`VERSION_CODENAME` of /etc/os-release).
pub fn host_codename() -> String {
    let text = fs::read_to_string("/etc/os-release").expect("reading /etc/os-release");
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .expect("/etc/os-release has no VERSION_CODENAME: this test needs Debian")
}

/// The host's Debian mirror for `codename`, from /etc/apt/sources.list and
/// /etc/apt/sources.list.d/ (one-line `.list` and deb822 `.sources`).
pub fn host_mirror(codename: &str) -> String {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(("list", t));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let kind = match p.extension().and_then(|e| e.to_str()) {
                Some("list") => "list",
                Some("sources") => "sources",
                _ => continue,
            };
            if let Ok(t) = fs::read_to_string(&p) {
                texts.push((kind, t));
            }
        }
    }
    texts
        .iter()
        .find_map(|(kind, text)| match *kind {
            "list" => mirror_from_list(text, codename),
            _ => mirror_from_sources(text, codename),
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// `deb [options] URI SUITE COMPONENTS...`
fn mirror_from_list(text: &str, codename: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options run to the word that ends with `]`.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        (words.next()? == codename).then(|| uri.to_owned())
    })
}

/// deb822 stanzas: `Types: deb`, `URIs: ...`, `Suites: ...`.
fn mirror_from_sources(text: &str, codename: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let debs = field("Types")?.split_whitespace().any(|t| t == "deb");
        let suite = field("Suites")?.split_whitespace().any(|s| s == codename);
        (enabled && debs && suite)
            .then(|| field("URIs"))
            .flatten()
            .and_then(|u| u.split_whitespace().next().map(str::to_owned))
    })
}

/// Installs `packages` with apt-get when `tool` is not on PATH.
pub fn ensure_tool(tool: &str, packages: &[&str]) {
    if which(tool) {
        return;
    }
    eprintln!("[nspawn] {tool} missing: installing {packages:?}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        assert!(
            install(),
            "could not install {packages:?} for {tool}: run `cargo xtask setup` as root"
        );
    }
    assert!(
        which(tool),
        "{tool} still not on PATH after installing {packages:?}"
    );
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The cached Debian tree for the host's suite, debootstrapped now if it is
/// not there yet (a few minutes, once). Concurrent runs wait for one build.
pub fn cached_rootfs() -> PathBuf {
    ensure_tool("debootstrap", &["debootstrap"]);
    let codename = host_codename();
    let cache = PathBuf::from(CACHE_DIR);
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));
    let rootfs = cache.join(format!("rootfs-{codename}"));
    let _lock = FileLock::exclusive(&cache.join(".lock"));
    if rootfs.join(COMPLETE).exists() {
        return rootfs;
    }
    let mirror = host_mirror(&codename);
    let partial = cache.join(format!("rootfs-{codename}.partial"));
    let _ = fs::remove_dir_all(&partial);
    let _ = fs::remove_dir_all(&rootfs);
    eprintln!(
        "[nspawn] debootstrapping {codename} from {mirror} into {} (once; a few minutes)",
        rootfs.display()
    );
    let start = Instant::now();
    let log = cache.join(format!("debootstrap-{codename}.log"));
    let out = fs::File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            &codename,
        ])
        .arg(&partial)
        .arg(&mirror)
        .stdout(out.try_clone().expect("dup log fd"))
        .stderr(out)
        .status()
        .expect("starting debootstrap");
    if !status.success() {
        let tail = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        let _ = fs::remove_dir_all(&partial);
        panic!(
            "debootstrap {codename} {mirror} failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // No getty on the container's console: nothing reads it, and it only
    // slows the boot down.
    let _ =
        fs::remove_file(partial.join("etc/systemd/system/getty.target.wants/getty@tty1.service"));
    fs::write(partial.join(COMPLETE), format!("{codename} {mirror}\n"))
        .expect("marking the rootfs complete");
    fs::rename(&partial, &rootfs).unwrap_or_else(|e| {
        panic!(
            "renaming {} to {}: {e}",
            partial.display(),
            rootfs.display()
        )
    });
    eprintln!(
        "[nspawn] rootfs ready in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    rootfs
}

/// `flock(LOCK_EX)` on a file, released on drop.
struct FileLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

impl FileLock {
    fn exclusive(path: &Path) -> Self {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("locking {}: {e}", path.display()));
        Self { _lock: lock }
    }
}

/// How a boot ended.
#[derive(Debug)]
pub struct Boot {
    /// nspawn's exit status; `None` when the harness killed it at the
    /// timeout.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    /// nspawn's own output and the container's console.
    pub console: String,
}

/// One container: an overlay of the cached tree, its own bpffs, an output
/// directory bound at /out, and its cgroups. See the module docs.
#[derive(Debug)]
pub struct Container {
    name: String,
    /// Holds upper/, work/, root/, bpffs/, out/.
    dir: PathBuf,
    root_mounted: bool,
    bpffs_mounted: bool,
    /// The container's cgroups, cgroup2 first (created before booting).
    cgroups: Vec<PathBuf>,
}

impl Container {
    /// Overlays `rootfs` and mounts a fresh bpffs; nothing runs yet.
    pub fn new(rootfs: &Path) -> Self {
        ensure_tool("systemd-nspawn", &["systemd-container"]);
        let name = format!("sg-boot-{}-{}", std::process::id(), crate::next_id());
        let dir = std::env::temp_dir().join(&name);
        let mut c = Self {
            name,
            dir,
            root_mounted: false,
            bpffs_mounted: false,
            cgroups: Vec::new(),
        };
        for sub in ["upper", "work", "root", "bpffs", "out"] {
            fs::create_dir_all(c.dir.join(sub))
                .unwrap_or_else(|e| panic!("creating {}: {e}", c.dir.join(sub).display()));
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.display(),
            c.dir.join("upper").display(),
            c.dir.join("work").display()
        );
        mount("overlay", &c.dir.join("root"), "overlay", &opts);
        c.root_mounted = true;
        // A bpffs instance of its own: the container's pins never meet the
        // host's, and they are gone once it is unmounted.
        mount("bpf", &c.dir.join("bpffs"), "bpf", "mode=0700");
        c.bpffs_mounted = true;
        c
    }

    /// The container's root directory (writable, before and after boot).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The host side of /out.
    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// Writes `text` to `path` inside the container's tree.
    pub fn write(&self, path: &str, text: &str, mode: u32) {
        let dest = self.root().join(path.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        fs::write(&dest, text).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dest.display()));
    }

    /// Enables `unit` (already written under /etc/systemd/system) for
    /// multi-user.target, as `systemctl enable` would.
    pub fn enable(&self, unit: &str) {
        let wants = self
            .root()
            .join("etc/systemd/system/multi-user.target.wants");
        fs::create_dir_all(&wants).expect("creating multi-user.target.wants");
        let link = wants.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link)
            .unwrap_or_else(|e| panic!("linking {}: {e}", link.display()));
    }

    /// Replaces the container's bpffs with a fresh one, as a reboot would:
    /// whatever was pinned is gone.
    pub fn fresh_bpffs(&mut self) {
        let dir = self.dir.join("bpffs");
        assert!(umount(&dir), "unmounting {}", dir.display());
        self.bpffs_mounted = false;
        mount("bpf", &dir, "bpf", "mode=0700");
        self.bpffs_mounted = true;
    }

    /// Boots the container with systemd as PID 1 and waits until it powers
    /// itself off, or kills it after `timeout`. May be called again after
    /// that: the tree keeps what the previous boot changed.
    pub fn boot(&mut self, timeout: Duration) -> Boot {
        self.make_cgroups();
        // What the previous boot left (nspawn's payload/ and supervisor/).
        for cg in &self.cgroups {
            for e in fs::read_dir(cg).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && let Err(e) = remove_cgroup_tree(&e.path())
                {
                    panic!("clearing the container's cgroup: {e}");
                }
            }
        }
        let console_path = self.dir.join("console.log");
        let console = fs::File::create(&console_path).expect("creating console.log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--boot",
            "--quiet",
            // No host systemd or machined here: nspawn runs in the cgroup
            // the harness made and registers nowhere.
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--private-network",
            // What the service's CapabilityBoundingSet= asks for; nspawn
            // does not give containers these by default.
            "--capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON",
            // nspawn's own seccomp filter refuses bpf(2) otherwise.
            "--system-call-filter=bpf",
        ])
        .arg(format!("--machine={}", self.name))
        .arg("--directory")
        .arg(self.root())
        .arg(format!(
            "--bind={}:/sys/fs/bpf",
            self.dir.join("bpffs").display()
        ))
        .arg(format!("--bind={}:/out", self.out().display()))
        .stdin(Stdio::null())
        .stdout(console.try_clone().expect("dup console fd"))
        .stderr(console);
        let procs: Vec<PathBuf> = self
            .cgroups
            .iter()
            .map(|c| c.join("cgroup.procs"))
            .collect();
        // SAFETY: between fork and exec this only writes to files and
        // allocates nothing but the pid string; a failure aborts the spawn.
        unsafe {
            cmd.pre_exec(move || {
                let pid = std::process::id().to_string();
                for p in &procs {
                    fs::write(p, &pid)?;
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child: Child = cmd.spawn().expect("starting systemd-nspawn");
        let status = loop {
            match child.try_wait().expect("waiting for systemd-nspawn") {
                Some(s) => break Some(s),
                None if start.elapsed() > timeout => {
                    eprintln!(
                        "[nspawn] {} still running after {timeout:?}: killing it",
                        self.name
                    );
                    self.kill_all();
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let elapsed = start.elapsed();
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&console_path) {
            let _ = f.read_to_string(&mut text);
        }
        Boot {
            status,
            elapsed,
            console: text,
        }
    }

    /// A cgroup in the cgroup2 hierarchy and, on hybrid hosts, one in
    /// systemd's named v1 hierarchy (nspawn reads its own cgroup there).
    fn make_cgroups(&mut self) {
        if !self.cgroups.is_empty() {
            return;
        }
        let v2 = crate::cgroup2_root().join(&self.name);
        fs::create_dir(&v2).unwrap_or_else(|e| panic!("creating {}: {e}", v2.display()));
        self.cgroups.push(v2);
        if let Some(v1) = named_systemd_hierarchy() {
            let cg = v1.join(&self.name);
            fs::create_dir(&cg).unwrap_or_else(|e| panic!("creating {}: {e}", cg.display()));
            self.cgroups.push(cg);
        }
    }

    /// Kills every process left in the container's cgroup.
    fn kill_all(&self) {
        let Some(v2) = self.cgroups.first() else {
            return;
        };
        if !v2.exists() {
            return;
        }
        if let Err(e) = fs::write(v2.join("cgroup.kill"), "1") {
            eprintln!("[nspawn] cgroup.kill on {}: {e}", v2.display());
        }
        let empty = crate::wait_until(Duration::from_secs(10), || {
            fs::read_to_string(v2.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l == "populated 0"))
        });
        if !empty {
            eprintln!("[nspawn] LEFTOVER processes in {}", v2.display());
        }
    }
}

/// Mount point of the `name=systemd` v1 hierarchy (hybrid layout), if any.
fn named_systemd_hierarchy() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        if r.next()? != "cgroup" {
            return None;
        }
        let opts = r.nth(1)?;
        if !opts.split(',').any(|o| o == "name=systemd") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn mount(source: &str, target: &Path, fstype: &str, opts: &str) {
    nix::mount::mount(
        Some(source),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        Some(opts),
    )
    .unwrap_or_else(|e| panic!("mount -t {fstype} -o {opts} {}: {e}", target.display()));
}

fn umount(target: &Path) -> bool {
    for _ in 0..50 {
        match nix::mount::umount(target) {
            Ok(()) => return true,
            Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                eprintln!("[nspawn] umount {}: {e}", target.display());
                return false;
            }
        }
    }
    eprintln!("[nspawn] umount {}: still busy", target.display());
    false
}

/// Removes a cgroup and everything below it, deepest first.
fn remove_cgroup_tree(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    spicegate_testkit::cgroup::rmdir(path).map_err(|e| e.to_string())
}

impl Drop for Container {
    fn drop(&mut self) {
        // Never panic here: this often runs while a failed test unwinds.
        self.kill_all();
        for cg in self.cgroups.iter().rev() {
            if let Err(e) = remove_cgroup_tree(cg) {
                eprintln!("[nspawn] LEFTOVER cgroup: {e}");
            }
        }
        // nspawn's lock on the image directory, left behind when it was
        // killed.
        if let Ok(meta) = fs::metadata(self.root()) {
            use std::os::unix::fs::MetadataExt as _;
            let _ = fs::remove_file(format!(
                "/run/systemd/nspawn/locks/inode-{}:{}",
                meta.dev(),
                meta.ino()
            ));
        }
        if self.root_mounted && !umount(&self.root()) {
            eprintln!("[nspawn] LEFTOVER mount {}", self.root().display());
            return;
        }
        // The container's pins die with this bpffs instance.
        if self.bpffs_mounted && !umount(&self.dir.join("bpffs")) {
            eprintln!(
                "[nspawn] LEFTOVER bpffs {}",
                self.dir.join("bpffs").display()
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("[nspawn] LEFTOVER {}: {e}", self.dir.display());
        }
        // nspawn refuses to remove this itself where /run is not a tmpfs.
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
    }
}

#[cfg(test)]
mod tests {
    use super::{mirror_from_list, mirror_from_sources};

    #[test]
    fn finds_the_mirror_in_one_line_lists() {
        let text = "# comment\ndeb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_list(text, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(mirror_from_list(text, "trixie"), None);
    }

    #[test]
    fn finds_the_mirror_in_deb822_sources() {
        let text = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n\
                    Suites: bookworm-security\n";
        assert_eq!(
            mirror_from_sources(text, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(
            mirror_from_sources(
                "Types: deb\nEnabled: no\nURIs: http://x\nSuites: bookworm\n",
                "bookworm"
            ),
            None
        );
    }
}
