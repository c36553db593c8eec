//! journald's native protocol: when stderr is the journal, each log record
//! is sent as one datagram to journald's socket, with `MESSAGE`,
//! `PRIORITY`, `SYSLOG_IDENTIFIER` and the record's key-values as fields
//! (`SPICEGATE_EVENT`, `SPICEGATE_UID`, ...), and a fixed `MESSAGE_ID` for
//! each [`Event`]. See docs/deploying.md, "Events in the journal".
//!
//! Sending never waits: the socket is non-blocking, and a datagram journald
//! cannot take now (its queue is full: `EAGAIN`; too large: `EMSGSIZE`; no
//! journald) is written to stderr as the usual line instead, without its
//! fields; the first time, a line says so.

use std::{
    io,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use log::kv::{self, Key, ToValue, Value, VisitSource, VisitValue};

/// journald's socket for the native protocol.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// The kinds of events that carry `SPICEGATE_EVENT` and a `MESSAGE_ID`.
/// Pass one as the `SPICEGATE_EVENT` key-value of a log call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A refused connect or bind (`DENY` line).
    Deny,
    /// Audit mode: a connect that would be refused, let through (`AUDIT`).
    Audit,
    /// The once-a-second summary of denials left out (`SUPPRESSED`).
    Suppressed,
    /// A revoked user's connection closed (`CLOSED`).
    Closed,
    /// The watchdog found pins, the table or the attachment changed by
    /// someone else, or restored them (`TAMPERING`).
    Tampering,
    /// A policy reload applied (`reloaded policy ...`).
    Reload,
    /// A policy reload refused (`reload refused ...`).
    ReloadRefused,
}

impl Event {
    pub const ALL: [Event; 7] = [
        Event::Deny,
        Event::Audit,
        Event::Suppressed,
        Event::Closed,
        Event::Tampering,
        Event::Reload,
        Event::ReloadRefused,
    ];

    /// The value of `SPICEGATE_EVENT`.
    pub const fn name(self) -> &'static str {
        match self {
            Event::Deny => "deny",
            Event::Audit => "audit",
            Event::Suppressed => "suppressed",
            Event::Closed => "closed",
            Event::Tampering => "tampering",
            Event::Reload => "reload",
            Event::ReloadRefused => "reload_refused",
        }
    }

    /// The `MESSAGE_ID` (generated once; never change one).
    pub const fn message_id(self) -> &'static str {
        match self {
            Event::Deny => "e34aa00902a24776b817569755f2e74d",
            Event::Audit => "800f480cebf8482b803897447b516790",
            Event::Suppressed => "f43242bdea10410b97e50e1b073361d3",
            Event::Closed => "a32add28ed324b4f9662ee0030e0111b",
            Event::Tampering => "50c98276a0b44eeea1403cd3c952bbdb",
            Event::Reload => "b136a710917c4a088f500b963f5f92e1",
            Event::ReloadRefused => "1d48a8693e2a41d691c9d8f1fe89269a",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl ToValue for Event {
    fn to_value(&self) -> Value<'_> {
        Value::from(self.name())
    }
}

/// Whether stderr is the journal, as systemd tells it: `JOURNAL_STREAM` is
/// `DEV:INODE` of stderr (a child whose stderr was redirected inherits the
/// variable, but not the match).
pub fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr())
        .is_ok_and(|st| stream_matches(&var.to_string_lossy(), st.st_dev, st.st_ino))
}

fn stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    var.split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// Appends one field: `NAME=value\n`, or, when the value holds a newline,
/// `NAME\n`, its length as 64-bit little endian, the value, `\n`.
pub fn put_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A key as a journal field name: uppercase letters, digits and `_`, not
/// starting with `_` or a digit, at most 64 characters; `None` otherwise.
fn field_name(key: &str) -> Option<String> {
    let name = key.to_ascii_uppercase();
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c == '_' || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    ok.then_some(name)
}

/// The datagram for one record.
pub fn encode(record: &log::Record<'_>, priority: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    put_field(&mut out, "PRIORITY", priority.to_string().as_bytes());
    put_field(&mut out, "SYSLOG_IDENTIFIER", b"spicegate");
    put_field(&mut out, "MESSAGE", record.args().to_string().as_bytes());
    let mut fields = Fields {
        out: &mut out,
        event: None,
    };
    let _ = record.key_values().visit(&mut fields);
    if let Some(ev) = fields.event {
        put_field(&mut out, "MESSAGE_ID", ev.message_id().as_bytes());
    }
    out
}

struct Fields<'a> {
    out: &'a mut Vec<u8>,
    event: Option<Event>,
}

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let Some(name) = field_name(key.as_str()) else {
            return Ok(());
        };
        let mut text = Text(None);
        value.visit(&mut text)?;
        let Some(text) = text.0 else {
            return Ok(()); // None: the field does not apply
        };
        if name == "SPICEGATE_EVENT" {
            self.event = Event::from_name(&text);
        }
        if name != "MESSAGE_ID" && name != "PRIORITY" && name != "MESSAGE" {
            put_field(self.out, &name, text.as_bytes());
        }
        Ok(())
    }
}

/// A value as text; `None` for a null (an `Option` that is `None`).
struct Text(Option<String>);

impl<'v> VisitValue<'v> for Text {
    fn visit_any(&mut self, value: Value<'_>) -> Result<(), kv::Error> {
        self.0 = Some(value.to_string());
        Ok(())
    }

