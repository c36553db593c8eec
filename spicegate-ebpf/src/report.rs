//! The refusal's report: the DENY record through aya-log within each uid's
//! budget, the flood ring for what the budget keeps out, and a per-CPU
//! count of every record that could not be written.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_NO_WAKEUP},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_map,
};
use aya_log_ebpf::macro_support::{AYA_LOGS, DisplayHint};
use spicegate_common::{
    DROP_FLOOD_RING, DROP_KINDS, DROP_LOG_RING, DROP_RATE_LIMITED, FLOOD_RING_BYTES, FloodRecord,
    LOG_RING_BYTES, LOG_RING_HEADROOM, RATE_BURST, RATE_LOW_UIDS, RATE_NAMED_ENTRIES,
    RATE_SHARED_BURST, RATE_SHARED_SLOT, RATE_SHARED_WINDOW_NS, RATE_SLOTS, RATE_WINDOW_NS,
    RateState,
};

/// Rate-limit state: one slot per uid below RATE_LOW_UIDS, one shared.
#[btf_map]
static SPICEGATE_RATE: Array<RateState, { RATE_SLOTS as usize }> = Array::new();

/// Rate-limit state of the high uids the policy names (filled by the
/// daemon; the program never inserts).
#[btf_map]
static SPICEGATE_RATE_NAMED: HashMap<u32, RateState, { RATE_NAMED_ENTRIES as usize }> =
    HashMap::new();

/// Denials not logged, per CPU, by reason (DROP_*).
#[btf_map]
static SPICEGATE_DROPS: PerCpuArray<u64, { DROP_KINDS as usize }> = PerCpuArray::new();

/// Denials the rate limit kept out of the log, for the daemon's summaries.
#[btf_map]
static SPICEGATE_FLOOD: RingBuf<FloodRecord, { FLOOD_RING_BYTES as usize }> = RingBuf::new();

/// The rate-limit slot of `uid` and its budget per window.
#[inline(always)]
fn rate_slot(uid: u32) -> Option<(*mut RateState, u32, u64)> {
    if uid < RATE_LOW_UIDS {
        return SPICEGATE_RATE
            .get_ptr_mut(uid)
            .map(|s| (s, RATE_BURST, RATE_WINDOW_NS));
    }
    if let Some(s) = SPICEGATE_RATE_NAMED.get_ptr_mut(uid) {
        return Some((s, RATE_BURST, RATE_WINDOW_NS));
    }
    SPICEGATE_RATE
        .get_ptr_mut(RATE_SHARED_SLOT)
        .map(|s| (s, RATE_SHARED_BURST, RATE_SHARED_WINDOW_NS))
}

/// Adds one to this CPU's drop counter `which`.
#[inline(always)]
pub(crate) fn count_drop(which: u32) {
    if let Some(c) = SPICEGATE_DROPS.get_ptr_mut(which) {
        // SAFETY: this CPU's slot of a per-CPU array; preemption is off.
        unsafe { *c += 1 };
    }
}

/// Room reserved in aya-log's ring for one DENY record (it takes some
/// 300 bytes; see [`LOG_RING_HEADROOM`]).
const RECORD_BYTES: u64 = 512;

/// Writes one WARN record into aya-log's ring, byte for byte what
/// `aya_log_ebpf::warn!` writes for the same format (aya-log-ebpf 0.2:
/// the header, then each literal piece, display hint and argument as
/// fields), which aya-log's reader in the daemon turns back into a line.
/// Evaluates to whether the record was submitted.
///
/// Why not `warn!` itself: it sizes the ring reservation at run time
/// (the smallest power of two from 64 bytes up that holds the record,
/// behind a `black_box`), and the verifier walks the whole record once
/// for every size it cannot rule out. Measured on kernel 6.18
/// (`verified_insns`): the record took some 10,300 instructions of each
/// program's verification with `warn!`, some 1,400 with this one (bind4:
/// 11,530 -> 2,585 in all; connect4: 12,650 -> 3,700; the 1,200-2,800 left
/// are the decisions).
///
/// The values are the format's pieces in order: a literal `&str`, or a
/// `DisplayHint` followed by its argument.
macro_rules! aya_log_record {
    ($($value:expr),+ $(,)?) => {{
        use aya_log_ebpf::macro_support::{
            Argument as _, Field, Header, Level, LogValueLength, level_enabled,
        };
        const SIZE_BYTES: usize = core::mem::size_of::<LogValueLength>();
        let count = 0u32 $(+ { let _ = stringify!($value); 1 })+;
        // A level the daemon turned off writes nothing and loses nothing.
        if !level_enabled(Level::Warn) {
            true
        } else { match AYA_LOGS.reserve_bytes(RECORD_BYTES as usize, 0) {
            None => false,
            Some(mut buf) => {
                let mut pos = SIZE_BYTES;
                let written = (|| -> Option<()> {
                    let mut op = |slice: &[u8]| -> Option<()> {
                        let to = buf.get_mut(pos..)?.get_mut(..slice.len())?;
                        to.copy_from_slice(slice);
                        pos += slice.len();
                        Some(())
                    };
                    Header::new(module_path!(), Level::Warn, module_path!(), file!(), line!(), count)?
                        .with_bytes(&mut op)?;
                    $({
                        let value = $value;
                        let (kind, bytes) = value.as_argument();
                        Field::new(kind, bytes)?.with_bytes(&mut op)?;
                    })+
                    let size = LogValueLength::try_from(pos).ok()?.to_ne_bytes();
                    buf.get_mut(..SIZE_BYTES)?.copy_from_slice(&size);
                    Some(())
                })();
                if written.is_some() {
                    buf.submit(0);
                    true
                } else {
                    buf.discard(0);
                    false
                }
            }
        } }
    }};
}

