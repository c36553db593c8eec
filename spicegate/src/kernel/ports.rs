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
    fn ports_fd(&self) -> anyhow::Result<i32> {
        match self.ebpf.map(PORTS_MAP) {
            Some(aya::maps::Map::Array(data)) => Ok(data.fd().as_fd().as_raw_fd()),
            Some(_) => bail!("map {PORTS_MAP} is not an array"),
            None => bail!("map {PORTS_MAP} missing"),
        }
    }

    /// The prefilter in the kernel now.
    pub(super) fn read_ports(&self) -> anyhow::Result<Box<PortBits>> {
        let bits: Option<Box<PortBits>> = map_lookup_boxed(self.ports_fd()?, &0u32)
            .with_context(|| format!("reading {PORTS_MAP}"))?;
        bits.ok_or_else(|| anyhow!("{PORTS_MAP} has no slot 0"))
    }

    /// Replaces the prefilter with `bits` (one write of the whole value).
    pub(super) fn write_ports(&mut self, bits: &PortBits) -> anyhow::Result<()> {
        self::sys::map_update(self.ports_fd()?, &0u32, bits)
            .with_context(|| format!("writing {PORTS_MAP}"))?;
        self.writes += 1;
        Ok(())
    }
}

/// [`map_lookup`] into a box: the value is 8 KiB.
fn map_lookup_boxed(fd: i32, key: &u32) -> io::Result<Option<Box<PortBits>>> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = Box::<PortBits>::default();
    let mut attr = LookupAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut *value) as u64,
        flags: 0,
    };
    // SAFETY: key and value point at a u32 and a PortBits, the map's key
    // and value sizes, that outlive the call.
    match unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
