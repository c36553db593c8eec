//! The daemon's own log. When stderr is the journal (see
//! [`journal::stderr_is_journal`]), each message goes to journald with its
//! fields (native protocol: `MESSAGE`, `PRIORITY`, and for events
//! `SPICEGATE_EVENT`, `MESSAGE_ID` and the event's fields, passed as the
//! log call's key-values); one journald cannot take at once is written as
//! the stderr line instead. Elsewhere, one line per message on stderr,
//! prefixed with `spicegate: `. The stderr line in the journal carries a
//! syslog priority prefix (`<4>`), so `journalctl -p warning` selects
//! denials either way.

use std::io::Write as _;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::journal::{self, Journal};

struct Logger {
    /// stderr is the journal's stream.
    journal_stream: bool,
    /// journald's socket, when stderr is the journal and it answers.
    native: Option<Journal>,
}

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 5,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for Logger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prio = priority(record.level());
        if let Some(j) = &self.native {
            match j.send(&journal::encode(record, prio)) {
                Ok(()) => return,
                Err(e) if j.first_fallback() => {
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "<4>journald did not take a message at once ({e}); this one and any others it cannot take now are written here, without their journal fields"
                    );
                }
                Err(_) => {}
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = if self.journal_stream {
            writeln!(err, "<{prio}>{}", record.args())
        } else {
            writeln!(err, "spicegate: {}", record.args())
        };
    }

    fn flush(&self) {}
}

/// Installs the logger; `verbose` adds debug messages.
pub fn init(verbose: bool) {
    let journal_stream = journal::stderr_is_journal();
    let native = if journal_stream {
        match Journal::open(std::path::Path::new(journal::SOCKET)) {
            Ok(j) => Some(j),
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "<4>cannot reach journald at {} ({e}); logging lines without journal fields",
                    journal::SOCKET
                );
                None
            }
        }
    } else {
        None
    };
    let logger = Logger {
        journal_stream,
        native,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(if verbose {
            LevelFilter::Debug
        } else {
            LevelFilter::Info
        });
    }
}
