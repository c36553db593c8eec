//! The daemon's side: the socket, the limits on clients, and the answers
//! (from the engine, or computed here off the engine thread).

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, broadcast, oneshot},
};

use crate::{
    accounts::{Accounts, Bucket},
    denials::StreamItem,
    directory::{Directory, Nss},
    engine::{Command, Loader, Reply, WhyQuery},
    policy::Settings,
};

use super::{wire::write_line, *};

/// Open connections per account; an entry goes when its last connection
/// does.
#[derive(Debug, Default)]
pub(super) struct PerUser {
    open: std::sync::Mutex<std::collections::HashMap<Bucket, usize>>,
    accounts: Accounts,
}

/// One connection counted in [`PerUser`]; uncounted on drop.
pub(super) struct UserSlot {
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
                    let _ = write_line(&mut s, &Response::<Answer>::err(why)).await;
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

/// Reads one request line of at most MAX_REQUEST bytes within the timeout.
pub(super) async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
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

pub(super) async fn handle(mut stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let peer = stream.peer_cred().context("SO_PEERCRED")?.uid();
    let req = match read_request(&mut stream).await {
        Ok(r) => r,
        Err(e) => return write_line(&mut stream, &Response::<Answer>::err(e)).await,
    };
    let admin = shared
        .settings
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_admin(peer);
    if req.needs_admin() && !admin {
        let resp = Response::<Answer>::err(
            "permission denied: only root and the policy's admin group may do this",
        );
        return write_line(&mut stream, &resp).await;
    }
    if matches!(req, Request::Events {}) {
        return stream_events(stream, shared, if admin { None } else { Some(peer) }).await;
    }
    let resp = Response::from(answer(req, peer, admin, shared).await);
    write_line(&mut stream, &resp).await
}

/// Runs a blocking lookup (NSS) on tokio's blocking pool: the thread that
/// serves the socket never waits on the name service.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| "internal error: a lookup panicked".to_owned())
}

/// Whether `who` (`name` or `#uid`) names the peer itself. Asks NSS only
/// for the peer's own entry, never for the other name: a user asking about
/// someone else is refused before anything about that someone is looked up.
pub(super) async fn is_self(who: &str, peer: u32) -> Result<bool, String> {
    if let Some(num) = who.strip_prefix('#') {
        return Ok(num.parse::<u32>().is_ok_and(|u| u == peer));
    }
    let who = who.to_owned();
    blocking(move || Nss.user_name(peer).is_some_and(|n| n == who)).await
}

/// The answer to a request (`events` aside): the engine's, its names and
/// the lines of a reload's diff looked up here, off the engine thread.
pub(super) async fn answer(
    req: Request,
    peer: u32,
    admin: bool,
    shared: &Shared,
) -> Result<Answer, String> {
    let resolve = |user: &str| {
        let user = user.to_owned();
        async move { blocking(move || resolve_user(&user, &Nss)).await? }
    };
    Ok(match req {
        Request::Status {} => {
            let status = ask(shared, |reply| Command::Status { reply }).await?;
            Answer::Status(Box::new(named(status).await?))
        }
        Request::Reload {} => {
            // Parsing waits on NSS and DNS: not on the engine's thread.
            let loader = Arc::clone(&shared.loader);
            let loaded = Box::new(blocking(move || loader.load()).await?);
            let r = ask(shared, |reply| Command::Reload { loaded, reply }).await?;
            let diff = r.diff;
            Answer::Reload(ReloadAnswer {
                changes: blocking(move || diff.lines(&Nss)).await?,
                sha256: r.sha256,
                summary: r.summary,
            })
        }
        Request::Why { user, addr, port } => {
            if !admin && !is_self(&user, peer).await? {
                return Err("permission denied: you may only ask about yourself".into());
            }
            let uid = resolve(&user).await?;
            let query = WhyQuery {
                uid,
                user,
                addr,
                port,
            };
            Answer::Why(ask(shared, |reply| Command::Why { query, reply }).await?)
        }
        Request::Grant { user, vm, for_secs } => {
            let uid = resolve(&user).await?;
            let cmd = |reply| Command::Grant {
                uid,
                user,
                vm,
                for_secs,
                by: peer,
                reply,
            };
            Answer::Grant(ask(shared, cmd).await?)
        }
        Request::Revoke { user, vm } => {
            let uid = resolve(&user).await?;
            let cmd = |reply| Command::Revoke {
                uid,
                user,
                vm,
                reply,
            };
            Answer::Revoke(ask(shared, cmd).await?)
        }
        Request::List {} => {
            let list = ask(shared, |reply| Command::List { uid: peer, reply }).await?;
            Answer::List(named(list).await?)
        }
        Request::Users { vm, after } => {
            let page = ask(shared, |reply| Command::Users { vm, after, reply }).await?;
            Answer::Users(named(page).await?)
        }
        // Every user for root and the admin group, the caller's own row
        // for anyone else.
        Request::Report { after } => {
            let only = (!admin).then_some(peer);
            let page = ask(shared, |reply| Command::Report { after, only, reply }).await?;
            Answer::Report(named(page).await?)
        }
        Request::Events {} => return Err("internal: events are streamed".into()),
    })
}

/// Sends the engine a command and waits for its reply.
async fn ask<T>(shared: &Shared, cmd: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
    let (reply, rx) = oneshot::channel();
    shared
        .engine
        .send(cmd(reply))
        .map_err(|_| "the daemon is shutting down".to_owned())?;
    rx.await
        .map_err(|_| "the daemon is shutting down".to_owned())?
}

/// `answer` with its names filled in (a page of at most a few thousand
/// uids), on the blocking pool.
async fn named<T: Names + Send + 'static>(mut answer: T) -> Result<T, String> {
    blocking(move || {
        let mut cache = NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: a policy of a million uids pages through names, it
        // does not keep them all.
        if cache.len() > NAME_CACHE {
            cache.clear();
        }
        fill_user_names(&mut answer, &Nss, &mut cache);
        answer
    })
    .await
}

/// Names the control handler looked up, shared by every answer (status
/// pages, list), so paging through a large VM asks NSS once per uid.
static NAMES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, String>>> =
    std::sync::LazyLock::new(Default::default);
/// Entries of [`NAMES`] before it starts over.
pub(super) const NAME_CACHE: usize = 100_000;

/// Fills every name the engine left out (`"user": null` next to a
/// `"uid"`) with that uid's name (`#UID` without a passwd entry), asking
/// `dir` once per uid not in `cache`.
pub fn fill_user_names<T: Names + ?Sized>(
    answer: &mut T,
    dir: &dyn Directory,
    cache: &mut std::collections::HashMap<u32, String>,
) {
    answer.each_name(&mut |uid, user| {
        if user.is_none() {
            let name = cache
                .entry(uid)
                .or_insert_with(|| dir.user_name(uid).unwrap_or_else(|| format!("#{uid}")));
            *user = Some(name.clone());
        }
    });
}

pub(super) async fn stream_events(
    mut stream: UnixStream,
    shared: &Shared,
    only_uid: Option<u32>,
) -> anyhow::Result<()> {
    let mut rx = shared.events.subscribe();
    write_line(
        &mut stream,
        &Response::ok(Answer::Streaming("streaming events".into())),
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
