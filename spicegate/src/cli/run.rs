use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, anyhow};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
};

use crate::{
    control::{self, Shared},
    directory::Nss,
    engine::{Config, Engine, Source},
    events::DenySink,
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
    /// D-Bus address of logind for `@console` [default: the system bus].
    #[arg(long, value_name = "ADDRESS", hide = true)]
    logind_bus: Option<String>,
}

pub fn run(args: RunArgs, socket: PathBuf) -> anyhow::Result<ExitCode> {
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
    })?;

    let (events_tx, _) = broadcast::channel(1024);
    let sink = DenySink::new(engine.vm_names(), Nss).with_events(events_tx.clone());
    let logger = engine.kernel_mut().logger(sink)?;
    // SAFETY: the logger owns its ring buffer fd and returns the same one
    // until it is dropped, which happens only with the AsyncFd.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow!("polling the event ring buffer: {e}"))?;

    let (console_tx, mut console_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(crate::console::watch(args.logind_bus.clone(), console_tx));

    let (cmd_tx, mut cmd_rx) = mpsc::channel(64);
    tokio::spawn(control::serve(
        listener,
        Shared {
            engine: cmd_tx,
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

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut addr_tick = tokio::time::interval(Duration::from_secs(args.addr_interval.max(1)));
    let mut watchdog_tick = tokio::time::interval(Duration::from_secs(1));
    // Grants expire and schedule windows open and close within a second.
    let mut expiry_tick = tokio::time::interval(Duration::from_millis(250));

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => { let _ = engine.reload("SIGHUP"); }
            Some(cmd) = cmd_rx.recv() => engine.handle(cmd),
            _ = addr_tick.tick() => engine.refresh_addresses(),
            _ = watchdog_tick.tick() => engine.watchdog(),
            _ = expiry_tick.tick() => engine.tick(),
            Ok(()) = console_rx.changed() => {
                let uid = *console_rx.borrow_and_update();
                engine.set_console(uid);
            }
            guard = logger.readable_mut() => {
                let mut guard = guard.context("waiting for kernel events")?;
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    drain(logger.get_mut());
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

/// Reads every queued kernel record. aya-log panics on a record it cannot
/// decode; a bad record must cost one log line, not the daemon.
fn drain<T: log::Log>(logger: &mut aya_log::EbpfLogger<T>) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush()));
    if result.is_err() {
        log::error!("a kernel event record could not be decoded and was skipped");
    }
}
