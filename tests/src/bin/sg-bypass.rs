//! sg-bypass: tries to reach a guarded endpoint through every path the
//! kernel routes a connection-oriented connect through, for the security
//! tests (`tests/tests/security.rs`).
//!
//! Longer than 600 lines: one function per way a connect reaches the
//! kernel (`--via` below: blocking, non-blocking, Fast Open, io_uring in
//! four forms), each a few dozen lines of raw syscalls.
//!
//! ```text
//! sg-bypass [--netns PATH] [--cgroup DIR] [--uid N --gid N]
//!           [--move-to-cgroup DIR]... [--lo-up] [--ids]
//!           ( --exec PROG [ARGS...]
//!           | --connect ADDR:PORT [--via MODE] [--v6-socket] [--proto P]
//!             [--type stream|seqpacket] [--af-smc] [--bind ADDR:PORT]
//!             [--first ADDR:PORT|unspec]... )
//! ```
//!
//! Setup, in this order: enter the network namespace (`setns`, needs root),
//! join the cgroup (needs root), drop to the given ids (setgroups([gid]),
//! setresgid, setresuid: the *real* uid is the one under test), try to move
//! into other cgroups as that user (`--move-to-cgroup`, expected to fail),
//! bring `lo` up in the current network namespace (`--lo-up`, for use
//! inside `unshare -Urn`), print the ids (`--ids`) and the cgroup
//! (`cgroup /path`, always). Then either `--exec` the
//! rest of the command line (`unshare`, a setuid copy of this binary) or
//! make one connect.
//!
//! `--via` picks how the connect reaches the kernel:
//! - `connect` (default): blocking connect(2);
//! - `nonblock`: SOCK_NONBLOCK socket, connect returns EINPROGRESS, then
//!   poll(POLLOUT) and SO_ERROR;
//! - `fastopen`: sendto(MSG_FASTOPEN) of one byte, no connect;
//! - `fastopen-connect`: setsockopt(TCP_FASTOPEN_CONNECT), connect (which
//!   may return before any SYN is sent), then write one byte;
//! - `uring`, `uring-async` (IOSQE_ASYNC: from an io-wq worker),
//!   `uring-sqpoll` (IORING_SETUP_SQPOLL: from the SQ poll thread),
//!   `uring-socket` (IORING_OP_SOCKET, then IORING_OP_CONNECT);
//! - `uring-fastopen`: IORING_OP_SENDMSG with a destination and
//!   MSG_FASTOPEN (EINPROGRESS, then poll and SO_ERROR).
//!
//! `--first` makes earlier connects on the same socket (`unspec`: a
//! connect to AF_UNSPEC, which disconnects); `--bind` binds the socket
//! first. `--proto`: `tcp`, `mptcp` (262), `sctp` (132), `smc` (256,
//! IPPROTO_SMC) or a number; `--af-smc` makes an AF_SMC socket instead.
//!
//! Output on stdout, one line per step, flushed at once:
//! `<step> ok`, `<step> err <errno> <NAME>` or `<step> <info>`; the last
//! line of a connect is `result ok` or `result err <errno> <NAME>` (also
//! when socket() or bind() failed: their own step line says so), and a
//! successful one is followed by `peer <address>` (getpeername).
//!
//! Exit codes: 0 result ok, 1 result EPERM, 2 result another errno, 3 usage
//! or setup failure (no `result` line).

use spicegate_testkit::{
    flags::{self, Flags},
    os_errno, privilege,
    sockaddr::{SockAddr, errno, errno_name},
};
use std::{
    ffi::CString,
    fs,
    io::Write as _,
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    process::exit,
    time::Duration,
};

const EXIT_SETUP: i32 = 3;
const IPPROTO_MPTCP: i32 = 262;
const IPPROTO_SMC: i32 = 256;
const AF_SMC: i32 = 43;
const TCP_FASTOPEN_CONNECT: i32 = 30;
/// How long any single connect may take before it is reported as timed out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
enum Target {
    Addr(SocketAddr),
    Unspec,
}

