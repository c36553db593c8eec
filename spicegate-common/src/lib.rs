//! Types and constants shared by the spicegate kernel program and the daemon.
//!
//! Everything here crosses the kernel/user boundary, so every struct is
//! `#[repr(C)]`, made of fixed-width integers, with explicit padding, and its
//! size is asserted at compile time. Both halves import the map names and
//! flag bits from here; nothing is spelled twice.
#![no_std]

/// Outer `ARRAY_OF_MAPS` (one slot) that holds the active rule table.
///
/// Written by the daemon (it swaps a freshly filled inner hash map into slot
/// [`POLICY_SLOT`] whenever a change needs a new table; changes of grants
/// only go to the overlays, [`OVERLAY_MAP`]), read by the kernel program once per
/// connect. Swapping the whole inner map is what makes a reload atomic: a
/// connect sees either the old table or the new one, never a mix.
pub const POLICY_MAP: &str = "SPICEGATE_POLICY";

/// The only slot of [`POLICY_MAP`].
pub const POLICY_SLOT: u32 = 0;

/// Outer `ARRAY_OF_MAPS` of two slots holding the two overlays of the rule
/// table in force: the grants that changed since that table was built (a
/// `grant`, a `revoke`, an expiry, a schedule edge, a console switch, a
/// reload that only moves users). [`OVERLAY_SELECT_MAP`] says which of the
/// two is in force; the other is the standby.
///
/// The daemon writes a change into the standby, flips the selector (one
/// write to a plain array: atomic, and no RCU wait as a map-in-map update
/// has), then writes the same change into the other. The cost is in
/// proportion to the change, not to the table.
///
/// Overlay keys carry the table's generation in [`RuleKey::_pad`]; the
/// table carries it in the flags of its [`KIND_ENDPOINT`] entries
/// ([`ENDPOINT_GEN_SHIFT`]). The program looks up
/// only [`KIND_GRANT`] keys there, with the generation of the table in
/// force, so a new table (a new generation) retires every overlay entry in
/// the same swap. An overlay entry holds the whole word of grants of its
/// (uid, block of VMs) and decides it in place of the table's.
pub const OVERLAY_MAP: &str = "SPICEGATE_OVERLAY";

/// Slots of [`OVERLAY_MAP`].
pub const OVERLAY_SLOTS: u32 = 2;

/// `ARRAY` of two `u32`: slot [`OVERLAY_SELECT_ACTIVE`] is the overlay in
/// force (0 or 1); slot [`OVERLAY_SELECT_GENERATION`] the generation of the
/// table in force, for the next daemon (the program never reads it).
pub const OVERLAY_SELECT_MAP: &str = "SPICEGATE_OVERLAY_SEL";
/// See [`OVERLAY_SELECT_MAP`].
pub const OVERLAY_SELECT_ACTIVE: u32 = 0;
/// Flag in slot [`OVERLAY_SELECT_ACTIVE`]: the overlay in force is empty,
/// so the program need not look there (bit 0 still says which it is).
pub const OVERLAY_EMPTY: u32 = 1 << 1;
/// See [`OVERLAY_SELECT_MAP`].
pub const OVERLAY_SELECT_GENERATION: u32 = 1;

/// Most entries an overlay holds (its capacity); a change that would need
/// more builds a new table instead.
pub const OVERLAY_MAX: usize = 4096;

/// Where a table's generation (1..=255, 8 bits) sits in the flags of its
/// [`KIND_ENDPOINT`] entries.
pub const ENDPOINT_GEN_SHIFT: u32 = 8;

/// Where a VM's slot sits in the flags of its [`KIND_ENDPOINT`] entries
/// (16 bits): its bit in the words of grants ([`KIND_GRANT`]) is bit
/// `slot % 64` of the word of block `slot / 64`.
pub const ENDPOINT_SLOT_SHIFT: u32 = 16;
/// Most VMs a policy may guard endpoints of (one slot each).
pub const MAX_VM_SLOTS: usize = 1 << 16;
/// VMs per word of grants (bits of a [`RuleValue`] read as one `u64`).
pub const GRANT_BLOCK_VMS: u32 = 64;

