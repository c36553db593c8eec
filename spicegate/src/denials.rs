//! The path of denied connects from the kernel to the log, bounded at every
//! step so that a flood (thousands of uids from a user namespace) costs a
//! fixed amount of log, memory and CPU, and never reaches the engine:
//!
//! 1. The kernel logs a denial with aya-log within its uid's budget (own
//!    slot for uids below 65,536 and for the uids the policy names, one
//!    shared slot for everyone else). Denials over budget go to the flood
//!    ring as typed records; whatever no ring can take is counted per CPU.
//! 2. The reader thread only moves records: aya-log records are parsed
//!    into [`DenyEvent`]s and queued (bounded; a full queue is counted),
//!    flood records are tallied.
//! 3. The writer thread looks names up (cache that a flood cannot churn),
//!    writes at most [`LINE_BUDGET`] DENY lines a second, and once a second
//!    a `SUPPRESSED` line that says what was left out: how many denials,
//!    from how many uids, which uid range, which programs.
//!
//! `spicegate events` subscribers get the logged denials and, once a
//! second, `{"skipped": N}` for those left out.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use spicegate_common::FloodRecord;

use crate::{
    directory::Directory,
    events::{DenyEvent, DenyRecord, Endpoint},
    journal::Event,
    kernel::KernelDrops,
    tally::{Tally, comm_bytes},
};

/// DENY lines written per second at most; the rest go into the summary.
/// With the summary line, a flood writes at most 41 lines a second.
pub const LINE_BUDGET: u64 = 40;
/// Records queued between the reader and the writer.
pub const QUEUE: usize = 1024;
/// How often the reader drains the flood ring (its records wake nobody).
const FLOOD_POLL: Duration = Duration::from_millis(100);
/// Names of uids at or above 65,536 kept (cleared when full); uids below
/// have their own cache, bounded by their range, so a flood of high uids
/// cannot push a real account's name out.
const HIGH_NAME_CACHE: usize = 1024;

/// What `spicegate events` streams: a logged denial, or a note that some
/// were left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamItem {
    Deny(DenyRecord),
    Skipped { skipped: u64 },
}

/// Counts of the daemon's side of the path, since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records the reader could not queue (the writer was behind).
    pub queue_full: AtomicU64,
    /// Denials that reached the writer over its line budget.
    pub over_budget: AtomicU64,
    /// DENY and AUDIT lines written.
    pub lines: AtomicU64,
    /// SUPPRESSED lines written.
    pub summaries: AtomicU64,
}

/// The `drops` object of `status`: every denial not logged, by reason.
/// Fields in alphabetical order, the order `status --json` prints them in
/// (see control/status.rs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    /// The kernel's flood ring was full (summaries count fewer uids).
    pub flood_ring_full: u64,
    /// The kernel's DENY ring was full.
    pub log_ring_full: u64,
    /// DENY lines written.
    pub logged: u64,
    /// Over the daemon's line budget (summarized).
    pub over_budget: u64,
    /// The daemon's queue was full.
    pub queue_full: u64,
    /// Kept out of the log by the kernel's rate limit (summarized).
    pub rate_limited: u64,
    /// SUPPRESSED summary lines written.
    pub summaries: u64,
}

impl DropCounts {
    pub fn new(kernel: KernelDrops, stats: &Stats) -> Self {
        Self {
            rate_limited: kernel.rate_limited,
            log_ring_full: kernel.log_ring_full,
            flood_ring_full: kernel.flood_ring_full,
            queue_full: stats.queue_full.load(Ordering::Relaxed),
            over_budget: stats.over_budget.load(Ordering::Relaxed),
            logged: stats.lines.load(Ordering::Relaxed),
            summaries: stats.summaries.load(Ordering::Relaxed),
        }
    }

    /// Denials that never got a line of their own.
    pub fn unlogged(&self) -> u64 {
        self.rate_limited
            .saturating_add(self.log_ring_full)
            .saturating_add(self.queue_full)
            .saturating_add(self.over_budget)
    }
}

/// What the reader hands the writer.
pub enum Item {
    Deny(DenyEvent),
    /// A kernel message that is not a denial (logged as `kernel: ...`).
    Other(String),
}

/// aya-log's sink on the reader thread: parses and queues, nothing else.
pub struct QueueSink {
    tx: SyncSender<Item>,
    stats: Arc<Stats>,
}

