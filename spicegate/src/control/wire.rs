//! Reading and writing the socket's lines, and naming a user in a request.

use anyhow::Context as _;
use serde::Serialize;
use tokio::{io::AsyncWriteExt as _, net::UnixStream};

use crate::directory::Directory;

use super::*;

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
