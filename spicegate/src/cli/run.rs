use std::{os::fd::AsRawFd as _, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::broadcast,
};

use crate::{
    background,
    control::{self, Shared},
    denials,
    directory::Nss,
    engine::{Command, Config, Engine, Loader, Source, Timers},
    kernel::{self, PinPaths},
    state::DEFAULT_STATE_DIR,
};

/// Arguments of `spicegate run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy file to enforce.
    #[arg(long, value_name = "PATH", default_value = super::DEFAULT_POLICY)]
    policy: PathBuf,
    /// cgroup v2 directory to attach to [default: the cgroup2 root, found in
    /// /proc/self/mountinfo]. Every process in its subtree is decided.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    pin: super::PinDirArg,
    /// Where the last good policy and the temporary grants are kept.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Seconds between re-reads of this machine's addresses (they decide
    /// which destinations count as "localhost").
    #[arg(long, value_name = "SECS", default_value_t = 2, hide = true)]
    addr_interval: u64,
    /// Test hook: file with seconds to add to the clock for schedules and
    /// expiries, re-read on every tick.
    #[arg(long, value_name = "FILE", hide = true)]
    clock_offset_file: Option<PathBuf>,
    /// Milliseconds a start waits for NSS and DNS before it enforces without
    /// the names that have not answered.
    #[arg(long, value_name = "MS", default_value_t = 5000, hide = true)]
    names_timeout_ms: u64,
    /// D-Bus address of logind for `@console` [default: the system bus].
    #[arg(long, value_name = "ADDRESS", hide = true)]
    logind_bus: Option<String>,
}

pub fn run(args: RunArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    // One malloc arena for the whole daemon: policies are parsed on one
    // thread and kept on another, and glibc's per-thread arenas would each
    // keep their own high-water mark (measured: 40 MB settled at 100,000
    // grants instead of 19). Its threads allocate little once started.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc tunable; no thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon(args, socket))
}

