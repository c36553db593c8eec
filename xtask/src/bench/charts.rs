//! SVG charts of a run, written next to the results document and linked
//! from its generated part: connect() cost, apply time and the daemon's
//! memory against the number of grants, on log scales.
//!
//! Drawn with plotters' SVG backend: text goes out as `<text>` elements
//! (plotters only estimates its width for the layout), so no font files or
//! font libraries are needed. A value that is missing (iptables is left out
//! at a million grants) or not positive has no point.

use std::{fs, ops::Range, path::Path};

use anyhow::Context as _;
use plotters::prelude::*;

use super::{SizeResult, SystemResult, measure::median};

/// The charts: file name (next to the document) and the alt text of its
/// link.
pub const CHARTS: [(&str, &str); 3] = [
    (
        "bench-connect.svg",
        "connect() cost (granted path, median ns) against the number of grants",
    ),
    (
        "bench-apply.svg",
        "time to apply a changed policy (median ms) against the number of grants",
    ),
    (
        "bench-memory.svg",
        "spicegate daemon memory (MB) against the number of grants",
    ),
];

const SIZE: (u32, u32) = (800, 500);
const GREY: RGBColor = RGBColor(110, 110, 110);
const RED: RGBColor = RGBColor(214, 39, 40);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const ORANGE: RGBColor = RGBColor(255, 127, 14);

/// One line of a chart: its legend entry and its (grants, value) points.
#[derive(Debug)]
struct Line {
    label: String,
    color: RGBColor,
    /// Stroke width: lines that lie on top of each other (no filter,
    /// nftables and spicegate are within a few % of each other) are drawn
    /// from the widest to the narrowest, so each shows as a band.
    width: u32,
    points: Vec<(f64, f64)>,
}

struct Chart {
    file: &'static str,
    title: &'static str,
    y_desc: &'static str,
    lines: Vec<Line>,
}

/// Writes the charts of `results` into `dir` and returns the names of the
/// files written (a chart with no point at all is left out).
pub fn write(results: &[SizeResult], dir: &Path) -> anyhow::Result<Vec<String>> {
    let charts = [
        Chart {
            file: CHARTS[0].0,
            title: "connect() cost, granted path",
            y_desc: "ns per connect (median)",
            lines: connect_lines(results),
        },
        Chart {
            file: CHARTS[1].0,
            title: "Applying a changed policy",
            y_desc: "ms per apply (median)",
            lines: apply_lines(results),
        },
        Chart {
            file: CHARTS[2].0,
            title: "spicegate daemon memory",
            y_desc: "MB",
            lines: memory_lines(results),
        },
    ];
    let mut written = Vec::new();
    for chart in &charts {
        if chart.lines.iter().all(|l| l.points.is_empty()) {
            continue;
        }
        let svg = render(chart)?;
        let path = dir.join(chart.file);
        fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        written.push(chart.file.to_owned());
    }
    Ok(written)
}

/// Markdown image links to `files` (names relative to the document), as a
/// paragraph of its own; empty when there are none.
pub fn links(files: &[String]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nCharts of the table above (log scales on both axes):\n\n");
    for f in files {
        let alt = CHARTS
            .iter()
            .find(|(name, _)| name == f)
            .map_or(f.as_str(), |(_, alt)| alt);
        s.push_str(&format!("![{alt}]({f})\n"));
    }
    s
}

fn system<'a>(r: &'a SizeResult, name: &str) -> Option<&'a SystemResult> {
    r.systems.iter().find(|s| s.name == name)
}

/// (grants, value) for every size where `value` gives a positive number.
fn points(results: &[SizeResult], value: impl Fn(&SizeResult) -> Option<f64>) -> Vec<(f64, f64)> {
    results
        .iter()
        .filter_map(|r| {
            let v = value(r)?;
            (v.is_finite() && v > 0.0).then_some((f64::from(r.layout.grants), v))
        })
        .collect()
}

fn line(label: &str, color: RGBColor, width: u32, points: Vec<(f64, f64)>) -> Line {
    Line {
        label: label.to_owned(),
        color,
        width,
        points,
    }
}

const SYSTEMS: [(&str, RGBColor); 3] =
    [("iptables", RED), ("nftables", BLUE), ("spicegate", GREEN)];

/// No filter (the median of every system's "off" batches at that size, as
/// in the table's "no filter" row) and each system, granted path.
fn connect_lines(results: &[SizeResult]) -> Vec<Line> {
    let mut lines = vec![line(
        "no filter",
        GREY,
        8,
        points(results, |r| {
            let off: Vec<f64> = r
                .systems
                .iter()
                .flat_map(|x| x.connect[0].off.iter().copied())
                .collect();
            Some(median(&off))
        }),
    )];
    for (name, color) in SYSTEMS {
        lines.push(line(
            name,
            color,
            if name == "nftables" { 5 } else { 2 },
            points(results, |r| {
                system(r, name).map(|x| median(&x.connect[0].on))
            }),
        ));
    }
    lines
}

