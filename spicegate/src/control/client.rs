//! The CLI's side: one request, one answer.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    net::UnixStream,
};

use super::{proto::write_line, *};

/// Client side: one request, one response. Fails with a sentence when the
/// daemon is not running.
pub async fn call(socket: &Path, req: &Request) -> anyhow::Result<Value> {
    let mut stream = connect(socket).await?;
    write_line(&mut stream, req).await?;
    let resp = read_response(&mut stream).await?;
    match (resp.ok, resp.result, resp.error) {
        (true, Some(v), _) => Ok(v),
        (true, None, _) => Ok(Value::Null),
        (false, _, e) => bail!(
            "{}",
            e.unwrap_or_else(|| "the daemon refused the request".into())
        ),
    }
}

/// The daemon does not answer on its socket: callers tell it from other
/// errors by type (`anyhow::Error::downcast_ref::<NotRunning>()`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the spicegate daemon is not running (cannot connect to {}: {source}); start it with `spicegate run` or `systemctl start spicegate`",
    socket.display()
)]
pub struct NotRunning {
    pub socket: PathBuf,
    pub source: std::io::Error,
}

pub async fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).await.map_err(|source| {
        NotRunning {
            socket: socket.to_owned(),
            source,
        }
        .into()
    })
}

pub async fn read_response(stream: &mut UnixStream) -> anyhow::Result<Response> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    reader
        .read_line(&mut line)
        .await
        .context("reading the daemon's answer")?;
    if line.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&line).context("the daemon's answer is not valid JSON")
}
