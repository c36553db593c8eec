//! `cargo xtask run`: the agent on the example policy, in the foreground,
//! with a demo listener, and the demo unloaded again on Ctrl-C.

use std::{net::TcpListener, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{is_root, workspace};

/// The demo's own pins, socket and state, so it never touches a real
/// installation's.
const DEMO_PIN_DIR: &str = "/sys/fs/bpf/spicegate-demo";
const DEMO_SOCKET: &str = "/run/spicegate-demo/control.sock";
const DEMO_STATE: &str = "/run/spicegate-demo/state";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy to enforce [default: examples/policy.toml].
    #[arg(long)]
    policy: Option<PathBuf>,
    /// More arguments for `spicegate run`.
    #[arg(last = true)]
    extra: Vec<String>,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    crate::setup::setup()?;
    let bin = crate::build::build(&crate::build::BuildArgs { release: false })?;
    if !is_root() {
        bail!("the agent loads eBPF programs: run `sudo cargo xtask run` (or as root)");
    }
    let policy = args
        .policy
        .clone()
        .unwrap_or_else(|| workspace().join("examples/policy.toml"));

    // A listener that accepts and drops, so a granted connect succeeds.
    match TcpListener::bind("127.0.0.1:5930") {
        Ok(l) => {
            std::thread::spawn(move || {
                for c in l.incoming() {
                    drop(c);
                }
            });
        }
        Err(e) => eprintln!(
            "xtask: demo listener on 127.0.0.1:5930 not started ({e}); granted connects will be refused by nothing but show `Connection refused`"
        ),
    }

    println!(
        "\nspicegate demo: enforcing {} (guards only ports 5930 and 20001-20010).\n\
         In another terminal, try:\n\n  \
         # root is granted the VM winlab on localhost:5930\n  \
         bash -c 'echo hi > /dev/tcp/127.0.0.1/5930' && echo granted\n\n  \
         # nobody is not: \"Operation not permitted\", and a DENY line appears here\n  \
         setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c 'echo hi > /dev/tcp/127.0.0.1/5930'\n\n  \
         {} --socket {DEMO_SOCKET} status\n  \
         {} --socket {DEMO_SOCKET} why nobody 127.0.0.1:5930\n\n\
         Ctrl-C stops the demo and unloads it.\n",
        policy.display(),
        bin.display(),
        bin.display()
    );

    // Ctrl-C goes to the whole foreground group: the agent stops on it, and
    // xtask, ignoring it, then unloads the demo.
    // SAFETY: setting a signal disposition has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let status = Command::new(&bin)
        .args(["--socket", DEMO_SOCKET, "run", "--policy"])
        .arg(&policy)
        .args(["--pin-dir", DEMO_PIN_DIR, "--state-dir", DEMO_STATE])
        .args(&args.extra)
        .status()
        .context("starting spicegate")?;
    let unload = Command::new(&bin)
        .args(["unload", "--pin-dir", DEMO_PIN_DIR])
        .status();
    let _ = std::fs::remove_dir_all("/run/spicegate-demo");
    match unload {
        Ok(s) if s.success() => println!(
            "\nxtask: demo unloaded. (A real deployment keeps enforcing after the daemon stops; `spicegate unload` removes it.)"
        ),
        _ => eprintln!(
            "xtask: could not unload the demo: run `{} unload --pin-dir {DEMO_PIN_DIR}`",
            bin.display()
        ),
    }
    if !status.success() && status.code() != Some(0) && status.code().is_some() {
        bail!("spicegate exited with {status}");
    }
    Ok(())
}