async fn daemon(args: RunArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
    let cgroup = match args.cgroup {
        Some(p) => p,
        None => kernel::cgroup2_root()?,
    };
    kernel::check_cgroup(&cgroup)?;
    let paths = PinPaths::new(&args.pin.pin_dir);
    kernel::ensure_bpffs(&paths.dir)?;
    let fresh_dir = !paths.dir.exists();
    let _lock = kernel::lock_pin_dir(&paths)?;
    let adopted = paths.has_links();
    let mut undo = FailedStart {
        socket: None,
        paths: &paths,
        unload: !adopted,
        fresh_dir,
    };
    let listener = control::bind(&socket).await?;
    undo.socket = Some(&socket);

    let mut engine = Engine::start(Config {
        policy_path: args.policy.clone(),
        state_dir: args.state_dir.clone(),
        cgroup: cgroup.clone(),
        paths: paths.clone(),
        clock_offset_file: args.clock_offset_file.clone(),
        names_timeout: Duration::from_millis(args.names_timeout_ms),
    })?;

    // Denials: read and written on threads of their own, bounded at every
    // step (see denials.rs); a flood never reaches the engine.
    let (events_tx, _) = broadcast::channel(1024);
    let stats = Arc::new(denials::Stats::default());
    let (sink, queue) = denials::queue(&stats);
    let mut logger = engine.kernel_mut().logger(sink)?;
    let logger_fd = logger.as_raw_fd();
    let flood = engine.kernel_mut().take_flood_ring()?;
    let drops = kernel::DropsReader::open(&paths)?;
    let pipeline = denials::Pipeline::start(
        logger_fd,
        move || logger.flush(),
        flood,
        queue,
        Arc::clone(&stats),
        denials::WriterConfig {
            vm_names: engine.vm_names(),
            dir: Nss,
            events: events_tx.clone(),
            drops: Box::new(move || drops.read().ok()),
        },
    )?;
    engine.set_denial_stats(Arc::clone(&stats));
    // Prometheus metrics (`[settings] metrics_file`): written on a thread
    // of their own, from pinned-map handles of their own.
    crate::metrics::writer::start(crate::metrics::writer::Sources {
        shared: engine.metrics(),
        settings: engine.settings(),
        vm_names: engine.vm_names(),
        denial_stats: Arc::clone(&stats),
        paths: paths.clone(),
        cgroup: cgroup.clone(),
    })?;

    let (console_tx, mut console_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(crate::console::watch(args.logind_bus.clone(), console_tx));

    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
    let loader = Arc::new(Loader::new(
        args.policy.clone(),
        engine.resolver(),
        engine.parse_cache(),
    ));
    background::watch_addresses(
        Duration::from_secs(args.addr_interval.max(1)),
        cmd_tx.clone(),
    )?;
    background::watch_names(
        engine.resolve_job(),
        engine.resolver(),
        engine.parse_cache(),
        cmd_tx.clone(),
    )?;
    tokio::spawn(control::serve(
        listener,
        Shared {
            engine: cmd_tx.clone(),
            loader: Arc::clone(&loader),
            settings: engine.settings(),
            events: events_tx,
        },
    ));

    // Loading BTF and parsing the policy peak far above what stays live.
    crate::engine::release_free_memory();
    log::info!(
        "enforcing policy {}{} on cgroup {}: {}; pins in {}; control socket {}{}",
        args.policy.display(),
        if engine.source() == Source::LastGood {
            " (LAST GOOD COPY: the file is broken)"
        } else {
            ""
        },
        cgroup.display(),
        engine.summary(),
        paths.dir.display(),
        socket.display(),
        if adopted {
            " (took over the pinned enforcement)"
        } else {
            ""
        }
    );

    // From here on, enforcement is in force and stays when the daemon stops.
    std::mem::forget(undo);

    // Type=notify: systemd considers the unit started only now, with the
    // policy enforced. Outside systemd (no NOTIFY_SOCKET) this is a no-op.
    let status = format!("enforcing {}", engine.summary());
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        log::warn!("could not notify systemd of readiness: {e}");
    }

    let engine_thread = std::thread::Builder::new()
        .name("sg-engine".into())
        .spawn(move || crate::engine::run(engine, &cmd_rx, &Timers::default()))
        .context("starting the engine thread")?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let (loader, tx) = (Arc::clone(&loader), cmd_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let loaded = Box::new(loader.load());
                    let _ = tx.send(Command::Sighup { loaded });
                });
            }
            Ok(()) = console_rx.changed() => {
                let uid = *console_rx.borrow_and_update();
                let _ = cmd_tx.send(Command::Console(uid));
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = cmd_tx.send(Command::Stop);
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    pipeline.stop();
    let _ = std::fs::remove_file(&socket);
    log::info!(
        "stopping: enforcement stays in force (pinned in {}); `spicegate unload --pin-dir {}` removes it",
        paths.dir.display(),
        paths.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What a start that failed half-way would leave behind: its control
/// socket, and pins no program enforces with. Pins that were in force before
/// this start (a previous daemon's links) are left alone: enforcement stays.
struct FailedStart<'a> {
    socket: Option<&'a std::path::Path>,
    paths: &'a PinPaths,
    /// Nothing enforced from this pin directory before this start.
    unload: bool,
    /// The pin directory did not exist before this start.
    fresh_dir: bool,
}

impl Drop for FailedStart<'_> {
    fn drop(&mut self) {
        if let Some(socket) = self.socket {
            let _ = std::fs::remove_file(socket);
        }
        if self.unload {
            match kernel::unload(self.paths) {
                Ok(_) if !self.fresh_dir => {
                    let _ = std::fs::create_dir(&self.paths.dir);
                }
                Ok(_) => {}
                Err(e) => log::error!(
                    "could not remove what the failed start left in {}: {e:#}",
                    self.paths.dir.display()
                ),
            }
        }
    }
}