struct Args {
    netns: Option<String>,
    cgroup: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    move_to: Vec<String>,
    lo_up: bool,
    ids: bool,
    exec: Vec<String>,
    connect: Option<SocketAddr>,
    via: String,
    v6_socket: bool,
    proto: i32,
    seqpacket: bool,
    smc_family: bool,
    bind: Option<SocketAddr>,
    first: Vec<Target>,
}

fn usage(msg: &str) -> ! {
    eprintln!("sg-bypass: {msg}");
    eprintln!(
        "usage: sg-bypass [--netns PATH] [--cgroup DIR] [--uid N --gid N] [--move-to-cgroup DIR]... [--lo-up] [--ids] (--exec PROG ARGS... | --connect ADDR:PORT [--via MODE] [--v6-socket] [--proto P] [--type stream|seqpacket] [--af-smc] [--bind ADDR:PORT] [--first ADDR:PORT|unspec]...)"
    );
    exit(EXIT_SETUP)
}

fn setup_failed(err: std::io::Error) -> ! {
    eprintln!("sg-bypass: {err}");
    exit(EXIT_SETUP)
}

/// `err` with `what` in front.
fn context(what: &str, err: std::io::Error) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// What an address flag takes, for the usage message.
const ADDR: &str = "ADDR:PORT (a.b.c.d:port or [v6%scope]:port)";

fn parse_args() -> Args {
    let mut a = Args {
        netns: None,
        cgroup: None,
        uid: None,
        gid: None,
        move_to: Vec::new(),
        lo_up: false,
        ids: false,
        exec: Vec::new(),
        connect: None,
        via: "connect".into(),
        v6_socket: false,
        proto: 0,
        seqpacket: false,
        smc_family: false,
        bind: None,
        first: Vec::new(),
    };
    let mut f = Flags::new(std::env::args().skip(1), usage);
    while let Some(flag) = f.next_flag() {
        match flag.as_str() {
            "--netns" => a.netns = Some(f.value(&flag)),
            "--cgroup" => a.cgroup = Some(f.value(&flag)),
            "--uid" => a.uid = Some(f.parsed(&flag)),
            "--gid" => a.gid = Some(f.parsed(&flag)),
            "--move-to-cgroup" => a.move_to.push(f.value(&flag)),
            "--lo-up" => a.lo_up = true,
            "--ids" => a.ids = true,
            "--connect" => a.connect = Some(f.parsed(&format!("--connect {ADDR}"))),
            "--via" => a.via = f.value(&flag),
            "--v6-socket" => a.v6_socket = true,
            "--proto" => {
                a.proto = match f.value(&flag).as_str() {
                    "tcp" => libc::IPPROTO_TCP,
                    "mptcp" => IPPROTO_MPTCP,
                    "sctp" => libc::IPPROTO_SCTP,
                    "smc" => IPPROTO_SMC,
                    n => n.parse().unwrap_or_else(|_| usage("bad --proto")),
                }
            }
            "--type" => {
                a.seqpacket = match f.value(&flag).as_str() {
                    "stream" => false,
                    "seqpacket" => true,
                    _ => usage("--type is stream or seqpacket"),
                }
            }
            "--af-smc" => a.smc_family = true,
            "--bind" => a.bind = Some(f.parsed(&format!("--bind {ADDR}"))),
            "--first" => {
                let v = f.value(&flag);
                a.first.push(if v == "unspec" {
                    Target::Unspec
                } else {
                    Target::Addr(flags::parse(&v, &format!("--first {ADDR}"), usage))
                });
            }
            "--exec" => {
                a.exec = f.rest();
                if a.exec.is_empty() {
                    usage("--exec needs a program");
                }
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.uid.is_some() != a.gid.is_some() {
        usage("--uid and --gid go together");
    }
    if a.exec.is_empty() == a.connect.is_none() {
        usage("give exactly one of --connect and --exec");
    }
    a
}

fn line(text: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not change what the process does.
    let _ = writeln!(out, "{}", text.as_ref());
    let _ = out.flush();
}

fn step(name: &str, r: Result<(), i32>) {
    match r {
        Ok(()) => line(format!("{name} ok")),
        Err(e) => line(format!("{name} err {e} {}", errno_name(e))),
    }
}

fn rc(v: libc::c_int) -> Result<(), i32> {
    if v < 0 { Err(errno()) } else { Ok(()) }
}

fn enter_netns(path: &str) {
    let f = fs::File::open(path)
        .unwrap_or_else(|e| setup_failed(context(&format!("opening {path}"), e)));
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        setup_failed(context(
            &format!("setns {path}"),
            std::io::Error::last_os_error(),
        ));
    }
}

fn print_ids() {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: valid out-pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    line(format!("ids ruid={r} euid={e} suid={s}"));
}

/// `ip link set lo up` through SIOCSIFFLAGS.
fn lo_up() -> Result<(), i32> {
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is fresh and ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq for these ioctls.
    unsafe {
        rc(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr))?;
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        rc(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr))
    }
}

