//! sg-bench: the processes `cargo xtask bench` measures with. Built in
//! release next to spicegate, so the measuring loops are optimised whatever
//! profile xtask itself runs in.
//!
//! ```text
//! sg-bench worker --cgroup DIR [--cpu N] --uid N --gid N
//! sg-bench listen --cgroup DIR [--cpu N] ADDR:PORT...
//! ```
//!
//! `--cpu N` pins the process to one CPU. The benchmark puts the worker
//! and the listener on different CPUs: left to the scheduler, a loopback
//! connect costs either ~25 or ~35 µs depending on where the two land,
//! and that bimodal noise would swamp a 2% difference.
//!
//! `worker` joins the cgroup first (that needs root), then drops to the uid
//! and gid for good (setgroups, setresgid, setresuid), so everything it does
//! afterwards is done by a process whose *real* uid is the one under test,
//! inside the cgroup spicegate may be attached to. It then answers commands,
//! one line each on stdin, with one line on stdout:
//!
//! - `connect ADDR:PORT MS`: socket + SO_LINGER 0 + connect + close in a tight
//!   loop for MS milliseconds (at least once). Answer:
//!   `done COUNT ELAPSED_NS OKS FAILS LAST_ERRNO MEDIAN_NS` (MEDIAN_NS: the
//!   median of the attempts timed one by one). SO_LINGER 0 makes close
//!   send a RST instead of leaving a TIME_WAIT socket, so the loop never runs
//!   out of ephemeral ports.
//! - `stream ADDR:PORT MS`: one connection; writes 128 KiB chunks for MS
//!   milliseconds, shuts down its side and waits for the peer's close, so
//!   every byte counted was received. Answer: `done BYTES ELAPSED_NS` or
//!   `err ERRNO`.
//! - `probe ADDR:PORT`: one connect. Answer: `ok` or `err ERRNO`.
//! - `quit` (or end of input): exit.
//!
//! `listen` binds every ADDR:PORT (backlog 4096: the accept queue must
//! never overflow, a dropped SYN would stall a connect for a second) and,
//! per port, accepts connections one after the other and reads each until
//! EOF or error. It runs until killed.

use spicegate_testkit::{
    flags::{self, Flags},
    privilege,
    sockaddr::{SockAddr, errno},
};
use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::exit,
    time::{Duration, Instant},
};

fn fail(msg: &str) -> ! {
    eprintln!("sg-bench: {msg}");
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        fail(
            "usage: sg-bench worker --cgroup DIR --uid N --gid N | listen --cgroup DIR ADDR:PORT...",
        )
    };
    let mut cgroup = None;
    let mut uid = None;
    let mut gid = None;
    let mut cpu = None;
    let mut addrs = Vec::new();
    let mut f = Flags::new(rest.iter().cloned(), fail);
    while let Some(a) = f.next_flag() {
        match a.as_str() {
            "--cgroup" => cgroup = Some(f.value(&a)),
            "--uid" => uid = Some(f.parsed::<u32>(&a)),
            "--gid" => gid = Some(f.parsed::<u32>(&a)),
            "--cpu" => cpu = Some(f.parsed::<u32>(&a)),
            other => addrs.push(v4(other)),
        }
    }
    if let Some(dir) = &cgroup
        && let Err(e) = privilege::join_cgroup(dir)
    {
        fail(&e.to_string());
    }
    if let Some(cpu) = cpu {
        pin_to(cpu);
    }
    match mode.as_str() {
        "worker" => {
            let (Some(uid), Some(gid)) = (uid, gid) else {
                fail("worker needs --uid and --gid")
            };
            if let Err(e) = privilege::drop_to(uid, gid) {
                fail(&format!("dropping to uid {uid} gid {gid}: {e}"));
            }
            serve();
        }
        "listen" => listen(&addrs),
        other => fail(&format!("unknown mode {other}")),
    }
}

fn v4(s: &str) -> SocketAddrV4 {
    match s.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) => a,
        _ => fail(&format!("not an IPv4 ADDR:PORT: {s}")),
    }
}

