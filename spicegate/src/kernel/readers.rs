//! Counters and drop counts, read by the engine and, through handles of
//! their own on the pinned maps, by other threads.

use super::*;

pub(super) fn read_drops<T: std::borrow::Borrow<MapData>>(
    table: &PerCpuArray<T, u64>,
) -> anyhow::Result<KernelDrops> {
    let mut sums = [0u64; DROP_KINDS as usize];
    for (i, sum) in sums.iter_mut().enumerate() {
        let per_cpu = table
            .get(&(i as u32), 0)
            .context("reading the drop counters")?;
        *sum = per_cpu.iter().fold(0u64, |a, c| a.saturating_add(*c));
    }
    Ok(KernelDrops {
        rate_limited: sums[DROP_RATE_LIMITED as usize],
        log_ring_full: sums[DROP_LOG_RING as usize],
        flood_ring_full: sums[DROP_FLOOD_RING as usize],
        mark_failed: sums[DROP_MARK_FAILED as usize],
    })
}

pub(super) fn read_counters<T: std::borrow::Borrow<MapData>>(
    table: &PerCpuHashMap<T, u32, VmCounters>,
) -> anyhow::Result<std::collections::BTreeMap<u32, VmCounters>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in table.iter() {
        let (vm, per_cpu) = entry.context("reading counters")?;
        let sum = per_cpu
            .iter()
            .fold(VmCounters::default(), |a, c| VmCounters {
                allowed: a.allowed + c.allowed,
                denied: a.denied + c.denied,
                audited: a.audited + c.audited,
            });
        out.insert(vm, sum);
    }
    Ok(out)
}

/// The pinned per-VM counters, opened on their own for the metrics
/// writer thread (the engine keeps the loaded object).
pub struct CountersReader(PerCpuHashMap<MapData, u32, VmCounters>);

impl CountersReader {
    pub fn open(paths: &PinPaths) -> anyhow::Result<Self> {
        let data = MapData::from_pin(paths.counters())
            .with_context(|| format!("opening {}", paths.counters().display()))?;
        let map = aya::maps::Map::PerCpuHashMap(data);
        Ok(Self(PerCpuHashMap::try_from(map)?))
    }

    /// Per-VM counters summed over CPUs, read from the kernel now.
    pub fn read(&self) -> anyhow::Result<std::collections::BTreeMap<u32, VmCounters>> {
        read_counters(&self.0)
    }
}

/// The pinned drop counters, opened on their own for the event writer
/// thread (the engine keeps the loaded object).
pub struct DropsReader(PerCpuArray<MapData, u64>);

impl DropsReader {
    pub fn open(paths: &PinPaths) -> anyhow::Result<Self> {
        let data = MapData::from_pin(paths.drops())
            .with_context(|| format!("opening {}", paths.drops().display()))?;
        let map = aya::maps::Map::PerCpuArray(data);
        Ok(Self(PerCpuArray::try_from(map)?))
    }

    pub fn read(&self) -> anyhow::Result<KernelDrops> {
        read_drops(&self.0)
    }
}

/// Denials the kernel did not log, by reason, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelDrops {
    /// Kept out of the log by the rate limit (each is in a summary line).
    pub rate_limited: u64,
    /// The aya-log ring had no room for the DENY record.
    pub log_ring_full: u64,
    /// The flood ring had no room for the summary record.
    pub flood_ring_full: u64,
    /// Not a denial: connects let through whose mark could not be written
    /// (their connections are not closed when access ends).
    pub mark_failed: u64,
}

impl KernelDrops {
    pub fn since(self, then: Self) -> Self {
        Self {
            rate_limited: self.rate_limited.saturating_sub(then.rate_limited),
            log_ring_full: self.log_ring_full.saturating_sub(then.log_ring_full),
            flood_ring_full: self.flood_ring_full.saturating_sub(then.flood_ring_full),
            mark_failed: self.mark_failed.saturating_sub(then.mark_failed),
        }
    }
}
