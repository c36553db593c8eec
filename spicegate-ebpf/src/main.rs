//! spicegate's kernel side: decides every stream connect() of the cgroup
//! subtree it is attached to.
//!
//! A connect is refused only when its destination is a guarded endpoint and
//! the real uid has no grant on its VM (its bit in the uid's word of
//! grants for the VM's block of 64). The rule table is one inner
//! hash map behind `SPICEGATE_POLICY`, replaced whole by a reload; grants
//! changed since (grant, revoke, schedule, console) sit in two small
//! overlays behind `SPICEGATE_OVERLAY`, of which `SPICEGATE_OVERLAY_SEL`
//! says which one is in force (the daemon writes the other, then flips).
//! A connect to a port whose bit in `SPICEGATE_PORTS` (a superset of the
//! table's guarded ports) is clear is let through at once. A granted
//! socket is marked (`mark`: its cookie in a slot of
//! `SPICEGATE_MARK_SLOTS`, else in `SPICEGATE_GRANTED`, else in socket
//! storage) for the daemon's sweep, and the release program removes the
//! mark when the socket is closed.
//!
//! - this file: the programs and the decision;
//! - `report`: a refusal's DENY record, its rate limit and drop counts.
//!
//! Shaped for the toolchain and the verifier: every helper is
//! `#[inline(always)]`, so each program is one flat function, but for the
//! DENY record, a global BPF function the verifier checks once
//! (`report::spicegate_report_denial`, which says why). Where that
//! is required, the function says what fails without it; on the small
//! helpers (`key`, `count`, `mark`, `rate_slot`...) LLVM inlines them anyway
//! today, and the attribute is kept because dropping it still made each
//! program 2 instructions longer (measured with bpf-linker 0.10.4).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod report;

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, ArrayOfMaps, HashMap, PerCpuHashMap, SkStorage},
    helpers::{bpf_get_current_uid_gid, bpf_get_socket_cookie},
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use spicegate_common::{
    COUNTERS_MAP_ENTRIES, DROP_MARK_FAILED, ENDPOINT_AUDIT, ENDPOINT_GEN_SHIFT,
    ENDPOINT_SLOT_SHIFT, GRANT_BLOCK_VMS, GRANTED_ENTRIES, KIND_BIND_PORT, KIND_ENDPOINT,
    KIND_GRANT, KIND_LISTENER, KIND_LOCAL, KIND_LOCAL_NETS, KIND_PORT, MARK_SLOTS,
    MAX_LOCAL_NET_LENS, NO_VM, OP_BIND, OP_CONNECT, OVERLAY_EMPTY, OVERLAY_SELECT_ACTIVE,
    OVERLAY_SLOTS, POLICY_SLOT, PORT_AUDIT, PORT_GUARD_ALL, PortBits, RuleKey, RuleValue,
    VmCounters, mark_slot,
};

use crate::report::{count_drop, report_denial};

/// Template for the inner rule table; the daemon creates the real ones, sized
/// for the policy (the kernel only checks type, key, value and flags match).
type Rules = HashMap<RuleKey, RuleValue, 1>;

#[btf_map]
static SPICEGATE_POLICY: ArrayOfMaps<Rules, 1> = ArrayOfMaps::new();

/// Grants changed since the table in force was built: two overlays, one
/// in force and one standby (see `OVERLAY_MAP`).
#[btf_map]
static SPICEGATE_OVERLAY: ArrayOfMaps<Rules, { OVERLAY_SLOTS as usize }> = ArrayOfMaps::new();

/// The ports the table in force guards, and maybe more (see `PORTS_MAP`):
/// a clear bit lets a socket go without a lookup in the table.
#[btf_map]
static SPICEGATE_PORTS: Array<PortBits, 1> = Array::new();

/// Which overlay is in force (and, for the daemon, the table's generation).
#[btf_map]
static SPICEGATE_OVERLAY_SEL: Array<u32, 2> = Array::new();

