//! spicegate: decides which Unix user may open the Spice console of which VM.
//!
//! `policy` (what the admin writes), `schedule` and `compile` (what the
//! kernel gets) are pure and tested without root; `kernel` and `sockdiag`
//! are the only modules that talk to the kernel; `engine` owns the kernel
//! state in the daemon and `control` is its socket. The library exists so
//! fuzzers and benchmarks can drive the same code as the binary.

pub mod accounts;
pub mod background;
pub mod cli;
pub mod compile;
pub mod console;
pub mod control;
pub mod denials;
pub mod diff;
pub mod directory;
pub mod engine;
pub mod events;
pub mod explain;
#[doc(hidden)]
pub mod fuzzing;
pub mod grants;
pub mod hostaddrs;
pub mod journal;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod policy_split;
pub mod proto;
pub mod report;
pub mod schedule;
pub mod sockdiag;
pub mod state;
pub mod tally;
pub mod trust;
