//! `spicegate report`: the access review, as a terminal table, CSV or JSON
//! lines, from the running daemon (page by page) or from a policy file.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::bail;
use serde::Serialize;

use crate::{
    control::{Request, fill_user_names},
    directory::Nss,
    grants::{now_unix, rfc3339},
    policy::{self, Policy},
    report::{self, Page, Row, cell_text},
};

/// Arguments of `spicegate report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Compute the report from this policy file (and its policy.d), without
    /// a daemon. Temporary grants are then unknown.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// CSV: a header `user,<vm>,<vm>,...`, then one row per user.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    /// JSON lines: a `report` object, then one object per user.
    #[arg(long)]
    json: bool,
}

/// The terminal's width the plain table is made to fit.
const WIDTH: usize = 80;

/// Where the pages come from.
enum Pages<'a> {
    Daemon(&'a Path),
    File(Box<Policy>, HashMap<u32, String>),
}

impl Pages<'_> {
    fn page(&mut self, after: Option<u32>) -> anyhow::Result<Page> {
        match self {
            Self::Daemon(socket) => super::client::call(socket, &Request::Report { after }),
            Self::File(policy, cache) => {
                let mut page = report::page(policy, &[], false, after, None);
                // One page of names at a time; the cache stays bounded.
                if cache.len() > 100_000 {
                    cache.clear();
                }
                fill_user_names(&mut page, &Nss, cache);
                Ok(page)
            }
        }
    }
}

