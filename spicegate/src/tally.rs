//! The denials left out of the log in one second, tallied cheaply enough
//! that the event reader can add every flood record (no allocation per
//! record), and bounded whatever the uids: how many, how many distinct
//! uids, their range, and which programs.

use std::fmt;

/// Distinct program names kept per summary.
const MAX_TALLY_COMMS: usize = 16;

/// Bits of the distinct-uid bitmap: uids are counted exactly when they
/// lie within any span of this many (a subordinate range is 65,536).
const UID_BITS: usize = 1 << 20;

/// Denials left out of the log in one second: cheap to add to (the reader
/// adds every flood record), bounded in size whatever the uids.
pub struct Tally {
    pub denials: u64,
    /// One bit per uid modulo [`UID_BITS`].
    seen: Box<[u64]>,
    distinct: u64,
    /// Some uid collided with another one modulo [`UID_BITS`].
    approximate: bool,
    min_uid: Option<u32>,
    max_uid: Option<u32>,
    /// Programs, by their raw 16-byte name, at most [`MAX_TALLY_COMMS`].
    comms: Vec<([u8; 16], u64)>,
    other_comms: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            denials: 0,
            seen: vec![0u64; UID_BITS / 64].into_boxed_slice(),
            distinct: 0,
            approximate: false,
            min_uid: None,
            max_uid: None,
            comms: Vec::new(),
            other_comms: 0,
        }
    }
}

impl fmt::Debug for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Tally {
    pub fn add(&mut self, uid: u32, comm: &[u8; 16]) {
        self.denials += 1;
        let bit = uid as usize % UID_BITS;
        let (w, m) = (bit / 64, 1u64 << (bit % 64));
        if self.seen[w] & m == 0 {
            self.seen[w] |= m;
            self.distinct += 1;
        }
        let (lo, hi) = (
            self.min_uid.map_or(uid, |m| m.min(uid)),
            self.max_uid.map_or(uid, |m| m.max(uid)),
        );
        self.approximate |= (hi - lo) as usize >= UID_BITS;
        self.min_uid = Some(lo);
        self.max_uid = Some(hi);
        self.add_comm(comm, 1);
    }

    fn add_comm(&mut self, comm: &[u8; 16], n: u64) {
        if let Some((_, c)) = self.comms.iter_mut().find(|(k, _)| k == comm) {
            *c += n;
        } else if self.comms.len() < MAX_TALLY_COMMS {
            self.comms.push((*comm, n));
        } else {
            self.other_comms += n;
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        if other.denials == 0 {
            return;
        }
        self.denials += other.denials;
        self.distinct = 0;
        for (a, b) in self.seen.iter_mut().zip(other.seen.iter()) {
            *a |= *b;
            self.distinct += u64::from(a.count_ones());
        }
        for m in [other.min_uid, self.min_uid].into_iter().flatten() {
            self.min_uid = Some(self.min_uid.map_or(m, |x| x.min(m)));
        }
        for m in [other.max_uid, self.max_uid].into_iter().flatten() {
            self.max_uid = Some(self.max_uid.map_or(m, |x| x.max(m)));
        }
        self.approximate |= other.approximate
            || self
                .min_uid
                .zip(self.max_uid)
                .is_some_and(|(lo, hi)| (hi - lo) as usize >= UID_BITS);
        for (c, n) in &other.comms {
            self.add_comm(c, *n);
        }
        self.other_comms += other.other_comms;
    }

    /// Empties the tally, keeping its memory.
    pub fn clear(&mut self) {
        if self.denials > 0 {
            self.seen.fill(0);
        }
        self.denials = 0;
        self.distinct = 0;
        self.approximate = false;
        self.min_uid = None;
        self.max_uid = None;
        self.comms.clear();
        self.other_comms = 0;
    }

    /// `uids=N uid_range=A-B comm=x(n),y(m)` (`uids~N` when uids more than
    /// [`UID_BITS`] apart may have been counted as one).
    pub fn describe(&self) -> String {
        let range = match (self.min_uid, self.max_uid) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "-".to_owned(),
        };
        let mut comms: Vec<(String, u64)> = self
            .comms
            .iter()
            .map(|(c, n)| (crate::events::comm_name(c), *n))
            .collect();
        comms.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut comm: Vec<String> = comms.iter().map(|(c, n)| format!("{c}({n})")).collect();
        if self.other_comms > 0 {
            comm.push(format!("others({})", self.other_comms));
        }
        format!(
            "uids{}{} uid_range={range} comm={}",
            if self.approximate { "~" } else { "=" },
            self.distinct,
            if comm.is_empty() {
                "-".to_owned()
            } else {
                comm.join(",")
            }
        )
    }
}

/// A comm as the kernel's 16 NUL-padded bytes.
pub fn comm_bytes(comm: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(comm.bytes().take(15)) {
        *o = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_describes_uids_ranges_and_programs() {
        let mut t = Tally::default();
        for uid in 100_000..100_300 {
            t.add(uid, &comm_bytes("flood"));
        }
        t.add(7, &comm_bytes("curl"));
        let mut u = Tally::default();
        u.add(200_000, &comm_bytes("flood"));
        u.add(100_000, &comm_bytes("flood"));
        t.merge(&u);
        assert_eq!(t.denials, 303);
        assert_eq!(
            t.describe(),
            "uids=302 uid_range=7-200000 comm=flood(302),curl(1)"
        );
        t.clear();
        assert_eq!(t.describe(), "uids=0 uid_range=- comm=-");
    }

    #[test]
    fn tally_is_bounded_and_says_when_it_approximates() {
        let mut t = Tally::default();
        for i in 0..(MAX_TALLY_COMMS as u32 + 5) {
            t.add(i, &comm_bytes(&format!("c{i}")));
        }
        assert_eq!(t.comms.len(), MAX_TALLY_COMMS);
        assert!(t.describe().ends_with("others(5)"));
        t.add(5 + UID_BITS as u32, &comm_bytes("c0"));
        assert!(t.describe().starts_with("uids~"), "{}", t.describe());
    }
}