/// Marks the sockets let through to a guarded endpoint (value: VM id), so
/// the daemon closes exactly those when access ends.
#[btf_map]
static SPICEGATE_MARKS: SkStorage<u32> = SkStorage::new();

/// The first place a mark goes: slot `mark_slot(cookie)` holds the cookie
/// of a socket let through to a guarded endpoint, cleared again by
/// `spicegate_release` (see `MARK_SLOTS_MAP`).
#[btf_map]
static SPICEGATE_MARK_SLOTS: Array<u64, { MARK_SLOTS as usize }> = Array::new();

/// The fast marks: socket cookie -> VM id of a socket let through to a
/// guarded endpoint whose slot was taken, removed again by
/// `spicegate_release` (see `GRANTED_MAP`). When full, `SPICEGATE_MARKS`
/// takes the mark instead.
#[btf_map]
static SPICEGATE_GRANTED: HashMap<u64, u32, { GRANTED_ENTRIES as usize }> = HashMap::new();

/// Per-VM counts of connects let through, refused and audited.
/// Not preallocated: a preallocated per-CPU hash makes one per-CPU
/// allocation per entry when it is created, which was a fifth of a start
/// (`perf`, 16,384 entries, kernel 6.18, 2 vCPUs); `count` inserts a VM's
/// entry on its first connect instead. A pinned map of an older release
/// (preallocated) is reused as it is.
#[btf_map]
static SPICEGATE_COUNTERS: PerCpuHashMap<
    u32,
    VmCounters,
    { COUNTERS_MAP_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// The connect hooks answer 1 to let the connect proceed, 0 to refuse it
/// (the caller gets EPERM).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_SEQPACKET: u32 = 5;

#[cgroup_sock_addr(connect4)]
pub fn spicegate_connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn spicegate_connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, AF_INET6)
}

/// Removes the fast mark of a stream socket being closed: its slot when
/// the slot holds its cookie (one store), the hash entry otherwise. Runs
/// for every socket of the subtree, so it returns early for those that
/// cannot have one: not a stream, never connected, or connected to a port
/// whose bit in `SPICEGATE_PORTS` is clear (the same check as an unguarded
/// connect). A hash delete, even of a missing key, costs more: measured
/// with `kernel.bpf_stats_enabled` on the 2-vCPU test VM, this program ran
/// in about 200 ns for an unguarded socket when it looked the port up in
/// the table, 300 ns when it deleted every time.
/// A mark whose port stopped being guarded while its socket was open is
/// left behind; it only takes a slot or a hash entry, and a mark that
/// finds both taken goes to socket storage.
#[cgroup_sock(sock_release)]
pub fn spicegate_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands every cgroup_sock program a valid bpf_sock;
    // plain context loads.
    let (kind, port) = unsafe { ((*ctx.sock).type_, u16::from_be((*ctx.sock).dst_port)) };
    if (kind != SOCK_STREAM && kind != SOCK_SEQPACKET) || port == 0 || !maybe_guarded(port) {
        return 1;
    }
    // SAFETY: the program's own context, which the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if let Some(slot) = SPICEGATE_MARK_SLOTS.get_ptr_mut(mark_slot(cookie)) {
        // SAFETY: a live, 8-byte aligned slot of a preallocated array; an
        // aligned 8-byte load or store is one BPF instruction, so no other
        // CPU sees half of it (LLVM cannot select `AtomicU64::load` for BPF
        // below CPU v4). Only this socket's release clears its own cookie,
        // and a connect only takes a slot that holds 0.
        unsafe {
            if core::ptr::read_volatile(slot) == cookie {
                core::ptr::write_volatile(slot, 0);
                return 1;
            }
        }
    }
    // Marked in the hash (its slot was taken, or a release before the
    // slots marked it), or not marked at all (audit mode, another server
    // on a guarded port): a delete, of a missing key in the last case.
    let _ = SPICEGATE_GRANTED.remove(cookie);
    1 // sock_release programs cannot refuse; 1 is "carry on"
}

