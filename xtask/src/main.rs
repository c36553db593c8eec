//! `cargo xtask`: the project's own commands. `setup` installs what a fresh
//! machine lacks, `run` starts the agent on the example policy, `test` runs
//! every test (root ones included).

mod build;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need: nightly rust-src,
    /// bpf-linker 0.10.4, Debian packages. Quick when all is there.
    Setup,
    /// Build the binaries (the eBPF object is built by spicegate's build.rs).
    Build(build::BuildArgs),
    /// Set up, build, and run the agent in the foreground on
    /// examples/policy.toml, with a demo listener on 127.0.0.1:5930.
    Run(run::RunArgs),
    /// Set up, build, and run every test: unit tests, then the root
    /// integration tests one at a time (kernel state is shared).
    Test(test::TestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build(a) => build::build(&a).map(|_| ()),
        Command::Run(a) => run::run(&a),
        Command::Test(a) => test::test(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
