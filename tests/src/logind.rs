//! A fake systemd-logind on a private D-Bus daemon, exposing the same
//! interface the real one does (org.freedesktop.login1: seat0's
//! ActiveSession, sessions' User, Remote, Class, Active, with
//! PropertiesChanged), so the daemon's `@console` watcher can be tested on a
//! machine without logind. Drop stops the bus.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
};

use zbus::{Connection, OwnedObjectPath};

const SEAT0: &str = "/org/freedesktop/login1/seat/seat0";

struct Seat {
    active: (String, OwnedObjectPath),
}

#[zbus::interface(name = "org.freedesktop.login1.Seat")]
impl Seat {
    #[zbus(property)]
    fn active_session(&self) -> (String, OwnedObjectPath) {
        self.active.clone()
    }
}

struct Session {
    uid: u32,
    remote: bool,
    class: String,
}

#[zbus::interface(name = "org.freedesktop.login1.Session")]
impl Session {
    #[zbus(property)]
    fn user(&self) -> (u32, OwnedObjectPath) {
        let path = format!("/org/freedesktop/login1/user/_{}", self.uid);
        (
            self.uid,
            OwnedObjectPath::try_from(path).expect("object path"),
        )
    }
    #[zbus(property)]
    fn remote(&self) -> bool {
        self.remote
    }
    #[zbus(property)]
    fn class(&self) -> String {
        self.class.clone()
    }
    #[zbus(property)]
    fn active(&self) -> bool {
        true
    }
}

pub struct FakeLogind {
    bus: Child,
    pub address: String,
    rt: tokio::runtime::Runtime,
    conn: Option<Connection>,
    sessions: u32,
}

impl FakeLogind {
    pub fn start() -> Self {
        let path = std::env::temp_dir().join(format!(
            "sg-bus-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        let mut bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address=unix:path={}", path.display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting dbus-daemon (package dbus)");
        let mut line = String::new();
        BufReader::new(bus.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("bus address");
        let address = line.trim().to_owned();
        // Worker threads, so the fake answers the daemon while the test sleeps.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let conn = rt.block_on(async {
            let conn = zbus::connection::Builder::address(address.as_str())
                .name("org.freedesktop.login1")
                .serve_at(
                    SEAT0,
                    Seat {
                        active: (
                            String::new(),
                            OwnedObjectPath::try_from("/").expect("root path"),
                        ),
                    },
                )
                .build()
                .await
                .expect("connecting the fake logind");
            conn
        });
        Self {
            bus,
            address,
            rt,
            conn: Some(conn),
            sessions: 0,
        }
    }

    /// Makes a session of `uid` the active one on seat0.
    pub fn activate(&mut self, uid: u32, remote: bool, class: &str) {
        self.sessions += 1;
        let id = format!("c{}", self.sessions);
        let path = format!("/org/freedesktop/login1/session/{id}");
        let conn = self.conn.as_ref().expect("fake logind running");
        self.rt.block_on(async {
            conn.object_server()
                .at(
                    path.as_str(),
                    Session {
                        uid,
                        remote,
                        class: class.to_owned(),
                    },
                )
                .await
                .expect("session object");
            let seat = conn
                .object_server()
                .interface::<_, Seat>(SEAT0)
                .await
                .expect("seat0");
            let mut s = seat.get_mut().await;
            s.active = (id, OwnedObjectPath::try_from(path).expect("path"));
            s.active_session_changed(seat.signal_emitter())
                .await
                .expect("PropertiesChanged");
        });
    }

    /// Nobody on seat0.
    pub fn logout(&mut self) {
        let conn = self.conn.as_ref().expect("fake logind running");
        self.rt.block_on(async {
            let seat = conn
                .object_server()
                .interface::<_, Seat>(SEAT0)
                .await
                .expect("seat0");
            let mut s = seat.get_mut().await;
            s.active = (String::new(), OwnedObjectPath::try_from("/").expect("path"));
            s.active_session_changed(seat.signal_emitter())
                .await
                .expect("PropertiesChanged");
        });
    }

    /// logind goes away (the bus stays).
    pub fn vanish(&mut self) {
        if let Some(c) = self.conn.take() {
            self.rt.block_on(async { drop(c) });
        }
    }
}

impl Drop for FakeLogind {
    fn drop(&mut self) {
        self.vanish();
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}