/// Per-uid rate-limit state for deny events (`ARRAY` of [`RATE_SLOTS`]
/// [`RateState`]s): slot `uid` for every uid below [`RATE_LOW_UIDS`] (the
/// range of real accounts), and one shared slot, [`RATE_SHARED_SLOT`], for
/// every other uid the policy does not name. An array, not an LRU: no flood
/// of distinct uids can evict a real account's state.
///
/// Written by the kernel program only.
pub const RATE_MAP: &str = "SPICEGATE_RATE";

/// uids below this one each have their own rate-limit slot.
pub const RATE_LOW_UIDS: u32 = 65_536;
/// The slot shared by every uid at or above [`RATE_LOW_UIDS`] that the
/// policy does not name (subordinate uid ranges, user namespaces).
pub const RATE_SHARED_SLOT: u32 = RATE_LOW_UIDS;
/// Capacity of [`RATE_MAP`].
pub const RATE_SLOTS: u32 = RATE_LOW_UIDS + 1;

/// Rate-limit state of the uids at or above [`RATE_LOW_UIDS`] that the
/// policy names (`HASH`, uid -> [`RateState`]). The daemon inserts an
/// entry for each such uid; the kernel only updates entries that exist, so
/// nobody outside the policy can add or evict one.
pub const RATE_NAMED_MAP: &str = "SPICEGATE_RATE_NAMED";
/// Capacity of [`RATE_NAMED_MAP`].
pub const RATE_NAMED_ENTRIES: u32 = 65_536;

/// Socket storage (`SK_STORAGE`, value `u32`: the VM id) that marks every
/// socket whose connect to a guarded endpoint the program let through.
/// Pinned, so every daemon sees the marks. The sweep closes only marked
/// sockets: it never touches the server side of a connection, and it finds
/// a socket whatever became of the cgroup it was made in.
pub const MARKS_MAP: &str = "SPICEGATE_MARKS";

/// The fast mark (`HASH`, socket cookie -> VM id): where the connect hook
/// records a socket it lets through to a guarded endpoint when its slot in
/// [`MARK_SLOTS_MAP`] is taken (and where a release before that map put
/// every mark); the release hook ([`PROG_RELEASE`]) removes it when the
/// socket is closed. An insert costs a fraction of a socket-storage
/// allocation; only when this map is full too does the hook fall back to
/// [`MARKS_MAP`], so a mark is never lost. Pinned.
pub const GRANTED_MAP: &str = "SPICEGATE_GRANTED";
/// Capacity of [`GRANTED_MAP`] (preallocated: about 1 MiB of kernel memory).
pub const GRANTED_ENTRIES: u32 = 16_384;

/// The first place a mark goes (`ARRAY` of [`MARK_SLOTS`] `u64`s): slot
/// `cookie % MARK_SLOTS` holds the socket cookie of a socket the connect
/// hook let through to a guarded endpoint, 0 when free. The hook takes a
/// free slot with one compare-and-swap and the release hook clears it
/// with one store: an inlined array access each, where a hash insert and
/// delete took about 200 and 110 ns (`kernel.bpf_stats_enabled`, kernel
/// 6.18, 2 vCPUs). A slot another open socket holds sends the mark on to
/// [`GRANTED_MAP`], then [`MARKS_MAP`], so a mark is never lost: someone
/// who keeps sockets open only makes marking slower, never absent.
/// Socket cookies count up from 1, in per-CPU runs, so the sockets open
/// at once mostly fall into distinct slots. Pinned.
pub const MARK_SLOTS_MAP: &str = "SPICEGATE_MARK_SLOTS";
/// Slots of [`MARK_SLOTS_MAP`] (a power of two; preallocated as one area:
/// 512 KiB of kernel memory).
pub const MARK_SLOTS: u32 = 65_536;
const _: () = assert!(MARK_SLOTS.is_power_of_two());

/// The slot of [`MARK_SLOTS_MAP`] a socket with `cookie` may take.
#[inline(always)]
pub const fn mark_slot(cookie: u64) -> u32 {
    (cookie as u32) & (MARK_SLOTS - 1)
}

