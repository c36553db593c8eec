//! The answers of the control socket other than `status` (status.rs): one
//! type each, built by the daemon and read by the CLI.
//!
//! Fields are declared in alphabetical order: the order the answers have
//! always had on the wire (they used to go through a sorted
//! `serde_json::Value`); `tests.rs` checks that it stays so.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::status::Status;
use crate::compile::Via;

/// Answers with user names the engine leaves out (`"user": null` next to a
/// `"uid"`): looking them up may wait on NSS, so the control handler fills
/// them in off the engine thread ([`crate::control::fill_user_names`]).
pub trait Names {
    /// Calls `f` with every (uid, name) pair of the answer.
    fn each_name(&mut self, f: &mut dyn FnMut(u32, &mut Option<String>));
}

/// A uid and its name: `console_user`, `listeners.users[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    pub uid: u32,
    pub user: Option<String>,
}

/// Who may open a VM now: `status` `vms[].users[]` and the pages of
/// `status --vm NAME --users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUser {
    /// `via` is `temporary`.
    pub temporary: bool,
    pub uid: u32,
    pub user: Option<String>,
    pub via: Via,
}

/// `users`: a page of who may open `vm` now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersPage {
    /// Ask again with this `after` for the next page; `None` on the last.
    pub next_after: Option<u32>,
    pub users: Vec<VmUser>,
    /// How many may open it now, in all pages.
    pub users_total: usize,
    pub vm: String,
}

impl Names for UsersPage {
    fn each_name(&mut self, f: &mut dyn FnMut(u32, &mut Option<String>)) {
        for u in &mut self.users {
            f(u.uid, &mut u.user);
        }
    }
}

/// `list`: the VMs the caller may open, now or later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListAnswer {
    /// `[settings] client`: the Spice client `open` starts.
    pub client: Vec<String>,
    pub uid: u32,
    pub user: Option<String>,
    pub vms: Vec<ListVm>,
}

impl Names for ListAnswer {
    fn each_name(&mut self, f: &mut dyn FnMut(u32, &mut Option<String>)) {
        f(self.uid, &mut self.user);
    }
}

/// One VM of `list`, and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListVm {
    pub addresses: Vec<String>,
    pub allowed_now: bool,
    pub ca_file: Option<PathBuf>,
    /// Opens only for whoever holds this machine's console.
    pub console_only: bool,
    pub host: String,
    pub name: String,
    /// When access next opens or closes (RFC 3339).
    pub next_change: Option<String>,
    pub port: Option<u16>,
    pub schedules: Vec<String>,
    pub server: String,
    pub tls: bool,
    pub tls_port: Option<u16>,
    /// How the caller may open it now (`none`); `None` when the VM has no
    /// endpoint.
    pub via: Option<String>,
}

/// `why`: the decision for a user and an endpoint (see explain.rs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhyAnswer {
    pub allow: bool,
    /// Whether the user may listen on the port, when it is a guarded local
    /// port; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    pub reason: String,
    pub short: String,
    pub vm: Option<String>,
}

impl WhyAnswer {
    pub fn new(v: crate::explain::Verdict, bind: Option<String>) -> Self {
        Self {
            allow: v.allow,
            bind,
            reason: v.reason,
            short: v.short,
            vm: v.vm,
        }
    }
}

/// `grant`: the temporary grant put in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantAnswer {
    /// `None`: until revoked.
    pub expires: Option<String>,
    pub expires_unix: Option<u64>,
    pub uid: u32,
    pub user: String,
    pub vm: String,
}

/// `revoke`: the temporary grant taken back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeAnswer {
    pub uid: u32,
    pub user: String,
    pub vm: String,
}

/// `reload`: the policy now in force and who gained or lost access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadAnswer {
    /// One line per change, at most [`crate::diff::MAX_DIFF_LINES`] and a
    /// count.
    pub changes: Vec<String>,
    pub sha256: String,
    pub summary: String,
}

/// What the daemon answers, whichever the request: serialized as the
/// answer itself (`result` of a [`Response`]). The CLI reads the type it
/// asked for.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Box<Status>),
    Reload(ReloadAnswer),
    Why(WhyAnswer),
    Grant(GrantAnswer),
    Revoke(RevokeAnswer),
    List(ListAnswer),
    Users(UsersPage),
    Report(crate::report::Page),
    /// The first line of `events`.
    Streaming(String),
}

/// A response line: `{"ok":true,"result":...}` or
/// `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response<T> {
    pub ok: bool,
    /// Absent on an error (a missing `Option` reads as `None`; no
    /// `default`, which would ask `T: Default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<T> Response<T> {
    pub fn ok(result: T) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

impl<T> From<Result<T, String>> for Response<T> {
    fn from(r: Result<T, String>) -> Self {
        match r {
            Ok(v) => Self::ok(v),
            Err(e) => Self::err(e),
        }
    }
}

/// The names of a report page's rows (not the `@console` row's).
impl Names for crate::report::Page {
    fn each_name(&mut self, f: &mut dyn FnMut(u32, &mut Option<String>)) {
        for r in &mut self.rows {
            if let Some(uid) = r.uid {
                f(uid, &mut r.user);
            }
        }
    }
}
