//! The control socket: a Unix stream socket speaking JSON lines.
//!
//! A client sends one request line and reads one response line
//! (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`); `events`
//! answers with a stream of lines instead. Peers are identified with
//! SO_PEERCRED: root and the policy's admin group may change things; anyone
//! else may only ask about themselves. Requests are bounded in size and
//! time, and connections in number, so no client can wedge the daemon.
//!
//! - `proto`: the requests, and reading a request;
//! - `answers`: the response line and the answers, one type each, built by
//!   the daemon and read by the CLI; `status`: the `status` document;
//! - `server`: the socket, its limits, and answering requests;
//! - `client`: one request and its answer, for the CLI.

mod answers;
mod client;
mod proto;
mod server;
mod status;
#[cfg(test)]
mod tests;

use std::{path::PathBuf, time::Duration};

pub use self::{
    answers::{
        Answer, GrantAnswer, ListAnswer, ListVm, Names, ReloadAnswer, Response, RevokeAnswer,
        UserRef, UsersPage, VmUser, WhyAnswer,
    },
    client::{NotRunning, call, connect, read_response, subscribe},
    proto::{Request, parse_request, resolve_user},
    server::{Shared, bind, fill_user_names, serve},
    status::{
        Counts, LastChange, LastReload, Listeners, NotRunningStatus, OverallMode, PolicyStatus,
        ScheduleUser, Status, TableStatus, TemporaryGrant, UnresolvedName, VmStatus,
    },
};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/spicegate/control.sock";
/// Largest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections of non-admin users served at once; more are refused with an
/// error. Root and the admin group are not counted.
pub const MAX_CLIENTS: usize = 64;

/// Connections one non-admin account may hold at once (a notify agent, a
/// few `list`/`why` calls, an `events` stream), so that one user cannot take
/// every slot from the others. An account's subordinate uids count as the
/// account, and uids of no account share one such quota (see accounts.rs).
pub const MAX_PER_USER: usize = 8;

/// `--socket` for every command that talks to the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
}
