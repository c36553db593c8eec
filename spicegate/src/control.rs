//! The control socket: a Unix stream socket speaking JSON lines.
//!
//! A client sends one request line and reads one response line
//! (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`); `events`
//! answers with a stream of lines instead. Peers are identified with
//! SO_PEERCRED: root and the policy's admin group may change things; anyone
//! else may only ask about themselves. Requests are bounded in size and
//! time, and connections in number, so no client can wedge the daemon.
//!
//! Longer than 600 lines: server, client and wire types are one module until
//! issue 14 gives them `control/{proto,server,client}.rs` with a typed
//! protocol.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, broadcast, oneshot},
};

use crate::{
    accounts::{Accounts, Bucket},
    denials::StreamItem,
    directory::{Directory, Nss},
    engine::{Command, Loader},
    policy::Settings,
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

/// Open connections per account; an entry goes when its last connection
/// does.
#[derive(Debug, Default)]
struct PerUser {
    open: std::sync::Mutex<std::collections::HashMap<Bucket, usize>>,
    accounts: Accounts,
}

/// One connection counted in [`PerUser`]; uncounted on drop.
struct UserSlot {
    table: Arc<PerUser>,
    bucket: Bucket,
}

impl PerUser {
    fn take(self: &Arc<Self>, uid: u32) -> Option<UserSlot> {
        let bucket = self.accounts.bucket(uid);
        let mut m = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(bucket.clone()).or_default();
        if *n >= MAX_PER_USER {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            table: Arc::clone(self),
            bucket,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = self
            .table
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.bucket) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.bucket);
            }
        }
    }
}

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
    fn needs_admin(&self) -> bool {
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

/// A response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: Value) -> Self {
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

/// Binds the socket: creates its directory, refuses to steal the socket of
/// a daemon that answers, replaces a stale one, and lets every user connect
/// (authorisation is per request, by peer credentials).
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another spicegate daemon answers on {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// What every connection handler shares.
#[derive(Clone)]
pub struct Shared {
    /// The engine thread's queue. Unbounded, but every sender is a counted
    /// connection or a daemon thread, so it holds a bounded number.
    pub engine: std::sync::mpsc::Sender<Command>,
    /// Reads the policy for `reload`, on a blocking-pool thread.
    pub loader: Arc<Loader>,
    pub settings: Arc<RwLock<Settings>>,
    pub events: broadcast::Sender<StreamItem>,
}

/// Accepts connections forever.
pub async fn serve(listener: UnixListener, shared: Shared) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let per_user = Arc::new(PerUser::default());
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Root and the admin group are always served, so other users
        // holding every slot (say, with `events` streams) cannot lock the
        // admin out of reload or revoke.
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let admin = uid != u32::MAX
            && shared
                .settings
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_admin(uid);
        let permit = if admin {
            Ok(None)
        } else {
            match per_user.take(uid) {
                None => Err(format!(
                    "busy: you already have {MAX_PER_USER} connections to spicegate open (counting the uids of your subordinate range); close one and try again"
                )),
                Some(user_slot) => Arc::clone(&slots)
                    .try_acquire_owned()
                    .map(|p| Some((p, user_slot)))
                    .map_err(|_| "busy: too many control clients; try again".to_owned()),
            }
        };
        let permit = match permit {
            Ok(p) => p,
            Err(why) => {
                tokio::spawn(async move {
                    let mut s = stream;
                    let _ = write_line(&mut s, &Response::err(why)).await;
                });
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared).await {
                log::debug!("control client: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn write_line<T: Serialize>(stream: &mut UnixStream, value: &T) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&line))
        .await
        .context("client too slow to read")??;
    Ok(())
}

/// Reads one request line of at most MAX_REQUEST bytes within the timeout.
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new((&mut *stream).take(MAX_REQUEST as u64 + 1));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => {
            return Err(format!(
                "no complete request within {}s",
                REQUEST_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(format!("read error: {e}")),
        Ok(Ok(_)) => {}
    }
    parse_request(&line)
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

async fn handle(mut stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let peer = stream.peer_cred().context("SO_PEERCRED")?.uid();
    let req = match read_request(&mut stream).await {
        Ok(r) => r,
        Err(e) => return write_line(&mut stream, &Response::err(e)).await,
    };
    let admin = shared
        .settings
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_admin(peer);
    if req.needs_admin() && !admin {
        let resp =
            Response::err("permission denied: only root and the policy's admin group may do this");
        return write_line(&mut stream, &resp).await;
    }
    if matches!(req, Request::Events {}) {
        return stream_events(stream, shared, if admin { None } else { Some(peer) }).await;
    }
    if let Request::Report { after } = req {
        // Typed all the way to the line: a page of 100,000 cells is never
        // a `Value` tree.
        let page = report_page(after, (!admin).then_some(peer), shared).await;
        return write_line(&mut stream, &crate::report::PageResponse::from(page)).await;
    }
    let resp = match request_engine(req, peer, admin, shared).await {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    };
    write_line(&mut stream, &resp).await
}

/// Runs a blocking lookup (NSS) on tokio's blocking pool: the thread that
/// serves the socket never waits on the name service.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| "internal error: a lookup panicked".to_owned())
}

/// Whether `who` (`name` or `#uid`) names the peer itself. Asks NSS only
/// for the peer's own entry, never for the other name: a user asking about
/// someone else is refused before anything about that someone is looked up.
async fn is_self(who: &str, peer: u32) -> Result<bool, String> {
    if let Some(num) = who.strip_prefix('#') {
        return Ok(num.parse::<u32>().is_ok_and(|u| u == peer));
    }
    let who = who.to_owned();
    blocking(move || Nss.user_name(peer).is_some_and(|n| n == who)).await
}

async fn request_engine(
    req: Request,
    peer: u32,
    admin: bool,
    shared: &Shared,
) -> Result<Value, String> {
    let (reply, rx) = oneshot::channel();
    let resolve = |user: &str| {
        let user = user.to_owned();
        async move { blocking(move || resolve_user(&user, &Nss)).await? }
    };
    let (cmd, names) = match req {
        Request::Status {} => (Command::Status { reply }, true),
        Request::Reload {} => {
            // Parsing waits on NSS and DNS: not on the engine's thread.
            let loader = Arc::clone(&shared.loader);
            let loaded = blocking(move || loader.load()).await?;
            (
                Command::Reload {
                    loaded: Box::new(loaded),
                    reply,
                },
                false,
            )
        }
        Request::Why { user, addr, port } => {
            if !admin && !is_self(&user, peer).await? {
                return Err("permission denied: you may only ask about yourself".into());
            }
            let uid = resolve(&user).await?;
            (
                Command::Why {
                    uid,
                    user,
                    addr,
                    port,
                    reply,
                },
                false,
            )
        }
        Request::Grant { user, vm, for_secs } => {
            let uid = resolve(&user).await?;
            (
                Command::Grant {
                    uid,
                    user,
                    vm,
                    for_secs,
                    by: peer,
                    reply,
                },
                false,
            )
        }
        Request::Revoke { user, vm } => {
            let uid = resolve(&user).await?;
            (
                Command::Revoke {
                    uid,
                    user,
                    vm,
                    reply,
                },
                false,
            )
        }
        Request::List {} => (Command::List { uid: peer, reply }, true),
        Request::Users { vm, after } => (Command::Users { vm, after, reply }, true),
        Request::Report { .. } => return Err("internal: report pages are typed".into()),
        Request::Events {} => return Err("internal: events are streamed".into()),
    };
    shared
        .engine
        .send(cmd)
        .map_err(|_| "the daemon is shutting down".to_owned())?;
    let mut v = rx
        .await
        .map_err(|_| "the daemon is shutting down".to_owned())??;
    if names {
        v = blocking(move || {
            let mut cache = NAMES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Bounded: a policy of a million uids pages through names, it
            // does not keep them all.
            if cache.len() > NAME_CACHE {
                cache.clear();
            }
            fill_user_names(&mut v, &Nss, &mut cache);
            v
        })
        .await?;
    }
    if let Some(diff) = v.get_mut("diff").map(Value::take) {
        let diff: crate::diff::Diff = serde_json::from_value(diff)
            .map_err(|e| format!("internal error: reading the diff: {e}"))?;
        let lines = blocking(move || diff.lines(&Nss)).await?;
        if let Some(o) = v.as_object_mut() {
            o.remove("diff");
            o.insert("changes".into(), Value::from(lines));
        }
    }
    Ok(v)
}

/// One page of `report` from the engine, its names looked up here (a page
/// of at most [`crate::report::REPORT_ROWS`] uids), off the engine thread.
async fn report_page(
    after: Option<u32>,
    only: Option<u32>,
    shared: &Shared,
) -> Result<crate::report::Page, String> {
    let (reply, rx) = oneshot::channel();
    shared
        .engine
        .send(Command::Report { after, only, reply })
        .map_err(|_| "the daemon is shutting down".to_owned())?;
    let mut page = rx
        .await
        .map_err(|_| "the daemon is shutting down".to_owned())??;
    blocking(move || {
        let mut cache = NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() > NAME_CACHE {
            cache.clear();
        }
        crate::report::fill_names(&mut page, &Nss, &mut cache);
        page
    })
    .await
}

/// Names the control handler looked up, shared by every answer (status
/// pages, list), so paging through a large VM asks NSS once per uid.
static NAMES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, String>>> =
    std::sync::LazyLock::new(Default::default);
/// Entries of [`NAMES`] before it starts over.
const NAME_CACHE: usize = 100_000;

/// Fills every `"user": null` next to a `"uid"` in an answer with that
/// uid's name (`#UID` without a passwd entry). The engine leaves names out:
/// looking them up may wait on NSS.
pub fn fill_user_names(
    v: &mut Value,
    dir: &dyn Directory,
    cache: &mut std::collections::HashMap<u32, String>,
) {
    match v {
        Value::Object(o) => {
            if let (Some(uid), Some(Value::Null)) = (
                o.get("uid")
                    .and_then(Value::as_u64)
                    .and_then(|u| u32::try_from(u).ok()),
                o.get("user"),
            ) {
                let name = cache
                    .entry(uid)
                    .or_insert_with(|| dir.user_name(uid).unwrap_or_else(|| format!("#{uid}")))
                    .clone();
                o.insert("user".into(), Value::String(name));
            }
            for (_, x) in o.iter_mut() {
                fill_user_names(x, dir, cache);
            }
        }
        Value::Array(a) => {
            for x in a {
                fill_user_names(x, dir, cache);
            }
        }
        _ => {}
    }
}

async fn stream_events(
    mut stream: UnixStream,
    shared: &Shared,
    only_uid: Option<u32>,
) -> anyhow::Result<()> {
    let mut rx = shared.events.subscribe();
    write_line(
        &mut stream,
        &Response::ok(Value::String("streaming events".into())),
    )
    .await?;
    let (mut rd, mut wr) = stream.split();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            // The client hung up (or sent something): stop.
            n = rd.read(&mut sink) => {
                if matches!(n, Ok(0) | Err(_)) {
                    return Ok(());
                }
            }
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    // A user sees their own denials, and no counts of
                    // anyone else's.
                    let mine = match (&ev, only_uid) {
                        (_, None) => true,
                        (StreamItem::Deny(d), Some(u)) => d.uid == u,
                        (StreamItem::Skipped { .. }, Some(_)) => false,
                    };
                    if !mine {
                        continue;
                    }
                    let mut line = serde_json::to_vec(&ev)?;
                    line.push(b'\n');
                    tokio::time::timeout(REQUEST_TIMEOUT, wr.write_all(&line)).await.context("client too slow")??;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // This subscriber read too slowly: say how many it missed.
                    let note = StreamItem::Skipped { skipped: n };
                    let mut line = serde_json::to_vec(&note)?;
                    line.push(b'\n');
                    tokio::time::timeout(REQUEST_TIMEOUT, wr.write_all(&line)).await.context("client too slow")??;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

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

pub async fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "the spicegate daemon is not running (cannot connect to {}: {e}); start it with `spicegate run` or `systemctl start spicegate`",
            socket.display()
        )
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

/// `--socket` for every command that talks to the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"why","user":"bob","addr":"::1","port":5930}"#)
                .expect("parses");
        assert_eq!(
            r,
            Request::Why {
                user: "bob".into(),
                addr: "::1".parse().expect("ip"),
                port: 5930
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"revoke","user":"b","vm":"v","x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
        for junk in [
            r#"{"cmd":"status","x":1}"#,
            r#"{"cmd":"reload","policy":"/tmp/evil.toml"}"#,
            r#"{"cmd":"list","uid":0}"#,
            r#"{"cmd":"events","all":true}"#,
            r#"{"cmd":"report","uid":0}"#,
        ] {
            assert!(
                serde_json::from_str::<Request>(junk).is_err(),
                "{junk} must be refused, not read as a plain request"
            );
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"report","after":7}"#).ok(),
            Some(Request::Report { after: Some(7) })
        );
        assert!(!Request::Report { after: None }.needs_admin());
        for plain in ["status", "reload", "list", "events", "report"] {
            assert!(
                serde_json::from_str::<Request>(&format!(r#"{{"cmd":"{plain}"}}"#)).is_ok(),
                "{plain}"
            );
        }
        assert_eq!(
            serde_json::to_string(&Request::Status {}).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert!(Request::Reload {}.needs_admin() && !Request::Events {}.needs_admin());
    }

    #[test]
    fn fills_names_where_the_engine_left_them_out() {
        let dir = crate::directory::FakeDirectory::default().user("bob", 1001);
        let mut v = serde_json::json!({
            "console_user": { "uid": 1001, "user": null },
            "vms": [{ "users": [{ "uid": 7, "user": null }, { "uid": 1001, "user": "kept" }] }],
            "uid": 1001, "user": null,
        });
        fill_user_names(&mut v, &dir, &mut std::collections::HashMap::new());
        assert_eq!(v["console_user"]["user"], "bob");
        assert_eq!(v["vms"][0]["users"][0]["user"], "#7");
        assert_eq!(v["vms"][0]["users"][1]["user"], "kept");
        assert_eq!(v["user"], "bob");
    }

    #[test]
    fn resolves_users() {
        assert_eq!(resolve_user("#1021", &Nss), Ok(1021));
        assert_eq!(resolve_user("root", &Nss), Ok(0));
        assert!(resolve_user("#x", &Nss).is_err());
        assert!(resolve_user("no-such-user-sg", &Nss).is_err());
    }
}
