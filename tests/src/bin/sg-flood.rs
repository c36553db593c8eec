//! sg-flood: a deny flood as an ordinary user with a subordinate uid range
//! can make it, for the flood test and the bench.
//!
//! ```text
//! sg-flood [--cgroup DIR] --connect 127.0.0.1:PORT --uid-base N --uids N
//!          [--secs S] [--procs P]
//! ```
//!
//! Joins the cgroup, then starts P processes (default 2, one per CPU). Each
//! cycles through the uids `uid-base .. uid-base + uids` with
//! `setresuid(uid, 0, 0)` (the real uid, which the kernel program decides
//! by, changes; the effective uid stays 0 so the next switch is allowed)
//! and makes one TCP connect to ADDR:PORT from each, until S seconds
//! (default 30) have passed. IPv4 loopback only.
//!
//! Prints one JSON line at the end: `{"attempts":N,"denied":N,"other":N,
//! "allowed":N,"uids":N}` summed over the processes. Exit 0, or 3 on a setup
//! error.

use spicegate_testkit::{
    flags::Flags,
    privilege,
    sockaddr::{SockAddr, errno},
};
use std::{
    fs,
    io::Read as _,
    net::SocketAddrV4,
    os::fd::FromRawFd as _,
    process::exit,
    time::{Duration, Instant},
};

struct Args {
    cgroup: Option<String>,
    connect: SocketAddrV4,
    uid_base: u32,
    uids: u32,
    secs: u64,
    procs: u32,
}

fn usage(why: &str) -> ! {
    eprintln!("sg-flood: {why}");
    eprintln!(
        "usage: sg-flood [--cgroup DIR] --connect A.B.C.D:PORT --uid-base N --uids N [--secs S] [--procs P]"
    );
    exit(3)
}

fn parse() -> Args {
    let mut a = Args {
        cgroup: None,
        connect: SocketAddrV4::new([127, 0, 0, 1].into(), 0),
        uid_base: 0,
        uids: 0,
        secs: 30,
        procs: 2,
    };
    let mut f = Flags::new(std::env::args().skip(1), usage);
    while let Some(flag) = f.next_flag() {
        match flag.as_str() {
            "--cgroup" => a.cgroup = Some(f.value(&flag)),
            "--connect" => a.connect = f.parsed(&flag),
            "--uid-base" => a.uid_base = f.parsed(&flag),
            "--uids" => a.uids = f.parsed(&flag),
            "--secs" => a.secs = f.parsed(&flag),
            "--procs" => a.procs = f.parsed(&flag),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.uids == 0 || a.connect.port() == 0 {
        usage("--connect and --uids are required");
    }
    a
}

/// Counts of one process.
#[derive(Default)]
struct Counts {
    attempts: u64,
    denied: u64,
    allowed: u64,
    other: u64,
}

fn one_connect(sa: &SockAddr) -> Result<(), i32> {
    // SAFETY: plain socket/connect/close on a fresh descriptor; the address
    // is valid for its length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let rc = libc::connect(fd, sa.as_ptr(), sa.len());
        let err = errno();
        libc::close(fd);
        if rc == 0 { Ok(()) } else { Err(err) }
    }
}

fn flood(a: &Args, start_offset: u32, stride: u32, deadline: Instant) -> Counts {
    let sa = SockAddr::new(a.connect.into());
    let mut c = Counts::default();
    let mut i = start_offset;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let uid = a.uid_base + (i % a.uids);
            i = i.wrapping_add(stride);
            if let Err(e) = privilege::switch_real_uid(uid) {
                eprintln!("sg-flood: {e}");
                exit(3);
            }
            c.attempts += 1;
            match one_connect(&sa) {
                Ok(()) => c.allowed += 1,
                Err(libc::EPERM) => c.denied += 1,
                Err(_) => c.other += 1,
            }
        }
    }
    c
}

fn main() {
    let a = parse();
    if let Some(cg) = &a.cgroup
        && let Err(e) = privilege::join_cgroup(cg)
    {
        eprintln!("sg-flood: {e}");
        exit(3);
    }
    let deadline = Instant::now() + Duration::from_secs(a.secs);
    let mut pipes = Vec::new();
    for p in 0..a.procs {
        let mut fds = [0i32; 2];
        // SAFETY: pipe/fork in a single-threaded process; the child only
        // runs the loop and writes its counts.
        unsafe {
            if libc::pipe(fds.as_mut_ptr()) != 0 {
                eprintln!("sg-flood: pipe failed");
                exit(3);
            }
            let pid = libc::fork();
            if pid < 0 {
                eprintln!("sg-flood: fork failed");
                exit(3);
            }
            if pid == 0 {
                libc::close(fds[0]);
                let c = flood(&a, p, a.procs, deadline);
                let line = format!("{} {} {} {}", c.attempts, c.denied, c.allowed, c.other);
                libc::write(fds[1], line.as_ptr().cast(), line.len());
                libc::_exit(0);
            }
            libc::close(fds[1]);
            pipes.push((pid, fds[0]));
        }
    }
    let mut total = Counts::default();
    for (pid, fd) in pipes {
        let mut text = String::new();
        // SAFETY: fd is the read end this process owns.
        let mut f = unsafe { fs::File::from_raw_fd(fd) };
        let _ = f.read_to_string(&mut text);
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let n: Vec<u64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [att, den, all, oth] = n[..] {
            total.attempts += att;
            total.denied += den;
            total.allowed += all;
            total.other += oth;
        }
    }
    println!(
        "{{\"attempts\":{},\"denied\":{},\"allowed\":{},\"other\":{},\"uids\":{}}}",
        total.attempts,
        total.denied,
        total.allowed,
        total.other,
        a.uids
            .min(u32::try_from(total.attempts).unwrap_or(u32::MAX))
    );
}