pub fn report(socket: &Path, args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let mut pages = match &args.policy {
        None => Pages::Daemon(socket),
        Some(file) => match policy::load(file, &Nss) {
            Ok(p) => Pages::File(Box::new(p), HashMap::new()),
            Err(errs) => {
                eprintln!("{errs}");
                bail!("{}: {} error(s); no report", file.display(), errs.0.len());
            }
        },
    };
    let source = match &args.policy {
        None => "the running daemon".to_owned(),
        Some(f) => format!("the policy file {}", f.display()),
    };
    let unknown =
        "temporary grants unknown (read from a policy file; ask the running daemon for them)";
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    let mut vms = Vec::new();
    let mut after = None;
    let mut rows = 0usize;
    loop {
        let page = match pages.page(after) {
            Err(e) if first && e.downcast_ref::<crate::control::NotRunning>().is_some() => {
                bail!("{e}; or read a policy file with `spicegate report --policy FILE`")
            }
            p => p?,
        };
        if first {
            vms.clone_from(&page.vms);
            if args.csv {
                if !page.temporary_known {
                    eprintln!("spicegate report: {unknown}");
                }
                writeln!(out, "{}", csv_header(&vms))?;
            } else if args.json {
                let head = JsonHead {
                    report: JsonReport {
                        generated_at: rfc3339(now_unix()),
                        policy: args.policy.as_deref(),
                        source: if args.policy.is_some() {
                            "policy"
                        } else {
                            "daemon"
                        },
                        temporary_grants_known: page.temporary_known,
                        vms: &vms,
                    },
                };
                writeln!(out, "{}", serde_json::to_string(&head)?)?;
            } else {
                writeln!(
                    out,
                    "# spicegate report {}: who may open which VM",
                    rfc3339(now_unix())
                )?;
                writeln!(out, "# from {source}")?;
                if !page.temporary_known {
                    writeln!(out, "# {unknown}")?;
                }
            }
        } else if page.vms != vms {
            bail!("the policy changed while the report was read; run it again");
        }
        rows += page.rows.len();
        if args.csv {
            for r in &page.rows {
                writeln!(out, "{}", csv_row(r, vms.len()))?;
            }
        } else if args.json {
            for r in &page.rows {
                writeln!(out, "{}", serde_json::to_string(&json_row(r, &vms))?)?;
            }
        } else {
            if !first && !page.rows.is_empty() {
                writeln!(out)?;
            }
            out.write_all(table(&page.rows, &vms).as_bytes())?;
        }
        first = false;
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    if rows == 0 && !args.csv && !args.json {
        writeln!(
            out,
            "(no rows: no VM is granted to anyone this report may show)"
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// One CSV field, quoted when it must be (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

pub fn csv_header(vms: &[String]) -> String {
    std::iter::once("user")
        .chain(vms.iter().map(String::as_str))
        .map(csv_field)
        .collect::<Vec<_>>()
        .join(",")
}

/// The text of each column of a row (empty: never).
fn columns(r: &Row, n: usize) -> Vec<String> {
    let mut cols = vec![String::new(); n];
    for c in &r.cells {
        if let Some(col) = cols.get_mut(c.vm) {
            *col = cell_text(&c.how);
        }
    }
    cols
}

pub fn csv_row(r: &Row, n: usize) -> String {
    std::iter::once(r.name())
        .chain(columns(r, n))
        .map(|f: String| csv_field(&f))
        .collect::<Vec<_>>()
        .join(",")
}

/// The first line of `report --json`. Fields in alphabetical order, the
/// order they have always been printed in.
#[derive(Serialize)]
struct JsonHead<'a> {
    report: JsonReport<'a>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    generated_at: String,
    /// The policy file read (`--policy`), or null.
    policy: Option<&'a Path>,
    /// `daemon` or `policy`.
    source: &'static str,
    temporary_grants_known: bool,
    vms: &'a [String],
}

/// A user's line of `report --json`: the VMs the user may open.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct JsonRow {
    /// VM name: the text of its cell.
    pub access: BTreeMap<String, String>,
    /// Null for `@console`.
    pub uid: Option<u32>,
    pub user: String,
}

/// `{"access":{VM: TEXT, ...}, "uid":..., "user":...}`: the VMs the user
/// may open (`uid` null for `@console`).
pub fn json_row(r: &Row, vms: &[String]) -> JsonRow {
    let access = r
        .cells
        .iter()
        .filter_map(|c| Some((vms.get(c.vm)?.clone(), cell_text(&c.how))))
        .collect();
    JsonRow {
        access,
        uid: r.uid,
        user: r.name(),
    }
}

/// A page as a table when it fits [`WIDTH`] columns, else one block per
/// user listing `VM: how`.
pub fn table(rows: &[Row], vms: &[String]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let cols: Vec<Vec<String>> = rows.iter().map(|r| columns(r, vms.len())).collect();
    let names: Vec<String> = rows.iter().map(Row::name).collect();
    let mut widths = vec![
        names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max(4),
    ];
    for (i, vm) in vms.iter().enumerate() {
        let w = cols.iter().map(|c| c[i].chars().count()).max().unwrap_or(0);
        widths.push(w.max(vm.chars().count()));
    }
    let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
    let mut out = String::new();
    if total <= WIDTH {
        let line = |fields: Vec<&str>| -> String {
            let padded: Vec<String> = fields
                .iter()
                .zip(&widths)
                .map(|(f, w)| format!("{f:<w$}"))
                .collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        out.push_str(&line(
            std::iter::once("user")
                .chain(vms.iter().map(String::as_str))
                .collect(),
        ));
        for (name, c) in names.iter().zip(&cols) {
            out.push_str(&line(
                std::iter::once(name.as_str())
                    .chain(c.iter().map(String::as_str))
                    .collect(),
            ));
        }
        return out;
    }
    for (name, c) in names.iter().zip(&cols) {
        out.push_str(name);
        out.push('\n');
        for (vm, text) in vms.iter().zip(c).filter(|(_, t)| !t.is_empty()) {
            out.push_str(&wrap(&format!("  {vm}: "), text));
        }
    }
    out
}

/// `prefix` then `text`, broken after "; " into lines of at most
/// [`WIDTH`] columns where it can be, continued under the text's start.
fn wrap(prefix: &str, text: &str) -> String {
    let indent = " ".repeat(prefix.chars().count().min(WIDTH / 2));
    let mut out = prefix.to_owned();
    let mut len = prefix.chars().count();
    let parts: Vec<&str> = text.split("; ").collect();
    for (i, part) in parts.iter().enumerate() {
        let piece = if i + 1 < parts.len() {
            format!("{part};")
        } else {
            (*part).to_owned()
        };
        let sep = usize::from(i > 0);
        if i > 0 && len + sep + piece.chars().count() > WIDTH {
            out.push('\n');
            out.push_str(&indent);
            len = indent.len();
        } else if i > 0 {
            out.push(' ');
            len += 1;
        }
        out.push_str(&piece);
        len += piece.chars().count();
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Cell, How};

    fn row(name: &str, uid: Option<u32>, cells: &[(usize, How)]) -> Row {
        Row {
            uid,
            user: Some(name.into()),
            cells: cells
                .iter()
                .map(|(vm, h)| Cell {
                    vm: *vm,
                    how: vec![h.clone()],
                })
                .collect(),
        }
    }

    fn sched(w: &[&str]) -> How {
        How::Schedule {
            windows: w.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn csv_quotes_what_it_must() {
        assert_eq!(csv_field("always"), "always");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        let vms = vec!["debianx".to_owned(), "win,lab".to_owned()];
        assert_eq!(csv_header(&vms), "user,debianx,\"win,lab\"");
        let r = row("anne", Some(1001), &[(1, sched(&["mon,tue 08:00-12:00"]))]);
        assert_eq!(csv_row(&r, 2), "anne,,\"schedule mon,tue 08:00-12:00\"");
        let j = serde_json::to_string(&json_row(&r, &vms)).expect("json");
        assert_eq!(
            j,
            r#"{"access":{"win,lab":"schedule mon,tue 08:00-12:00"},"uid":1001,"user":"anne"}"#
        );
    }

    #[test]
    fn a_narrow_report_is_a_table() {
        let vms = vec!["debianx".to_owned(), "winlab".to_owned()];
        let rows = [
            row("@console", None, &[(1, How::Console)]),
            row("anne", Some(1001), &[(0, How::Always)]),
        ];
        assert_eq!(
            table(&rows, &vms),
            "user      debianx  winlab\n\
             @console           console\n\
             anne      always\n"
        );
    }

    #[test]
    fn a_wide_report_is_one_block_per_user() {
        let vms: Vec<String> = (0..6).map(|i| format!("vm-number-{i}")).collect();
        let rows = [row(
            "tessa",
            Some(1004),
            &[
                (0, How::Always),
                (
                    3,
                    sched(&[
                        "mon,tue,wed 08:00-12:00",
                        "thu,fri 13:00-18:00",
                        "sat 10:00-11:00",
                        "sun 22:00-06:00",
                    ]),
                ),
            ],
        )];
        let t = table(&rows, &vms);
        assert_eq!(
            t,
            "tessa\n  vm-number-0: always\n  \
             vm-number-3: schedule mon,tue,wed 08:00-12:00; thu,fri 13:00-18:00;\n               \
             sat 10:00-11:00; sun 22:00-06:00\n"
        );
        assert!(t.lines().all(|l| l.chars().count() <= WIDTH), "{t}");
    }
}
