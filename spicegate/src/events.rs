//! Denied-connect events: the kernel program logs them with aya-log as
//! `deny uid=.. pid=.. dst=.. port=.. vm=.. suppressed=.. comm=..`; this
//! module parses those records, adds the user and VM names, and writes one
//! grep-able line per denial:
//!
//! `DENY uid=1001 user=bob pid=4242 comm=remote-viewer dst=192.168.2.2:20002 vm=debianx suppressed=0`

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, RwLock},
};

use crate::{compile::canonical, directory::Directory};

/// One denial as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyEvent {
    pub uid: u32,
    pub pid: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub vm: u32,
    /// Denials of this uid the kernel did not log before this one.
    pub suppressed: u32,
    /// Audit mode: the connect was let through.
    pub audit: bool,
    pub comm: String,
}

impl DenyEvent {
    /// Parses the kernel's message; `None` for anything else.
    pub fn parse(msg: &str) -> Option<Self> {
        let rest = msg.strip_prefix("deny ")?;
        let mut ev = DenyEvent {
            uid: 0,
            pid: 0,
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port: 0,
            vm: 0,
            suppressed: 0,
            audit: false,
            comm: String::new(),
        };
        let mut seen = 0u8;
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "uid" => ev.uid = v.parse().ok()?,
                "pid" => ev.pid = v.parse().ok()?,
                "dst" => ev.addr = canonical(IpAddr::V6(v.parse().ok()?)),
                "port" => ev.port = v.parse().ok()?,
                "vm" => ev.vm = v.parse().ok()?,
                "suppressed" => ev.suppressed = v.parse().ok()?,
                "audit" => {
                    ev.audit = v == "1";
                    continue;
                }
                "comm" => ev.comm = decode_comm(v),
                _ => continue,
            }
            seen += 1;
        }
        (seen == 7).then_some(ev)
    }
}

/// The kernel sends the 16-byte comm as hex; it ends at the first NUL.
/// Anything unprintable becomes `?` so a process name cannot forge log
/// fields or lines.
fn decode_comm(hex: &str) -> String {
    let bytes: Vec<u8> = hex
        .as_bytes()
        .chunks(2)
        .filter_map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
        })
        .take_while(|b| *b != 0)
        .collect();
    String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Formats a destination as `a.b.c.d:port` or `[v6]:port`.
pub struct Endpoint(pub IpAddr, pub u16);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

/// One denial with names resolved: what `spicegate events --json` streams.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DenyRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub unix: u64,
    pub uid: u32,
    /// Name, or `#UID` without a passwd entry.
    pub user: String,
    pub pid: u32,
    pub comm: String,
    /// Destination address (IPv4-mapped addresses as IPv4).
    pub addr: String,
    pub port: u16,
    /// `a.b.c.d:port` or `[v6]:port`.
    pub dst: String,
    /// The VM the endpoint belongs to; absent for a `[protect]`-only port.
    pub vm: Option<String>,
    /// Denials of this uid the kernel did not log before this one.
    pub suppressed: u32,
    /// Audit mode: the connect would have been refused and was let through.
    #[serde(default)]
    pub audit: bool,
}

impl DenyRecord {
    /// The log line: `DENY uid=.. user=.. pid=.. comm=.. dst=.. vm=.. suppressed=..`
    /// (`AUDIT ...` in audit mode: would be denied, let through).
    pub fn line(&self) -> String {
        format!(
            "{} uid={} user={} pid={} comm={} dst={} vm={} suppressed={}",
            if self.audit { "AUDIT" } else { "DENY" },
            self.uid,
            self.user,
            self.pid,
            self.comm,
            self.dst,
            self.vm.as_deref().unwrap_or("-"),
            self.suppressed
        )
    }
}

