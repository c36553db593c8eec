//! The two systems spicegate replaces, confined to the benchmark's own
//! ports, chain and table, and removed again in `Drop`:
//!
//! - iptables: chain `SGBENCH-<pid>` filled by `iptables-restore --noflush`,
//!   reached from OUTPUT by one jump rule for the guarded port range;
//! - nftables: table `ip sgbench_<pid>`, replaced whole by `nft -f`.
//!
//! Both can be switched out of the packet path and back quickly (the jump
//! rule; the table's hooked base chain), which is how the benchmark
//! alternates "filter" and "no filter" rounds without reloading the rules.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Ctx, SystemResult,
    env::{check_interrupted, children_cpu, sh},
    layout::Layout,
    measure::{self, Cg, System, Workers, ms},
};

/// How long one apply took: wall clock, and the CPU it used (less moved by
/// other work on the machine).
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    pub wall: Duration,
    pub cpu: Duration,
}

/// What the connect-cost and apply measurements need from a firewall.
pub trait Firewall {
    fn name(&self) -> &'static str;
    /// Writes `text` to the rules file, then times only the apply command.
    fn apply(&mut self, text: &str) -> anyhow::Result<Applied>;
    /// Rules rendered for `layout`.
    fn render(&mut self, layout: &Layout, extra: bool) -> String;
    /// Puts the rules into the packet path (true) or takes them out.
    fn set_active(&mut self, on: bool) -> anyhow::Result<()>;
}

