//! `cargo xtask bench`: what spicegate costs next to no filter, iptables
//! owner rules and an nftables set, for policies of 100, 10,000, 100,000
//! and 1,000,000 grants: connect() cost, bulk throughput, time to apply a
//! changed policy, the daemon's start time and memory, and a deny storm.
//! Prints one table and writes it, with the machine and the command, into
//! docs/benchmarks.md (between markers; the text around them is kept),
//! with SVG charts next to it (`bench/charts.rs`).
//!
//! Everything runs in a child cgroup holding only the benchmark's
//! processes, on loopback ports of its own; the iptables chain, the nft
//! table, the users, the pins and the helpers sit in guards that remove
//! them (see `bench/env.rs`).
//!
//! The storms are in `bench/storm.rs`, the grant changes in
//! `bench/change.rs`.

mod change;
mod charts;
mod env;
mod firewall;
mod layout;
mod measure;
mod report;
mod storm;

use std::{
    fs,
    io::BufRead as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    env::{BenchCgroups, Daemon, PinDir, Proc, SystemUser, TempDir, Worker, check_interrupted, sh},
    firewall::{Iptables, Nft, run_firewall},
    layout::Layout,
    measure::{Cg, Series, System, Targets, Workers, control_series, ms},
    storm::{deny_storm, uid_storm},
};
use crate::util::{Step, cargo, is_root, target_dir, workspace};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short run (fewer and shorter rounds) to check that the benchmark
    /// works; writes no file unless --doc is given.
    #[arg(long)]
    quick: bool,
    /// Policy sizes, in grants.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 10_000, 100_000, 1_000_000])]
    sizes: Vec<u32>,
    /// Where to write the results [default: docs/benchmarks.md, full runs
    /// only].
    #[arg(long, value_name = "PATH")]
    doc: Option<PathBuf>,
}

/// How long and how often things are measured.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Interleaved connect rounds per system and size (after one warm-up).
    pub rounds: usize,
    /// Length of one connect batch.
    pub batch_ms: u64,
    pub stream_rounds: usize,
    pub stream_ms: u64,
    /// Applies per system and size, alternating "grant the denied user"
    /// and "take it back" (even, so each size ends on its base policy).
    pub applies: usize,
    /// Daemon starts per size (each on a fresh pin directory).
    pub starts: usize,
    pub storm_ms: u64,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 6,
                batch_ms: 10,
                stream_rounds: 2,
                stream_ms: 200,
                applies: 2,
                starts: 1,
                storm_ms: 2_000,
            }
        } else {
            Self {
                rounds: 80,
                batch_ms: 20,
                stream_rounds: 10,
                stream_ms: 400,
                applies: 4,
                starts: 3,
                storm_ms: 10_000,
            }
        }
    }
}

