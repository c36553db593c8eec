//! The two deny storms: one user connecting as fast as it can to an
//! endpoint it is not granted, and sg-flood cycling through 30,000 uids,
//! with `status` sampled all along and a temporary grant that expires in
//! the middle.

use super::*;

/// The denied user connects to its guarded endpoint as fast as it can.
pub(super) fn deny_storm(
    d: &Daemon,
    workers: &mut Workers,
    t: &Targets,
    layout: &Layout,
    storm_ms: u64,
) -> anyhow::Result<StormResult> {
    eprintln!("xtask: deny storm for {:.0}s", storm_ms as f64 / 1000.0);
    let rss_before = d.rss_kib()?;
    let lines_before = d.deny_lines();
    let ticks_before = d.cpu_ticks()?;
    let start = Instant::now();
    let a = workers
        .get(Cg::Guarded, true)
        .ask(&format!("connect {} {storm_ms}", t.guarded))?;
    let secs = start.elapsed().as_secs_f64();
    let ticks = d.cpu_ticks()?.saturating_sub(ticks_before);
    let count: u64 = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let oks: u64 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    if oks != 0 || a.get(5).map(String::as_str) != Some(&libc::EPERM.to_string()) {
        bail!("deny storm: expected every connect refused with EPERM, got {a:?}");
    }
    // Lines the kernel reported near the end reach the log a moment later.
    std::thread::sleep(Duration::from_secs(1));
    let hz = env::ticks_per_sec();
    Ok(StormResult {
        grants: layout.grants,
        secs,
        connects: count,
        cpu_percent: ticks as f64 / hz / secs * 100.0,
        cpu_ticks: ticks,
        deny_lines: d.deny_lines() - lines_before,
        rss_before_kib: rss_before,
        rss_after_kib: d.rss_kib()?,
        uids: None,
    })
}

/// Distinct uids of the uid storm, from a range no policy names.
pub(super) const STORM_UIDS: u32 = 30_000;
pub const STORM_FIRST_UID: u32 = 400_000;

/// One `status` round trip on the control socket, in ms.
pub(super) fn status_ms(socket: &Path) -> anyhow::Result<f64> {
    use std::io::{BufRead as _, Write as _};
    let start = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&mut s).read_line(&mut line)?;
    if !line.contains("\"ok\":true") {
        bail!("status failed: {line}");
    }
    Ok(ms(start.elapsed()))
}

pub(super) fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: usize| {
        v[((v.len() * q).div_ceil(100))
            .saturating_sub(1)
            .min(v.len() - 1)]
    };
    (at(50), at(99))
}

/// sg-flood from [`STORM_UIDS`] uids for `storm_ms`, with `status` sampled
/// all along and a temporary grant that expires in the middle.
pub(super) fn uid_storm(
    ctx: &Ctx<'_>,
    d: &Daemon,
    pin: &PinDir,
    cgroup: &Path,
    layout: &Layout,
    storm_ms: u64,
) -> anyhow::Result<UidStormResult> {
    let secs = (storm_ms / 1000).max(4);
    eprintln!("xtask: deny storm from {STORM_UIDS} uids for {secs}s");
    let socket = pin.socket();
    let quiet: Vec<f64> = (0..30)
        .map(|_| status_ms(&socket))
        .collect::<anyhow::Result<_>>()?;
    let rss_before = d.rss_kib()?;
    let lines_before = d.line_count();
    let ticks_before = d.cpu_ticks()?;
    let start = Instant::now();
    let flood = Command::new(&ctx.bins.sg_flood)
        .arg("--cgroup")
        .arg(cgroup)
        .args(["--connect", &ctx.targets.guarded])
        .args(["--uid-base", &STORM_FIRST_UID.to_string()])
        .args(["--uids", &STORM_UIDS.to_string()])
        .args(["--secs", &secs.to_string(), "--procs", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting sg-flood")?;
    let sampler = {
        let socket = socket.clone();
        let end = start + Duration::from_secs(secs.saturating_sub(1));
        std::thread::spawn(move || {
            let mut v = Vec::new();
            std::thread::sleep(Duration::from_millis(500));
            while Instant::now() < end {
                if let Ok(t) = status_ms(&socket) {
                    v.push(t);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            v
        })
    };
    // A grant of two seconds, given a second into the storm.
    std::thread::sleep(Duration::from_secs(1));
    let vm = format!("bench{}", layout.probe_port());
    sh(Command::new(&ctx.bins.spicegate)
        .arg("--socket")
        .arg(&socket)
        .args(["grant", &layout.denied, &vm, "--for", "2s"]))?;
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let out = flood.wait_with_output().context("waiting for sg-flood")?;
    let storm_secs = start.elapsed().as_secs_f64();
    let ticks = d.cpu_ticks()?.saturating_sub(ticks_before);
    let counts: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("sg-flood's summary")?;
    let status_storm = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the status sampler panicked"))?;
    // The grant expires at the start of the unix second 2 s after the one
    // it was given in (the daemon counts whole seconds).
    let expiry_real = {
        let into_second = Duration::from_nanos(u64::from(unix_now.subsec_nanos()));
        start + Duration::from_secs(1) - into_second + Duration::from_secs(2)
    };
    let expired_at = d
        .line_at("temporary grant expired")
        .ok_or_else(|| anyhow::anyhow!("the grant given during the storm never expired"))?;
    let grant_late_ms = ms(expired_at.saturating_duration_since(expiry_real));
    let lines = d.line_count() - lines_before;
    Ok(UidStormResult {
        uids: STORM_UIDS,
        secs: storm_secs,
        connects: counts["attempts"].as_u64().unwrap_or(0),
        cpu_percent: ticks as f64 / env::ticks_per_sec() / storm_secs * 100.0,
        lines_per_sec: lines as f64 / storm_secs,
        status_quiet_ms: p50_p99(quiet),
        status_storm_ms: p50_p99(status_storm),
        grant_late_ms,
        rss_before_kib: rss_before,
        rss_after_kib: d.rss_kib()?,
    })
}