/// Only a listener (`[protect] listeners`, and root) may bind a guarded
/// local port, on any address: nobody else can stand up a fake Spice
/// server where the console user's client will connect.
#[cgroup_sock_addr(bind4)]
pub fn spicegate_bind4(ctx: SockAddrContext) -> i32 {
    decide_bind(&ctx, AF_INET)
}

#[cgroup_sock_addr(bind6)]
pub fn spicegate_bind6(ctx: SockAddrContext) -> i32 {
    decide_bind(&ctx, AF_INET6)
}

// Without this, decide_bind is one subprogram for bind4 and bind6 with
// `family` a run-time argument, and LLVM picks user_ip4 or user_ip6[3] by
// adding an offset to the context pointer; the kernel verifier at load
// (kernel 6.18) refuses that: "dereference of modified ctx ptr R7 off=20
// disallowed". Inlined, `family` is a constant in each program.
#[inline(always)]
fn decide_bind(ctx: &SockAddrContext, family: u32) -> i32 {
    // SAFETY: the kernel hands every cgroup_sock_addr program a valid
    // bpf_sock_addr; these are plain context loads.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM && sa.type_ != SOCK_SEQPACKET {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    if port == 0 {
        return ALLOW; // an ephemeral port, chosen by the kernel
    }
    let Some(rules) = SPICEGATE_POLICY.get(POLICY_SLOT) else {
        return ALLOW;
    };
    let Some(rule) = rules.get_ptr(key(KIND_BIND_PORT, port, 0, &[0; 4])) else {
        return ALLOW;
    };
    let uid = bpf_get_current_uid_gid() as u32;
    if uid == 0 || rules.get_ptr(key(KIND_LISTENER, 0, uid, &[0; 4])).is_some() {
        return ALLOW;
    }
    // SAFETY: a live entry of the frozen rule table.
    let (vm, audit) = unsafe { ((*rule).vm, (*rule).flags & PORT_AUDIT != 0) };
    refuse(uid, &addr_words(sa, family), port, vm, audit, OP_BIND)
}

/// The address of a sock_addr context as four words in network byte
/// order (as the kernel stores them), IPv4 mapped into IPv6.
#[inline(always)]
fn addr_words(sa: &aya_ebpf::bindings::bpf_sock_addr, family: u32) -> [u32; 4] {
    if family == AF_INET {
        [0, 0, V4_MAPPED_PREFIX, sa.user_ip4]
    } else {
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    }
}

/// Counts and reports a refusal (a connect or a bind); in audit mode the
/// operation is let through.
// Without this, LLVM/bpf-linker at build time (a BPF call takes at most 5
// register arguments): "too many arguments" and "stack arguments are not
// supported".
#[inline(always)]
fn refuse(uid: u32, words: &[u32; 4], port: u16, vm: u32, audit: bool, op: u8) -> i32 {
    count(
        vm,
        if audit {
            Outcome::Audited
        } else {
            Outcome::Denied
        },
    );
    report_denial(uid, words, port, vm, audit, op);
    if audit { ALLOW } else { DENY }
}

