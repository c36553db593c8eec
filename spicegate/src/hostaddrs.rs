//! The addresses of this machine, which all reach its own listeners.

use std::net::IpAddr;

use crate::compile::LocalAddrs;

/// Every address configured on an interface now (loopback included; the
/// compiler ignores those it already knows).
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
    Ok(set)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_listed() {
        let set = super::current().expect("getifaddrs");
        assert!(set.iter().any(|a| a.is_loopback()), "{set:?}");
    }
}
