//! This machine's addresses, and how the kernel program folds a
//! destination into "this machine" (one endpoint per port).

use std::{collections::BTreeSet, net::IpAddr};

use spicegate_common::{LOCAL_ADDR, mapped_v4, mask_addr};

use super::Dest;

/// What reaches this machine's own listeners: its interface addresses, and
/// the networks its `local` routes cover (AnyIP: `ip route add local
/// 198.18.0.0/24 dev lo`). Loopback and unspecified addresses are always
/// local and need not be listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    addrs: BTreeSet<IpAddr>,
    /// (network address, prefix length in its own family), shorter than a
    /// single address.
    nets: BTreeSet<(IpAddr, u8)>,
}

impl LocalAddrs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, ip: IpAddr) -> bool {
        self.addrs.insert(canonical(ip))
    }

    /// A local route's destination; a full-length one is an address.
    pub fn insert_net(&mut self, ip: IpAddr, len: u8) {
        let ip = canonical(ip);
        let full = if ip.is_ipv4() { 32 } else { 128 };
        if ip.is_loopback() {
            // 127.0.0.0/8 and ::1: the program folds them without a table.
        } else if len >= full {
            self.addrs.insert(ip);
        } else {
            let masked = match ip {
                IpAddr::V4(v4) => IpAddr::V4(
                    (u32::from(v4) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)).into(),
                ),
                IpAddr::V6(v6) => IpAddr::V6(
                    (u128::from(v6) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0))
                        .into(),
                ),
            };
            self.nets.insert((masked, len));
        }
    }

    /// The single addresses.
    pub fn iter(&self) -> impl Iterator<Item = &IpAddr> {
        self.addrs.iter()
    }

    /// The networks, as (address, prefix length in IPv6 terms).
    pub fn nets_v6(&self) -> impl Iterator<Item = ([u8; 16], u16)> + '_ {
        self.nets.iter().map(|(ip, len)| {
            let len = u16::from(*len) + if ip.is_ipv4() { 96 } else { 0 };
            (mask_addr(key_addr(*ip), len), len)
        })
    }

    /// Whether `ip` is one of the addresses or in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.addrs.contains(&ip) || {
            let key = key_addr(ip);
            self.nets_v6().any(|(net, len)| mask_addr(key, len) == net)
        }
    }
}

impl<const N: usize> From<[IpAddr; N]> for LocalAddrs {
    fn from(ips: [IpAddr; N]) -> Self {
        let mut l = Self::new();
        for ip in ips {
            l.insert(ip);
        }
        l
    }
}

/// The 16-byte form the kernel compares: IPv4 mapped into IPv6.
pub fn key_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a connect to `ip` lands on this machine.
pub fn is_local(ip: IpAddr, local: &LocalAddrs) -> bool {
    let ip = canonical(ip);
    ip.is_loopback() || ip.is_unspecified() || local.contains(ip)
}

/// Folds a destination the way the kernel program does.
pub fn fold(ip: IpAddr, local: &LocalAddrs) -> Dest {
    if is_local(ip, local) {
        Dest::Local
    } else {
        Dest::Remote(canonical(ip))
    }
}

pub fn dest_key(d: Dest) -> [u8; 16] {
    match d {
        Dest::Local => LOCAL_ADDR,
        Dest::Remote(ip) => key_addr(ip),
    }
}
