//! What travels on the control socket: the request line, and the answers
//! (one type each, built by the daemon and read by the CLI). Plain data:
//! this module depends on no part of the daemon that uses it, so the
//! engine builds answers and the server ([`crate::control`]) sends them
//! without either importing the other's types through a cycle.
//!
//! - here: [`Request`], and reading one;
//! - `answers`: the response line and the answers other than `status`;
//! - `status`: the `status` document (docs/status.md).

mod answers;
mod status;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use self::{
    answers::{
        Answer, GrantAnswer, ListAnswer, ListVm, Names, ReloadAnswer, Response, RevokeAnswer,
        UserRef, UsersPage, VmUser, WhyAnswer,
    },
    status::{
        Counts, LastChange, LastReload, Listeners, NotRunningStatus, OverallMode, PolicyStatus,
        STATUS_FORMAT, STATUS_USERS, ScheduleUser, Status, TableStatus, TemporaryGrant, USERS_PAGE,
        UnresolvedName, VmStatus,
    },
};

/// Largest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Braces, not unit variants: serde's unknown-field check only applies
    // to struct variants, and `{"cmd":"status","junk":1}` must be refused.
    Status {},
    Reload {},
    Why {
        user: String,
        addr: IpAddr,
        port: u16,
    },
    Grant {
        user: String,
        vm: String,
        for_secs: Option<u64>,
    },
    Revoke {
        user: String,
        vm: String,
    },
    Events {},
    /// The VMs the caller may open (now or later), for `list` and `open`.
    List {},
    /// A page of who may open `vm` now (uids above `after`), for `status
    /// --vm NAME --users`.
    Users {
        vm: String,
        after: Option<u32>,
    },
    /// A page of the access review (users above `after`), for `spicegate
    /// report`: every user for root and the admin group, the caller's own
    /// row for anyone else.
    Report {
        after: Option<u32>,
    },
}

impl Request {
    pub(super) fn needs_admin(&self) -> bool {
        matches!(
            self,
            Self::Status {}
                | Self::Reload {}
                | Self::Grant { .. }
                | Self::Revoke { .. }
                | Self::Users { .. }
        )
    }
}

/// Validates one request line as read from a client (newline included).
/// Pure, so the fuzzer drives exactly what the socket does.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("truncated request (no newline)".into());
    }
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned())?;
    serde_json::from_str(text.trim_end()).map_err(|e| format!("bad request: {e}"))
}
