//! The netlink framing sock_diag (sockdiag.rs) and rtnetlink (hostaddrs.rs)
//! share: a socket with a receive timeout, the message header, and one
//! reader of dumps and acknowledgements, so both handle `NLMSG_ERROR`,
//! `NLMSG_DONE` and a truncated message the same way.
//!
//! Raw through libc: a few fixed structs and attributes, less code than
//! wiring a netlink crate's generic message types for two requests.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
pub const HEADER_LEN: usize = 16;

/// A netlink socket of `protocol` that gives up on a silent kernel after
/// 2 s instead of blocking its thread for good.
pub fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid option value pointer and length.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

/// Starts a message of `len` bytes in all (header included): the header,
/// addressed to the kernel. The caller appends the payload.
pub fn message(len: usize, kind: u16, flags: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m
}

pub fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zeroed means "the kernel".
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and addr are valid for the lengths given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The error code of an `NLMSG_ERROR` payload (0: an acknowledgement).
fn error_code(payload: &[u8]) -> io::Result<i32> {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| io::Error::other("truncated netlink error message"))
}

/// Reads the answer to a request until `NLMSG_DONE` (a dump) or an
/// acknowledgement, calling `each(kind, payload)` for every other message.
/// An `NLMSG_ERROR` with a code is returned as that errno; a message cut
/// short is an error, never a silent end.
pub fn read_answer(fd: &OwnedFd, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd, &mut buf)?;
        if n == 0 {
            return Err(io::Error::other(
                "netlink socket closed before the answer ended",
            ));
        }
        let mut at = 0;
        while at + HEADER_LEN <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < HEADER_LEN || at + len > n {
                return Err(io::Error::other("truncated netlink message"));
            }
            let payload = &buf[at + HEADER_LEN..at + len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    return match error_code(payload)? {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
                _ => each(kind, payload),
            }
            at += (len + 3) & !3;
        }
    }
}

pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_starts_with_its_header() {
        let m = message(HEADER_LEN + 4, 20, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(m.len(), HEADER_LEN);
        assert_eq!(u32_at(&m, 0), 20);
        assert_eq!(u16_at(&m, 4), 20);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_DUMP);
    }

    #[test]
    fn error_codes() {
        assert_eq!(error_code(&0i32.to_ne_bytes()).ok(), Some(0));
        assert_eq!(error_code(&(-2i32).to_ne_bytes()).ok(), Some(-2));
        assert!(error_code(&[0, 0]).is_err());
    }
}
