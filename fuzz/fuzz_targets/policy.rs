//! Arbitrary bytes as a policy (main file plus one drop-in): validation must
//! never panic, and a policy it accepts must compile or be refused with an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spicegate::fuzzing::policy_input(data));