/// Receives aya-log records from the kernel, writes DENY lines and
/// publishes them to `spicegate events` subscribers.
pub struct DenySink<D> {
    /// VM names of the policy in force, by id.
    pub vm_names: Arc<RwLock<BTreeMap<u32, String>>>,
    dir: D,
    names: Mutex<HashMap<u32, Option<String>>>,
    events: Option<tokio::sync::broadcast::Sender<DenyRecord>>,
}

impl<D: Directory> DenySink<D> {
    pub fn new(vm_names: Arc<RwLock<BTreeMap<u32, String>>>, dir: D) -> Self {
        Self {
            vm_names,
            dir,
            names: Mutex::new(HashMap::new()),
            events: None,
        }
    }

    /// Also publish every record on `tx`.
    pub fn with_events(mut self, tx: tokio::sync::broadcast::Sender<DenyRecord>) -> Self {
        self.events = Some(tx);
        self
    }

    fn user(&self, uid: u32) -> String {
        let mut cache = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: a flood of distinct uids cannot grow the daemon.
        if cache.len() > 4096 {
            cache.clear();
        }
        let name = cache
            .entry(uid)
            .or_insert_with(|| self.dir.user_name(uid))
            .clone();
        name.unwrap_or_else(|| format!("#{uid}"))
    }

    /// The record of an event, names resolved.
    pub fn record(&self, ev: &DenyEvent) -> DenyRecord {
        let vm = self
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
            user: self.user(ev.uid),
            pid: ev.pid,
            comm: ev.comm.clone(),
            addr: ev.addr.to_string(),
            port: ev.port,
            dst: Endpoint(ev.addr, ev.port).to_string(),
            vm,
            suppressed: ev.suppressed,
            audit: ev.audit,
        }
    }

    /// The line logged for an event.
    #[cfg(test)]
    pub fn render(&self, ev: &DenyEvent) -> String {
        self.record(ev).line()
    }
}

impl<D: Directory + Send + Sync> log::Log for DenySink<D> {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args().to_string();
        match DenyEvent::parse(&msg) {
            Some(ev) => {
                let rec = self.record(&ev);
                log::warn!("{}", rec.line());
                if let Some(tx) = &self.events {
                    // No subscribers is fine; slow ones lag and are told so.
                    let _ = tx.send(rec);
                }
            }
            None => log::info!("kernel: {msg}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::FakeDirectory;

    #[test]
    fn parses_and_renders_a_kernel_record() {
        let msg = "deny uid=1001 pid=4242 dst=::ffff:192.168.2.2 port=20002 vm=1 suppressed=3 comm=72656d6f74652d76696577657200000000";
        let ev = DenyEvent::parse(msg).expect("parses");
        assert_eq!(ev.addr, "192.168.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(ev.comm, "remote-viewer");
        let sink = DenySink::new(
            Arc::new(RwLock::new([(1, "debianx".to_owned())].into())),
            FakeDirectory::default().user("bob", 1001),
        );
        assert_eq!(
            sink.render(&ev),
            "DENY uid=1001 user=bob pid=4242 comm=remote-viewer dst=192.168.2.2:20002 vm=debianx suppressed=3"
        );
    }

    #[test]
    fn unknown_uid_ipv6_and_no_vm() {
        let ev = DenyEvent::parse("deny uid=7 pid=1 dst=::1 port=5 vm=0 suppressed=0 comm=6100")
            .expect("parses");
        let sink = DenySink::new(
            Arc::new(RwLock::new(BTreeMap::new())),
            FakeDirectory::default(),
        );
        assert_eq!(
            sink.render(&ev),
            "DENY uid=7 user=#7 pid=1 comm=a dst=[::1]:5 vm=- suppressed=0"
        );
    }

    #[test]
    fn hostile_comm_cannot_forge_fields() {
        // "a b\nDENY" in hex
        assert_eq!(decode_comm("6120620a44454e59"), "a?b?DENY");
        assert!(DenyEvent::parse("hello").is_none());
        assert!(DenyEvent::parse("deny uid=x").is_none());
    }
}
