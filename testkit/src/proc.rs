//! Child processes a test or the benchmark starts: a guard that stops and
//! reaps one, and a collector of the lines it writes.

use std::{
    io::{self, BufRead as _, BufReader, Read},
    process::{Child, Command, ExitStatus},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{context, log_prefix, wait_until};

/// A running child. Drop sends SIGTERM, then SIGKILL when it is still
/// there after the grace period (at once with a zero grace), and reaps
/// it; it never panics.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
    grace: Duration,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` (its stdio as the caller set it up) with a grace of
    /// 5 s; `what` names it in messages.
    pub fn spawn(cmd: &mut Command, what: &str) -> io::Result<Self> {
        let child = cmd
            .spawn()
            .map_err(|e| context(format!("starting {what} ({cmd:?})"), e))?;
        Ok(Self {
            child,
            what: what.to_owned(),
            grace: Duration::from_secs(5),
            status: None,
        })
    }

    /// How long Drop waits after SIGTERM before SIGKILL (zero: SIGKILL
    /// right away).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// The child itself, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status, once it has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends `sig`, unless it was reaped already (its pid may be another
    /// process's by now).
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none()
            && let Ok(pid) = libc::pid_t::try_from(self.child.id())
        {
            // SAFETY: kill on our own, not yet reaped, child.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.exited().is_some());
        self.status
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn stop_with(&mut self, sig: libc::c_int, timeout: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() {
            self.signal(sig);
        }
        self.wait_exit(timeout)
    }

    /// What Drop does: SIGTERM, SIGKILL after the grace, reaped; whether it
    /// is gone.
    pub fn stop(&mut self) -> bool {
        if self.exited().is_some() {
            return true;
        }
        if !self.grace.is_zero() {
            if self.stop_with(libc::SIGTERM, self.grace).is_some() {
                return true;
            }
            eprintln!(
                "{} {} (pid {}) ignored SIGTERM; killing it",
                log_prefix(),
                self.what,
                self.pid()
            );
        }
        self.stop_with(libc::SIGKILL, Duration::from_secs(5))
            .is_some()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.stop() {
            eprintln!(
                "{} LEFTOVER process {} (pid {})",
                log_prefix(),
                self.what,
                self.pid()
            );
        }
    }
}

/// The lines a process writes, each with the moment it was read, collected
/// by a thread per stream (so a full pipe never blocks the process).
#[derive(Debug, Default)]
pub struct LineLog {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    readers: Vec<JoinHandle<()>>,
}

impl LineLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Collects whichever of `child`'s stdout and stderr are piped, each
    /// echoed after its prefix when it has one (see [`LineLog::read`]).
    pub fn of_child(child: &mut Child, echo_out: Option<String>, echo_err: Option<String>) -> Self {
        let mut log = Self::new();
        if let Some(out) = child.stdout.take() {
            log.read(out, echo_out);
        }
        if let Some(err) = child.stderr.take() {
            log.read(err, echo_err);
        }
        log
    }

    /// Reads `stream` to its end on a thread; with `echo`, every line is
    /// also written to stderr after that prefix (the test's output, shown
    /// when it fails).
    pub fn read(&mut self, stream: impl Read + Send + 'static, echo: Option<String>) {
        let sink = Arc::clone(&self.lines);
        self.readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(prefix) = &echo {
                    eprintln!("{prefix} {line}");
                }
                let at = Instant::now();
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((at, line));
            }
        }));
    }

    /// Every line so far, with when it was read.
    pub fn timed(&self) -> Vec<(Instant, String)> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.timed().into_iter().map(|(_, l)| l).collect()
    }

    /// How many lines so far.
    pub fn count(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether every stream has ended (the process closed its output,
    /// usually by exiting).
    pub fn closed(&self) -> bool {
        self.readers.iter().all(JoinHandle::is_finished)
    }

    /// Waits up to `timeout` for the streams to end and joins the readers
    /// that did (one whose stream a grandchild still holds is left).
    pub fn join(&mut self, timeout: Duration) {
        wait_until(timeout, || self.closed());
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            } else {
                self.readers.push(r);
            }
        }
    }
}
