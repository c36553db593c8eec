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
            let cmd = super::Cli::command();
            write_man(&cmd, "spicegate", dir)?;
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = format!("spicegate-{}", sub.get_name());
                let sub = sub
                    .clone()
                    .name(name.clone())
                    .version(cmd.get_version().unwrap_or_default().to_owned());
                write_man(&sub, &name, dir)?;
            }
        }
        What::Completions { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for shell in [
                clap_complete::Shell::Bash,
                clap_complete::Shell::Zsh,
                clap_complete::Shell::Fish,
            ] {
                let mut cmd = super::Cli::command();
                clap_complete::generate_to(shell, &mut cmd, "spicegate", dir)
                    .with_context(|| format!("writing {shell} completions to {}", dir.display()))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Section 8: system administration commands.
fn write_man(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.8"));
    let mut out =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut out)
        .with_context(|| format!("writing {}", path.display()))
}