/// Per-CPU counters of denials that were not logged (`PERCPU_ARRAY` of
/// `u64`, indexed by the `DROP_*` constants). Written by the kernel, read
/// by the daemon for `status`, the events stream and the summary lines.
pub const DROPS_MAP: &str = "SPICEGATE_DROPS";
/// [`DROPS_MAP`] index: denials the rate limit kept out of the log.
pub const DROP_RATE_LIMITED: u32 = 0;
/// [`DROPS_MAP`] index: DENY records the aya-log ring had no room for.
pub const DROP_LOG_RING: u32 = 1;
/// [`DROPS_MAP`] index: flood records ([`FloodRecord`]) the flood ring had
/// no room for.
pub const DROP_FLOOD_RING: u32 = 2;
/// [`DROPS_MAP`] index (not a denial): connects let through to a guarded
/// endpoint whose mark could not be written (the fast marks full and no
/// memory for socket storage). The sweep cannot find those connections,
/// so they are not closed when access ends; the daemon says so.
pub const DROP_MARK_FAILED: u32 = 3;
/// Entries of [`DROPS_MAP`].
pub const DROP_KINDS: u32 = 4;

/// Ring buffer (not pinned) of the denials the rate limit kept out of the
/// log, as [`FloodRecord`]s, so the daemon can summarize them (how many, from
/// how many uids, which uids, which programs). Submitted without a wake-up:
/// the daemon drains it on a timer.
pub const FLOOD_MAP: &str = "SPICEGATE_FLOOD";
/// Size of [`FLOOD_MAP`] in bytes (a power of two, a multiple of the page).
pub const FLOOD_RING_BYTES: u32 = 1 << 20;

/// Room the program keeps free in aya-log's ring before it writes a DENY
/// record (records are at most 512 bytes): a record that would not fit is
/// counted in [`DROP_LOG_RING`] instead of vanishing.
pub const LOG_RING_HEADROOM: u64 = 1024;
/// Size of aya-log's ring (`aya-log-ebpf`'s `AYA_LOGS`, 128 KiB).
pub const LOG_RING_BYTES: u64 = 1 << 17;

/// One denial the rate limit kept out of the log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodRecord {
    /// Real uid of the connecting process.
    pub uid: u32,
    /// VM id of the endpoint, or [`NO_VM`].
    pub vm: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// [`OP_CONNECT`] or [`OP_BIND`].
    pub op: u8,
    /// 1 in audit mode.
    pub audit: u8,
    pub _pad: u32,
    /// The process name, NUL-padded.
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<FloodRecord>() == 32);

/// Per-VM connect counters (`PERCPU_HASH`, vm id -> [`VmCounters`]),
/// pinned so they outlive daemon restarts. Written by the kernel program,
/// read by the daemon for `status`.
pub const COUNTERS_MAP: &str = "SPICEGATE_COUNTERS";

/// Capacity of [`COUNTERS_MAP`]: one entry per VM id ever seen (ids are
/// stable hashes of VM names), plus [`NO_VM`].
pub const COUNTERS_MAP_ENTRIES: u32 = 16384;

/// aya-log's ring buffer (not pinned: each loaded program has its own).
pub const LOG_MAP: &str = "AYA_LOGS";

/// Name of the bind4 program in the object file.
pub const PROG_BIND4: &str = "spicegate_bind4";
/// Name of the bind6 program in the object file.
pub const PROG_BIND6: &str = "spicegate_bind6";

/// [`FloodRecord::op`] and the `op=` field of deny records: a connect.
pub const OP_CONNECT: u8 = 0;
/// [`FloodRecord::op`] and the `op=` field of deny records: a bind.
pub const OP_BIND: u8 = 1;

/// Name of the sock_release program in the object file: it removes a
/// closed socket's fast mark ([`GRANTED_MAP`]).
pub const PROG_RELEASE: &str = "spicegate_release";

/// Name of the connect4 program in the object file.
pub const PROG_CONNECT4: &str = "spicegate_connect4";
/// Name of the connect6 program in the object file.
pub const PROG_CONNECT6: &str = "spicegate_connect6";

/// Deny events logged per uid per [`RATE_WINDOW_NS`] (each uid below
/// [`RATE_LOW_UIDS`] and each uid the policy names); the rest are counted
/// and the count is reported with the next logged event of that uid.
pub const RATE_BURST: u32 = 5;
/// Length of one rate-limit window.
pub const RATE_WINDOW_NS: u64 = 10_000_000_000;
/// Deny events logged per [`RATE_SHARED_WINDOW_NS`] for all the uids of
/// the shared slot together.
pub const RATE_SHARED_BURST: u32 = 10;
/// Window of the shared slot.
pub const RATE_SHARED_WINDOW_NS: u64 = 1_000_000_000;

