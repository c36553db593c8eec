//! The `status` document (docs/status.md), as the daemon builds it and the
//! CLI reads it.
//!
//! Fields are declared in alphabetical order at every level: that is the
//! order `status --json` has always printed them in (the document used to
//! go through a sorted `serde_json::Value`), and `tests.rs` checks that it
//! stays so. Field names are stable: add fields, never rename or remove one
//! without a new `status_format`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::answers::{Names, UserRef, VmUser};
use crate::{denials::DropCounts, policy::Mode};

/// Version of the `status` document (docs/status.md).
pub const STATUS_FORMAT: u32 = 2;

/// Users listed per VM by `status` (and schedule users); the rest are
/// counted (`users_total`) and paged by `status --vm NAME --users`.
pub const STATUS_USERS: usize = 100;

/// Users per page of `status --vm NAME --users`.
pub const USERS_PAGE: usize = 1000;

/// `spicegate status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Both connect programs are attached to `cgroup` (read back from the
    /// kernel).
    pub attached: bool,
    pub cgroup: PathBuf,
    /// The active seat0 session, from logind.
    pub console_user: Option<UserRef>,
    pub counts: Counts,
    /// Some names of the policy did not resolve: they are granted nothing
    /// until they do.
    pub degraded: bool,
    /// Denials not logged since this daemon started, by reason.
    pub drops: DropCounts,
    pub last_reload: LastReload,
    /// Who may bind the guarded local ports besides root.
    pub listeners: Listeners,
    pub mode: OverallMode,
    pub pin_dir: PathBuf,
    pub policy: PolicyStatus,
    pub protect_audited: u64,
    pub protect_denied: u64,
    /// Always `true` here; see [`NotRunningStatus`].
    pub running: bool,
    pub started_at: String,
    /// [`STATUS_FORMAT`].
    pub status_format: u32,
    /// How changes reach the kernel.
    pub table: TableStatus,
    /// The policy slot holds the table this daemon installed.
    pub table_in_force: bool,
    pub temporary_grants: Vec<TemporaryGrant>,
    pub time_zone: String,
    pub unresolved: Vec<UnresolvedName>,
    pub version: String,
    pub vms: Vec<VmStatus>,
}

impl Names for Status {
    fn each_name(&mut self, f: &mut dyn FnMut(u32, &mut Option<String>)) {
        if let Some(c) = &mut self.console_user {
            f(c.uid, &mut c.user);
        }
        for u in &mut self.listeners.users {
            f(u.uid, &mut u.user);
        }
        for vm in &mut self.vms {
            for u in &mut vm.users {
                f(u.uid, &mut u.user);
            }
            for u in &mut vm.schedule_users {
                f(u.uid, &mut u.user);
            }
        }
    }
}

/// `status --json` when no daemon answers: whether enforcement is pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotRunningStatus {
    pub attached: bool,
    pub error: String,
    /// Always `false`.
    pub running: bool,
}

/// `mode`: of the policy as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverallMode {
    Enforce,
    /// Everything in audit mode.
    Audit,
    /// Some VMs audit, some enforce.
    Mixed,
}

impl std::fmt::Display for OverallMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Mixed => "mixed",
        })
    }
}

/// `counts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub grants: usize,
    pub guarded_endpoints: usize,
    pub kernel_entries: usize,
    pub ports_guarded_everywhere: usize,
    pub vms: usize,
}

/// `last_reload`: the last reload attempt, or the start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    pub at: String,
    pub at_unix: u64,
    pub message: String,
    pub ok: bool,
}

/// `listeners`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listeners {
    pub ports: Vec<u16>,
    pub users: Vec<UserRef>,
}

/// `policy`: the policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub admins: Option<String>,
    pub end_sessions: bool,
    pub files: Vec<PathBuf>,
    pub loaded_at: String,
    pub loaded_at_unix: u64,
    pub path: PathBuf,
    pub sha256: String,
    /// `file`, or `last-good`.
    pub source: String,
}

/// `table`: the table in force, its overlays and the last change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableStatus {
    pub generation: u32,
    pub last_change: Option<LastChange>,
    pub map_writes: u64,
    pub overlay_entries: usize,
}

/// `table.last_change`: how the last change reached the kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastChange {
    pub grants: usize,
    /// `overlay` or `table`.
    pub how: String,
    pub map_writes: u64,
    /// Milliseconds, rounded to two decimals.
    pub ms: f64,
    pub overlay_entries: usize,
}

/// `temporary_grants[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemporaryGrant {
    /// `false` when the VM is not in the policy.
    pub active: bool,
    /// `None`: until revoked.
    pub expires: Option<String>,
    pub expires_in_secs: Option<u64>,
    pub expires_unix: Option<u64>,
    pub uid: u32,
    pub user: String,
    pub vm: String,
}

/// `unresolved[]`: a name of the policy that did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnresolvedName {
    /// `FILE:LINE:COL`.
    pub at: String,
    /// `user NAME`, `group @NAME` or `hostname NAME`.
    pub name: String,
    pub why: String,
}

impl From<&crate::policy::Unresolved> for UnresolvedName {
    fn from(u: &crate::policy::Unresolved) -> Self {
        Self {
            at: u.at.clone(),
            name: u.name.clone(),
            why: u.why.clone(),
        }
    }
}

/// `vms[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub allowed: u64,
    pub audited: u64,
    pub denied: u64,
    /// `a.b.c.d:port`, `[v6]:port` or `localhost:port`.
    pub endpoints: Vec<String>,
    pub mode: Mode,
    pub name: String,
    /// The first [`STATUS_USERS`] a schedule names.
    pub schedule_users: Vec<ScheduleUser>,
    pub schedule_users_total: usize,
    pub schedules: Vec<String>,
    pub server: String,
    /// Who may open it now, the first [`STATUS_USERS`].
    pub users: Vec<VmUser>,
    pub users_total: usize,
}

/// `vms[].schedule_users[]`: whether a user's window is open, and when
/// that next changes (`None`: not within 8 days).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleUser {
    pub next_change: Option<String>,
    pub next_change_unix: Option<i64>,
    pub open_now: bool,
    pub uid: u32,
    pub user: Option<String>,
}