/// Runs `prog` with `file` on stdin and returns how long it took.
fn timed_apply(prog: &str, args: &[&str], file: &Path) -> anyhow::Result<Applied> {
    let input = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let cpu = children_cpu();
    let start = Instant::now();
    let out = Command::new(prog)
        .args(args)
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("could not start {prog}"))?;
    let took = Applied {
        wall: start.elapsed(),
        cpu: children_cpu().saturating_sub(cpu),
    };
    if !out.status.success() {
        bail!(
            "`{prog} {}` < {} failed ({}): {}",
            args.join(" "),
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

pub struct Iptables {
    chain: String,
    comment: String,
    jump: Vec<String>,
    file: PathBuf,
    /// Whether nft's `table ip filter` existed before we started (the
    /// nf_tables backend creates it with the first rule).
    filter_table_existed: bool,
    nft_backend: bool,
    created: bool,
    jump_on: bool,
}

impl Iptables {
    pub fn new(scratch: &Path, base_port: u16, last_port: u16) -> anyhow::Result<Self> {
        let version = sh(Command::new("iptables").arg("-V"))?;
        let nft_backend = version.contains("nf_tables");
        let filter_table_existed = nft_backend
            && Command::new("nft")
                .args(["list", "table", "ip", "filter"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        let pid = std::process::id();
        let chain = format!("SGBENCH-{pid}");
        let comment = format!("sgbench-{pid}");
        let jump = [
            "-o",
            "lo",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            &format!("{base_port}:{last_port}"),
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            &chain,
        ]
        .map(str::to_owned)
        .to_vec();
        Ok(Self {
            file: scratch.join("iptables.rules"),
            chain,
            comment,
            jump,
            filter_table_existed,
            nft_backend,
            created: false,
            jump_on: false,
        })
    }

    pub fn version() -> String {
        sh(Command::new("iptables").arg("-V"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }

    fn iptables(&self, args: &[&str]) -> anyhow::Result<String> {
        sh(Command::new("iptables").arg("-w").args(args))
    }

    /// Best effort, step by step (a step may fail because an earlier run
    /// of this function or a failed apply left less behind); then checks
    /// that nothing of ours is left.
    fn cleanup(&mut self) -> anyhow::Result<()> {
        // An empty chain first, so that deleting the jump by its spec does
        // not make iptables-nft read 100,000 rules.
        let _ = self.iptables(&["-F", &self.chain]);
        let mut args = vec!["-D", "OUTPUT"];
        args.extend(self.jump.iter().map(String::as_str));
        while self.iptables(&args).is_ok() {}
        self.jump_on = false;
        let _ = self.iptables(&["-X", &self.chain]);
        let rules = self.iptables(&["-S"])?;
        if rules.contains(&self.chain) || rules.contains(&self.comment) {
            bail!("still there after cleaning up");
        }
        self.created = false;
        // Leave no empty `table ip filter` the nf_tables backend made for us.
        if self.nft_backend
            && !self.filter_table_existed
            && rules
                .lines()
                .all(|l| l.starts_with("-P ") && l.ends_with(" ACCEPT"))
        {
            let _ = sh(Command::new("nft").args(["delete", "table", "ip", "filter"]));
        }
        Ok(())
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn render(&mut self, layout: &Layout, extra: bool) -> String {
        layout.iptables_rules(&self.chain, extra)
    }

    fn apply(&mut self, text: &str) -> anyhow::Result<Applied> {
        fs::write(&self.file, text)?;
        self.created = true;
        timed_apply("iptables-restore", &["-w", "--noflush"], &self.file)
    }

    fn set_active(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.jump_on {
            return Ok(());
        }
        if on {
            let mut args = vec!["-I", "OUTPUT", "1"];
            args.extend(self.jump.iter().map(String::as_str));
            self.iptables(&args)?;
        } else {
            // By position: deleting by spec makes iptables-nft read the
            // whole table (seconds with 100,000 rules). Only after checking
            // that position 1 is still our rule.
            let first = self.iptables(&["-S", "OUTPUT", "1"])?;
            if !first.contains(&self.comment) {
                bail!("the first OUTPUT rule is no longer ours: {}", first.trim());
            }
            self.iptables(&["-D", "OUTPUT", "1"])?;
        }
        self.jump_on = on;
        Ok(())
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        if let Err(e) = self.cleanup() {
            eprintln!(
                "xtask: LEFTOVER iptables chain {} or its jump from OUTPUT (comment {}): {e:#}",
                self.chain, self.comment
            );
        }
    }
}

pub struct Nft {
    table: String,
    file: PathBuf,
    hook: String,
    exists: bool,
    on: bool,
}

impl Nft {
    pub fn new(scratch: &Path) -> Self {
        Self {
            table: format!("sgbench_{}", std::process::id()),
            file: scratch.join("nft.rules"),
            hook: String::new(),
            exists: false,
            on: false,
        }
    }

    /// The bench's table (`ip` family); its set of grants is `grants`.
    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn version() -> String {
        sh(Command::new("nft").arg("-v"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }

    fn nft_script(&self, script: &str) -> anyhow::Result<()> {
        let path = self.file.with_extension("toggle");
        fs::write(&path, script)?;
        sh(Command::new("nft").arg("-f").arg(&path))?;
        Ok(())
    }
}

impl Firewall for Nft {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn render(&mut self, layout: &Layout, extra: bool) -> String {
        self.hook = layout.nft_hook_chain();
        layout.nft_rules(&self.table, extra)
    }

    fn apply(&mut self, text: &str) -> anyhow::Result<Applied> {
        fs::write(&self.file, text)?;
        self.exists = true;
        // The file always carries the hooked chain: applying puts it in force.
        let took = timed_apply("nft", &["-f", "-"], &self.file)?;
        self.on = true;
        Ok(took)
    }

    fn set_active(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.on {
            return Ok(());
        }
        let t = &self.table;
        if on {
            self.nft_script(&format!("table ip {t} {{\n{}}}\n", self.hook))?;
        } else {
            self.nft_script(&format!("delete chain ip {t} output\n"))?;
        }
        self.on = on;
        Ok(())
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // `list tables`: listing the table itself would print every element.
        let listed = || {
            sh(Command::new("nft").args(["list", "tables", "ip"])).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.trim() == format!("table ip {}", self.table))
            })
        };
        if self.exists
            && listed()
            && let Err(e) = sh(Command::new("nft").args(["delete", "table", "ip", &self.table]))
        {
            eprintln!("xtask: LEFTOVER nft table ip {}: {e:#}", self.table);
        }
    }
}

pub(super) fn run_firewall(
    ctx: &Ctx<'_>,
    fw: &mut dyn Firewall,
    layout: &Layout,
    workers: &mut Workers,
    apply_what: &'static str,
) -> anyhow::Result<SystemResult> {
    let p = ctx.params;
    let name = fw.name();
    let text = fw.render(layout, false);
    fw.apply(&text)?;
    let (connect, stream) = {
        let mut toggle = |on: bool| fw.set_active(on);
        let mut sys = System {
            name,
            on_cg: Cg::Base,
            off_cg: Cg::Base,
            refused_errno: Some(libc::ECONNREFUSED),
            toggle: &mut toggle,
        };
        measure::verify(&mut sys, workers, ctx.targets)?;
        let c = measure::connect_rounds(&mut sys, workers, ctx.targets, p.rounds, p.batch_ms)?;
        let s =
            measure::stream_rounds(&mut sys, workers, ctx.targets, p.stream_rounds, p.stream_ms)?;
        (c, s)
    };
    fw.set_active(true)?;
    let mut apply_ms = Vec::new();
    let mut apply_cpu_ms = Vec::new();
    for i in 0..p.applies {
        check_interrupted()?;
        let extra = i % 2 == 0;
        let text = fw.render(layout, extra);
        let took = fw.apply(&text)?;
        apply_ms.push(ms(took.wall));
        apply_cpu_ms.push(ms(took.cpu));
        let want = if extra {
            Ok(())
        } else {
            Err(libc::ECONNREFUSED)
        };
        measure::expect_verdict(
            workers.get(Cg::Base, true),
            &ctx.targets.guarded,
            want,
            apply_what,
        )?;
    }
    Ok(SystemResult {
        name,
        connect,
        stream,
        apply_ms,
        apply_cpu_ms,
        apply_what,
    })
}
