//! Denied-connect events: the kernel program logs them with aya-log as
//! `deny uid=.. pid=.. dst=.. port=.. vm=.. suppressed=.. comm=..`; this
//! module parses those records, adds the user and VM names, and writes one
//! grep-able line per denial:
//!
//! `DENY uid=1001 user=bob pid=4242 comm=remote-viewer dst=192.168.2.2:20002 vm=debianx suppressed=0`

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use crate::compile::canonical;

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
    /// A refused bind (a guarded local port), not a connect.
    pub bind: bool,
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
            bind: false,
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
                "op" => {
                    ev.bind = v == "1";
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

/// A kernel `comm` (NUL-padded bytes) as printable text, like
/// [`decode_comm`].
pub fn comm_name(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end])
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
    /// `connect`, or `bind` for a refused bind of a guarded local port.
    #[serde(default = "connect_op")]
    pub op: String,
}

fn connect_op() -> String {
    "connect".to_owned()
}

impl DenyRecord {
    /// The log line: `DENY uid=.. user=.. pid=.. comm=.. dst=.. vm=.. suppressed=.. op=..`
    /// (`AUDIT ...` in audit mode: would be denied, let through; `op=bind`
    /// for a bind, where `dst` is the address bound).
    pub fn line(&self) -> String {
        format!(
            "{} uid={} user={} pid={} comm={} dst={} vm={} suppressed={} op={}",
            if self.audit { "AUDIT" } else { "DENY" },
            self.uid,
            self.user,
            self.pid,
            self.comm,
            self.dst,
            self.vm.as_deref().unwrap_or("-"),
            self.suppressed,
            self.op
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ev: &DenyEvent, user: &str, vm: Option<&str>) -> String {
        DenyRecord {
            time: String::new(),
            unix: 0,
            uid: ev.uid,
            user: user.to_owned(),
            pid: ev.pid,
            comm: ev.comm.clone(),
            addr: ev.addr.to_string(),
            port: ev.port,
            dst: Endpoint(ev.addr, ev.port).to_string(),
            vm: vm.map(str::to_owned),
            suppressed: ev.suppressed,
            audit: ev.audit,
            op: if ev.bind { "bind" } else { "connect" }.to_owned(),
        }
        .line()
    }

    #[test]
    fn parses_and_renders_a_kernel_record() {
        let msg = "deny uid=1001 pid=4242 dst=::ffff:192.168.2.2 port=20002 vm=1 suppressed=3 comm=72656d6f74652d76696577657200000000";
        let ev = DenyEvent::parse(msg).expect("parses");
        assert_eq!(ev.addr, "192.168.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(ev.comm, "remote-viewer");
        assert_eq!(
            record(&ev, "bob", Some("debianx")),
            "DENY uid=1001 user=bob pid=4242 comm=remote-viewer dst=192.168.2.2:20002 vm=debianx suppressed=3 op=connect"
        );
    }

    #[test]
    fn unknown_uid_ipv6_and_no_vm() {
        let ev = DenyEvent::parse("deny uid=7 pid=1 dst=::1 port=5 vm=0 suppressed=0 comm=6100")
            .expect("parses");
        assert_eq!(
            record(&ev, "#7", None),
            "DENY uid=7 user=#7 pid=1 comm=a dst=[::1]:5 vm=- suppressed=0 op=connect"
        );
    }

    #[test]
    fn hostile_comm_cannot_forge_fields() {
        // "a b\nDENY" in hex
        assert_eq!(decode_comm("6120620a44454e59"), "a?b?DENY");
        assert_eq!(comm_name(b"a b\nDENY\0\0\0\0\0\0\0\0"), "a?b?DENY");
        assert!(DenyEvent::parse("hello").is_none());
        assert!(DenyEvent::parse("deny uid=x").is_none());
    }
}
