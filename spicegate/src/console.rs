//! `@console`: who holds the active session on seat0, from systemd-logind
//! over D-Bus. Watched through logind's change signals, with a short
//! re-check as a safety net. Remote (SSH) sessions have no seat and never
//! count; greeter and non-user sessions do not count either. While logind
//! cannot be reached, nobody is the console user (fail closed).

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::watch;
use zbus::{Connection, OwnedObjectPath, Proxy, proxy::CacheProperties};

const LOGIND: &str = "org.freedesktop.login1";
const SEAT0: &str = "/org/freedesktop/login1/seat/seat0";
/// Re-check even without a signal, in case one is missed.
const RECHECK: Duration = Duration::from_secs(2);

/// Publishes the console user's uid on `tx` for as long as the daemon runs.
/// `bus`: a D-Bus address instead of the system bus (tests).
pub async fn watch(bus: Option<String>, tx: watch::Sender<Option<u32>>) {
    let mut reported = false;
    loop {
        if let Err(e) = follow(bus.as_deref(), &tx).await {
            tx.send_if_modified(|v| v.take().is_some());
            if reported {
                log::debug!("logind: {e}");
            } else {
                log::info!(
                    "logind is not reachable ({e}); `@console` (if the policy uses it) grants nobody until it is"
                );
                reported = true;
            }
        }
        tokio::time::sleep(RECHECK).await;
    }
}

async fn connect(bus: Option<&str>) -> zbus::Result<Connection> {
    match bus {
        Some(addr) => zbus::connection::Builder::address(addr).build().await,
        None => Connection::system().await,
    }
}

async fn follow(bus: Option<&str>, tx: &watch::Sender<Option<u32>>) -> zbus::Result<()> {
    let conn = connect(bus).await?;
    let seat = Proxy::new(&conn, LOGIND, SEAT0, "org.freedesktop.login1.Seat").await?;
    let mut changes = seat
        .receive_property_changed::<(String, OwnedObjectPath)>("ActiveSession")
        .await;
    loop {
        let uid = console_uid(&conn, &seat).await?;
        tx.send_if_modified(|v| {
            let changed = *v != uid;
            *v = uid;
            changed
        });
        tokio::select! {
            _ = changes.next() => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

async fn console_uid(conn: &Connection, seat: &Proxy<'_>) -> zbus::Result<Option<u32>> {
    let (_id, path): (String, OwnedObjectPath) = seat.get_property("ActiveSession").await?;
    if path.as_str() == "/" {
        return Ok(None);
    }
    let session = zbus::proxy::Builder::<Proxy<'_>>::new(conn)
        .destination(LOGIND)
        .path(path)
        .interface("org.freedesktop.login1.Session")
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let (uid, _): (u32, OwnedObjectPath) = session.get_property("User").await?;
    let remote: bool = session.get_property("Remote").await?;
    let class: String = session.get_property("Class").await?;
    let active: bool = session.get_property("Active").await?;
    Ok((active && !remote && class == "user").then_some(uid))
}
