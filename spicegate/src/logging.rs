//! The daemon's own log: one line per message on stderr, with a syslog
//! priority prefix (`<4>`) when stderr goes to the journal, so
//! `journalctl -p warning` selects denials.

use std::io::Write as _;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    journal: bool,
}

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 5,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = if self.journal {
            writeln!(err, "<{}>{}", priority(record.level()), record.args())
        } else {
            writeln!(err, "spicegate: {}", record.args())
        };
    }

    fn flush(&self) {}
}

/// Installs the stderr logger; `verbose` adds debug messages.
pub fn init(verbose: bool) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if log::set_boxed_logger(Box::new(StderrLogger { journal })).is_ok() {
        log::set_max_level(if verbose {
            LevelFilter::Debug
        } else {
            LevelFilter::Info
        });
    }
}
