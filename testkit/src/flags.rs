//! The command lines of the helper binaries (sg-probe, sg-bypass,
//! sg-flood, sg-bench): flags with values, read one by one, and a usage
//! message on anything wrong.

use std::str::FromStr;

/// A command line read flag by flag; every error goes to `usage`, which
/// prints it and exits.
pub struct Flags<I> {
    args: I,
    usage: fn(&str) -> !,
}

impl<I: Iterator<Item = String>> Flags<I> {
    /// `args` without the program name (`std::env::args().skip(1)`).
    pub fn new(args: I, usage: fn(&str) -> !) -> Self {
        Self { args, usage }
    }

    /// The next flag (or positional argument).
    pub fn next_flag(&mut self) -> Option<String> {
        self.args.next()
    }

    /// The value after `flag`.
    pub fn value(&mut self, flag: &str) -> String {
        let usage = self.usage;
        self.args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
    }

    /// The value after `flag`, parsed.
    pub fn parsed<T: FromStr>(&mut self, flag: &str) -> T {
        let usage = self.usage;
        parse(&self.value(flag), flag, usage)
    }

    /// Everything left (`--exec PROG ARGS...`).
    pub fn rest(&mut self) -> Vec<String> {
        self.args.by_ref().collect()
    }
}

/// `value` parsed as what `flag` takes; `usage` when it is not.
pub fn parse<T: FromStr>(value: &str, flag: &str, usage: fn(&str) -> !) -> T {
    value
        .parse()
        .unwrap_or_else(|_| usage(&format!("bad {flag}: {value:?}")))
}