impl log::Log for QueueSink {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args().to_string();
        let item = match DenyEvent::parse(&msg) {
            Some(ev) => Item::Deny(ev),
            None => Item::Other(msg),
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(item) {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// Reads kernel drop counters for the writer's summaries.
pub type DropsSource = Box<dyn Fn() -> Option<KernelDrops> + Send>;

/// The running pipeline: stop it with [`Pipeline::stop`] (drains first).
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What the writer needs.
pub struct WriterConfig<D> {
    pub vm_names: Arc<RwLock<BTreeMap<u32, String>>>,
    pub dir: D,
    pub events: tokio::sync::broadcast::Sender<StreamItem>,
    pub drops: DropsSource,
}

impl Pipeline {
    /// Starts the reader on `logger` (aya-log's ring) and `flood` (the
    /// flood ring), and the writer.
    pub fn start<D: Directory + Clone + Send + 'static>(
        logger_fd: RawFd,
        mut flush_logger: impl FnMut() + Send + 'static,
        mut flood: aya::maps::RingBuf<aya::maps::MapData>,
        rx: Receiver<Item>,
        stats: Arc<Stats>,
        cfg: WriterConfig<D>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let reader = {
            let stop = Arc::clone(&stop);
            let tally = Arc::clone(&tally);
            std::thread::Builder::new()
                .name("sg-events-rd".into())
                .spawn(move || {
                    let flood_fd = flood.as_raw_fd();
                    loop {
                        let stopping = stop.load(Ordering::Relaxed);
                        wait_readable(&[logger_fd, flood_fd], FLOOD_POLL);
                        // aya-log panics on a record it cannot decode; a bad
                        // record must cost one log line, not the daemon.
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut flush_logger))
                            .is_err()
                        {
                            log::error!(
                                "a kernel event record could not be decoded and was skipped"
                            );
                        }
                        let mut t = tally
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        while let Some(item) = flood.next() {
                            if let Some(rec) = flood_record(&item) {
                                t.add(rec.uid, &rec.comm);
                            }
                        }
                        drop(t);
                        if stopping {
                            break;
                        }
                    }
                })?
        };
        let writer = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("sg-events-wr".into())
                .spawn(move || Writer::new(cfg, stats, tally).run(&rx, &stop))?
        };
        Ok(Self {
            stop,
            reader: Some(reader),
            writer: Some(writer),
        })
    }

    /// Drains what is queued and stops both threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The sink for aya-log and the writer's queue.
pub fn queue(stats: &Arc<Stats>) -> (QueueSink, Receiver<Item>) {
    let (tx, rx) = sync_channel(QUEUE);
    (
        QueueSink {
            tx,
            stats: Arc::clone(stats),
        },
        rx,
    )
}

fn flood_record(bytes: &[u8]) -> Option<FloodRecord> {
    if bytes.len() < size_of::<FloodRecord>() {
        return None;
    }
    // SAFETY: FloodRecord is repr(C) plain integers; read_unaligned copes
    // with any alignment of the ring's bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FloodRecord>()) })
}

/// Waits until one of `fds` is readable or `timeout` passes.
fn wait_readable(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length.
    unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            i32::try_from(timeout.as_millis()).unwrap_or(100),
        );
    }
}

/// Names of uids, cached so that a flood cannot churn real accounts out.
struct Names<D> {
    dir: D,
    low: HashMap<u32, Option<String>>,
    high: HashMap<u32, Option<String>>,
}

impl<D: Directory> Names<D> {
    fn get(&mut self, uid: u32) -> String {
        let cache = if uid < spicegate_common::RATE_LOW_UIDS {
            &mut self.low
        } else {
            if self.high.len() >= HIGH_NAME_CACHE {
                self.high.clear();
            }
            &mut self.high
        };
        cache
            .entry(uid)
            .or_insert_with(|| self.dir.user_name(uid))
            .clone()
            .unwrap_or_else(|| format!("#{uid}"))
    }
}

struct Writer<D> {
    cfg: WriterConfig<D>,
    names: Names<D>,
    stats: Arc<Stats>,
    tally: Arc<Mutex<Tally>>,
    /// Denials over the line budget this second.
    over: Tally,
    /// An empty tally, swapped with the reader's each second.
    spare: Tally,
    lines_this_second: u64,
    last_drops: KernelDrops,
    last_queue_full: u64,
}

impl<D: Directory + Clone> Writer<D> {
    fn new(cfg: WriterConfig<D>, stats: Arc<Stats>, tally: Arc<Mutex<Tally>>) -> Self {
        let last_drops = (cfg.drops)().unwrap_or_default();
        Self {
            names: Names {
                dir: cfg.dir.clone(),
                low: HashMap::new(),
                high: HashMap::new(),
            },
            cfg,
            stats,
            tally,
            over: Tally::default(),
            spare: Tally::default(),
            lines_this_second: 0,
            last_drops,
            last_queue_full: 0,
        }
    }
}

