//! Interleaved measurements: every round measures "no filter" and the
//! system under test back to back (A B, then B A in the next round, so a
//! linear drift cancels), and the result is the distribution of the
//! per-round ratios, not a ratio of two averages taken minutes apart.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::env::{Worker, check_interrupted};

/// Which cgroup a worker lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cg {
    /// Nothing attached: "no filter" for spicegate, and every iptables/nft
    /// measurement (those filter by rules, not by cgroup).
    Base,
    /// spicegate's programs are attached here.
    Guarded,
}

/// The four long-lived workers: {base, guarded} x {granted, denied} user.
pub struct Workers {
    pub base_granted: Worker,
    pub base_denied: Worker,
    pub guarded_granted: Worker,
    pub guarded_denied: Worker,
}

impl Workers {
    pub fn get(&mut self, cg: Cg, denied: bool) -> &mut Worker {
        match (cg, denied) {
            (Cg::Base, false) => &mut self.base_granted,
            (Cg::Base, true) => &mut self.base_denied,
            (Cg::Guarded, false) => &mut self.guarded_granted,
            (Cg::Guarded, true) => &mut self.guarded_denied,
        }
    }
}

/// The three connect paths, in table order.
pub const PATHS: [&str; 3] = ["granted", "unguarded", "denied"];

/// Where the paths connect (`ADDR:PORT`).
#[derive(Debug, Clone)]
pub struct Targets {
    pub guarded: String,
    pub unguarded: String,
}

/// How the system under test is switched in and out.
pub struct System<'a> {
    pub name: &'static str,
    /// Cgroup of the workers while the filter is on / off.
    pub on_cg: Cg,
    pub off_cg: Cg,
    /// errno of a refused connect while on; `None` for the A/A control,
    /// which refuses nothing.
    pub refused_errno: Option<i32>,
    /// Puts the filter in the path (true) or takes it out; a no-op when
    /// the cgroup choice does the switching.
    pub toggle: &'a mut dyn FnMut(bool) -> anyhow::Result<()>,
}

/// Per-round values with the filter off and on, and the per-round
/// ratios on/off. For connects the values are the batch's median ns per
/// connect, and `mean_ratios` the same ratios from the batch means (total
/// time / count), which a stall inside a batch moves; for streams, Gbit/s.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub off: Vec<f64>,
    pub on: Vec<f64>,
    pub ratios: Vec<f64>,
    pub mean_ratios: Vec<f64>,
}

impl Series {
    pub fn ratio(&self) -> Spread {
        Spread::of(&self.ratios)
    }
}

/// Median and the 10th/90th percentiles.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Self {
            median: percentile(&v, 0.5),
            p10: percentile(&v, 0.1),
            p90: percentile(&v, 0.9),
        }
    }
}

/// Linear interpolation between closest ranks; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = p * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

pub fn median(values: &[f64]) -> f64 {
    Spread::of(values).median
}

/// One batch: connects for `ms` milliseconds. Returns the median ns of
/// one connect (each timed on its own) and the batch's mean, after
/// checking every attempt had the expected outcome.
fn batch(
    w: &mut Worker,
    addr: &str,
    ms: u64,
    expect: Result<(), i32>,
    what: &str,
) -> anyhow::Result<(f64, f64)> {
    let a = w.ask(&format!("connect {addr} {ms}"))?;
    let num = |i: usize| -> anyhow::Result<u64> {
        a.get(i)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: odd answer {a:?}", w.what))
    };
    let (count, elapsed, oks, fails, errno) = (num(1)?, num(2)?, num(3)?, num(4)?, num(5)?);
    let median = num(6)?;
    let right = match expect {
        Ok(()) => fails == 0,
        Err(e) => oks == 0 && errno == e as u64,
    };
    if !right || count == 0 {
        bail!(
            "{what}: expected {} on every connect, got {oks} successes and {fails} failures (last errno {errno}) of {count}",
            match expect {
                Ok(()) => "success".to_owned(),
                Err(e) => format!("errno {e}"),
            }
        );
    }
    Ok((median as f64, elapsed as f64 / count as f64))
}

/// The connect() cost of every path, interleaved with "no filter".
pub fn connect_rounds(
    sys: &mut System<'_>,
    workers: &mut Workers,
    t: &Targets,
    rounds: usize,
    batch_ms: u64,
) -> anyhow::Result<[Series; 3]> {
    let mut out: [Series; 3] = Default::default();
    // Round 0 warms caches, the listener and the rule paths; not counted.
    for round in 0..=rounds {
        check_interrupted()?;
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut ns = [[(0.0f64, 0.0f64); 3]; 2];
        for on in order {
            (sys.toggle)(on)?;
            let cg = if on { sys.on_cg } else { sys.off_cg };
            for (i, path) in PATHS.iter().enumerate() {
                let (denied_user, addr) = match i {
                    0 => (false, &t.guarded),
                    1 => (true, &t.unguarded),
                    _ => (true, &t.guarded),
                };
                let expect = match sys.refused_errno {
                    Some(e) if on && i == 2 => Err(e),
                    _ => Ok(()),
                };
                let what = format!(
                    "{} {} path ({})",
                    sys.name,
                    path,
                    if on { "filter on" } else { "no filter" }
                );
                ns[usize::from(on)][i] =
                    batch(workers.get(cg, denied_user), addr, batch_ms, expect, &what)?;
            }
        }
        if round == 0 {
            continue;
        }
        for (i, s) in out.iter_mut().enumerate() {
            s.off.push(ns[0][i].0);
            s.on.push(ns[1][i].0);
            s.ratios.push(ns[1][i].0 / ns[0][i].0);
            s.mean_ratios.push(ns[1][i].1 / ns[0][i].1);
        }
    }
    Ok(out)
}

