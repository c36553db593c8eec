//! `spicegate generate man|completions DIR`: the man pages and shell
//! completions, generated from the clap definitions so they never drift
//! from `--help`. Used by packaging (`cargo xtask deb`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::CommandFactory as _;

/// Arguments of `spicegate generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Man pages: spicegate.8 and spicegate-SUBCOMMAND.8.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// bash, zsh and fish completions.
    Completions {
        /// Output directory.
        dir: PathBuf,
    },
}

pub fn generate(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    match &args.what {
        What::Man { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let cmd = super::Cli::command().section("8");
            clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
        }
        What::Completions { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
                let mut cmd = super::Cli::command();
                clap_complete::generate_to(shell, &mut cmd, "spicegate", dir)
                    .with_context(|| format!("writing {shell} completions to {}", dir.display()))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