fn pin_to(cpu: u32) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
    // get a valid set of the size given.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if !ok {
        fail(&format!(
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn sockaddr(a: SocketAddrV4) -> SockAddr {
    SockAddr::new(a.into())
}

fn tcp_socket() -> Result<OwnedFd, i32> {
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_opt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) {
    // SAFETY: value points to a live T of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
}

fn connect(fd: &OwnedFd, sa: &SockAddr) -> Result<(), i32> {
    // SAFETY: sa is valid for its length.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), sa.as_ptr(), sa.len()) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// One connect + close, the unit the connect benchmark counts.
#[inline(always)]
fn connect_once(sa: &SockAddr) -> Result<(), i32> {
    let fd = tcp_socket()?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    connect(&fd, sa)
}

fn serve() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["connect", addr, ms] => connect_loop(v4(addr), millis(ms)),
            ["stream", addr, ms] => stream(v4(addr), millis(ms)),
            ["probe", addr] => match connect_once(&sockaddr(v4(addr))) {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("err {e}"),
            },
            ["quit"] => break,
            _ => fail(&format!("unknown command: {line}")),
        };
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
}

fn millis(s: &str) -> Duration {
    Duration::from_millis(flags::parse(s, "MS", fail))
}

fn connect_loop(addr: SocketAddrV4, length: Duration) -> String {
    let sa = sockaddr(addr);
    let (mut count, mut oks, mut fails, mut last_errno) = (0u64, 0u64, 0u64, 0);
    // Each connect + close is timed on its own too: the median of those is
    // immune to the odd preemption or interrupt landing in a batch, which
    // the batch's total time is not.
    let mut each: Vec<u32> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let mut before = start;
    loop {
        match connect_once(&sa) {
            Ok(()) => oks += 1,
            Err(e) => {
                fails += 1;
                last_errno = e;
            }
        }
        count += 1;
        // The clock is read through the vDSO: tens of nanoseconds against
        // the tens of microseconds of a loopback connect.
        let after = Instant::now();
        each.push(u32::try_from((after - before).as_nanos()).unwrap_or(u32::MAX));
        before = after;
        if after - start >= length {
            break;
        }
    }
    let elapsed = (before - start).as_nanos();
    each.sort_unstable();
    let median = each[each.len() / 2];
    format!("done {count} {elapsed} {oks} {fails} {last_errno} {median}")
}

fn stream(addr: SocketAddrV4, length: Duration) -> String {
    let fd = match tcp_socket() {
        Ok(fd) => fd,
        Err(e) => return format!("err {e}"),
    };
    let start = Instant::now();
    if let Err(e) = connect(&fd, &sockaddr(addr)) {
        return format!("err {e}");
    }
    let chunk = vec![0x5a_u8; 128 * 1024];
    let mut bytes = 0u64;
    while start.elapsed() < length {
        // SAFETY: chunk is valid for its length.
        let n = unsafe { libc::write(fd.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
        if n < 0 {
            return format!("err {}", errno());
        }
        bytes += n as u64;
    }
    // Counted bytes are received bytes: wait for the reader's close.
    // SAFETY: plain syscalls on our own socket and buffer.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR);
        let mut b = [0u8; 64];
        while libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) > 0 {}
    }
    format!("done {bytes} {}", start.elapsed().as_nanos())
}

fn listen(addrs: &[SocketAddrV4]) {
    if addrs.is_empty() {
        fail("listen needs at least one ADDR:PORT");
    }
    let mut threads = Vec::new();
    for &a in addrs {
        let fd = tcp_socket().unwrap_or_else(|e| fail(&format!("socket: errno {e}")));
        let one: libc::c_int = 1;
        set_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one);
        let sa = sockaddr(a);
        // SAFETY: sa is valid for its length.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), sa.as_ptr(), sa.len()) };
        // SAFETY: listen on our own bound socket.
        if rc != 0 || unsafe { libc::listen(fd.as_raw_fd(), 4096) } != 0 {
            fail(&format!(
                "listening on {a}: {}",
                std::io::Error::last_os_error()
            ));
        }
        threads.push(std::thread::spawn(move || serve_port(&fd)));
    }
    // Tell the parent every port listens.
    println!("listening");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}

fn serve_port(listener: &OwnedFd) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        // SAFETY: accept without an address buffer.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: c is a fresh socket nobody else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        // A connect benchmark's connection was reset already: read fails at
        // once. A stream is read to its end.
        // SAFETY: buf is valid for its length.
        while unsafe { libc::read(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}
