//! What reaches this machine's own listeners: the addresses of its
//! interfaces, and every destination a `local` route covers. The kernel
//! delivers a connect locally when its route lookup ends on a route of type
//! `local`; besides the interface addresses (which the kernel adds to the
//! `local` table itself) an admin can add whole networks (AnyIP: `ip route
//! add local 198.18.0.0/24 dev lo`), and every address in them then reaches
//! the same listeners as 127.0.0.1.
//!
//! Routes are read with one rtnetlink dump per family (RTM_GETROUTE), raw
//! through libc with the framing in netlink.rs: one request and two fields
//! of the answer do not need a netlink crate.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    compile::LocalAddrs,
    netlink::{self, HEADER_LEN, NLM_F_DUMP, NLM_F_REQUEST, read_answer, send, u16_at},
};

/// Interface addresses and `local` routes of this network namespace, now.
pub fn current() -> anyhow::Result<LocalAddrs> {
    let mut set = LocalAddrs::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            set.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            set.insert(IpAddr::V6(v6.ip()));
        }
    }
    for (ip, len) in local_routes()? {
        set.insert_net(ip, len);
    }
    Ok(set)
}

const NETLINK_ROUTE: i32 = 0;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
/// `struct rtmsg`.
const RTMSG_LEN: usize = 12;

/// (destination, prefix length) of every route of type `local`, in every
/// routing table, IPv4 and IPv6.
pub fn local_routes() -> io::Result<Vec<(IpAddr, u8)>> {
    let fd = netlink::socket(NETLINK_ROUTE)?;
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut req = netlink::message(
            HEADER_LEN + RTMSG_LEN,
            RTM_GETROUTE,
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        let mut rtm = [0u8; RTMSG_LEN];
        rtm[0] = family;
        req.extend_from_slice(&rtm);
        send(&fd, &req)?;
        read_answer(&fd, |kind, payload| {
            if kind == RTM_NEWROUTE {
                out.extend(parse_route(payload));
            }
        })?;
    }
    Ok(out)
}

/// A `local` route's (destination, prefix length), from one RTM_NEWROUTE
/// payload (`struct rtmsg` and its attributes).
fn parse_route(m: &[u8]) -> Option<(IpAddr, u8)> {
    if m.len() < RTMSG_LEN || m[7] != RTN_LOCAL {
        return None;
    }
    let (family, dst_len) = (m[0], m[1]);
    let mut dst = None;
    let mut at = RTMSG_LEN;
    while at + 4 <= m.len() {
        let alen = usize::from(u16_at(m, at));
        let atype = u16_at(m, at + 2);
        if alen < 4 || at + alen > m.len() {
            break;
        }
        let v = &m[at + 4..at + alen];
        if atype == RTA_DST {
            dst = match (i32::from(family), v.len()) {
                (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
                (libc::AF_INET6, 16) => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(v);
                    Some(IpAddr::V6(Ipv6Addr::from(a)))
                }
                _ => None,
            };
        }
        at += (alen + 3) & !3;
    }
    // No RTA_DST: the default route (prefix length 0).
    let dst = dst.or(match i32::from(family) {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    })?;
    Some((dst, dst_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed() {
        let set = current().expect("getifaddrs and route dump");
        assert!(set.iter().any(|a| a.is_loopback()), "{set:?}");
        let routes = local_routes().expect("route dump");
        assert!(
            routes
                .iter()
                .any(|(ip, _)| *ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
                    || *ip == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0))),
            "the local table always routes 127.0.0.0/8 locally: {routes:?}"
        );
    }

    fn route(family: u8, kind: u8, dst_len: u8, dst: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; RTMSG_LEN];
        m[0] = family;
        m[1] = dst_len;
        m[4] = 255; // table local
        m[7] = kind;
        let alen = 4 + dst.len();
        m.extend_from_slice(&(alen as u16).to_ne_bytes());
        m.extend_from_slice(&RTA_DST.to_ne_bytes());
        m.extend_from_slice(dst);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
        m
    }

    #[test]
    fn parses_local_routes_and_skips_others() {
        assert_eq!(
            parse_route(&route(libc::AF_INET as u8, RTN_LOCAL, 24, &[198, 18, 7, 0])),
            Some((IpAddr::V4(Ipv4Addr::new(198, 18, 7, 0)), 24))
        );
        let v6: [u8; 16] = "2001:db8::".parse::<Ipv6Addr>().expect("v6").octets();
        assert_eq!(
            parse_route(&route(libc::AF_INET6 as u8, RTN_LOCAL, 64, &v6)),
            Some((IpAddr::V6(Ipv6Addr::from(v6)), 64))
        );
        // RTN_UNICAST (1), RTN_BROADCAST (3): not local.
        assert_eq!(
            parse_route(&route(libc::AF_INET as u8, 1, 24, &[10, 0, 0, 0])),
            None
        );
        assert_eq!(
            parse_route(&route(libc::AF_INET as u8, 3, 32, &[10, 0, 0, 255])),
            None
        );
    }
}