/// Layout version of the pinned objects. Part of the pin names, so a daemon
/// never adopts maps whose layout it does not understand.
///
/// - 1: rate limit in an LRU of 4,096 uids.
/// - 2: rate limit in an array (one slot per uid below 65,536 and a shared
///   one) plus a map of named uids; per-CPU drop counters; bind4 and bind6
///   programs (links `bind4_v2`, `bind6_v2`) beside connect4 and connect6;
///   socket marks. Later in layout 2 (added, nothing changed): the fast
///   marks ([`GRANTED_MAP`], pin `granted_v2`) and the release program
///   (link `release_v2`); a daemon of layout 2 without them leaves them
///   alone, and one with them creates them on start. Then, the same way:
///   the mark slots ([`MARK_SLOTS_MAP`], pin `mark_slots_v2`) and the
///   port prefilter ([`PORTS_MAP`], pin `ports_v2`).
/// - 3: grants as words of 64 VMs ([`KIND_GRANT`]), endpoints carry the
///   VM's slot and the generation. What reads the table changed: the rule
///   table, the overlays, their selector, the port prefilter and the links
///   get `_v3` pins. The maps whose layout did not change keep their
///   layout-2 pins ([`KEPT_LAYOUT_VERSION`]), so an upgrade adopts them:
///   the marks of open sockets, the counters and the rate limit survive it.
pub const LAYOUT_VERSION: u32 = 3;

/// The layout version in the pin names of the maps layout 3 did not change
/// (rate limit, named uids, drops, marks, fast marks, mark slots,
/// counters): see [`LAYOUT_VERSION`].
pub const KEPT_LAYOUT_VERSION: u32 = 2;

/// The prefilter of guarded ports (`ARRAY` of one [`PortBits`]): bit `p`
/// is set for every port `p` that has a [`KIND_PORT`] entry in the table in
/// force, and may be set for others. The connect and release programs let
/// a socket go when its port's bit is clear, with one inlined array read
/// instead of a hash lookup in a table that may hold a million entries.
///
/// The daemon keeps it a superset of the table in force: before a new
/// table is swapped in it writes the union of the old and new ports, after
/// the swap the new ones (a write of the whole value may tear between
/// bytes, but every byte then comes from one of two supersets, so the
/// whole is one too). Checked with the table by the watchdog. Pinned.
pub const PORTS_MAP: &str = "SPICEGATE_PORTS";

/// One bit per port (see [`PORTS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBits {
    pub words: [u64; 1024],
}

const _: () = assert!(core::mem::size_of::<PortBits>() == 8192);

impl Default for PortBits {
    fn default() -> Self {
        Self { words: [0; 1024] }
    }
}

impl PortBits {
    /// Whether `port`'s bit is set.
    #[inline(always)]
    pub const fn has(&self, port: u16) -> bool {
        self.words[(port >> 6) as usize] >> (port & 63) & 1 != 0
    }

    /// Sets `port`'s bit.
    pub fn set(&mut self, port: u16) {
        self.words[(port >> 6) as usize] |= 1 << (port & 63);
    }

    /// Every bit set in `self` or `other`.
    pub fn union(&self, other: &Self) -> Self {
        let mut out = *self;
        for (w, o) in out.words.iter_mut().zip(other.words.iter()) {
            *w |= o;
        }
        out
    }

    /// Whether every bit of `other` is set in `self`.
    pub fn covers(&self, other: &Self) -> bool {
        self.words
            .iter()
            .zip(other.words.iter())
            .all(|(w, o)| w & o == *o)
    }
}