/// Bulk throughput of one stream by the granted user to the guarded
/// endpoint, in Gbit/s, interleaved with "no filter". `on` holds Gbit/s
/// with the filter, `off` without, `ratios` on/off.
pub fn stream_rounds(
    sys: &mut System<'_>,
    workers: &mut Workers,
    t: &Targets,
    rounds: usize,
    ms: u64,
) -> anyhow::Result<Series> {
    let mut out = Series::default();
    for round in 0..rounds {
        check_interrupted()?;
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut gbits = [0.0f64; 2];
        for on in order {
            (sys.toggle)(on)?;
            let cg = if on { sys.on_cg } else { sys.off_cg };
            let w = workers.get(cg, false);
            let a = w.ask(&format!("stream {} {ms}", t.guarded))?;
            let (Some(bytes), Some(ns)) = (
                a.get(1).and_then(|s| s.parse::<f64>().ok()),
                a.get(2).and_then(|s| s.parse::<f64>().ok()),
            ) else {
                bail!(
                    "{} stream ({}): {a:?}",
                    sys.name,
                    if on { "on" } else { "off" }
                );
            };
            if a[0] != "done" {
                bail!("{} stream failed: {a:?}", sys.name);
            }
            gbits[usize::from(on)] = bytes * 8.0 / ns;
        }
        out.off.push(gbits[0]);
        out.on.push(gbits[1]);
        out.ratios.push(gbits[1] / gbits[0]);
    }
    Ok(out)
}

/// The verdicts every system must give before it is measured.
pub fn verify(sys: &mut System<'_>, workers: &mut Workers, t: &Targets) -> anyhow::Result<()> {
    for on in [true, false] {
        (sys.toggle)(on)?;
        let cg = if on { sys.on_cg } else { sys.off_cg };
        let granted = workers.get(cg, false).probe(&t.guarded)?;
        let unguarded = workers.get(cg, true).probe(&t.unguarded)?;
        let denied = workers.get(cg, true).probe(&t.guarded)?;
        let want_denied = match sys.refused_errno {
            Some(e) if on => Err(e),
            _ => Ok(()),
        };
        if granted != Ok(()) || unguarded != Ok(()) || denied != want_denied {
            bail!(
                "{} ({}) decides wrongly: granted {granted:?}, unguarded {unguarded:?}, denied {denied:?} (expected Ok, Ok, {want_denied:?})",
                sys.name,
                if on { "on" } else { "off" }
            );
        }
    }
    Ok(())
}

/// One probe right after an apply command returned: the change must be in
/// force by then.
pub fn expect_verdict(
    w: &mut Worker,
    addr: &str,
    want: Result<(), i32>,
    what: &str,
) -> anyhow::Result<()> {
    let got = w.probe(addr)?;
    if got != want {
        bail!("{what}: right after the apply, the probe got {got:?}, expected {want:?}");
    }
    Ok(())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "No filter" against itself, interleaved like every other system: what
/// the ratios look like when nothing differs.
pub fn control_series(
    workers: &mut Workers,
    targets: &Targets,
    p: super::Params,
) -> anyhow::Result<super::SystemResult> {
    let mut noop = |_: bool| Ok(());
    let mut sys = System {
        name: "no filter vs itself (A/A)",
        on_cg: Cg::Base,
        off_cg: Cg::Base,
        refused_errno: None,
        toggle: &mut noop,
    };
    verify(&mut sys, workers, targets)?;
    let connect = connect_rounds(&mut sys, workers, targets, p.rounds, p.batch_ms)?;
    let stream = stream_rounds(&mut sys, workers, targets, p.stream_rounds, p.stream_ms)?;
    Ok(super::SystemResult {
        name: sys.name,
        connect,
        stream,
        apply_ms: Vec::new(),
        apply_cpu_ms: Vec::new(),
        apply_what: "",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert!((percentile(&v, 0.1) - 1.4).abs() < 1e-9);
        assert!(percentile(&[], 0.5).is_nan());
        let s = Spread::of(&[5.0, 1.0, f64::NAN, 3.0]);
        assert_eq!((s.median, s.p10), (3.0, 1.4));
    }
}
