//! The grants of one policy size, rendered for each system from the same
//! list in the same order: a spicegate policy, an iptables-restore file and
//! an nft file.
//!
//! A size of N grants is U users x E endpoints: E = sqrt(N) up to 100
//! endpoints (10 x 10, 100 x 100, 1,000 x 100). Users are numeric uids
//! 200000.. that need no passwd entry. Endpoints are loopback ports
//! `base .. base+E-1`, all of them guarded. The probes connect to the
//! middle endpoint, where the real "granted" user holds one more grant
//! (after the numeric ones, so an iptables chain walks about half its
//! rules to reach it); the "denied" user holds none unless a variant adds
//! it.

use std::fmt::Write as _;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// First numeric uid of the generated grants.
pub const FIRST_UID: u32 = 200_000;

#[derive(Debug, Clone)]
pub struct Layout {
    pub grants: u32,
    pub users: u32,
    pub endpoints: u32,
    pub base_port: u16,
    /// Name of the real user granted on the probe endpoint.
    pub granted: String,
    pub granted_uid: u32,
    /// Name and uid of the real user granted nowhere (unless `extra`, a
    /// temporary grant, or the clock moved into the schedule window).
    pub denied: String,
    pub denied_uid: u32,
    /// UTC hour whose first hour the denied user's schedule window on the
    /// probe endpoint covers: three hours from the bench's start, so it
    /// is closed until the bench moves the daemon's clock.
    pub window_hour: u64,
}

impl Layout {
    pub fn new(grants: u32, base_port: u16, granted: (&str, u32), denied: (&str, u32)) -> Self {
        let endpoints = f64::from(grants).sqrt().round().clamp(1.0, 100.0) as u32;
        let users = (grants / endpoints).max(1);
        Self {
            grants,
            users,
            endpoints,
            base_port,
            granted: granted.0.to_owned(),
            granted_uid: granted.1,
            denied: denied.0.to_owned(),
            denied_uid: denied.1,
            window_hour: (now_unix() / 3600 + 3) % 24,
        }
    }

    /// The VM of the probe endpoint.
    pub fn probe_vm(&self) -> String {
        format!("bench{}", self.probe_port())
    }

    /// Seconds to add to the clock to stand one minute into the schedule
    /// window.
    pub fn secs_to_window(&self) -> u64 {
        let into_day = now_unix() % 86_400;
        (self.window_hour * 3600 + 60 + 86_400 - into_day) % 86_400
    }

    /// Guarded ports: `base ..= last`.
    pub fn last_port(&self) -> u16 {
        self.base_port + self.endpoints as u16 - 1
    }

    pub fn probe_port(&self) -> u16 {
        self.base_port + (self.endpoints / 2) as u16
    }

    /// Outside every guarded range of every size.
    pub fn unguarded_port(base_port: u16) -> u16 {
        base_port + 100
    }

