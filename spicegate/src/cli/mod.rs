//! Command line: one module per subcommand. Doc comments are the help text.

mod check;
mod client;
mod generate;
mod report;
mod run;
mod unload;
mod user;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::control::SocketArg;

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
    #[command(flatten)]
    pub socket: SocketArg,
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
    /// Re-read the policy file. All or nothing: an invalid policy is refused
    /// and the previous one stays in force. Prints who gained and lost what.
    Reload(client::ReloadArgs),
    /// Show what the running agent enforces.
    Status(client::StatusArgs),
    /// Show the decision the kernel takes now for USER connecting to
    /// ADDRESS:PORT, and the policy entry behind it. Exit 0 allow, 1 deny.
    Why(client::WhyArgs),
    /// Let USER open VM for a while, on top of the policy. Survives reloads
    /// and restarts; gone at expiry.
    Grant(client::GrantArgs),
    /// Take back a temporary grant; the user's open connections to the VM
    /// are closed.
    Revoke(client::RevokeArgs),
    /// Stream denied connects live.
    Events(client::EventsArgs),
    /// The access review: who may open which VM, and when (always, by
    /// schedule, at the console, temporarily). From the running daemon, or
    /// from a policy file with --policy. Root and the admin group see every
    /// user; anyone else sees their own row.
    Report(report::ReportArgs),
    /// Show the VMs you may open now or later, and how they are reached.
    List(user::ListArgs),
    /// Open a VM's console with your Spice client (remote-viewer by default).
    Open(user::OpenArgs),
    /// Show a desktop notification when one of your connects is refused
    /// (started with your desktop session).
    Notify(user::NotifyArgs),
    /// Detach the programs and remove every pin (for uninstalling).
    Unload(unload::UnloadArgs),
    /// Write man pages or shell completions (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket.socket;
    match cli.command {
        Command::Run(a) => run::run(a, socket),
        Command::Check(a) => check::check(&a, &socket),
        Command::Reload(_) => client::reload(&socket),
        Command::Status(a) => client::status(&socket, &a),
        Command::Why(a) => client::why(&socket, &a),
        Command::Grant(a) => client::grant(&socket, &a),
        Command::Revoke(a) => client::revoke(&socket, &a),
        Command::Events(a) => client::events(&socket, &a),
        Command::Report(a) => report::report(&socket, &a),
        Command::List(a) => user::list(&socket, &a),
        Command::Open(a) => user::open(&socket, &a),
        Command::Notify(a) => user::notify(&socket, &a),
        Command::Unload(a) => unload::unload(&a),
        Command::Generate(a) => generate::generate(&a),
    }
}

/// `--pin-dir`, shared by the commands that touch pins.
#[derive(Debug, clap::Args)]
pub struct PinDirArg {
    /// Directory on bpffs holding spicegate's pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}
