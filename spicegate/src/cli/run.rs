use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    compile::{Compiled, LocalAddrs, compile},
    directory::Nss,
    events::DenySink,
    hostaddrs,
    kernel::{self, Kernel, PinPaths},
    policy::{self, Policy},
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
    /// Seconds between re-reads of this machine's addresses (they decide
    /// which destinations count as "localhost").
    #[arg(long, value_name = "SECS", default_value_t = 2, hide = true)]
    addr_interval: u64,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon(args))
}

/// What is in force now.
struct InForce {
    policy: Policy,
    local: LocalAddrs,
    compiled: Compiled,
}

fn load_and_compile(path: &std::path::Path, local: &LocalAddrs) -> anyhow::Result<(Policy, Compiled)> {
    let policy = policy::load(path, &Nss).map_err(|e| anyhow!("{e}"))?;
    let compiled = compile(&policy, local).with_context(|| format!("{}", path.display()))?;
    Ok((policy, compiled))
}

fn summary(c: &Compiled) -> String {
    format!(
        "{} vm(s), {} guarded endpoint(s), {} port(s) guarded everywhere, {} grant(s)",
        c.vm_names.len(),
        c.endpoints.len(),
        c.guarded_everywhere.len(),
        c.grant_count()
    )
}

async fn daemon(args: RunArgs) -> anyhow::Result<ExitCode> {
    let local = hostaddrs::current().context("listing this machine's addresses")?;
    let (policy, compiled) = load_and_compile(&args.policy, &local)
        .with_context(|| format!("policy {} rejected; nothing changed", args.policy.display()))?;
    let cgroup = match args.cgroup {
        Some(p) => p,
        None => kernel::cgroup2_root()?,
    };
    let paths = PinPaths::new(&args.pin.pin_dir);
    kernel::ensure_bpffs(&paths.dir)?;
    let _lock = kernel::lock_pin_dir(&paths)?;
    let adopted = paths.has_links();

    let mut k = Kernel::load(&paths)?;
    // Table first, links second: a fresh attach never runs without its
    // table, and on adoption the old links see the new table at once.
    k.install(&compiled)?;
    k.attach(&cgroup)?;

    let vm_names = Arc::new(RwLock::new(compiled.vm_names.clone()));
    let logger = k.logger(DenySink::new(Arc::clone(&vm_names), Nss))?;
    // SAFETY: the logger owns its ring buffer fd and returns the same one
    // until it is dropped, which happens only with the AsyncFd.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow!("polling the event ring buffer: {e}"))?;

    log::info!(
        "enforcing policy {} on cgroup {}: {}; pins in {}{}",
        args.policy.display(),
        cgroup.display(),
        summary(&compiled),
        paths.dir.display(),
        if adopted { " (took over the pinned enforcement)" } else { "" }
    );
    let mut state = InForce { policy, local, compiled };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(args.addr_interval.max(1)));

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                match load_and_compile(&args.policy, &state.local) {
                    Ok((policy, compiled)) => match k.install(&compiled) {
                        Ok(()) => {
                            *vm_names.write().unwrap_or_else(std::sync::PoisonError::into_inner) = compiled.vm_names.clone();
                            log::info!("reloaded policy {}: {}", args.policy.display(), summary(&compiled));
                            state.policy = policy;
                            state.compiled = compiled;
                        }
                        Err(e) => log::error!("reload failed, the previous policy stays in force: {e:#}"),
                    },
                    Err(e) => log::error!("reload refused, the previous policy stays in force:\n{e:#}"),
                }
            }
            _ = tick.tick() => {
                let Ok(now) = hostaddrs::current() else { continue };
                if now == state.local {
                    continue;
                }
                match compile(&state.policy, &now) {
                    Ok(compiled) => {
                        if let Err(e) = k.install(&compiled) {
                            log::error!("this machine's addresses changed but the table could not be updated: {e:#}");
                            continue;
                        }
                        log::info!("this machine's addresses changed; local endpoints updated ({} addresses)", now.len());
                        *vm_names.write().unwrap_or_else(std::sync::PoisonError::into_inner) = compiled.vm_names.clone();
                        state.compiled = compiled;
                        state.local = now;
                    }
                    Err(e) => log::error!("this machine's addresses changed and the policy no longer compiles; keeping the previous table: {e}"),
                }
            }
            guard = logger.readable_mut() => {
                let mut guard = guard.context("waiting for kernel events")?;
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
        }
    }
    drain(logger.get_mut());
    log::info!(
        "stopping: enforcement stays in force (pinned in {}); `spicegate unload --pin-dir {}` removes it",
        paths.dir.display(),
        paths.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads every queued kernel record. aya-log panics on a record it cannot
/// decode; a bad record must cost one log line, not the daemon.
fn drain<T: log::Log>(logger: &mut aya_log::EbpfLogger<T>) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush()));
    if result.is_err() {
        log::error!("a kernel event record could not be decoded and was skipped");
    }
}