impl<D: Directory> Writer<D> {
    fn run(mut self, rx: &Receiver<Item>, stop: &AtomicBool) {
        let mut next_second = Instant::now() + Duration::from_secs(1);
        loop {
            let wait = next_second.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(item) => self.item(item),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.second();
                    return;
                }
            }
            if Instant::now() >= next_second {
                self.second();
                next_second = Instant::now() + Duration::from_secs(1);
                if stop.load(Ordering::Relaxed) && rx.try_recv().is_err() {
                    return;
                }
            }
        }
    }

    fn item(&mut self, item: Item) {
        let ev = match item {
            Item::Deny(ev) => ev,
            Item::Other(msg) => {
                if self.lines_this_second < LINE_BUDGET {
                    self.lines_this_second += 1;
                    log::info!("kernel: {msg}");
                }
                return;
            }
        };
        if self.lines_this_second >= LINE_BUDGET {
            self.stats.over_budget.fetch_add(1, Ordering::Relaxed);
            self.over.add(ev.uid, &comm_bytes(&ev.comm));
            return;
        }
        self.lines_this_second += 1;
        let rec = self.record(&ev);
        log::warn!(
            SPICEGATE_EVENT = if rec.audit { Event::Audit } else { Event::Deny },
            SPICEGATE_UID = rec.uid,
            SPICEGATE_USER = rec.user.as_str(),
            SPICEGATE_PID = rec.pid,
            SPICEGATE_COMM = rec.comm.as_str(),
            SPICEGATE_DST = rec.dst.as_str(),
            SPICEGATE_VM = rec.vm.as_deref(),
            SPICEGATE_OP = rec.op.as_str();
            "{}",
            rec.line()
        );
        self.stats.lines.fetch_add(1, Ordering::Relaxed);
        // No subscribers is fine; slow ones lag and are told so.
        let _ = self.cfg.events.send(StreamItem::Deny(rec));
    }

    fn record(&mut self, ev: &DenyEvent) -> DenyRecord {
        let vm = self
            .cfg
            .vm_names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ev.vm)
            .cloned();
        let unix = crate::grants::now_unix();
        DenyRecord {
            time: crate::grants::rfc3339(unix),
            unix,
            uid: ev.uid,
            user: self.names.get(ev.uid),
            pid: ev.pid,
            comm: ev.comm.clone(),
            addr: ev.addr.to_string(),
            port: ev.port,
            dst: Endpoint(ev.addr, ev.port).to_string(),
            vm,
            suppressed: ev.suppressed,
            audit: ev.audit,
            op: if ev.bind { "bind" } else { "connect" }.to_owned(),
        }
    }

    /// Once a second: the summary of what was left out, if anything.
    fn second(&mut self) {
        self.lines_this_second = 0;
        let now = (self.cfg.drops)().unwrap_or(self.last_drops);
        let k = now.since(self.last_drops);
        self.last_drops = now;
        let queue_full = self.stats.queue_full.load(Ordering::Relaxed);
        let q = queue_full.saturating_sub(self.last_queue_full);
        self.last_queue_full = queue_full;
        // Swap the reader's tally for this second's empty one, so the
        // reader waits on the lock only for a pointer swap.
        std::mem::swap(
            &mut *self
                .tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            &mut self.spare,
        );
        let mut tally = std::mem::take(&mut self.spare);
        let over_n = self.over.denials;
        tally.merge(&self.over);
        self.over.clear();
        // How many: the kernel's and the daemon's own counts of the second.
        // Who: the flood records tallied (read every 100 ms, so a few may
        // land in the next second's line).
        let left_out = k
            .rate_limited
            .saturating_add(k.log_ring_full)
            .saturating_add(q)
            .saturating_add(over_n);
        if left_out == 0 {
            tally.clear();
            self.spare = tally;
            return;
        }
        log::warn!(
            SPICEGATE_EVENT = Event::Suppressed,
            SPICEGATE_DENIALS = left_out;
            "SUPPRESSED denials={left_out} {} rate_limited={} log_ring_full={} flood_ring_full={} queue_full={q} over_budget={over_n}: denials left out of the log in the last second",
            tally.describe(),
            k.rate_limited,
            k.log_ring_full,
            k.flood_ring_full,
        );
        self.stats.summaries.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .cfg
            .events
            .send(StreamItem::Skipped { skipped: left_out });
        tally.clear();
        self.spare = tally;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_items_serialize_as_documented() {
        assert_eq!(
            serde_json::to_string(&StreamItem::Skipped { skipped: 3 }).expect("json"),
            r#"{"skipped":3}"#
        );
    }
}