/// A sockaddr for `t` in `family` (IPv4 becomes IPv4-mapped on AF_INET6).
fn sockaddr(t: Target, family: libc::c_int) -> SockAddr {
    match t {
        Target::Unspec => SockAddr::unspec(),
        Target::Addr(a) => SockAddr::for_family(a, family),
    }
}

fn sys_connect(fd: RawFd, t: Target, family: libc::c_int) -> Result<(), i32> {
    let sa = sockaddr(t, family);
    // SAFETY: the address is valid for its length.
    rc(unsafe { libc::connect(fd, sa.as_ptr(), sa.len()) })
}

fn setopt(fd: RawFd, level: i32, name: i32, value: &[u8]) -> Result<(), i32> {
    // SAFETY: value is valid for its length.
    rc(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
}

fn int_bytes(v: libc::c_int) -> [u8; 4] {
    v.to_ne_bytes()
}

/// The peer (`peer`: true) or the local address of a socket, as text.
fn socket_name(fd: RawFd, peer: bool) -> String {
    match SockAddr::of_socket(fd, peer) {
        Ok(sa) => sa
            .to_socket_addr()
            .map_or_else(|| format!("family {}", sa.family()), |a| a.to_string()),
        Err(_) if !peer => "?".into(),
        Err(_) => {
            let e = errno();
            format!("none (getpeername err {e} {})", errno_name(e))
        }
    }
}

/// Waits until a non-blocking connect ends and returns its SO_ERROR.
fn finish_nonblocking(fd: RawFd) -> Result<(), i32> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, CONNECT_TIMEOUT.as_millis() as libc::c_int) };
    if n < 0 {
        return Err(errno());
    }
    if n == 0 {
        return Err(libc::ETIMEDOUT);
    }
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err is a valid c_int out-parameter.
    rc(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &mut len,
        )
    })?;
    if err != 0 { Err(err) } else { Ok(()) }
}