    /// (uid, port) of every grant in rule order; `extra` also grants the
    /// denied user on the probe endpoint.
    fn each(&self, extra: bool, mut f: impl FnMut(Grantee<'_>, u16)) {
        for e in 0..self.endpoints {
            let port = self.base_port + e as u16;
            for u in 0..self.users {
                f(Grantee::Uid(FIRST_UID + u), port);
            }
            if port == self.probe_port() {
                f(Grantee::User(&self.granted, self.granted_uid), port);
                if extra {
                    f(Grantee::User(&self.denied, self.denied_uid), port);
                }
            }
        }
    }

    /// A spicegate policy: the guarded range in `[protect]` (the admin's
    /// default DROP) and one VM per endpoint on this machine.
    pub fn spicegate_policy(&self, extra: bool) -> String {
        let mut by_port: Vec<(u16, Vec<String>)> = Vec::new();
        self.each(extra, |g, port| {
            let entry = match g {
                Grantee::Uid(uid) => format!("\"#{uid}\""),
                Grantee::User(name, _) => format!("\"{name}\""),
            };
            match by_port.last_mut() {
                Some((p, allow)) if *p == port => allow.push(entry),
                _ => by_port.push((port, vec![entry])),
            }
        });
        let mut s = format!(
            "# cargo xtask bench: {} grants\n[settings]\ntimezone = \"UTC\"\n[protect]\nports = [\"{}-{}\"]\n",
            self.grants,
            self.base_port,
            self.last_port()
        );
        for (port, allow) in by_port {
            let _ = write!(
                s,
                "\n[vms.bench{port}]\nserver = \"localhost\"\nports = [{port}]\nallow = [{}]\n",
                allow.join(", ")
            );
            if port == self.probe_port() {
                let h = self.window_hour;
                let _ = write!(
                    s,
                    "[[vms.bench{port}.schedule]]\nallow = [\"{}\"]\nhours = \"{h:02}:00-{:02}:00\"\n",
                    self.denied,
                    h + 1
                );
            }
        }
        s
    }

    /// An iptables-restore file for `--noflush`: declaring the chain
    /// flushes it, then one ACCEPT per grant as admins write them, and a
    /// final REJECT for the guarded ports (REJECT with tcp-reset instead of
    /// the usual DROP, so a refused connect fails at once instead of
    /// retrying its SYN for two minutes).
    pub fn iptables_rules(&self, chain: &str, extra: bool) -> String {
        let mut s = format!("*filter\n:{chain} - [0:0]\n");
        self.each(extra, |g, port| {
            let _ = writeln!(
                s,
                "-A {chain} -d 127.0.0.1/32 -p tcp -m tcp --dport {port} -m owner --uid-owner {} -j ACCEPT",
                g.uid()
            );
        });
        let _ = writeln!(
            s,
            "-A {chain} -p tcp -j REJECT --reject-with tcp-reset\nCOMMIT"
        );
        s
    }

    /// An nft file that replaces table `ip <table>` atomically: the grants
    /// as one `uid . ipv4_addr . inet_service` set, a chain that accepts
    /// members and rejects the rest, and the output hook jumping there for
    /// the guarded ports.
    pub fn nft_rules(&self, table: &str, extra: bool) -> String {
        let mut s = format!(
            "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n  set grants {{\n    type uid . ipv4_addr . inet_service\n    elements = {{\n"
        );
        let mut first = true;
        self.each(extra, |g, port| {
            let sep = if first { "" } else { ",\n" };
            first = false;
            let _ = write!(s, "{sep}      {} . 127.0.0.1 . {port}", g.uid());
        });
        let _ = write!(
            s,
            "\n    }}\n  }}\n  chain guard {{\n    meta skuid . ip daddr . tcp dport @grants accept\n    reject with tcp reset\n  }}\n{}}}\n",
            self.nft_hook_chain()
        );
        s
    }

    /// The base chain that puts the rules in force; deleting it alone
    /// takes them out of the path without touching the set.
    pub fn nft_hook_chain(&self) -> String {
        format!(
            "  chain output {{\n    type filter hook output priority filter; policy accept;\n    oifname \"lo\" tcp dport {}-{} jump guard\n  }}\n",
            self.base_port,
            self.last_port()
        )
    }
}

enum Grantee<'a> {
    Uid(u32),
    User(&'a str, u32),
}

impl Grantee<'_> {
    fn uid(&self) -> u32 {
        match self {
            Self::Uid(u) | Self::User(_, u) => *u,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: u32) -> Layout {
        Layout::new(n, 21000, ("g", 990), ("d", 991))
    }

    #[test]
    fn sizes_split_into_users_and_endpoints() {
        for (n, u, e) in [(100, 10, 10), (10_000, 100, 100), (100_000, 1000, 100)] {
            let l = layout(n);
            assert_eq!((l.users, l.endpoints), (u, e), "{n}");
        }
    }

    #[test]
    fn every_system_gets_the_same_grants() {
        let l = layout(100);
        let ipt = l.iptables_rules("C", true);
        let nft = l.nft_rules("t", true);
        let policy = l.spicegate_policy(true);
        // 100 numeric grants + granted + denied (extra); spicegate's
        // policy also names the denied user in the probe VM's schedule
        // window (closed unless the bench moves the daemon's clock).
        assert_eq!(ipt.matches("-j ACCEPT").count(), 102);
        assert_eq!(nft.matches(". 127.0.0.1 .").count(), 102);
        assert_eq!(
            policy.matches("\"#").count()
                + policy.matches("\"g\"").count()
                + policy.matches("\"d\"").count(),
            103
        );
        assert_eq!(policy.matches("[[vms.bench21005.schedule]]").count(), 1);
        assert!(ipt.contains("--dport 21005 -m owner --uid-owner 991 -j ACCEPT"));
        assert!(!l.iptables_rules("C", false).contains("--uid-owner 991"));
    }
}
