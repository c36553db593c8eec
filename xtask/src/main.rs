//! `cargo xtask`: the project's own commands. `setup` installs what a fresh
//! machine lacks, `build` builds the binaries, `run` starts the agent on the
//! example policy, `test` runs every test (root ones included).

mod bench;
mod build;
mod deb;
mod fuzz;
mod lint;
mod packaging;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need: the nightly toolchain with
    /// rust-src, bpf-linker 0.10.4, and the Debian packages the tests use.
    /// Quick when everything is there.
    Setup,
    /// Build the binaries (spicegate's build.rs builds the eBPF object) and
    /// print the path of `spicegate`.
    Build(build::BuildArgs),
    /// Set up, build, and run the agent in the foreground on
    /// examples/policy.toml with a demo listener on 127.0.0.1:5930; Ctrl-C
    /// stops and unloads it. Needs root.
    Run(run::RunArgs),
    /// Set up, build, and run every test: unit tests, the packaging checks
    /// (lintian, systemd-analyze verify, the ansible example), then the
    /// root integration tests one at a time (they share kernel state).
    /// Needs root; `--only packaging` does not.
    Test(test::TestArgs),
    /// Fuzz the policy parser and the control protocol with cargo-fuzz,
    /// growing fuzz/corpus (which `test` replays).
    Fuzz(fuzz::FuzzArgs),
    /// Measure spicegate against no filter, iptables owner rules and an
    /// nftables set (connect cost, bulk throughput, apply time, daemon
    /// start and memory, deny storm) and write docs/benchmarks.md. Needs
    /// root; 4-6 minutes, `--quick` for a short check.
    Bench(bench::BenchArgs),
    /// Build the Debian package (release build, units, policy template, man
    /// pages, completions, docs) into target/debian/ and print its path.
    Deb(deb::DebArgs),
}

fn main() -> ExitCode {
    // First, while xtask has a single thread.
    util::ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build(a) => build::build(&a).map(|bin| println!("{}", bin.display())),
        Command::Run(a) => run::run(&a),
        Command::Test(a) => test::test(&a),
        Command::Fuzz(a) => fuzz::fuzz(&a),
        Command::Bench(a) => bench::bench(&a),
        Command::Deb(a) => deb::deb(&a).map(|deb| println!("{}", deb.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