fn new_socket(family: libc::c_int, ty: libc::c_int, proto: i32) -> Result<OwnedFd, i32> {
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One io_uring connect (and, for `uring-socket`, the socket too).
fn via_uring(
    mode: &str,
    sock: Option<&OwnedFd>,
    target: SocketAddr,
    family: libc::c_int,
    ty: libc::c_int,
    proto: i32,
) -> (Result<(), i32>, Option<OwnedFd>) {
    use io_uring::{IoUring, opcode, squeue, types};
    let ring = if mode == "uring-sqpoll" {
        IoUring::builder().setup_sqpoll(2000).build(8)
    } else {
        IoUring::new(8)
    };
    let mut ring = match ring {
        Ok(r) => {
            step("uring-setup", Ok(()));
            r
        }
        Err(e) => {
            let e = e.raw_os_error().unwrap_or(0);
            step("uring-setup", Err(e));
            return (Err(e), None);
        }
    };
    let mut run = |entry: squeue::Entry| -> Result<i32, i32> {
        // SAFETY: every buffer the entry points at outlives the wait below.
        unsafe {
            ring.submission().push(&entry).map_err(|_| libc::EBUSY)?;
        }
        ring.submit_and_wait(1)
            .map_err(|e| e.raw_os_error().unwrap_or(0))?;
        let cqe = ring.completion().next().ok_or(libc::EIO)?;
        if cqe.result() < 0 {
            Err(-cqe.result())
        } else {
            Ok(cqe.result())
        }
    };
    let mut made = None;
    let fd = match sock {
        Some(s) => s.as_raw_fd(),
        None => {
            let entry = opcode::Socket::new(family, ty | libc::SOCK_CLOEXEC, proto)
                .build()
                .user_data(1);
            match run(entry) {
                Ok(fd) => {
                    step("uring-op-socket", Ok(()));
                    // SAFETY: the kernel just made this fd for us.
                    made = Some(unsafe { OwnedFd::from_raw_fd(fd) });
                    fd
                }
                Err(e) => {
                    step("uring-op-socket", Err(e));
                    return (Err(e), None);
                }
            }
        }
    };
    let mut sa = sockaddr(Target::Addr(target), family);
    if mode == "uring-fastopen" {
        let mut byte = [b'x'];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = sa.as_mut_ptr().cast();
        msg.msg_namelen = sa.len();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        let entry = opcode::SendMsg::new(types::Fd(fd), &raw const msg)
            .flags(libc::MSG_FASTOPEN as u32)
            .build()
            .user_data(3);
        return (run(entry).map(|_| ()), made);
    }
    let mut entry = opcode::Connect::new(types::Fd(fd), sa.as_ptr(), sa.len())
        .build()
        .user_data(2);
    if mode == "uring-async" || mode == "uring-socket" {
        entry = entry.flags(squeue::Flags::ASYNC);
    }
    (run(entry).map(|_| ()), made)
}

fn connect_main(a: &Args, target: SocketAddr) -> Result<(), i32> {
    let family = if a.v6_socket || target.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let ty = if a.seqpacket {
        libc::SOCK_SEQPACKET
    } else {
        libc::SOCK_STREAM
    };
    let nonblock = if a.via == "nonblock" {
        libc::SOCK_NONBLOCK
    } else {
        0
    };
    let mut holder = None;
    // AF_SMC sockets take AF_INET/AF_INET6 addresses; the protocol says
    // which (SMCPROTO_SMC = 0, SMCPROTO_SMC6 = 1).
    let (sock_family, sock_proto) = if a.smc_family {
        (AF_SMC, i32::from(family == libc::AF_INET6))
    } else {
        (family, a.proto)
    };
    if a.via != "uring-socket" {
        match new_socket(sock_family, ty | nonblock, sock_proto) {
            Ok(s) => {
                step("socket", Ok(()));
                holder = Some(s);
            }
            Err(e) => {
                step("socket", Err(e));
                step("result", Err(e));
                return Err(e);
            }
        }
    }
    if let Some(s) = &holder {
        let fd = s.as_raw_fd();
        let tv = libc::timeval {
            tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a timeval viewed as bytes for setsockopt.
        let tv_bytes = unsafe {
            std::slice::from_raw_parts((&raw const tv).cast::<u8>(), size_of::<libc::timeval>())
        };
        let _ = setopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tv_bytes);
        if let Some(b) = a.bind {
            let _ = setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &int_bytes(1));
            let sa = sockaddr(Target::Addr(b), family);
            // SAFETY: the address is valid for its length.
            let r = rc(unsafe { libc::bind(fd, sa.as_ptr(), sa.len()) });
            step("bind", r);
            if let Err(e) = r {
                step("result", Err(e));
                return Err(e);
            }
            line(format!("local {}", socket_name(fd, false)));
        }
        for t in &a.first {
            let r = sys_connect(fd, *t, family);
            let r = match r {
                Err(libc::EINPROGRESS) => finish_nonblocking(fd),
                other => other,
            };
            step("first", r);
        }
    }
    let fd_of = |h: &Option<OwnedFd>| h.as_ref().map_or(-1, |s| s.as_raw_fd());
    let result = match a.via.as_str() {
        "connect" => sys_connect(fd_of(&holder), Target::Addr(target), family),
        "nonblock" => {
            let r = sys_connect(fd_of(&holder), Target::Addr(target), family);
            step("connect", r);
            match r {
                Err(libc::EINPROGRESS) => finish_nonblocking(fd_of(&holder)),
                other => other,
            }
        }
        "fastopen" => {
            let sa = sockaddr(Target::Addr(target), family);
            let byte = [b'x'];
            // SAFETY: buffer and address are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    fd_of(&holder),
                    byte.as_ptr().cast(),
                    1,
                    libc::MSG_FASTOPEN,
                    sa.as_ptr(),
                    sa.len(),
                )
            };
            if n < 0 { Err(errno()) } else { Ok(()) }
        }
        "fastopen-connect" => {
            let fd = fd_of(&holder);
            step(
                "setsockopt-tcp-fastopen-connect",
                setopt(fd, libc::IPPROTO_TCP, TCP_FASTOPEN_CONNECT, &int_bytes(1)),
            );
            let r = sys_connect(fd, Target::Addr(target), family);
            step("connect", r);
            // Whether connect() returned before the handshake (deferred
            // until the first write).
            line(format!("state-after-connect {}", tcp_state(fd)));
            match r {
                Ok(()) => {
                    let byte = [b'x'];
                    // SAFETY: buffer valid for 1 byte.
                    let n = unsafe { libc::send(fd, byte.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
                    let w = if n < 0 { Err(errno()) } else { Ok(()) };
                    step("write", w);
                    w
                }
                e => e,
            }
        }
        m @ ("uring" | "uring-async" | "uring-sqpoll" | "uring-socket" | "uring-fastopen") => {
            let (r, made) = via_uring(m, holder.as_ref(), target, family, ty, a.proto);
            if made.is_some() {
                holder = made;
            }
            // io_uring sends without blocking: a fast-open sendmsg that
            // started the handshake says EINPROGRESS.
            match r {
                Err(libc::EINPROGRESS) => {
                    step("sendmsg", r);
                    finish_nonblocking(fd_of(&holder))
                }
                other => other,
            }
        }
        other => usage(&format!("unknown --via {other}")),
    };
    step("result", result);
    if result.is_ok() {
        let fd = fd_of(&holder);
        line(format!("peer {}", socket_name(fd, true)));
        if a.proto == 0 || a.proto == libc::IPPROTO_TCP {
            line(format!("tcp-state {}", tcp_state(fd)));
        }
    }
    result
}

