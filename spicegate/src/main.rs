//! The `spicegate` command: see the library for the architecture.

use std::process::ExitCode;

use clap::Parser as _;
use spicegate::{cli, logging};

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
