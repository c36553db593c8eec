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

use spicegate_testkit::{
    flags::Flags,
    privilege,
    sockaddr::{SockAddr, errno, errno_name},
};
use std::{
    io::Write as _,
    net::SocketAddr,
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

fn setup_failed(err: std::io::Error) -> ! {
    eprintln!("sg-probe: {err}");
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
    let mut f = Flags::new(std::env::args().skip(1), usage);
    while let Some(flag) = f.next_flag() {
        match flag.as_str() {
            "--cgroup" => cgroup = Some(f.value(&flag)),
            "--uid" => uid = Some(f.parsed(&flag)),
            "--gid" => gid = Some(f.parsed(&flag)),
            "--connect" => connect = Some(f.parsed("--connect ADDR:PORT")),
            "--count" => count = f.parsed(&flag),
            "--interval-ms" => interval = Duration::from_millis(f.parsed(&flag)),
            "--hold" => hold = Some(Duration::from_secs(f.parsed(&flag))),
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

/// One attempt; the connected socket or the errno.
fn attempt(args: &Args) -> Result<OwnedFd, i32> {
    // An IPv6 address, or --v6-socket, makes an AF_INET6 socket.
    let family = if args.v6_socket || args.connect.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let dst = SockAddr::for_family(args.connect, family);
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let (addr, len) = (dst.as_ptr(), dst.len());
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
    if rc < 0 { Err(errno()) } else { Ok(sock) }
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
            _ => match errno() {
                libc::EINTR | libc::EAGAIN => {}
                errno => return format!("closed {errno} {} after {ms}", errno_name(errno)),
            },
        }
    }
}

fn main() {
    let args = parse_args();
    if let Some(dir) = &args.cgroup
        && let Err(e) = privilege::join_cgroup(dir)
    {
        setup_failed(e);
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid)
        && let Err(e) = privilege::drop_to(uid, gid)
    {
        setup_failed(e);
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
