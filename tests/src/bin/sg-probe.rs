//! sg-probe: the process the integration tests run to make connects that
//! spicegate decides.
//!
//! ```text
//! sg-probe [--cgroup DIR] [--uid N --gid N] --connect ADDR:PORT
//!          [--v6-socket] [--fastopen] [--count N] [--interval-ms MS]
//!          [--hold SECS]
//! ```
//!
//! Order of setup matters: the cgroup is joined first (that needs root), then
//! the credentials are dropped (setgroups([gid]), setresgid, setresuid), so
//! the connects are made by a process whose *real* uid is the one under test.
//!
//! `ADDR:PORT` is `a.b.c.d:port` or `[v6]:port`. An IPv6 address (including
//! `::ffff:a.b.c.d`) always uses an AF_INET6 socket; `--v6-socket` also turns
//! an IPv4 address into its mapped form on an AF_INET6 socket.
//! `--fastopen` sends one byte with `sendto(MSG_FASTOPEN)` instead of calling
//! connect(), which reaches the same cgroup hook through another path.
//!
//! Output on stdout: one line per attempt, `ok` or `err <errno> <NAME>`,
//! flushed at once so a reader sees attempts as they happen.
//!
//! `--hold SECS` makes one connect and, when it succeeds, keeps the
//! connection open and blocks reading it, to see whether something (a
//! revocation) ends it: after `ok` it prints `closed eof after <ms>` when
//! the peer closes, `closed <errno> <NAME> after <ms>` when the read fails
//! (ECONNABORTED when the socket is destroyed, ECONNRESET on a reset), or
//! `open after <ms>` when SECS pass with the connection intact. Data the
//! peer sends is read and ignored. The exit code is that of the connect.
//!
//! Exit codes:
//! - 0: every attempt succeeded;
//! - 1: at least one attempt was refused with EPERM (denied) and no attempt
//!   failed otherwise;
//! - 2: at least one attempt failed with another errno (e.g. ECONNREFUSED);
//! - 3: usage error, or the setup (cgroup join, credential change) failed;
//!   no attempt was made.

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::exit,
    time::Duration,
};

const EXIT_OK: i32 = 0;
const EXIT_DENIED: i32 = 1;
const EXIT_OTHER: i32 = 2;
const EXIT_SETUP: i32 = 3;

struct Args {
    cgroup: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    connect: SocketAddr,
    v6_socket: bool,
    fastopen: bool,
    count: u32,
    interval: Duration,
    hold: Option<Duration>,
}

fn usage(msg: &str) -> ! {
    eprintln!("sg-probe: {msg}");
    eprintln!(
        "usage: sg-probe [--cgroup DIR] [--uid N --gid N] --connect ADDR:PORT [--v6-socket] [--fastopen] [--count N] [--interval-ms MS] [--hold SECS]"
    );
    exit(EXIT_SETUP)
}

fn setup_failed(what: &str, err: std::io::Error) -> ! {
    eprintln!("sg-probe: {what}: {err}");
    exit(EXIT_SETUP)
}

fn parse_args() -> Args {
    let mut cgroup = None;
    let mut uid = None;
    let mut gid = None;
    let mut connect = None;
    let mut v6_socket = false;
    let mut fastopen = false;
    let mut count = 1;
    let mut interval = Duration::ZERO;
    let mut hold = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match flag.as_str() {
            "--cgroup" => cgroup = Some(value("--cgroup")),
            "--uid" => {
                uid = Some(
                    value("--uid")
                        .parse()
                        .unwrap_or_else(|_| usage("bad --uid")),
                )
            }
            "--gid" => {
                gid = Some(
                    value("--gid")
                        .parse()
                        .unwrap_or_else(|_| usage("bad --gid")),
                )
            }
            "--connect" => {
                connect = Some(
                    value("--connect")
                        .parse()
                        .unwrap_or_else(|_| usage("bad --connect ADDR:PORT")),
                )
            }
            "--count" => {
                count = value("--count")
                    .parse()
                    .unwrap_or_else(|_| usage("bad --count"))
            }
            "--interval-ms" => {
                interval = Duration::from_millis(
                    value("--interval-ms")
                        .parse()
                        .unwrap_or_else(|_| usage("bad --interval-ms")),
                )
            }
            "--hold" => {
                hold = Some(Duration::from_secs(
                    value("--hold")
                        .parse()
                        .unwrap_or_else(|_| usage("bad --hold")),
                ))
            }
            "--v6-socket" => v6_socket = true,
            "--fastopen" => fastopen = true,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let Some(connect) = connect else {
        usage("--connect is required")
    };
    if uid.is_some() != gid.is_some() {
        usage("--uid and --gid go together");
    }
    if hold.is_some() && (count != 1 || fastopen) {
        usage("--hold makes exactly one plain connect");
    }
    Args {
        cgroup,
        uid,
        gid,
        connect,
        v6_socket,
        fastopen,
        count,
        interval,
        hold,
    }
}

fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn drop_privileges(uid: u32, gid: u32) {
    let groups = [gid as libc::gid_t];
    // SAFETY: plain syscalls with a valid one-element array.
    unsafe {
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            setup_failed("setgroups", last_os_error());
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            setup_failed("setresgid", last_os_error());
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            setup_failed("setresuid", last_os_error());
        }
    }
}