/// Each system's apply (spicegate reload, iptables-restore, nft -f),
/// spicegate first.
fn apply_lines(results: &[SizeResult]) -> Vec<Line> {
    SYSTEMS
        .iter()
        .rev()
        .map(|&(name, color)| {
            let label = results
                .iter()
                .find_map(|r| system(r, name))
                .map_or(name, |x| x.apply_what);
            line(
                label,
                color,
                2,
                points(results, |r| system(r, name).map(|x| median(&x.apply_ms))),
            )
        })
        .collect()
}

fn mb(kib: u64) -> Option<f64> {
    (kib > 0).then_some(kib as f64 / 1024.0)
}

/// The daemon's VmRSS after start (the largest of the starts, as in the
/// table), settled after the reloads, and its peak (VmHWM).
fn memory_lines(results: &[SizeResult]) -> Vec<Line> {
    vec![
        line(
            "VmRSS after start",
            BLUE,
            2,
            points(results, |r| {
                r.daemon.rss_start_kib.iter().copied().max().and_then(mb)
            }),
        ),
        line(
            "VmRSS settled after reloads",
            GREEN,
            2,
            points(results, |r| mb(r.daemon.rss_end_kib)),
        ),
        line(
            "peak (VmHWM)",
            ORANGE,
            2,
            points(results, |r| mb(r.daemon.rss_peak_kib)),
        ),
    ]
}

/// Whole decades around `values` (at least one), so a log axis always
/// has labelled powers of ten. A single decade ends just below its top:
/// plotters labels the top of a one-decade log axis twice (as a power of
/// ten and as the last of 20, 30 .. 100).
fn decades(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (
            (lo / 1.05).log10().floor() as i32,
            (hi * 1.05).log10().ceil() as i32,
        )
    } else {
        (0, 1)
    };
    let (lo, hi) = (10_f64.powi(lo), 10_f64.powi(hi));
    if hi / lo <= 10.0 {
        lo..hi * 0.999
    } else {
        lo..hi
    }
}

