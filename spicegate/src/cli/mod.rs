//! Command line: one module per subcommand. Doc comments are the help text.

mod check;
mod run;
mod unload;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Default policy file.
pub const DEFAULT_POLICY: &str = "/etc/spicegate/policy.toml";
/// Default pin directory on bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/spicegate";

/// Decides which Unix user may open the Spice console of which VM, in the
/// kernel, for every process on this machine.
#[derive(Debug, Parser)]
#[command(name = "spicegate", version, propagate_version = true)]
pub struct Cli {
    /// Also log debug messages.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: enforce the policy and log denied connects.
    ///
    /// Enforcement is pinned in the kernel: it stays in force when the agent
    /// stops or dies, and a restarted agent takes it over without a gap.
    /// SIGHUP re-reads the policy.
    Run(run::RunArgs),
    /// Validate a policy file and print what it would enforce, without
    /// touching the kernel. Exits 1 when the policy has errors.
    Check(check::CheckArgs),
    /// Detach the programs and remove every pin (for uninstalling).
    Unload(unload::UnloadArgs),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Check(a) => check::check(&a),
        Command::Unload(a) => unload::unload(&a),
    }
}

/// `--pin-dir`, shared by the commands that touch pins.
#[derive(Debug, clap::Args)]
pub struct PinDirArg {
    /// Directory on bpffs holding spicegate's pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}
