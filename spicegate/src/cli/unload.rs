use std::process::ExitCode;

use crate::kernel::{PinPaths, unload as kernel_unload};

/// Arguments of `spicegate unload`.
#[derive(Debug, clap::Args)]
pub struct UnloadArgs {
    #[command(flatten)]
    pin: super::PinDirArg,
}

pub fn unload(args: &UnloadArgs) -> anyhow::Result<ExitCode> {
    let paths = PinPaths::new(&args.pin.pin_dir);
    if !paths.dir.exists() {
        log::info!("nothing to unload: {} does not exist", paths.dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let done = kernel_unload(&paths)?;
    log::info!(
        "unloaded: detached {} links, removed {} pins and {}; connects are no longer decided by spicegate",
        done.links,
        done.pins,
        paths.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
