//! `cargo xtask run`: the agent on the example policy in the foreground,
//! with a demo listener, unloaded again when it stops.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::{Context as _, bail};

use crate::util::{is_root, workspace};

/// The demo's own pins, socket and state, so it never touches a real
/// installation's.
const DEMO_PIN_DIR: &str = "/sys/fs/bpf/spicegate-demo";
const DEMO_RUN_DIR: &str = "/run/spicegate-demo";
const DEMO_SOCKET: &str = "/run/spicegate-demo/control.sock";
const DEMO_STATE: &str = "/run/spicegate-demo/state";
const DEMO_LISTEN: &str = "127.0.0.1:5930";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy to enforce [default: examples/policy.toml].
    #[arg(long, value_name = "PATH")]
    policy: Option<PathBuf>,
    /// More arguments for `spicegate run` (after `--`).
    #[arg(last = true)]
    extra: Vec<String>,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the agent loads eBPF programs into the kernel: run `cargo xtask run` as root");
    }
    crate::setup::setup()?;
    let bin = crate::build::build(&crate::build::BuildArgs { release: false })?;
    let policy = args
        .policy
        .clone()
        .unwrap_or_else(|| workspace().join("examples/policy.toml"));

    start_listener();
    print_what_to_try(&bin, &policy);

    forward_signals()?;
    let mut child = Command::new(&bin)
        .args(["--socket", DEMO_SOCKET, "run", "--policy"])
        .arg(&policy)
        .args(["--pin-dir", DEMO_PIN_DIR, "--state-dir", DEMO_STATE])
        .args(&args.extra)
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))?;
    CHILD.store(
        i32::try_from(child.id()).unwrap_or_default(),
        Ordering::SeqCst,
    );
    let status = child.wait().context("waiting for spicegate");
    CHILD.store(0, Ordering::SeqCst);

    // Unload even when the agent failed: it may have pinned part of itself.
    let unloaded = Command::new(&bin)
        .args(["unload", "--pin-dir", DEMO_PIN_DIR])
        .status()
        .is_ok_and(|s| s.success());
    // Only the demo's scratch socket and state live there.
    let _ = std::fs::remove_dir_all(DEMO_RUN_DIR);
    if unloaded {
        println!(
            "\nxtask: demo unloaded. (A real deployment keeps enforcing after the daemon stops; \
             `spicegate unload` removes it.)"
        );
    } else {
        bail!(
            "the demo could not be unloaded, so it still decides connects: run `{} unload --pin-dir {DEMO_PIN_DIR}`",
            bin.display()
        );
    }
    let status = status?;
    // Killed by the signal itself (before it installed its handler) is a
    // normal stop too; only an exit code says something went wrong.
    if status.code().is_some_and(|c| c != 0) {
        bail!("spicegate exited with {status}: see its message above");
    }
    Ok(())
}

/// Accepts and drops connections, so a granted connect succeeds.
fn start_listener() {
    match TcpListener::bind(DEMO_LISTEN) {
        Ok(listener) => {
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    drop(conn);
                }
            });
        }
        Err(e) => eprintln!(
            "xtask: demo listener on {DEMO_LISTEN} not started ({e}); \
             a granted connect reaches whatever listens there, or is refused"
        ),
    }
}

fn print_what_to_try(bin: &Path, policy: &Path) {
    let bin = bin.display();
    println!(
        "\nspicegate demo: enforcing {policy} (the example guards only ports 5930 and 20001-20010).\n\
         Listening on {DEMO_LISTEN}. In another terminal, try:\n\
         \n  \
         # granted: root may open the VM winlab on localhost:5930\n  \
         bash -c 'echo hi > /dev/tcp/127.0.0.1/5930' && echo granted\n\
         \n  \
         # denied: nobody may not (\"Operation not permitted\"), and a DENY line appears here\n  \
         setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c 'echo hi > /dev/tcp/127.0.0.1/5930'\n\
         \n  \
         # what the agent enforces, and why a connect is decided as it is\n  \
         {bin} --socket {DEMO_SOCKET} status\n  \
         {bin} --socket {DEMO_SOCKET} why nobody 127.0.0.1:5930\n\
         \n\
         Ctrl-C stops the demo and unloads it.\n",
        policy = policy.display(),
    );
}

/// The running agent's pid, for the signal handler; 0 when none.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe. A second SIGINT when the
        // terminal already sent one to the agent's process group is harmless:
        // the agent's handler is still installed while it shuts down.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Keeps xtask alive through Ctrl-C and SIGTERM so that it can unload the
/// demo after the agent stops, and hands the signal on to the agent (which
/// also covers a `kill -INT` aimed at xtask alone). A caught signal, unlike
/// an ignored one, is reset to the default when the agent is exec'd.
fn forward_signals() -> anyhow::Result<()> {
    crate::util::on_interrupt(forward)
}