/// tcpi_state from TCP_INFO (1 = ESTABLISHED, 2 = SYN_SENT, 7 = CLOSE).
fn tcp_state(fd: RawFd) -> String {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: info is valid for len bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        let e = errno();
        return format!("? (TCP_INFO err {e} {})", errno_name(e));
    }
    let name = match info[0] {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        _ => "other",
    };
    format!("{} {name}", info[0])
}

fn exec(argv: &[String]) -> ! {
    let c: Vec<CString> = argv
        .iter()
        .map(|a| {
            CString::new(std::ffi::OsStr::new(a).as_bytes())
                .unwrap_or_else(|_| usage("NUL in --exec argument"))
        })
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = c.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // Unbuffered stdout lines are already flushed; exec replaces us.
    // SAFETY: argv is a NULL-terminated array of valid C strings.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    setup_failed(context(
        &format!("exec {}", argv[0]),
        std::io::Error::last_os_error(),
    ))
}

fn main() {
    let a = parse_args();
    if let Some(ns) = &a.netns {
        enter_netns(ns);
    }
    if let Some(dir) = &a.cgroup
        && let Err(e) = privilege::join_cgroup(dir)
    {
        setup_failed(e);
    }
    if let (Some(uid), Some(gid)) = (a.uid, a.gid)
        && let Err(e) = privilege::drop_to(uid, gid)
    {
        setup_failed(e);
    }
    for dir in &a.move_to {
        let r = privilege::join_cgroup(dir).map_err(|e| os_errno(&e));
        step(&format!("move-to {dir}"), r);
    }
    if let Ok(cg) = fs::read_to_string("/proc/self/cgroup") {
        for l in cg.lines().filter(|l| l.starts_with("0::")) {
            line(format!("cgroup {}", &l[3..]));
        }
    }
    if a.lo_up {
        step("lo-up", lo_up());
    }
    if a.ids {
        print_ids();
    }
    if !a.exec.is_empty() {
        exec(&a.exec);
    }
    let Some(target) = a.connect else {
        usage("--connect is required")
    };
    exit(match connect_main(&a, target) {
        Ok(()) => 0,
        Err(libc::EPERM) => 1,
        Err(_) => 2,
    })
}