// Inlined for the same reason as `decide_bind`, so that `family` is a
// constant in each program. Not measured on its own: with every helper out
// of line, decide too became one subprogram for connect4 and connect6, but
// the load stopped at decide_bind's message (see there) first.
#[inline(always)]
fn decide(ctx: &SockAddrContext, family: u32) -> i32 {
    // SAFETY: the kernel hands every cgroup_sock_addr program a valid
    // bpf_sock_addr; these are plain context loads.
    let sa = unsafe { &*ctx.sock_addr };
    // Connection-oriented sockets only, whatever the protocol number (TCP,
    // MPTCP, SCTP one-to-one...). Datagram connects only set a default peer.
    if sa.type_ != SOCK_STREAM && sa.type_ != SOCK_SEQPACKET {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    // Fast path: a port nobody guards costs one array read (inlined by the
    // verifier) and nothing else.
    if !maybe_guarded(port) {
        return ALLOW;
    }
    let words = addr_words(sa, family);
    // The table in force; an empty slot (no daemon ever installed one)
    // decides nothing.
    let Some(rules) = SPICEGATE_POLICY.get(POLICY_SLOT) else {
        return ALLOW;
    };
    // LOCAL_ADDR (`::`) is all zeroes.
    let endpoint = if is_local(rules, &words) {
        [0u32; 4]
    } else {
        words
    };
    let uid = bpf_get_current_uid_gid() as u32;
    // A VM's endpoint: its grants decide. The endpoint entry says which
    // VM (its id, for the counters and the record) and its slot (its bit
    // in the words of grants).
    if let Some(rule) = rules.get_ptr(key(KIND_ENDPOINT, port, 0, &endpoint)) {
        // SAFETY: a live entry of the frozen rule table.
        let (vm, flags) = unsafe { ((*rule).vm, (*rule).flags) };
        if granted(rules, flags, uid) {
            count(vm, Outcome::Allowed);
            mark(ctx, vm);
            return ALLOW;
        }
        return refuse(
            uid,
            &words,
            port,
            vm,
            flags & ENDPOINT_AUDIT != 0,
            OP_CONNECT,
        );
    }
    // No VM's endpoint: refused only where `[protect]` (or a VM whose
    // server does not resolve) guards the port on every address.
    let Some(port_rule) = rules.get_ptr(key(KIND_PORT, port, 0, &[0; 4])) else {
        return ALLOW;
    };
    // SAFETY: a live entry of the frozen rule table.
    let port_flags = unsafe { (*port_rule).flags };
    if port_flags & PORT_GUARD_ALL == 0 {
        return ALLOW;
    }
    refuse(
        uid,
        &words,
        port,
        NO_VM,
        port_flags & PORT_AUDIT != 0,
        OP_CONNECT,
    )
}

/// Whether `port` may be guarded: its bit in `SPICEGATE_PORTS`, a superset
/// of the ports of the table in force. Without the map (cannot happen: an
/// array's slot 0 always exists) every port may be.
#[inline(always)]
fn maybe_guarded(port: u16) -> bool {
    match SPICEGATE_PORTS.get_ptr(0) {
        // SAFETY: slot 0 of a preallocated array; a torn read of a word
        // the daemon is rewriting still gives a superset (see PORTS_MAP).
        Some(bits) => unsafe { (*bits).has(port) },
        None => true,
    }
}

/// Marks a socket let through to a guarded endpoint, so that the sweep
/// closes it when access ends: its cookie in its slot of
/// `SPICEGATE_MARK_SLOTS` (one compare-and-swap), else in the hash
/// `SPICEGATE_GRANTED`, else socket storage (about ten times the cost of
/// the hash).
#[inline(always)]
fn mark(ctx: &SockAddrContext, mut vm: u32) {
    // SAFETY: the program's own context, which the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(slot) = SPICEGATE_MARK_SLOTS.get_ptr_mut(mark_slot(cookie)) {
        // The target spec says no compare-and-swap (`atomic-cas` is false
        // for every BPF CPU version, so `AtomicU64` has no
        // `compare_exchange`), but LLVM emits BPF_CMPXCHG (kernel >= 5.12)
        // for the intrinsic.
        // SAFETY: a live, 8-byte aligned slot of a preallocated array, only
        // ever accessed atomically (here, by the release hook, and by the
        // daemon's reads).
        let (held, _) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                slot, 0, cookie,
            )
        };
        // Taken now, or this socket's already: a connect after a failed
        // one (cookies are never 0, and never reused within a boot).
        if held == 0 || held == cookie {
            return;
        }
    }
    if SPICEGATE_GRANTED.insert(cookie, vm, 0).is_ok() {
        return;
    }
    // SAFETY: ctx.sk is the connecting socket; the helper checks it.
    // A failed mark (no memory) only means the sweep will not close
    // this connection when access ends; the connect is decided, and the
    // failure counted for the daemon to report.
    if unsafe { SPICEGATE_MARKS.get_or_insert_ptr_mut(ctx, Some(&mut vm)) }.is_null() {
        count_drop(DROP_MARK_FAILED);
    }
}