/// [`RuleKey::kind`]: "is this port guarded at all, and how". Key has only
/// `port` set. Value flags: [`PORT_GUARD_ALL`], [`PORT_GUARD_ENDPOINTS`].
pub const KIND_PORT: u8 = 1;
/// [`RuleKey::kind`]: a guarded endpoint (`addr`, `port`). Value `vm` names
/// the VM it belongs to.
pub const KIND_ENDPOINT: u8 = 2;
/// [`RuleKey::kind`]: a uid's grants on a block of [`GRANT_BLOCK_VMS`]
/// VMs, one bit per VM slot (`uid`, and the block in `port`). The value,
/// read as one little-endian `u64` ([`RuleValue::word`]), has bit `slot %
/// 64` set for every VM of the block the uid may open. One entry per
/// (uid, block) rather than per (uid, endpoint): with `allow =
/// ["@students"]` on 100 VMs, 5,000 students make 10,000 entries instead
/// of 500,000 for a start to fill. Layout 2's
/// tables held one entry per (uid, endpoint) under the same kind.
pub const KIND_GRANT: u8 = 3;
/// [`RuleKey::kind`]: `addr` is an address of this machine (a "local"
/// address): connects to it are decided as connects to [`LOCAL_ADDR`].
pub const KIND_LOCAL: u8 = 4;
/// [`RuleKey::kind`] of the one entry that lists the prefix lengths of the
/// local networks in the table (local routes such as AnyIP `ip route add
/// local 198.18.0.0/24 dev lo`). Its value packs up to [`MAX_LOCAL_NET_LENS`]
/// lengths (IPv6 terms, 0..=128, IPv4 as 96 + its length) one per byte of
/// [`RuleValue::vm`], how many in [`RuleValue::flags`]. Each local network
/// is a [`KIND_LOCAL`] entry with its masked address and its length in
/// [`RuleKey::port`] (0 for single addresses).
pub const KIND_LOCAL_NETS: u8 = 5;
/// [`RuleKey::kind`]: a port that only its listeners may bind, on any
/// address of this machine (`[protect]` ports and the ports of VMs on
/// `localhost`). Key has only `port` set. Value: `vm` (or [`NO_VM`]) and
/// [`PORT_AUDIT`] in audit mode.
pub const KIND_BIND_PORT: u8 = 6;
/// [`RuleKey::kind`]: `uid` may bind every [`KIND_BIND_PORT`] port
/// (`[protect] listeners`). Key has only `uid` set.
pub const KIND_LISTENER: u8 = 7;
/// How many distinct local network prefix lengths the program checks.
pub const MAX_LOCAL_NET_LENS: usize = 4;

/// [`KIND_PORT`] flag: the port is guarded on every destination address.
pub const PORT_GUARD_ALL: u32 = 1 << 0;
/// [`KIND_PORT`] flag: the port is guarded on some addresses; look up
/// [`KIND_ENDPOINT`].
pub const PORT_GUARD_ENDPOINTS: u32 = 1 << 1;

/// [`KIND_PORT`] flag: `[settings] mode = "audit"`: a refusal on this port
/// that no VM endpoint decides is logged and let through.
pub const PORT_AUDIT: u32 = 1 << 2;
/// [`KIND_ENDPOINT`] flag: the VM runs in audit mode: refusals are logged
/// and let through. The endpoint's flags also carry the table's generation
/// ([`ENDPOINT_GEN_SHIFT`]) and the VM's slot ([`ENDPOINT_SLOT_SHIFT`]).
pub const ENDPOINT_AUDIT: u32 = 1 << 0;

/// The address every local destination is folded into before lookup:
/// loopback (127.0.0.0/8, ::1), unspecified (0.0.0.0, ::) and every address
/// the daemon has marked with [`KIND_LOCAL`]. All of them reach the same
/// listeners on this machine, so they are one endpoint per port. It is `::`,
/// which is itself a local destination, so folding is idempotent.
pub const LOCAL_ADDR: [u8; 16] = [0; 16];

/// `vm` value meaning "no VM" (a port guarded only by `[protect]`).
pub const NO_VM: u32 = 0;

/// Key of the inner rule table.
///
/// Written by the daemon (compiled from the policy), read by the kernel.
/// Addresses are always 16 bytes: IPv4 destinations are stored in their
/// IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), which is also what an IPv6
/// socket connecting to a mapped address presents, so both forms hit the
/// same entry. Unused fields are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    /// One of the `KIND_*` constants.
    pub kind: u8,
    /// Zero in rule tables; the table's generation in overlay keys (see
    /// [`OVERLAY_MAP`]).
    pub _pad: u8,
    /// Destination port, host byte order; the block of VM slots in
    /// [`KIND_GRANT`] keys.
    pub port: u16,
    /// Real uid of the connecting process (grants only).
    pub uid: u32,
    /// Destination address, network byte order, IPv4 mapped into IPv6.
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<RuleKey>() == 24);

