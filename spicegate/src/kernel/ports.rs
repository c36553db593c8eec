//! The port prefilter (`PORTS_MAP`): one bit per port, kept a superset of
//! the ports the table in force guards, so the programs let a socket to
//! any other port go without a lookup in the table.

use super::*;
use spicegate_common::{KIND_PORT, PORTS_MAP, PortBits};

/// The ports `compiled`'s table guards for connects (its [`KIND_PORT`]
/// entries).
pub(super) fn ports_of(compiled: &Compiled) -> Box<PortBits> {
    let mut bits = Box::<PortBits>::default();
    for (k, _) in compiled.rules.iter().filter(|(k, _)| k.kind == KIND_PORT) {
        bits.set(k.port);
    }
    bits
}

impl Kernel {
    /// The prefilter in the kernel now.
    pub(super) fn read_ports(&self) -> anyhow::Result<Box<PortBits>> {
        // Boxed: the value is 8 KiB.
        let mut bits = Box::<PortBits>::default();
        let found = self::sys::map_lookup_into(self.map_fd(PORTS_MAP)?, &0u32, &mut *bits)
            .with_context(|| format!("reading {PORTS_MAP}"))?;
        if !found {
            bail!("{PORTS_MAP} has no slot 0");
        }
        Ok(bits)
    }

    /// Replaces the prefilter with `bits` (one write of the whole value).
    pub(super) fn write_ports(&mut self, bits: &PortBits) -> anyhow::Result<()> {
        self::sys::map_update(self.map_fd(PORTS_MAP)?, &0u32, bits)
            .with_context(|| format!("writing {PORTS_MAP}"))?;
        self.writes += 1;
        Ok(())
    }
}