/// 1,000,000 for numbers from 1 up; 0.5, 0.02 below.
fn number(v: f64) -> String {
    if v >= 1.0 {
        let digits = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

fn render(chart: &Chart) -> anyhow::Result<String> {
    let all = || chart.lines.iter().flat_map(|l| l.points.iter());
    let (x_lo, x_hi) = all().fold((f64::INFINITY, 0.0_f64), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let x = (x_lo / 2.0)..(x_hi * 2.0);
    let y = decades(all().map(|p| p.1));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(95)
            .build_cartesian_2d(x.log_scale(), y.log_scale())
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc("grants in the policy")
            .y_desc(chart.y_desc)
            .x_labels(6)
            .y_labels(10)
            .x_label_formatter(&|v| number(*v))
            .y_label_formatter(&|v| number(*v))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_err)?;
        for l in &chart.lines {
            if l.points.is_empty() {
                continue;
            }
            let style = l.color.stroke_width(l.width);
            c.draw_series(LineSeries::new(l.points.iter().copied(), style))
                .map_err(plot_err)?
                .label(l.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            c.draw_series(
                l.points
                    .iter()
                    .map(|&p| Circle::new(p, 3 + l.width / 2, l.color.filled())),
            )
            .map_err(plot_err)?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{DaemonResult, layout::Layout, measure::Series};

    fn series(off: f64, on: f64) -> Series {
        Series {
            off: vec![off, off * 1.01, off * 0.99],
            on: vec![on, on * 1.01, on * 0.99],
            ratios: vec![on / off],
            mean_ratios: vec![on / off],
        }
    }

    fn sys(name: &'static str, connect_ns: f64, apply_ms: f64, what: &'static str) -> SystemResult {
        SystemResult {
            name,
            connect: [
                series(30_000.0, connect_ns),
                series(30_000.0, 30_100.0),
                series(30_000.0, 6_000.0),
            ],
            stream: series(30.0, 30.0),
            apply_ms: vec![apply_ms * 0.9, apply_ms, apply_ms * 1.1],
            apply_cpu_ms: vec![apply_ms],
            apply_what: what,
        }
    }

    /// Like a full run: iptables grows to milliseconds and is left out at a
    /// million grants.
    fn synthetic() -> Vec<SizeResult> {
        [100_u32, 10_000, 100_000, 1_000_000]
            .iter()
            .map(|&g| {
                let f = f64::from(g);
                let mut systems = vec![sys(
                    "spicegate",
                    31_000.0,
                    10.0 + f / 1000.0,
                    "spicegate reload",
                )];
                if g <= 100_000 {
                    systems.push(sys(
                        "iptables",
                        30_000.0 + f * 28.0,
                        15.0 + f / 36.0,
                        "iptables-restore --noflush",
                    ));
                }
                systems.push(sys(
                    "nftables",
                    31_500.0,
                    15.0 + f / 90.0,
                    "nft -f (whole table)",
                ));
                SizeResult {
                    layout: Layout::new(g, 20_000, ("granted", 1001), ("denied", 1002)),
                    systems,
                    daemon: DaemonResult {
                        start_ms: vec![100.0],
                        rss_start_kib: vec![11_000 + g as u64 / 10, 10_000],
                        rss_end_kib: 11_500 + g as u64 / 8,
                        rss_peak_kib: 25_000 + g as u64 / 2,
                        ..DaemonResult::default()
                    },
                    nft_element_ms: vec![2.0],
                }
            })
            .collect()
    }

    #[test]
    fn missing_systems_have_no_point() {
        let results = synthetic();
        let lines = connect_lines(&results);
        let count = |label: &str| {
            lines
                .iter()
                .find(|l| l.label == label)
                .map(|l| l.points.len())
        };
        assert_eq!(count("no filter"), Some(4));
        assert_eq!(count("spicegate"), Some(4));
        assert_eq!(count("nftables"), Some(4));
        assert_eq!(count("iptables"), Some(3));
        let ipt = &lines[1].points;
        assert_eq!(ipt[2], (100_000.0, 30_000.0 + 100_000.0 * 28.0));
        let apply = apply_lines(&results);
        let labels: Vec<&str> = apply.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "spicegate reload",
                "nft -f (whole table)",
                "iptables-restore --noflush"
            ]
        );
        let mem = memory_lines(&results);
        assert_eq!(mem[0].points[0], (100.0, 11_010.0 / 1024.0));
    }

    #[test]
    fn three_svg_charts_with_series_and_axis_labels() {
        let dir = std::env::temp_dir().join(format!("sgbench-charts-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let files = write(&synthetic(), &dir).expect("charts");
        assert_eq!(files, CHARTS.map(|(f, _)| f.to_owned()));
        let read = |f: &str| fs::read_to_string(dir.join(f)).expect("read svg");
        let (connect, apply, memory) = (read(&files[0]), read(&files[1]), read(&files[2]));
        let _ = fs::remove_dir_all(&dir);
        for (svg, wants) in [
            (
                &connect,
                &[
                    "connect() cost, granted path",
                    "grants in the policy",
                    "ns per connect (median)",
                    "no filter",
                    "iptables",
                    "nftables",
                    "spicegate",
                    "1,000,000",
                ][..],
            ),
            (
                &apply,
                &[
                    "Applying a changed policy",
                    "ms per apply (median)",
                    "spicegate reload",
                    "iptables-restore --noflush",
                    "nft -f (whole table)",
                ][..],
            ),
            (
                &memory,
                &[
                    "spicegate daemon memory",
                    "VmRSS after start",
                    "VmRSS settled after reloads",
                    "peak (VmHWM)",
                ][..],
            ),
        ] {
            assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("<polyline") || svg.contains("<path"));
            for want in wants {
                assert!(
                    svg.contains(&format!(">{want}<")) || svg.contains(&format!(">\n{want}\n<")),
                    "no text {want:?} in the chart"
                );
            }
        }
        let md = links(&files);
        assert!(md.contains("![connect() cost (granted path, median ns) against the number of grants](bench-connect.svg)"));
        assert!(md.contains("(bench-apply.svg)") && md.contains("(bench-memory.svg)"));
        assert_eq!(links(&[]), "");
    }

    #[test]
    fn the_report_links_the_charts_after_the_main_table() {
        let results = synthetic();
        let machine = crate::bench::report::Machine {
            cpu: "cpu".into(),
            cores: 2,
            kernel: "k".into(),
            os: "os".into(),
            date: "d".into(),
            iptables: "i".into(),
            nft: "n".into(),
            command: "cargo xtask bench".into(),
            took: std::time::Duration::from_secs(1),
            load_start: "0".into(),
            load_end: "0".into(),
        };
        let control = sys("no filter vs itself (A/A)", 30_000.0, 0.0, "");
        let params = crate::bench::Params::new(true);
        let files = CHARTS.map(|(f, _)| f.to_owned());
        let text =
            crate::bench::report::render(&machine, &params, &control, &results, None, &files);
        let at = |s: &str| {
            text.find(s)
                .unwrap_or_else(|| panic!("no {s:?} in the report"))
        };
        assert!(at("| 1000000 | nftables |") < at("](bench-connect.svg)"));
        assert!(at("](bench-memory.svg)") < at("Changing one grant"));
        let without =
            crate::bench::report::render(&machine, &params, &control, &results, None, &[]);
        assert!(!without.contains(".svg"));
    }

    #[test]
    fn one_size_and_empty_results_still_draw_or_skip() {
        let dir = std::env::temp_dir().join(format!("sgbench-charts1-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let one: Vec<SizeResult> = synthetic().into_iter().take(1).collect();
        let files = write(&one, &dir).expect("charts");
        let none = write(&[], &dir).expect("no charts");
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(files.len(), 3);
        assert!(none.is_empty());
    }

    #[test]
    fn decades_and_numbers() {
        assert_eq!(decades([30.0, 400.0].into_iter()), 10.0..1000.0);
        assert_eq!(decades([100.0].into_iter()), 10.0..1000.0);
        assert_eq!(decades([11.0, 30.0].into_iter()), 10.0..99.9);
        assert_eq!(decades(std::iter::empty()), 1.0..9.99);
        assert_eq!(number(1_000_000.0), "1,000,000");
        assert_eq!(number(100.0), "100");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(0.01), "0.01");
    }
}