impl RuleKey {
    /// Key of a [`KIND_PORT`] entry.
    pub const fn port(port: u16) -> Self {
        Self {
            kind: KIND_PORT,
            _pad: 0,
            port,
            uid: 0,
            addr: [0; 16],
        }
    }
    /// Key of a [`KIND_ENDPOINT`] entry.
    pub const fn endpoint(addr: [u8; 16], port: u16) -> Self {
        Self {
            kind: KIND_ENDPOINT,
            _pad: 0,
            port,
            uid: 0,
            addr,
        }
    }
    /// Key of a [`KIND_GRANT`] entry: `uid`'s grants on the VMs of
    /// `block` (slots `64 * block ..`).
    pub const fn grant(uid: u32, block: u16) -> Self {
        Self {
            kind: KIND_GRANT,
            _pad: 0,
            port: block,
            uid,
            addr: [0; 16],
        }
    }
    /// Key of a [`KIND_LOCAL`] entry for a local network: `addr` masked to
    /// its first `len` bits (IPv6 terms).
    pub const fn local_net(addr: [u8; 16], len: u16) -> Self {
        Self {
            kind: KIND_LOCAL,
            _pad: 0,
            port: len,
            uid: 0,
            addr,
        }
    }
    /// Key of a [`KIND_BIND_PORT`] entry.
    pub const fn bind_port(port: u16) -> Self {
        Self {
            kind: KIND_BIND_PORT,
            _pad: 0,
            port,
            uid: 0,
            addr: [0; 16],
        }
    }
    /// Key of a [`KIND_LISTENER`] entry.
    pub const fn listener(uid: u32) -> Self {
        Self {
            kind: KIND_LISTENER,
            _pad: 0,
            port: 0,
            uid,
            addr: [0; 16],
        }
    }
    /// Key of the [`KIND_LOCAL_NETS`] entry.
    pub const fn local_nets() -> Self {
        Self {
            kind: KIND_LOCAL_NETS,
            _pad: 0,
            port: 0,
            uid: 0,
            addr: [0; 16],
        }
    }
    /// Key of a [`KIND_LOCAL`] entry.
    pub const fn local(addr: [u8; 16]) -> Self {
        Self {
            kind: KIND_LOCAL,
            _pad: 0,
            port: 0,
            uid: 0,
            addr,
        }
    }
}

/// Value of the inner rule table. Written by the daemon, read by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    /// VM id (a stable hash of the VM name, assigned by the daemon), or
    /// [`NO_VM`]. On grants: the VM the grant belongs to.
    pub vm: u32,
    /// `PORT_*` flags for [`KIND_PORT`], `ENDPOINT_*` for [`KIND_ENDPOINT`].
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<RuleValue>() == 8);

impl RuleValue {
    /// A [`KIND_GRANT`] value: `word`'s low half in `vm`, its high half in
    /// `flags` (the bytes of a little-endian `u64`).
    pub const fn grant_word(word: u64) -> Self {
        Self {
            vm: word as u32,
            flags: (word >> 32) as u32,
        }
    }
    /// A [`KIND_GRANT`] value's word of grants.
    pub const fn word(&self) -> u64 {
        self.vm as u64 | (self.flags as u64) << 32
    }
}

/// Per-uid deny-event rate limiter. Written and read by the kernel program;
/// the daemon may read it for diagnostics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RateState {
    /// `bpf_ktime_get_ns()` at the start of the current window.
    pub window_start: u64,
    /// Events logged in the current window.
    pub logged: u32,
    /// Events not logged since the last logged one.
    pub suppressed: u32,
}

const _: () = assert!(core::mem::size_of::<RateState>() == 16);

/// Connects decided on one VM's endpoints. Per CPU; the daemon sums.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// Guarded connects let through by a grant.
    pub allowed: u64,
    /// Guarded connects refused.
    pub denied: u64,
    /// Guarded connects that would have been refused, let through in audit
    /// mode.
    pub audited: u64,
}

const _: () = assert!(core::mem::size_of::<VmCounters>() == 24);

/// Maps an IPv4 address (network order octets) to its IPv4-mapped IPv6 form.
/// `addr` with all but its first `len` bits cleared.
pub const fn mask_addr(addr: [u8; 16], len: u16) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let bits = len as i32 - (i as i32) * 8;
        out[i] = if bits >= 8 {
            addr[i]
        } else if bits <= 0 {
            0
        } else {
            addr[i] & (0xffu8 << (8 - bits))
        };
        i += 1;
    }
    out
}

pub const fn mapped_v4(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are repr(C), made of integers, with no implicit padding
    // (sizes asserted above).
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for super::VmCounters {}
    // SAFETY: repr(C), integers and a byte array, no implicit padding.
    unsafe impl aya::Pod for super::FloodRecord {}
}