/// Whether `uid` may open the VM of an endpoint whose entry has `flags`:
/// the VM's bit in `uid`'s word of grants for the VM's block of 64. While
/// an overlay is in force (`SPICEGATE_OVERLAY_SEL` without
/// `OVERLAY_EMPTY`), a word it holds for the key with the table's
/// generation (a changed word) decides in place of the table's.
#[inline(always)]
fn granted(rules: &Rules, flags: u32, uid: u32) -> bool {
    let slot = flags >> ENDPOINT_SLOT_SHIFT;
    let block = (slot / GRANT_BLOCK_VMS) as u16;
    let bit = 1u64 << (slot % GRANT_BLOCK_VMS);
    // Read once: the overlay in force, or OVERLAY_EMPTY.
    let active = SPICEGATE_OVERLAY_SEL
        .get(OVERLAY_SELECT_ACTIVE)
        .copied()
        .unwrap_or(OVERLAY_EMPTY);
    let generation = ((flags >> ENDPOINT_GEN_SHIFT) & 0xff) as u8;
    if active & OVERLAY_EMPTY == 0
        && let Some(overlay) = SPICEGATE_OVERLAY.get(active & 1)
        && let Some(changed) = overlay.get_ptr(key_in(generation, KIND_GRANT, block, uid, &[0; 4]))
    {
        // SAFETY: a live entry of an overlay. Overlays are not frozen (the
        // daemon writes the standby one), but a hash map update replaces
        // the element whole: a reader sees the old word or the new one.
        let word = unsafe { (*changed).word() };
        return word & bit != 0;
    }
    match rules.get_ptr(key(KIND_GRANT, block, uid, &[0; 4])) {
        // SAFETY: a live entry of the frozen rule table.
        Some(w) => (unsafe { (*w).word() }) & bit != 0,
        None => false,
    }
}

enum Outcome {
    Allowed,
    Denied,
    Audited,
}

/// Bumps the per-CPU counter of a VM. Per CPU, so no atomics are needed.
#[inline(always)]
fn count(vm: u32, outcome: Outcome) {
    let counters = match SPICEGATE_COUNTERS.get_ptr_mut(vm) {
        Some(c) => c,
        None => {
            // A full map only loses counting, never a decision.
            let _ = SPICEGATE_COUNTERS.insert(vm, VmCounters::default(), 0);
            match SPICEGATE_COUNTERS.get_ptr_mut(vm) {
                Some(c) => c,
                None => return,
            }
        }
    };
    // SAFETY: a live per-CPU slot of this CPU; preemption is off in BPF.
    unsafe {
        match outcome {
            Outcome::Allowed => (*counters).allowed += 1,
            Outcome::Denied => (*counters).denied += 1,
            Outcome::Audited => (*counters).audited += 1,
        }
    }
}

/// A [`RuleKey`] written as three 64-bit words. The BPF target is
/// little-endian: kind, pad, port and uid fill the first word; `addr`
/// (network byte order words) the other two.
///
/// Kept for a measured reason: a plain `RuleKey { .. }` literal builds and
/// loads too, but costs 20 more instructions in connect4 (bpftool xlated
/// 2118 against 2098). Either way LLVM still turns the all-zero address
/// words of some keys into a call to the `memset` subprogram, which the
/// kernel verifier accepts.
#[inline(always)]
fn key(kind: u8, port: u16, uid: u32, addr: &[u32; 4]) -> RuleKey {
    key_in(0, kind, port, uid, addr)
}

