//! The two overlays of the table in force (see
//! [`spicegate_common::OVERLAY_MAP`]): grants changed since it was built.

use super::*;

/// The two overlays (see [`spicegate_common::OVERLAY_MAP`]).
pub(super) struct Overlays {
    /// Holding them keeps their descriptors open.
    _maps: [RuleTable; 2],
    fds: [i32; 2],
    /// Their kernel ids, to check the slots still hold them.
    ids: [u32; 2],
    /// Which one is in force.
    active: u32,
}

/// Two new, empty overlays, not yet in the overlay slots.
pub(super) struct NewOverlays {
    maps: [RuleTable; 2],
    fds: [i32; 2],
    ids: [u32; 2],
}

impl NewOverlays {
    pub(super) fn create() -> anyhow::Result<Self> {
        let capacity = u32::try_from(OVERLAY_MAX + OVERLAY_MAX / 4).unwrap_or(u32::MAX);
        let a = RuleTable::create(capacity, 0).context("creating an overlay")?;
        let b = RuleTable::create(capacity, 0).context("creating an overlay")?;
        let fds = [
            IterableMap::map(&a).fd().as_fd().as_raw_fd(),
            IterableMap::map(&b).fd().as_fd().as_raw_fd(),
        ];
        let ids = [
            IterableMap::map(&a).info()?.id(),
            IterableMap::map(&b).info()?.id(),
        ];
        Ok(Self {
            maps: [a, b],
            fds,
            ids,
        })
    }

    /// The slot updates that place them in the overlay map `outer`, for
    /// [`set_slots_together`], with the ids the slots then hold.
    pub(super) fn slot_updates(&self, outer: i32) -> [((i32, u32, i32), u32); 2] {
        [
            ((outer, 0, self.fds[0]), self.ids[0]),
            ((outer, 1, self.fds[1]), self.ids[1]),
        ]
    }
}

/// Writes map-in-map slots (`(outer map, slot, inner map)` descriptors),
/// each from its own thread, and returns each result in order. The kernel
/// makes every map-in-map update wait for an RCU grace period before it
/// returns, and waits that run side by side end together: on the 2-vCPU
/// test VM (kernel 6.18), one update took 16 ms, three one after the other
/// 32 ms, three side by side 16 ms.
pub(super) fn set_slots_together(updates: &[(i32, u32, i32)]) -> Vec<io::Result<()>> {
    let set = |(outer, slot, inner): (i32, u32, i32)| {
        super::sys::map_update(outer, &slot, &(inner as u32))
    };
    if let [one] = updates {
        return vec![set(*one)];
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = updates.iter().map(|u| s.spawn(move || set(*u))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a map-update thread panicked")))
            })
            .collect()
    })
}