/// A sockaddr for `dst`, and the family of the socket to make.
fn sockaddr(
    dst: SocketAddr,
    v6_socket: bool,
) -> (libc::sockaddr_storage, libc::socklen_t, libc::c_int) {
    let dst = match dst {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        other => other,
    };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match dst {
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
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            (
                ss,
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
                libc::AF_INET,
            )
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
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            (
                ss,
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                libc::AF_INET6,
            )
        }
    }
}

/// One attempt; the connected socket or the errno.
fn attempt(args: &Args) -> Result<OwnedFd, i32> {
    let (ss, len, family) = sockaddr(args.connect, args.v6_socket);
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = (&raw const ss).cast::<libc::sockaddr>();
    let rc = if args.fastopen {
        let byte = [b'x'];
        // SAFETY: buffer and address are valid for the lengths given.
        unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                byte.as_ptr().cast(),
                1,
                libc::MSG_FASTOPEN,
                addr,
                len,
            ) as i32
        }
    } else {
        // SAFETY: address is valid for len bytes.
        unsafe { libc::connect(sock.as_raw_fd(), addr, len) }
    };
    if rc < 0 {
        Err(last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(sock)
    }
}

/// Blocks reading `sock` until the connection ends or `limit` passes, and
/// says which.
fn hold(sock: &OwnedFd, limit: Duration) -> String {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return format!("open after {}", start.elapsed().as_millis());
        }
        let tv = libc::timeval {
            tv_sec: left.as_secs() as libc::time_t,
            tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: valid option value pointer and length.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let ms = start.elapsed().as_millis();
        match n {
            0 => return format!("closed eof after {ms}"),
            n if n > 0 => {}
            _ => match last_os_error().raw_os_error().unwrap_or(0) {
                libc::EINTR | libc::EAGAIN => {}
                errno => return format!("closed {errno} {} after {ms}", errno_name(errno)),
            },
        }
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EINTR => "EINTR",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        _ => "OTHER",
    }
}

fn main() {
    let args = parse_args();
    if let Some(dir) = &args.cgroup {
        let procs = format!("{dir}/cgroup.procs");
        // Own pid, not 0: the line is also a record of who joined.
        if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
            setup_failed(&format!("joining {procs}"), e);
        }
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        drop_privileges(uid, gid);
    }
    let mut out = std::io::stdout().lock();
    let mut denied = false;
    let mut other = false;
    for i in 0..args.count {
        if i > 0 && !args.interval.is_zero() {
            std::thread::sleep(args.interval);
        }
        let mut held = None;
        let line = match attempt(&args) {
            Ok(sock) => {
                held = Some(sock);
                "ok".to_owned()
            }
            Err(errno) => {
                if errno == libc::EPERM {
                    denied = true;
                } else {
                    other = true;
                }
                format!("err {errno} {}", errno_name(errno))
            }
        };
        // A closed stdout must not change the exit code's meaning.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        if let (Some(limit), Some(sock)) = (args.hold, &held) {
            let _ = writeln!(out, "{}", hold(sock, limit));
            let _ = out.flush();
        }
    }
    exit(if other {
        EXIT_OTHER
    } else if denied {
        EXIT_DENIED
    } else {
        EXIT_OK
    })
}
