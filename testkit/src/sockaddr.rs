//! Socket addresses for raw syscalls (connect, bind, sendto, io_uring),
//! and errno names for the helpers' output lines.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::RawFd,
};

/// A `sockaddr_in`, `sockaddr_in6` or `AF_UNSPEC` address in a
/// `sockaddr_storage`, with its length.
#[derive(Clone, Copy)]
pub struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    /// `addr` in its own family.
    pub fn new(addr: SocketAddr) -> Self {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        Self {
            storage,
            len: len as libc::socklen_t,
        }
    }

    /// `addr` for a socket of `family`: an IPv4 address becomes its
    /// IPv4-mapped form (`::ffff:a.b.c.d`) on an AF_INET6 socket.
    pub fn for_family(addr: SocketAddr, family: libc::c_int) -> Self {
        match addr {
            SocketAddr::V4(a) if family == libc::AF_INET6 => Self::new(SocketAddr::V6(
                SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
            )),
            other => Self::new(other),
        }
    }

    /// An `AF_UNSPEC` address (a connect to it disconnects), as long as a
    /// sockaddr_in6.
    pub fn unspec() -> Self {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        storage.ss_family = libc::AF_UNSPEC as libc::sa_family_t;
        Self {
            storage,
            len: size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        }
    }

    /// The address a socket is bound to (`peer`: false) or connected to
    /// (`peer`: true): getsockname / getpeername.
    pub fn of_socket(fd: RawFd, peer: bool) -> io::Result<Self> {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let out = (&raw mut storage).cast();
        // SAFETY: storage is valid for len bytes.
        let rc = unsafe {
            if peer {
                libc::getpeername(fd, out, &mut len)
            } else {
                libc::getsockname(fd, out, &mut len)
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { storage, len })
    }

    /// AF_INET, AF_INET6 or AF_UNSPEC (or what getsockname said).
    pub fn family(&self) -> libc::c_int {
        libc::c_int::from(self.storage.ss_family)
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        (&raw const self.storage).cast()
    }

    /// For structures that want a mutable pointer (msghdr's `msg_name`).
    pub fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        (&raw mut self.storage).cast()
    }

    pub fn len(&self) -> libc::socklen_t {
        self.len
    }

    /// Never: a family always has a length. (For clippy's `len` rule.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Back to a `SocketAddr` (IPv6 with its scope id); `None` for another
    /// family.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        match self.family() {
            libc::AF_INET => {
                // SAFETY: the family says sockaddr_in.
                let sin = unsafe { &*(&raw const self.storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::new(
                    IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                ))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says sockaddr_in6.
                let sin6 = unsafe { &*(&raw const self.storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    0,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// The errno's symbolic name for the helpers' `err <errno> <NAME>` lines
/// (`OTHER` for one the tests never meet).
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOENT => "ENOENT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EPROTOTYPE => "EPROTOTYPE",
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EALREADY => "EALREADY",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::EINTR => "EINTR",
        libc::EAGAIN => "EAGAIN",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        libc::EBADF => "EBADF",
        libc::ENOSYS => "ENOSYS",
        _ => "OTHER",
    }
}

/// The errno of the last failed call in this thread.
pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::SockAddr;

    #[test]
    fn round_trips() {
        for a in ["127.0.0.1:5930", "[::1]:20001", "[fe80::1%2]:7"] {
            let addr = a.parse().expect("an address");
            assert_eq!(SockAddr::new(addr).to_socket_addr(), Some(addr));
        }
        let mapped = SockAddr::for_family("10.1.2.3:9".parse().expect("v4"), libc::AF_INET6);
        assert_eq!(mapped.family(), libc::AF_INET6);
        assert_eq!(
            mapped.to_socket_addr().map(|a| a.to_string()),
            Some("[::ffff:10.1.2.3]:9".to_owned())
        );
        assert_eq!(SockAddr::unspec().family(), libc::AF_UNSPEC);
    }
}
