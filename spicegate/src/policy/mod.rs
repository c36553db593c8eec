//! The TOML policy: what the admin writes, and its validation.
//!
//! Parsing never touches the kernel. Every error names the file, the line and
//! the column of the offending value; all errors of a file are reported at
//! once, and a policy with any error is never applied.
//!
//! - this module: errors, and re-exports;
//! - `model`: the validated policy (what the rest of the daemon reads);
//! - `raw`: the file as written (serde);
//! - `cache`: the parsed pieces of a large policy, kept between reloads;
//! - `sources`: the main file and its `policy.d`, and loading them;
//! - `validate`: from the raw files to the model, every error with its place;
//! - `entries`: servers, VMs, schedules and `allow` entries, one by one;
//! - `errors`: collecting errors with their file, line and column;
//! - `windows`: the schedule syntax (days, hours).

use std::{fmt, path::PathBuf};

mod cache;
mod entries;
mod errors;
mod model;
mod raw;
mod sources;
#[cfg(test)]
pub(crate) mod tests;
mod validate;
pub mod windows;

pub use self::{
    cache::{ParseCache, PieceCounts},
    errors::Unresolved,
    model::*,
    sources::*,
    validate::metrics_file,
};

/// Name of the built-in server meaning "this machine".
pub const LOCALHOST: &str = "localhost";

/// One problem in a policy file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
