//! The `spicegate` command: see the library for the architecture.

use std::process::ExitCode;

use clap::Parser as _;
use spicegate::{cli, logging};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logging::init(args.verbose);
    if !matches!(args.command, cli::Command::Run(_)) {
        // A command piped into `head` or `grep -q` ends quietly when the
        // reader goes, like any Unix tool, instead of panicking on EPIPE.
        // The daemon keeps Rust's default (SIGPIPE ignored, EPIPE errors).
        // SAFETY: sets a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            log::error!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
