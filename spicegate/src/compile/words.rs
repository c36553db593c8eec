//! The table's grants as words: one [`KIND_GRANT`] entry per (uid, block
//! of 64 VM slots), bit `slot % 64` set for each VM of the block the uid
//! may open. With `allow = ["@students"]` on 100 VMs, each student costs
//! two entries instead of one per endpoint.

use std::{
    collections::{BTreeSet, HashMap},
    hash::BuildHasherDefault,
};

use spicegate_common::{GRANT_BLOCK_VMS, KIND_GRANT, RuleKey, RuleValue};

use super::{Compiled, EndpointInfo};

/// Hashes a uid by one multiplication (Fibonacci hashing): uids are not
/// chosen by an adversary who could aim at one bucket, only root's policy
/// and root's `grant` name them. Several times faster than SipHash on the
/// 100,000 uids of a large policy.
#[derive(Default)]
pub struct UidHasher(u64);

impl std::hash::Hasher for UidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A hash map keyed by uid, hashed with [`UidHasher`].
type UidMap<V> = HashMap<u32, V, BuildHasherDefault<UidHasher>>;

impl Compiled {
    /// Each VM with endpoints, at its slot (the endpoints of a VM share
    /// one [`EndpointInfo`]). Costs one step per endpoint.
    pub fn vms_by_slot(&self) -> Vec<Option<&EndpointInfo>> {
        let mut out: Vec<Option<&EndpointInfo>> = Vec::new();
        for info in self.endpoints.values() {
            let slot = info.slot as usize;
            if out.len() <= slot {
                out.resize(slot + 1, None);
            }
            out[slot] = Some(info);
        }
        out
    }

    /// The table's grant entries, one per (uid, block) that has a grant:
    /// the product of each VM and its uids folded into words.
    pub fn grant_words(&self) -> Vec<(RuleKey, RuleValue)> {
        let slots = self.vms_by_slot();
        let mut out = Vec::new();
        for (block, vms) in slots.chunks(GRANT_BLOCK_VMS as usize).enumerate() {
            let most = vms
                .iter()
                .flatten()
                .map(|i| i.uids.len())
                .max()
                .unwrap_or(0);
            let mut words: UidMap<u64> = UidMap::with_capacity_and_hasher(most, Default::default());
            for (bit, info) in vms.iter().enumerate() {
                let Some(info) = info else { continue };
                for &uid in &info.uids {
                    *words.entry(uid).or_default() |= 1 << bit;
                }
            }
            let block = block as u16;
            out.extend(
                words
                    .into_iter()
                    .map(|(uid, w)| (RuleKey::grant(uid, block), RuleValue::grant_word(w))),
            );
        }
        out
    }
}

/// `uid`'s word of grants for `block`, from the VMs at their `slots`
/// ([`Compiled::vms_by_slot`]); 0: none.
fn grant_word(slots: &[Option<&EndpointInfo>], uid: u32, block: u16) -> u64 {
    let first = usize::from(block) * GRANT_BLOCK_VMS as usize;
    slots
        .iter()
        .skip(first)
        .take(GRANT_BLOCK_VMS as usize)
        .enumerate()
        .filter(|(_, i)| i.is_some_and(|i| i.uids.contains(&uid)))
        .fold(0, |w, (bit, _)| w | 1 << bit)
}

/// The words of grants `new` has for the (uid, block)s whose grants
/// differ from `old`'s, where both tables have the same VMs at the same
/// slots: each changed uid's new word for the block of each VM it gained
/// or lost. `None` beyond `limit` words.
pub(super) fn changed_words(
    old: &Compiled,
    new: &Compiled,
    limit: usize,
) -> Option<Vec<(RuleKey, RuleValue)>> {
    let old_slots = old.vms_by_slot();
    let new_slots = new.vms_by_slot();
    let mut changed: BTreeSet<(u32, u16)> = BTreeSet::new();
    for (slot, (a, b)) in old_slots.iter().zip(&new_slots).enumerate() {
        let (Some(a), Some(b)) = (a, b) else { continue };
        if std::ptr::eq(*a, *b) || a.uids == b.uids {
            continue;
        }
        let block = (slot / GRANT_BLOCK_VMS as usize) as u16;
        for &uid in a.uids.symmetric_difference(&b.uids) {
            changed.insert((uid, block));
            if changed.len() > limit {
                return None;
            }
        }
    }
    let out: Vec<_> = changed
        .into_iter()
        .map(|(uid, block)| {
            (
                RuleKey::grant(uid, block),
                RuleValue::grant_word(grant_word(&new_slots, uid, block)),
            )
        })
        .collect();
    debug_assert!(out.iter().all(|(k, _)| k.kind == KIND_GRANT));
    Some(out)
}
