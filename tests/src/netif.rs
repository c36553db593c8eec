//! This machine's interface addresses, as the tests see them (from
//! getifaddrs, not from the daemon's own reader).

use std::net::{IpAddr, Ipv6Addr};

/// Every IPv4 and IPv6 address of every interface, with the interface's
/// index.
fn all_addrs() -> Vec<(IpAddr, u32)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family says which struct it is.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: the family is AF_INET.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: the family is AF_INET6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        // SAFETY: ifa_name is the interface's NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        out.push((ip, index));
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// This machine's non-loopback, non-link-local interface addresses.
pub fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (ip, _) in all_addrs() {
        if !ip.is_loopback() && !ip.is_unspecified() && !is_link_local(ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// This machine's IPv6 link-local addresses with their interface index
/// (`fe80::...%IFINDEX`), which [`interface_addrs`] leaves out.
pub fn link_local_addrs() -> Vec<(Ipv6Addr, u32)> {
    let mut out = Vec::new();
    for (ip, index) in all_addrs() {
        if let IpAddr::V6(v6) = ip
            && is_link_local(ip)
            && index != 0
            && !out.contains(&(v6, index))
        {
            out.push((v6, index));
        }
    }
    out
}