/// [`key`] with `generation` in the pad byte: an overlay key.
#[inline(always)]
fn key_in(generation: u8, kind: u8, port: u16, uid: u32, addr: &[u32; 4]) -> RuleKey {
    let w = [
        u64::from(kind)
            | (u64::from(generation) << 8)
            | (u64::from(port) << 16)
            | (u64::from(uid) << 32),
        u64::from(addr[0]) | (u64::from(addr[1]) << 32),
        u64::from(addr[2]) | (u64::from(addr[3]) << 32),
    ];
    // SAFETY: RuleKey is repr(C), 24 bytes, with no padding the words
    // leave undefined and no invalid bit patterns.
    unsafe { core::mem::transmute::<[u64; 3], RuleKey>(w) }
}

const _: () = assert!(core::mem::size_of::<RuleKey>() == 24);
// The byte offsets `key_in` packs the fields at.
const _: () = assert!(core::mem::offset_of!(RuleKey, kind) == 0);
const _: () = assert!(core::mem::offset_of!(RuleKey, _pad) == 1);
const _: () = assert!(core::mem::offset_of!(RuleKey, port) == 2);
const _: () = assert!(core::mem::offset_of!(RuleKey, uid) == 4);
const _: () = assert!(core::mem::offset_of!(RuleKey, addr) == 8);

/// `::ffff:0:0/96` prefix word, in memory (network) order.
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The first 12 bytes of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// `::1`.
const IPV6_LOOPBACK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Loopback, unspecified, or marked local by the daemon.
///
/// Not a subprogram: without `#[inline(always)]` here LLVM leaves it a
/// bpf-to-bpf call on the guarded connect path (measured).
#[inline(always)]
fn is_local(rules: &Rules, words: &[u32; 4]) -> bool {
    // Plain array compares: LLVM expands these fixed-size compares inline
    // (no memcmp/bcmp call), and they came out 3 instructions shorter in
    // connect4 than the word-by-word compares they replace (bpftool
    // xlated 2095 against 2098).
    // SAFETY: [u32; 4] and [u8; 16] have the same size and any bit pattern
    // is valid for both.
    let bytes: [u8; 16] = unsafe { core::mem::transmute(*words) };
    let (prefix, last) = bytes.split_at(12);
    if prefix == V4_MAPPED && (last[0] == 127 || last == [0; 4]) {
        return true; // 127.0.0.0/8 and 0.0.0.0
    }
    if bytes == [0; 16] || bytes == IPV6_LOOPBACK {
        return true; // :: and ::1
    }
    if rules.get_ptr(key(KIND_LOCAL, 0, 0, words)).is_some() {
        return true;
    }
    // Local networks (AnyIP routes): for each prefix length the table
    // lists, the address masked to it.
    let Some(nets) = rules.get_ptr(key(KIND_LOCAL_NETS, 0, 0, &[0; 4])) else {
        return false;
    };
    // SAFETY: a live entry of the frozen rule table.
    let (lens, count) = unsafe { ((*nets).vm.to_ne_bytes(), (*nets).flags) };
    // A bounded `while` with an early `break`, not `for &len in
    // lens.iter().take(count)`: that form builds and loads too, but LLVM
    // unrolls it into 206 more instructions in connect4 (bpftool xlated
    // 2301 against 2095; measured with aya-ebpf 0.2, bpf-linker 0.10.4).
    let mut i = 0;
    while i < MAX_LOCAL_NET_LENS {
        if i as u32 >= count {
            break;
        }
        let len = u32::from(lens[i]);
        let mut masked = [0u32; 4];
        let mut w = 0;
        while w < 4 {
            let bits = len.saturating_sub(w as u32 * 32);
            masked[w] = if bits >= 32 {
                words[w]
            } else if bits == 0 {
                0
            } else {
                // The words hold network byte order: mask in host order.
                words[w] & u32::to_be(u32::MAX << (32 - bits))
            };
            w += 1;
        }
        if rules
            .get_ptr(key(KIND_LOCAL, len as u16, 0, &masked))
            .is_some()
        {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
