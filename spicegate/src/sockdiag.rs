//! Closing established connections when access ends, with the kernel's
//! socket-destroy facility (sock_diag `SOCK_DESTROY`, as `ss -K` uses).
//!
//! Raw netlink through libc (the framing in netlink.rs): two fixed structs
//! and one attribute.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

use crate::netlink::{
    self, HEADER_LEN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, read_answer, send, u16_at, u32_at,
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Response attribute: the socket's storage in the requested BPF maps.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
/// Request attribute: which socket-storage maps to report.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const IPPROTO_TCP: u8 = 6;

/// TCP states worth closing: everything but LISTEN, TIME_WAIT and CLOSE.
const STATES: u32 = !((1 << 10) | (1 << 6) | (1 << 7)) & 0xfff;

/// One TCP socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub family: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// The socket's owner (`sk_uid`: the fsuid that created it).
    pub uid: u32,
    pub cgroup_id: Option<u64>,
    /// The mark the connect hook left on the socket (the VM id), when the
    /// dump asked for the marks map: `Some` only for sockets whose connect
    /// to a guarded endpoint the program let through.
    pub marked: Option<u32>,
    /// The socket's cookie (unique for the boot), the key of its fast mark.
    pub cookie: u64,
    /// The socket's inode; 0 for sockets no process holds any more
    /// (orphans closing down, time-wait entries, reported with uid 0).
    pub inode: u32,
    /// Raw `inet_diag_sockid`, echoed back to destroy exactly this socket.
    id: [u8; 48],
}

fn request(kind: u16, flags: u16, family: u8, id: &[u8; 48]) -> Vec<u8> {
    request_with(kind, flags, family, id, None)
}

/// A request, with the socket-storage map to report when `marks` is given.
fn request_with(kind: u16, flags: u16, family: u8, id: &[u8; 48], marks: Option<i32>) -> Vec<u8> {
    let len = HEADER_LEN + 56 + if marks.is_some() { 12 } else { 0 };
    let mut m = netlink::message(len, kind, flags);
    m.push(family);
    m.push(IPPROTO_TCP);
    m.push(0); // idiag_ext
    m.push(0);
    m.extend_from_slice(&STATES.to_ne_bytes());
    m.extend_from_slice(id);
    if let Some(fd) = marks {
        m.extend_from_slice(&12u16.to_ne_bytes());
        m.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        m.extend_from_slice(&(fd as u32).to_ne_bytes());
    }
    m
}

fn addr(family: u8, raw: &[u8]) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&raw[..16]);
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

/// Every TCP socket of this network namespace that is not listening or
/// closed, IPv4 and IPv6; with `marks` (the fd of the connect hook's
/// socket-storage map), each socket's mark too.
pub fn tcp_sockets(marks: Option<std::os::fd::BorrowedFd<'_>>) -> io::Result<Vec<TcpSocket>> {
    let marks = marks.map(|f| f.as_raw_fd());
    let fd = netlink::socket(NETLINK_SOCK_DIAG)?;
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        send(
            &fd,
            &request_with(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                family,
                &[0; 48],
                marks,
            ),
        )?;
        read_answer(&fd, |kind, payload| {
            if kind == SOCK_DIAG_BY_FAMILY && payload.len() >= 72 {
                out.push(parse_msg(payload));
            }
        })?;
    }
    Ok(out)
}

fn parse_msg(m: &[u8]) -> TcpSocket {
    let family = m[0];
    let mut id = [0u8; 48];
    id.copy_from_slice(&m[4..52]);
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let src = addr(family, &m[8..24]);
    let dst = addr(family, &m[24..40]);
    let uid = u32_at(m, 64);
    let inode = u32_at(m, 68);
    // idiag_cookie: two u32s, the low half first.
    let cookie = u64::from(u32_at(m, 44)) | (u64::from(u32_at(m, 48)) << 32);
    // Attributes after the 72-byte inet_diag_msg.
    let mut cgroup_id = None;
    let mut marked = None;
    let mut at = 72;
    while at + 4 <= m.len() {
        let alen = usize::from(u16_at(m, at));
        let atype = u16_at(m, at + 2);
        if alen < 4 || at + alen > m.len() {
            break;
        }
        if atype == INET_DIAG_CGROUP_ID && alen >= 12 {
            let mut v = [0u8; 8];
            v.copy_from_slice(&m[at + 4..at + 12]);
            cgroup_id = Some(u64::from_ne_bytes(v));
        }
        if atype & NLA_TYPE_MASK == INET_DIAG_SK_BPF_STORAGES {
            marked = Some(storage_value(&m[at + 4..at + alen]).unwrap_or(0));
        }
        at += (alen + 3) & !3;
    }
    TcpSocket {
        family,
        src,
        sport,
        dst,
        dport,
        uid,
        cgroup_id,
        marked,
        cookie,
        inode,
        id,
    }
}

/// The first `u32` map value inside an INET_DIAG_SK_BPF_STORAGES nest
/// (SK_DIAG_BPF_STORAGE, itself nested, holding MAP_ID and MAP_VALUE).
fn storage_value(nest: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 4 <= nest.len() {
        let alen = usize::from(u16_at(nest, at));
        let atype = u16_at(nest, at + 2) & NLA_TYPE_MASK;
        if alen < 4 || at + alen > nest.len() {
            return None;
        }
        if atype == SK_DIAG_BPF_STORAGE_MAP_VALUE && alen >= 8 {
            return Some(u32_at(nest, at + 4));
        }
        // SK_DIAG_BPF_STORAGE (1) nests the id and the value.
        if atype == 1
            && let Some(v) = storage_value(&nest[at + 4..at + alen])
        {
            return Some(v);
        }
        at += (alen + 3) & !3;
    }
    None
}

/// Closes one socket: both ends see the connection reset.
pub fn destroy(sock: &TcpSocket) -> io::Result<()> {
    let fd = netlink::socket(NETLINK_SOCK_DIAG)?;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            sock.family,
            &sock.id,
        ),
    )?;
    match read_answer(&fd, |_, _| {}) {
        // ENOENT: it closed by itself in the meantime.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Inode numbers (= cgroup ids) of a cgroup directory and all below it.
pub fn cgroup_ids(root: &std::path::Path) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = std::collections::BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(meta) = std::fs::metadata(&dir) {
            ids.insert(meta.ino());
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            libc::AF_INET as u8,
            &[7; 48],
        );
        assert_eq!(m.len(), 72);
        assert_eq!(u32_at(&m, 0), 72);
        assert_eq!(u16_at(&m, 4), SOCK_DESTROY);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], IPPROTO_TCP);
        assert_eq!(&m[24..72], &[7; 48]);
    }

    #[test]
    fn parses_a_message() {
        let mut m = vec![0u8; 72 + 12];
        m[0] = libc::AF_INET as u8;
        m[4..6].copy_from_slice(&40000u16.to_be_bytes());
        m[6..8].copy_from_slice(&5930u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[24..28].copy_from_slice(&[127, 0, 0, 2]);
        m[64..68].copy_from_slice(&1001u32.to_ne_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        m[72..74].copy_from_slice(&12u16.to_ne_bytes());
        m[74..76].copy_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        m[76..84].copy_from_slice(&99u64.to_ne_bytes());
        let s = parse_msg(&m);
        assert_eq!(
            (s.sport, s.dport, s.uid, s.inode, s.cgroup_id),
            (40000, 5930, 1001, 4242, Some(99))
        );
        assert_eq!(s.dst, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    }
}
