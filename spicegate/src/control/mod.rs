//! The control socket: a Unix stream socket speaking JSON lines.
//!
//! A client sends one request line and reads one response line
//! (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`); `events`
//! answers with a stream of lines instead. Peers are identified with
//! SO_PEERCRED: root and the policy's admin group may change things; anyone
//! else may only ask about themselves. Requests are bounded in size and
//! time, and connections in number, so no client can wedge the daemon.
//!
//! The requests and answers themselves are in [`crate::proto`].
//!
//! - `wire`: writing a line, and naming a user in a request;
//! - `server`: the socket, its limits, and answering requests;
//! - `client`: one request and its answer, for the CLI.

mod client;
mod server;
#[cfg(test)]
mod tests;
mod wire;

use std::{path::PathBuf, time::Duration};

pub use self::{
    client::{NotRunning, call, connect, read_response, subscribe},
    server::{Shared, bind, fill_user_names, serve},
    wire::resolve_user,
};
// The CLI reads the answers it asks for through here.
pub use crate::proto::*;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/spicegate/control.sock";
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
