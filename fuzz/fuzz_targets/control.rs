//! Arbitrary bytes as a control-socket request line: the parser must answer
//! a request or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spicegate::control::parse_request(data);
});
