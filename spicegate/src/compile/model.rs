//! What the kernel program decides, worked out from the compiled table
//! the way the program does: `why` and the sweep use it.

use std::net::IpAddr;

use spicegate_common::{
    ENDPOINT_AUDIT, LOCAL_ADDR, PORT_AUDIT, PORT_GUARD_ALL, RuleKey, mask_addr,
};

use super::{Compiled, Dest, canonical, key_addr};

/// What the kernel decides, computed from the table the way the kernel
/// program does. Used to find established connections a new table would
/// refuse, and by tests.
/// Whether the program folds `ip` into localhost with this table: the
/// built-in loopback and unspecified ranges, a [`RuleKey::local`] address,
/// or a local network of one of the lengths the table lists.
pub fn table_is_local(c: &Compiled, ip: IpAddr) -> bool {
    let ip = canonical(ip);
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let key = key_addr(ip);
    if c.rules.contains_key(&RuleKey::local(key)) {
        return true;
    }
    let Some(nets) = c.rules.get(&RuleKey::local_nets()) else {
        return false;
    };
    nets.vm
        .to_ne_bytes()
        .iter()
        .take(nets.flags as usize)
        .map(|len| u16::from(*len))
        .any(|len| {
            c.rules
                .contains_key(&RuleKey::local_net(mask_addr(key, len), len))
        })
}

pub fn decide(c: &Compiled, uid: u32, ip: IpAddr, port: u16) -> bool {
    let Some(port_rule) = c.rules.get(&RuleKey::port(port)) else {
        return true;
    };
    let mapped = canonical(ip);
    let addr = if table_is_local(c, mapped) {
        LOCAL_ADDR
    } else {
        key_addr(mapped)
    };
    let endpoint = c.rules.get(&RuleKey::endpoint(addr, port));
    let guarded = port_rule.flags & PORT_GUARD_ALL != 0 || endpoint.is_some();
    let dest = if addr == LOCAL_ADDR {
        Dest::Local
    } else {
        Dest::Remote(mapped)
    };
    if !guarded || c.granted(dest, port, uid) {
        return true;
    }
    // Audit mode lets it through (and logs it).
    match endpoint {
        Some(e) => e.flags & ENDPOINT_AUDIT != 0,
        None => port_rule.flags & PORT_AUDIT != 0,
    }
}