/// One system at one size.
#[derive(Debug, Clone)]
pub struct SystemResult {
    pub name: &'static str,
    pub connect: [Series; 3],
    pub stream: Series,
    /// Apply times in ms; what "apply" runs is in `apply_what`.
    pub apply_ms: Vec<f64>,
    /// CPU ms each apply used (for spicegate: the reload command and the
    /// daemon).
    pub apply_cpu_ms: Vec<f64>,
    pub apply_what: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct DaemonResult {
    pub start_ms: Vec<f64>,
    /// VmRSS half a second after each start said `enforcing policy`.
    pub rss_start_kib: Vec<u64>,
    /// VmRSS after the measurements and the reloads, once the daemon has
    /// settled (it hands freed heap back 2 s after a reload).
    pub rss_end_kib: u64,
    /// VmHWM: the highest VmRSS of the last daemon, reached during a reload.
    pub rss_peak_kib: u64,
    /// Changing one grant (grant, revoke, schedule edge).
    pub change: change::ChangeResult,
}

#[derive(Debug, Clone)]
pub struct StormResult {
    pub grants: u32,
    pub secs: f64,
    pub connects: u64,
    pub cpu_percent: f64,
    pub cpu_ticks: u64,
    pub deny_lines: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// The same daemon under a flood from 30,000 distinct uids.
    pub uids: Option<UidStormResult>,
}

/// A deny storm from many distinct uids (sg-flood: `setresuid` through a
/// range, as a user namespace over a subordinate range allows).
#[derive(Debug, Clone)]
pub struct UidStormResult {
    pub uids: u32,
    pub secs: f64,
    pub connects: u64,
    pub cpu_percent: f64,
    /// Every line the daemon wrote during the storm, per second.
    pub lines_per_sec: f64,
    /// `status` round trips on the control socket, without and during the
    /// storm: (p50, p99) in ms.
    pub status_quiet_ms: (f64, f64),
    pub status_storm_ms: (f64, f64),
    /// How long after its expiry a temporary grant given mid-storm was
    /// taken out of the kernel (the daemon's `expired` line).
    pub grant_late_ms: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

#[derive(Debug, Clone)]
pub struct SizeResult {
    pub layout: Layout,
    pub systems: Vec<SystemResult>,
    pub daemon: DaemonResult,
    /// `nft add element` / `delete element` of one grant, ms.
    pub nft_element_ms: Vec<f64>,
}

struct Bins {
    spicegate: PathBuf,
    sg_bench: PathBuf,
    sg_flood: PathBuf,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs, changes iptables and nftables and creates users: run `cargo xtask bench` as root"
        );
    }
    if args.sizes.is_empty() || args.sizes.iter().any(|&n| n == 0 || n > 1_000_000) {
        bail!("--sizes takes grant counts between 1 and 1,000,000");
    }
    let started = Instant::now();
    let load_start = report::loadavg();
    crate::setup::setup()?;
    let bins = build()?;
    let params = Params::new(args.quick);
    let command = std::iter::once("cargo xtask".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    env::catch_interrupts()?;
    let load1: f64 = load_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load1 > 0.5 {
        eprintln!(
            "xtask: the machine is busy (load average {load_start}): other work on these CPUs shows up as noise in every ratio"
        );
    }

    // Declared in this order so they are dropped in reverse: helpers first,
    // then users, cgroups and the scratch directory.
    let scratch = env::scratch()?;
    let cgroups = BenchCgroups::new()?;
    let granted = env::bench_user('g')?;
    let denied = env::bench_user('d')?;
    let base_port = pick_base_port()?;
    let layouts: Vec<Layout> = args
        .sizes
        .iter()
        .map(|&n| {
            Layout::new(
                n,
                base_port,
                (&granted.name, granted.uid),
                (&denied.name, denied.uid),
            )
        })
        .collect();
    let unguarded = Layout::unguarded_port(base_port);
    let mut ports: Vec<u16> = layouts.iter().map(Layout::probe_port).collect();
    ports.push(unguarded);
    ports.sort_unstable();
    ports.dedup();
    // The measuring worker on one CPU, the listener on another (see
    // sg-bench's `--cpu`); the daemon and everything else float.
    let cpus = env::cpus();
    let (worker_cpu, listener_cpu) = match cpus.as_slice() {
        [a, b, ..] => (Some(*a), Some(*b)),
        _ => (None, None),
    };
    let _listener = listen(
        &bins.sg_bench,
        &cgroups.leaf("listen"),
        listener_cpu,
        &ports,
    )?;
    let start = |cg: &str, u: &SystemUser, what: &str| {
        Worker::start(&bins.sg_bench, &cgroups.leaf(cg), worker_cpu, u, what)
    };
    let mut workers = Workers {
        base_granted: start("base", &granted, "worker base/granted")?,
        base_denied: start("base", &denied, "worker base/denied")?,
        guarded_granted: start("guarded", &granted, "worker guarded/granted")?,
        guarded_denied: start("guarded", &denied, "worker guarded/denied")?,
    };

    // The noise floor: "no filter" against itself, measured the same way.
    let control = {
        let step = Step::start("bench: A/A control");
        let targets = Targets {
            guarded: format!("127.0.0.1:{}", layouts[0].probe_port()),
            unguarded: format!("127.0.0.1:{unguarded}"),
        };
        let r = control_series(&mut workers, &targets, params);
        step.finish(r.is_ok());
        r?
    };

    let mut results = Vec::new();
    let mut storm = None;
    let largest = layouts.iter().map(|l| l.grants).max().unwrap_or(0);
    for layout in &layouts {
        let step = Step::start("bench: policy size");
        eprintln!(
            "xtask: {} grants ({} users x {} endpoints, ports {}-{}, probes on {})",
            layout.grants,
            layout.users,
            layout.endpoints,
            layout.base_port,
            layout.last_port(),
            layout.probe_port()
        );
        let targets = Targets {
            guarded: format!("127.0.0.1:{}", layout.probe_port()),
            unguarded: format!("127.0.0.1:{unguarded}"),
        };
        let ctx = Ctx {
            bins: &bins,
            scratch: &scratch,
            cgroups: &cgroups,
            targets: &targets,
            params,
        };
        let r = run_size(
            &ctx,
            layout,
            &mut workers,
            layout.grants == largest,
            &mut storm,
        );
        step.finish(r.is_ok());
        results.push(r?);
    }

    let machine = report::Machine::read(&command, started.elapsed(), load_start);
    let doc = match (&args.doc, args.quick) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(workspace().join("docs/benchmarks.md")),
        (None, true) => None,
    };
    // The charts go next to the document, which links them; a chart that
    // fails costs its pictures, not the results.
    let charts = match &doc {
        Some(doc) => {
            let dir = doc
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            charts::write(&results, dir).unwrap_or_else(|e| {
                eprintln!("xtask: no charts: {e:#}");
                Vec::new()
            })
        }
        None => Vec::new(),
    };
    let text = report::render(
        &machine,
        &params,
        &control,
        &results,
        storm.as_ref(),
        &charts,
    );
    println!("\n{text}");
    if let Some(doc) = doc {
        report::write_doc(&doc, &text)?;
        eprintln!(
            "xtask: results written to {}, charts beside it: {}",
            doc.display(),
            charts.join(", ")
        );
    }
    eprintln!(
        "xtask: benchmark done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo build --release --bins`: spicegate and sg-bench, optimised.
fn build() -> anyhow::Result<Bins> {
    crate::setup::check_toolchain()?;
    let step = Step::start("build (release)");
    let built = crate::util::run(cargo().args(["build", "--release", "--bins"]));
    step.finish(built.is_ok());
    built.context("the release build failed: see cargo's errors above")?;
    let dir = target_dir()?.join("release");
    let bins = Bins {
        spicegate: dir.join("spicegate"),
        sg_bench: dir.join("sg-bench"),
        sg_flood: dir.join("sg-flood"),
    };
    for b in [&bins.spicegate, &bins.sg_bench, &bins.sg_flood] {
        if !b.is_file() {
            bail!("the build finished but {} is missing", b.display());
        }
    }
    Ok(bins)
}

/// A block of 101 ports below the ephemeral range (so no connection's
/// source port lands in the guarded range) whose probe ports are free.
fn pick_base_port() -> anyhow::Result<u16> {
    let first = 20_000 + (std::process::id() % 50) as u16 * 200;
    for i in 0..50u16 {
        let base = 20_000 + (first - 20_000 + i * 200) % 10_000;
        let free = [0, 5, 50, 100]
            .iter()
            .all(|off| TcpListener::bind(("127.0.0.1", base + off)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("no free block of loopback ports between 20000 and 30000")
}

/// `sg-bench listen` on every probe port, in the `listen` cgroup.
fn listen(
    sg_bench: &Path,
    cgroup: &Path,
    cpu: Option<usize>,
    ports: &[u16],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(sg_bench);
    cmd.arg("listen").arg("--cgroup").arg(cgroup);
    if let Some(cpu) = cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    cmd.args(ports.iter().map(|p| format!("127.0.0.1:{p}")));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut proc = env::spawn(&mut cmd, "sg-bench listen", Duration::ZERO)?;
    let out = proc.child().stdout.take().context("listener stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "listening" {
        bail!("the listener did not start (see its message above)");
    }
    Ok(proc)
}

pub(super) struct Ctx<'a> {
    bins: &'a Bins,
    scratch: &'a TempDir,
    cgroups: &'a BenchCgroups,
    targets: &'a Targets,
    params: Params,
}

fn run_size(
    ctx: &Ctx<'_>,
    layout: &Layout,
    workers: &mut Workers,
    storm_here: bool,
    storm: &mut Option<StormResult>,
) -> anyhow::Result<SizeResult> {
    let mut systems = Vec::new();
    let (sg, daemon) = run_spicegate(ctx, layout, workers, storm_here, storm)?;
    systems.push(sg);
    check_interrupted()?;
    if layout.grants <= MAX_IPTABLES_GRANTS {
        eprintln!("xtask: iptables, {} grants", layout.grants);
        let mut ipt = Iptables::new(ctx.scratch.path(), layout.base_port, layout.last_port())?;
        systems.push(run_firewall(
            ctx,
            &mut ipt,
            layout,
            workers,
            "iptables-restore --noflush",
        )?);
        drop(ipt);
    } else {
        eprintln!(
            "xtask: iptables left out at {} grants: a chain that long takes minutes to load and milliseconds per packet (see the 100,000 row)",
            layout.grants
        );
    }
    check_interrupted()?;
    eprintln!("xtask: nftables, {} grants", layout.grants);
    let mut nft = Nft::new(ctx.scratch.path());
    systems.push(run_firewall(
        ctx,
        &mut nft,
        layout,
        workers,
        "nft -f (whole table)",
    )?);
    let nft_element_ms = change::nft_element_ms(nft.table(), workers, ctx.targets, layout)?;
    drop(nft);
    Ok(SizeResult {
        layout: layout.clone(),
        systems,
        daemon,
        nft_element_ms,
    })
}

fn run_spicegate(
    ctx: &Ctx<'_>,
    layout: &Layout,
    workers: &mut Workers,
    storm_here: bool,
    storm: &mut Option<StormResult>,
) -> anyhow::Result<(SystemResult, DaemonResult)> {
    let p = ctx.params;
    eprintln!("xtask: spicegate, {} grants", layout.grants);
    let policy = ctx.scratch.path().join("policy.toml");
    fs::write(&policy, layout.spicegate_policy(false))?;
    let guarded_cg = ctx.cgroups.leaf("guarded");
    let pin = env::pin_dir(&ctx.bins.spicegate, ctx.scratch);
    let mut dr = DaemonResult::default();
    let mut daemon: Option<Daemon> = None;
    for _ in 0..p.starts.max(1) {
        if let Some(d) = daemon.take() {
            d.stop()?;
            pin.clear()?;
        }
        let mut d = Daemon::spawn(&ctx.bins.spicegate, &policy, &guarded_cg, &pin)?;
        let at = d.wait_enforcing(Duration::from_secs(60))?;
        dr.start_ms.push(ms(at - d.spawned));
        std::thread::sleep(Duration::from_millis(500));
        dr.rss_start_kib.push(d.rss_kib()?);
        daemon = Some(d);
    }
    let Some(d) = daemon else {
        bail!("no daemon started")
    };

    let mut noop = |_: bool| Ok(());
    let mut sys = System {
        name: "spicegate",
        on_cg: Cg::Guarded,
        off_cg: Cg::Base,
        refused_errno: Some(libc::EPERM),
        toggle: &mut noop,
    };
    measure::verify(&mut sys, workers, ctx.targets)?;
    let connect = measure::connect_rounds(&mut sys, workers, ctx.targets, p.rounds, p.batch_ms)?;
    let stream =
        measure::stream_rounds(&mut sys, workers, ctx.targets, p.stream_rounds, p.stream_ms)?;

    let mut apply_ms = Vec::new();
    let mut apply_cpu_ms = Vec::new();
    for i in 0..p.applies {
        check_interrupted()?;
        let extra = i % 2 == 0;
        fs::write(&policy, layout.spicegate_policy(extra))?;
        let (cpu, ticks) = (env::children_cpu(), d.cpu_ticks()?);
        let start = Instant::now();
        env::reload(&ctx.bins.spicegate, &pin)?;
        apply_ms.push(ms(start.elapsed()));
        let daemon_s = d.cpu_ticks()?.saturating_sub(ticks) as f64 / env::ticks_per_sec();
        apply_cpu_ms.push(ms(env::children_cpu().saturating_sub(cpu)) + daemon_s * 1000.0);
        let want = if extra { Ok(()) } else { Err(libc::EPERM) };
        measure::expect_verdict(
            workers.get(Cg::Guarded, true),
            &ctx.targets.guarded,
            want,
            "spicegate reload",
        )?;
    }
    dr.change = change::spicegate_changes(
        &ctx.bins.spicegate,
        &policy,
        &pin,
        &d,
        workers,
        ctx.targets,
        layout,
    )?;
    // spicegate returns freed heap to the kernel 2 s after a reload.
    std::thread::sleep(Duration::from_millis(2500));
    dr.rss_end_kib = d.rss_kib()?;
    dr.rss_peak_kib = d.status_kib("VmHWM")?;

    if storm_here {
        let mut st = deny_storm(&d, workers, ctx.targets, layout, p.storm_ms)?;
        st.uids = Some(uid_storm(ctx, &d, &pin, &guarded_cg, layout, p.storm_ms)?);
        *storm = Some(st);
    }
    d.stop()?;
    pin.clear()?;
    Ok((
        SystemResult {
            name: "spicegate",
            connect,
            stream,
            apply_ms,
            apply_cpu_ms,
            apply_what: "spicegate reload",
        },
        dr,
    ))
}

/// Above this size iptables is left out: at 100,000 rules it already
/// takes about 3 s to load and costs ~95x per connect; a million rules
/// would take minutes per apply and say nothing new.
const MAX_IPTABLES_GRANTS: u32 = 100_000;