/// Logs a denial through aya-log within the uid's budget (RATE_BURST per
/// RATE_WINDOW_NS for real accounts and named uids, RATE_SHARED_BURST per
/// RATE_SHARED_WINDOW_NS for all other uids together). A denial over
/// budget is counted and handed to the flood ring for the daemon's
/// summary; a record no ring has room for is counted too. Nothing is
/// dropped without a count.
///
/// Packs its arguments into the five registers a BPF call has and calls
/// [`spicegate_report_denial`], which the program carries once.
// Without inlining, LLVM/bpf-linker at build time (a BPF call takes at
// most 5 register arguments): "too many arguments" and "stack arguments
// are not supported".
#[inline(always)]
pub(crate) fn report_denial(uid: u32, words: &[u32; 4], port: u16, vm: u32, audit: bool, op: u8) {
    // The address words as they lie in memory (the target is
    // little-endian), two to a register.
    let high = u64::from(words[0]) | (u64::from(words[1]) << 32);
    let low = u64::from(words[2]) | (u64::from(words[3]) << 32);
    let who = u64::from(uid) | (u64::from(port) << 32) | (u64::from(op) << 48);
    let what = u64::from(vm) | (u64::from(audit) << 32);
    spicegate_report_denial(who, what, high, low);
}

/// The body of [`report_denial`], a global BPF function: the verifier
/// checks it once, on its own, with its arguments as any scalars, rather
/// than once for every path of the program that reaches a refusal (each
/// inlined copy of the aya-log record multiplied the states it walked).
/// Measured on kernel 6.18, 2 vCPUs (`verified_insns` of bpf_prog_info,
/// with `warn!` for the record): inlined at every refusal, the verifier
/// walked 27,000 instructions for each connect program and 23,200 for
/// each bind program (19-25 ms of BPF_PROG_LOAD each); with this
/// function, 12,600-13,100 and 11,500. See [`aya_log_record!`] for the
/// rest.
///
/// Every argument must reach it defined: the verifier refuses a call
/// whose argument register holds no scalar ("R3 is not a scalar"), which
/// is what LLVM passes for an argument the body does not use.
///
/// `who`: uid | port << 32 | op << 48; `what`: vm | audit << 32; `high`,
/// `low`: the 16 address bytes as they lie in memory. Returns 0 (a global
/// function must return a scalar).
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn spicegate_report_denial(who: u64, what: u64, high: u64, low: u64) -> i32 {
    let uid = who as u32;
    let port = (who >> 32) as u16;
    let op = (who >> 48) as u8;
    let vm = what as u32;
    let audit = (what >> 32) & 1 != 0;
    // SAFETY: [u64; 2] and [u8; 16] have the same size and any bit
    // pattern is valid for both.
    let addr: [u8; 16] = unsafe { core::mem::transmute([high, low]) };
    // SAFETY: a helper with no arguments and no side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((state, burst, window)) = rate_slot(uid) else {
        return 0;
    };
    // SAFETY: a live array or hash slot; racing CPUs can at worst miscount
    // by a few events, never overflow a buffer.
    let state = unsafe { &mut *state };
    let suppressed = if now.wrapping_sub(state.window_start) >= window {
        state.window_start = now;
        state.logged = 1;
        let s = state.suppressed;
        state.suppressed = 0;
        s
    } else if state.logged < burst {
        state.logged += 1;
        let s = state.suppressed;
        state.suppressed = 0;
        s
    } else {
        state.suppressed = state.suppressed.saturating_add(1);
        count_drop(DROP_RATE_LIMITED);
        report_flood(uid, port, vm, audit, op);
        return 0;
    };
    // aya-log drops a record silently when its ring is full: check for room
    // first, so such a loss is counted.
    if AYA_LOGS.query(u64::from(BPF_RB_AVAIL_DATA)) + LOG_RING_HEADROOM > LOG_RING_BYTES {
        count_drop(DROP_LOG_RING);
        return 0;
    }
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    let written = aya_log_record!(
        "deny uid=",
        DisplayHint::Default,
        uid,
        " pid=",
        DisplayHint::Default,
        pid,
        " dst=",
        DisplayHint::Ip,
        addr,
        " port=",
        DisplayHint::Default,
        port,
        " vm=",
        DisplayHint::Default,
        vm,
        " suppressed=",
        DisplayHint::Default,
        suppressed,
        " audit=",
        DisplayHint::Default,
        u8::from(audit),
        " op=",
        DisplayHint::Default,
        op,
        " comm=",
        DisplayHint::LowerHex,
        &comm[..],
    );
    if !written {
        count_drop(DROP_LOG_RING);
    }
    0
}

/// Hands a denial the rate limit kept out of the log to the daemon's
/// summary, without waking it (it drains the ring on a timer).
#[inline(always)]
fn report_flood(uid: u32, port: u16, vm: u32, audit: bool, op: u8) {
    let Some(mut entry) = SPICEGATE_FLOOD.reserve(0) else {
        count_drop(DROP_FLOOD_RING);
        return;
    };
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    entry.write(FloodRecord {
        uid,
        vm,
        port,
        op,
        audit: u8::from(audit),
        _pad: 0,
        comm,
    });
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
