//! Listening sockets the probes connect to. Each accepts and drops
//! connections on its own thread until it is dropped.

use spicegate_testkit::sockaddr::SockAddr;
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    fd: libc::c_int,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Reads what already arrived (the data of a Fast Open SYN) before closing:
/// closing with unread data sends a RST, which can reach the client before
/// its connect returns and turn a granted connect into ECONNRESET.
fn close_gently(conn: std::net::TcpStream) {
    use std::io::Read as _;
    let mut conn = conn;
    if conn.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl Listener {
    /// Listens on `addr` (port 0: the kernel picks a free ephemeral port,
    /// which is what keeps the tests' guarded ports unique and high).
    /// An IPv6 unspecified address (`[::]`) is explicitly dual-stack, so
    /// IPv4 and IPv4-mapped destinations reach it too.
    pub fn bind(addr: &str) -> Self {
        Self::start(addr, false)
    }

    /// IPv4 loopback listener with a fresh port that keeps every accepted
    /// connection open until it is dropped, so a client can hold an
    /// established connection (to see whether a revocation ends it).
    pub fn loopback_keeping_connections() -> Self {
        Self::start("127.0.0.1:0", true)
    }

    fn start(addr: &str, keep: bool) -> Self {
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("listener address {addr}: {e}"));
        let listener = make_listener(addr).unwrap_or_else(|e| panic!("listening on {addr}: {e}"));
        let addr = listener.local_addr().expect("local address of a listener");
        let fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("accept {addr}"))
            .spawn(move || {
                let mut kept = Vec::new();
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) if keep => kept.push(conn),
                        Ok((conn, _)) => close_gently(conn),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
            .expect("spawning an accept thread");
        Self {
            addr,
            fd,
            stop,
            thread: Some(thread),
        }
    }

    /// Dual-stack listener on `[::]` with a fresh port.
    pub fn dual_stack() -> Self {
        Self::bind("[::]:0")
    }

    /// IPv4 loopback listener with a fresh port.
    pub fn loopback() -> Self {
        Self::bind("127.0.0.1:0")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn make_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let setopt = |level, name, value: libc::c_int| {
        // SAFETY: value is a valid c_int for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    setopt(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        setopt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    let sa = SockAddr::new(addr);
    // SAFETY: the address is valid for its length.
    if unsafe { libc::bind(sock.as_raw_fd(), sa.as_ptr(), sa.len()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain syscall.
    if unsafe { libc::listen(sock.as_raw_fd(), 128) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpListener::from(sock))
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() on a listening socket wakes a blocked accept() on Linux.
        // Waking it with a connect instead would itself be decided by
        // spicegate when a test attaches to the real cgroup root.
        // SAFETY: the fd stays open until the thread (its owner) ends.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("[harness] accept thread of {} panicked", self.addr);
        }
    }
}
