//! A fake systemd-logind on a private D-Bus daemon, for `@console`.
//!
//! It serves the part of logind's interface the daemon reads, under the
//! same names the real one uses (`org.freedesktop.login1` on the bus):
//! `/org/freedesktop/login1/seat/seat0` with `org.freedesktop.login1.Seat`
//! property `ActiveSession (so)`, which emits `PropertiesChanged` when it
//! changes, and session objects `/org/freedesktop/login1/session/<id>` with
//! `org.freedesktop.login1.Session` properties `User (uo)`, `Remote (b)`,
//! `Class (s)` and `Active (b)`. So the daemon's watcher is tested against
//! logind's interface, not against a real logind.
//!
//! The bus is a `dbus-daemon --session` on a socket of its own in /tmp
//! (package `dbus`); Drop stops it and removes the socket.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use zbus::{Connection, OwnedObjectPath};

const NAME: &str = "org.freedesktop.login1";
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

/// One login session as logind describes it.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub uid: u32,
    /// An SSH (or other remote) login.
    pub remote: bool,
    /// `user`, `greeter`, `lock-screen`, `background`, ...
    pub class: String,
    pub active: bool,
}

impl SessionSpec {
    /// A graphical login at this machine's screen: what `@console` counts.
    pub fn local(uid: u32) -> Self {
        Self {
            uid,
            remote: false,
            class: "user".into(),
            active: true,
        }
    }

    pub fn remote(uid: u32) -> Self {
        Self {
            remote: true,
            ..Self::local(uid)
        }
    }

    pub fn class(uid: u32, class: &str) -> Self {
        Self {
            class: class.into(),
            ..Self::local(uid)
        }
    }

    pub fn inactive(uid: u32) -> Self {
        Self {
            active: false,
            ..Self::local(uid)
        }
    }
}

struct Session(SessionSpec);

#[zbus::interface(name = "org.freedesktop.login1.Session")]
impl Session {
    #[zbus(property)]
    fn user(&self) -> (u32, OwnedObjectPath) {
        let path = format!("/org/freedesktop/login1/user/_{}", self.0.uid);
        (
            self.0.uid,
            OwnedObjectPath::try_from(path).expect("object path"),
        )
    }
    #[zbus(property)]
    fn remote(&self) -> bool {
        self.0.remote
    }
    #[zbus(property)]
    fn class(&self) -> String {
        self.0.class.clone()
    }
    #[zbus(property)]
    fn active(&self) -> bool {
        self.0.active
    }
}

pub struct FakeLogind {
    bus: Option<Child>,
    socket: PathBuf,
    /// The bus address to hand to `spicegate run --logind-bus`.
    pub address: String,
    rt: tokio::runtime::Runtime,
    conn: Option<Connection>,
    sessions: u32,
}

impl FakeLogind {
    /// Starts a private bus and serves logind on it with nobody on seat0.
    pub fn start() -> Self {
        let socket = std::env::temp_dir().join(format!(
            "sg-bus-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        let mut bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting dbus-daemon (Debian package `dbus`)");
        let mut line = String::new();
        let read = BufReader::new(bus.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| e.to_string());
        // From here on the guard owns the bus, so a failure below stops it.
        let mut me = Self {
            bus: Some(bus),
            socket,
            address: line.trim().to_owned(),
            rt: tokio::runtime::Builder::new_multi_thread()
                // Worker threads: the fake answers the daemon while the test
                // thread sleeps or waits for a probe.
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime for the fake logind"),
            conn: None,
            sessions: 0,
        };
        if let Err(e) = read {
            panic!("dbus-daemon printed no address: {e}");
        }
        assert!(
            me.address.starts_with("unix:"),
            "dbus-daemon printed {:?} instead of its address",
            me.address
        );
        me.serve();
        eprintln!("[logind] fake logind on {}", me.address);
        me
    }

    /// Takes the name on the bus, with nobody on seat0.
    fn serve(&mut self) {
        let address = self.address.clone();
        let conn = self.rt.block_on(async {
            zbus::connection::Builder::address(address.as_str())
                .name(NAME)
                .serve_at(
                    SEAT0,
                    Seat {
                        active: (String::new(), root_path()),
                    },
                )
                .build()
                .await
        });
        self.conn = Some(conn.unwrap_or_else(|e| panic!("serving {NAME} on {address}: {e}")));
    }

    /// logind is back after [`FakeLogind::vanish`] (a restart), with
    /// nobody on seat0 until [`FakeLogind::activate`].
    pub fn come_back(&mut self) {
        assert!(self.conn.is_none(), "the fake logind is still running");
        eprintln!("[logind] fake logind is back on the bus");
        self.serve();
    }

    /// A new session becomes the active one on seat0 (a login or a user
    /// switch); returns its id.
    pub fn activate(&mut self, spec: SessionSpec) -> String {
        self.sessions += 1;
        let id = format!("c{}", self.sessions);
        let path = format!("/org/freedesktop/login1/session/{id}");
        eprintln!("[logind] session {id} active on seat0: {spec:?}");
        let conn = self.conn.as_ref().expect("fake logind is running");
        self.rt.block_on(async {
            conn.object_server()
                .at(path.as_str(), Session(spec))
                .await
                .expect("registering the session object");
        });
        let path = OwnedObjectPath::try_from(path).expect("session path");
        self.set_active(id.clone(), path);
        id
    }

    /// Nobody on seat0 (logout; logind's `ActiveSession` is then `("", "/")`).
    pub fn logout(&mut self) {
        eprintln!("[logind] nobody on seat0");
        self.set_active(String::new(), root_path());
    }

    fn set_active(&mut self, id: String, path: OwnedObjectPath) {
        let conn = self.conn.as_ref().expect("fake logind is running");
        self.rt.block_on(async {
            let seat = conn
                .object_server()
                .interface::<_, Seat>(SEAT0)
                .await
                .expect("seat0 object");
            let mut s = seat.get_mut().await;
            s.active = (id, path);
            s.active_session_changed(seat.signal_emitter())
                .await
                .expect("emitting PropertiesChanged for ActiveSession");
        });
    }

    /// logind goes away (gives up its name, disconnects); the bus stays.
    pub fn vanish(&mut self) {
        if let Some(c) = self.conn.take() {
            eprintln!("[logind] fake logind leaves the bus");
            self.rt.block_on(async {
                let _ = c.release_name(NAME).await;
                let _ = c.close().await;
            });
        }
    }
}

fn root_path() -> OwnedObjectPath {
    OwnedObjectPath::try_from("/").expect("root path")
}

impl Drop for FakeLogind {
    fn drop(&mut self) {
        self.vanish();
        if let Some(mut bus) = self.bus.take() {
            // SIGTERM lets dbus-daemon clean up; SIGKILL if it does not.
            let pid = nix::unistd::Pid::from_raw(bus.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(bus.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(bus.try_wait(), Ok(None)) {
                let _ = bus.kill();
            }
            if let Err(e) = bus.wait() {
                eprintln!("[logind] LEFTOVER dbus-daemon pid {}: {e}", bus.id());
            }
        }
        if let Err(e) = std::fs::remove_file(&self.socket)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "[logind] LEFTOVER bus socket {}: {e}",
                self.socket.display()
            );
        }
    }
}
