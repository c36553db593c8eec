//! What travels on the socket: one request line, one response line.

use std::net::IpAddr;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt as _, net::UnixStream};

use crate::directory::Directory;

use super::*;

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

/// Resolves `name` or `#uid` to a uid.
pub fn resolve_user(who: &str, dir: &dyn Directory) -> Result<u32, String> {
    if let Some(num) = who.strip_prefix('#') {
        return num
            .parse()
            .map_err(|_| format!("`{who}`: `#` must be followed by a numeric uid"));
    }
    match dir.user_uid(who) {
        Ok(Some(uid)) => Ok(uid),
        Ok(None) => Err(format!(
            "unknown user `{who}` (write `#UID` for a uid without a passwd entry)"
        )),
        Err(e) => Err(format!("cannot look up user `{who}`: {e}")),
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

/// Writes one JSON line (a request or a response).
pub(super) async fn write_line<T: Serialize>(
    stream: &mut UnixStream,
    value: &T,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&line))
        .await
        .context("client too slow to read")??;
    Ok(())
}
