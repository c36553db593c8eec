//! spicegate: decides which Unix user may open the Spice console of which VM.
//!
//! `policy` (what the admin writes) and `compile` (what the kernel gets) are
//! pure and tested without root; `kernel` is the only module that talks to
//! bpf(2).

mod cli;
mod compile;
mod console;
mod control;
mod directory;
mod engine;
mod events;
mod explain;
mod grants;
mod hostaddrs;
mod kernel;
mod logging;
mod policy;
mod schedule;
mod sockdiag;
mod state;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logging::init(args.verbose);
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            log::error!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