    fn visit_null(&mut self) -> Result<(), kv::Error> {
        self.0 = None;
        Ok(())
    }
}

/// A non-blocking client of journald's socket.
pub struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
    warned: AtomicBool,
}

impl Journal {
    /// Opens a client of journald's socket at `path`, checked with an empty
    /// datagram (which journald ignores).
    pub fn open(path: &Path) -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        // What MSG_DONTWAIT would do on every send: never wait for journald.
        socket.set_nonblocking(true)?;
        socket.send_to(&[], path)?;
        Ok(Self {
            socket,
            path: path.to_owned(),
            warned: AtomicBool::new(false),
        })
    }

    /// Sends one datagram, or fails at once.
    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        self.socket.send_to(payload, &self.path).map(|_| ())
    }

    /// True the first time only: the caller says that messages now go to
    /// stderr without their fields.
    pub fn first_fallback(&self) -> bool {
        !self.warned.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_plain_and_binary() {
        let mut out = Vec::new();
        put_field(&mut out, "MESSAGE", b"hello");
        assert_eq!(out, b"MESSAGE=hello\n");
        out.clear();
        put_field(&mut out, "MESSAGE", b"a\nb");
        assert_eq!(out, b"MESSAGE\n\x03\0\0\0\0\0\0\0a\nb\n");
    }

    #[test]
    fn field_names() {
        assert_eq!(
            field_name("spicegate_uid").as_deref(),
            Some("SPICEGATE_UID")
        );
        assert_eq!(field_name("SPICEGATE_VM").as_deref(), Some("SPICEGATE_VM"));
        assert_eq!(field_name("_PID"), None); // trusted fields are journald's
        assert_eq!(field_name("1X"), None);
        assert_eq!(field_name("a-b"), None);
        assert_eq!(field_name(""), None);
        assert_eq!(field_name(&"A".repeat(65)), None);
    }

    #[test]
    fn detection_matches_dev_and_inode() {
        assert!(stream_matches("8:1234", 8, 1234));
        assert!(!stream_matches("8:1234", 8, 1235));
        assert!(!stream_matches("9:1234", 8, 1234));
        assert!(!stream_matches("", 8, 1234));
        assert!(!stream_matches("8", 8, 1234));
        assert!(!stream_matches("x:y", 8, 1234));
    }

    fn encoded(event: Event, vm: Option<&str>) -> Vec<u8> {
        encode(
            &log::Record::builder()
                .args(format_args!("DENY uid=1002 user=sg-no"))
                .level(log::Level::Warn)
                .key_values(&[
                    ("SPICEGATE_EVENT", event.to_value()),
                    ("SPICEGATE_UID", 1002u32.to_value()),
                    ("SPICEGATE_VM", vm.to_value()),
                    ("SPICEGATE_COMM", "a\nb".to_value()),
                    ("MESSAGE_ID", "forged".to_value()),
                ])
                .build(),
            4,
        )
    }

    #[test]
    fn a_deny_record() {
        let mut want = b"PRIORITY=4\nSYSLOG_IDENTIFIER=spicegate\nMESSAGE=DENY uid=1002 user=sg-no\nSPICEGATE_EVENT=deny\nSPICEGATE_UID=1002\nSPICEGATE_VM=boottest\nSPICEGATE_COMM\n\x03\0\0\0\0\0\0\0a\nb\n".to_vec();
        want.extend_from_slice(b"MESSAGE_ID=e34aa00902a24776b817569755f2e74d\n");
        assert_eq!(encoded(Event::Deny, Some("boottest")), want);
        // A field that does not apply is left out.
        let none = encoded(Event::Deny, None);
        assert!(!none.windows(12).any(|w| w == b"SPICEGATE_VM"));
    }

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let mut ids: Vec<_> = Event::ALL.iter().map(|e| e.message_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), Event::ALL.len());
        for e in Event::ALL {
            assert_eq!(Event::from_name(e.name()), Some(e));
        }
    }

    #[test]
    fn documented_and_tested() {
        let docs = include_str!("../../docs/deploying.md");
        for e in Event::ALL {
            assert!(
                docs.contains(e.message_id()),
                "{e:?}: MESSAGE_ID not in docs"
            );
            assert!(
                docs.contains(&format!("`{}`", e.name())),
                "{e:?} not in docs"
            );
        }
        let scenario = include_str!("../../tests/nspawn/service-scenario.sh");
        for e in [Event::Deny, Event::Reload] {
            assert!(
                scenario.contains(e.message_id()),
                "{e:?}: MESSAGE_ID not in the boot test"
            );
        }
    }

    #[test]
    fn sends_datagrams_and_never_waits() {
        let dir = std::env::temp_dir().join(format!("sg-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("socket");
        let server = UnixDatagram::bind(&path).expect("bind");
        let j = Journal::open(&path).expect("open");
        let mut buf = [0u8; 64];
        assert_eq!(server.recv(&mut buf).expect("empty probe"), 0);
        j.send(b"MESSAGE=x\n").expect("send");
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"MESSAGE=x\n");
        // Nobody reads: the queue fills and a send fails at once.
        let start = std::time::Instant::now();
        let err = (0..100_000)
            .find_map(|_| j.send(&[b'x'; 1024]).err())
            .expect("the queue fills");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert!(j.first_fallback());
        assert!(!j.first_fallback());
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