/// [`set_slots_together`] for slots no program decides by yet (with no
/// table in force): returns as soon as each slot holds its map (`ids`, in
/// the order of `updates`), while the kernel's RCU wait, which only
/// matters to programs that read the old value, goes on in the
/// background. A slot that does not show its map before its update
/// returns gives that update's result.
pub(super) fn set_slots_visible(updates: &[(i32, u32, i32)], ids: &[u32]) -> Vec<io::Result<()>> {
    let handles: Vec<_> = updates
        .iter()
        .map(|&(outer, slot, inner)| {
            std::thread::Builder::new()
                .name("sg-slot-update".into())
                .spawn(move || super::sys::map_update(outer, &slot, &(inner as u32)))
        })
        .collect();
    handles
        .into_iter()
        .zip(updates.iter().zip(ids))
        .map(|(handle, (&(outer, slot, _), &id))| {
            let handle = handle?;
            loop {
                if map_lookup_u32(outer, slot).ok().flatten() == Some(id) {
                    // The update is done but for the wait; the thread ends
                    // on its own.
                    return Ok(());
                }
                if handle.is_finished() {
                    return handle
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a map-update thread panicked")));
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        })
        .collect()
}

/// Writes `ops` into an overlay: each key with `generation` in its pad
/// byte, updated to its value or deleted (a missing key is no error).
fn write_ops(fd: i32, generation: u8, ops: &[(RuleKey, Option<RuleValue>)]) -> anyhow::Result<()> {
    for (k, v) in ops {
        let mut k = *k;
        k._pad = generation;
        match v {
            Some(v) => super::sys::map_update(fd, &k, v)?,
            None => match super::sys::map_delete(fd, &k) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => r?,
            },
        }
    }
    Ok(())
}

impl Kernel {
    /// Puts a change of grants in force through the overlays: `delta`
    /// holds each changed word of grants with its new value. The change is
    /// written into the standby overlay, the selector flips (atomic), and
    /// the same change goes into the other overlay. Map writes: twice the
    /// change, plus one.
    ///
    /// Returns `Ok(false)`, having changed nothing, when the overlays cannot
    /// take it (they would overflow, or must be made again): build a new
    /// table instead. On error the kernel decides as before.
    pub fn apply_delta(&mut self, delta: &[(RuleKey, RuleValue)]) -> anyhow::Result<bool> {
        let Some(ov) = &self.overlays else {
            return Ok(false);
        };
        let Some(table) = &self.table else {
            return Ok(false);
        };
        let table = IterableMap::map(&table.map).fd().as_fd().as_raw_fd();
        // A word that goes back to what the table says leaves the overlay;
        // any other is written there.
        let mut ops: Vec<(RuleKey, Option<RuleValue>)> = Vec::with_capacity(delta.len());
        let mut len = self.overlay.len();
        for (k, v) in delta {
            let base: RuleValue = super::sys::map_lookup(table, k)
                .context("reading a word of grants in the table in force")?
                .unwrap_or_default();
            let held = self.overlay.get(k);
            if base.word() == v.word() {
                if held.is_some() {
                    ops.push((*k, None));
                    len -= 1;
                }
            } else if held != Some(v) {
                ops.push((*k, Some(*v)));
                if held.is_none() {
                    len += 1;
                }
            }
        }
        if ops.is_empty() {
            return Ok(true);
        }
        if len > OVERLAY_MAX {
            return Ok(false);
        }
        let standby = 1 - ov.active;
        let generation = u8::try_from(self.generation).unwrap_or(0);
        let result = write_ops(ov.fds[standby as usize], generation, &ops);
        self.writes += ops.len() as u64;
        if let Err(e) = result {
            // The standby is not in force: nothing changed, but it no
            // longer matches the other.
            self.overlays = None;
            return Err(e).context("writing the standby overlay");
        }
        let empty = if len == 0 {
            spicegate_common::OVERLAY_EMPTY
        } else {
            0
        };
        self.select(OVERLAY_SELECT_ACTIVE, standby | empty)
            .context("flipping the overlay selector")?;
        self.writes += 1;
        let old = ov.fds[ov.active as usize];
        for (k, v) in &ops {
            match v {
                Some(v) => self.overlay.insert(*k, *v),
                None => self.overlay.remove(k),
            };
        }
        if let Some(ov) = &mut self.overlays {
            ov.active = standby;
        }
        let result = write_ops(old, generation, &ops);
        self.writes += ops.len() as u64;
        if let Err(e) = result {
            // In force and right; the standby is not: make both again at
            // the next change (through a new table).
            self.overlays = None;
            log::error!("the change is in force, but writing the standby overlay failed: {e:#}");
        }
        Ok(true)
    }

    /// Makes the next [`Kernel::install`] put two fresh overlays in the
    /// overlay slots (after tampering).
    pub fn discard_overlays(&mut self) {
        self.overlays = None;
    }

    /// Entries of the rule table this daemon installed (not counting the
    /// overlays).
    pub fn table_entries(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.entries)
    }

    /// Generation of the table in force, entries in its overlay, and map
    /// writes since start.
    pub fn table_stats(&self) -> (u32, usize, u64) {
        (self.generation, self.overlay.len(), self.writes)
    }

    pub(super) fn select(&self, slot: u32, value: u32) -> anyhow::Result<()> {
        map_update_u32(self.map_fd(OVERLAY_SELECT_MAP)?, slot, value)
            .with_context(|| format!("writing slot {slot} of {OVERLAY_SELECT_MAP}"))
    }

    /// The generation after the one in force: after ours, or after the one
    /// a previous daemon recorded (so its overlay entries never match).
    pub(super) fn next_generation(&self) -> anyhow::Result<u32> {
        let current = if self.generation != 0 {
            self.generation
        } else {
            map_lookup_u32(self.map_fd(OVERLAY_SELECT_MAP)?, OVERLAY_SELECT_GENERATION)
                .context("reading the generation in force")?
                .unwrap_or(0)
                % 256
        };
        Ok(current % 255 + 1)
    }

    /// Empty overlays for a new table: the entries of `old_generation` are
    /// deleted from ours; the first time (or after a failed write), two
    /// fresh maps take the overlay slots, so nothing a previous daemon
    /// left there survives: `new` when [`Kernel::install`] made them
    /// (`placed`: and put them in their slots beside the table).
    pub(super) fn reset_overlays(
        &mut self,
        old_generation: u32,
        new: Option<NewOverlays>,
        placed: bool,
    ) -> anyhow::Result<()> {
        let keys: Vec<RuleKey> = std::mem::take(&mut self.overlay).into_keys().collect();
        if let Some(ov) = &self.overlays {
            // Nothing in force is in them any more: the program may skip them.
            self.select(
                OVERLAY_SELECT_ACTIVE,
                ov.active | spicegate_common::OVERLAY_EMPTY,
            )?;
            let g = u8::try_from(old_generation).unwrap_or(0);
            let ops: Vec<(RuleKey, Option<RuleValue>)> = keys.iter().map(|k| (*k, None)).collect();
            let fresh = ov.fds.iter().try_for_each(|fd| write_ops(*fd, g, &ops));
            self.writes += 2 * ops.len() as u64;
            if fresh.is_ok() {
                return Ok(());
            }
            self.overlays = None;
        }
        let (new, placed) = match new {
            Some(new) => (new, placed),
            None => (NewOverlays::create()?, false),
        };
        if !placed {
            let updates = new
                .slot_updates(self.map_fd(OVERLAY_MAP)?)
                .map(|(update, _)| update);
            for (slot, result) in set_slots_together(&updates).into_iter().enumerate() {
                result.with_context(|| format!("placing overlay {slot}"))?;
            }
        }
        self.select(OVERLAY_SELECT_ACTIVE, spicegate_common::OVERLAY_EMPTY)?;
        self.writes += 3;
        self.overlays = Some(Overlays {
            _maps: new.maps,
            fds: new.fds,
            ids: new.ids,
            active: 0,
        });
        Ok(())
    }

    /// Whether both overlay slots hold our overlays and both overlays hold
    /// exactly what they should: they are not frozen (a change writes
    /// them), so root's `bpf()` could write a grant there; the watchdog
    /// puts a new table in force when one is found.
    pub(super) fn overlays_intact(&self) -> anyhow::Result<bool> {
        let Some(ov) = &self.overlays else {
            return Ok(true);
        };
        let outer = self.map_fd(OVERLAY_MAP)?;
        let generation = u8::try_from(self.generation).unwrap_or(0);
        for slot in 0..2 {
            if map_lookup_u32(outer, slot)? != Some(ov.ids[slot as usize]) {
                return Ok(false);
            }
            let table = &ov._maps[slot as usize];
            let mut n = 0;
            for entry in table.iter() {
                let (mut k, v) = entry.context("reading an overlay")?;
                n += 1;
                if k._pad != generation {
                    return Ok(false);
                }
                k._pad = 0;
                if self.overlay.get(&k) != Some(&v) {
                    return Ok(false);
                }
            }
            if n != self.overlay.len() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
