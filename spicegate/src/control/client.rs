//! The CLI's side: one request, one answer.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, Lines},
    net::UnixStream,
};

use super::{wire::write_line, *};

/// Client side: one request, one response, read as `T` (the answer type of
/// that request, e.g. [`super::Status`] for [`Request::Status`]). Fails
/// with a sentence when the daemon is not running.
pub async fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> anyhow::Result<T> {
    let mut stream = connect(socket).await?;
    write_line(&mut stream, req).await?;
    let resp = read_response::<T>(&mut stream).await?;
    match (resp.ok, resp.result, resp.error) {
        (true, Some(v), _) => Ok(v),
        (true, None, _) => bail!("the daemon's answer has no result"),
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

/// Subscribes to `events`: the lines that follow the daemon's first answer,
/// one JSON object each (see [`crate::denials::StreamItem`]).
pub async fn subscribe(socket: &Path) -> anyhow::Result<Lines<BufReader<UnixStream>>> {
    let mut stream = connect(socket).await?;
    write_line(&mut stream, &Request::Events {}).await?;
    let mut lines = BufReader::new(stream).lines();
    let first = lines
        .next_line()
        .await?
        .context("the daemon closed the connection")?;
    let resp: Response<String> = serde_json::from_str(&first)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_default());
    }
    Ok(lines)
}

pub async fn read_response<T: DeserializeOwned>(
    stream: &mut UnixStream,
) -> anyhow::Result<Response<T>> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    reader
        .read_line(&mut line)
        .await
        .context("reading the daemon's answer")?;
    if line.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&line).context("the daemon's answer is not understood")
}
