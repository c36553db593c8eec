//! Parsing a very large policy a piece at a time.
//!
//! The toml crate builds a tree of the whole document before it hands
//! values to serde: for a policy of a million `allow` entries that tree
//! costs about 200 MB, for 11 MB of text. A text this large is almost all
//! `[vms.NAME]` tables, so it is cut into pieces of a few VMs each, parsed
//! one after the other (the tree of one piece at a time), and the rest of
//! the document on its own. A reload parses again only the pieces whose
//! text changed (see [`crate::policy::ParseCache`]): where pieces end
//! depends on the tables around the cut only, not on the text before.
//!
//! A piece is a slice of the text (no copy); the rest is the text without
//! the VM tables. Each document carries the map from its offsets back to
//! the file's, so every error still names the right line and column.
//! Whenever the cut is not plainly safe (a VM's
//! sub-table away from its VM, a quoted or dotted VM name) or any piece
//! fails to parse, the caller parses the whole text instead, so what is
//! accepted, and every error message, stays exactly what a whole parse
//! gives.

use std::ops::Range;

/// Texts shorter than this are parsed whole.
pub const SPLIT_FROM: usize = 1 << 20;

/// A piece of VM tables ends after a table that brings it to at least
/// `PIECE_MIN` bytes and whose name picks it (one name in
/// [`PIECE_PICK`]), or to `PIECE_MAX` bytes whatever the name (a single
/// table may be longer). Where a piece ends depends on the tables near it
/// only, so editing one VM leaves the other pieces' text as it was and
/// their parse is reused (see [`crate::policy::ParseCache`]); the tree of
/// one piece is about 18 times its size.
const PIECE_MIN: usize = 8 << 10;
const PIECE_MAX: usize = 32 << 10;
const PIECE_PICK: u32 = 4;

/// Whether a piece may end after the table of VM `name`: a fixed hash of
/// the name (FNV-1a), the same on every run.
fn picks(name: &str) -> bool {
    let h = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h % PIECE_PICK == 0
}

/// One document to parse: its text, and where its bytes are in the file
/// (pairs of document offset and file offset, from which the bytes run on
/// in step, sorted).
pub struct Doc<'a> {
    pub text: std::borrow::Cow<'a, str>,
    pub map: Vec<(usize, usize)>,
}

impl Doc<'_> {
    /// The file offset of document offset `at`.
    pub fn file_offset(map: &[(usize, usize)], at: usize) -> usize {
        let i = map.partition_point(|(d, _)| *d <= at);
        match i.checked_sub(1).and_then(|i| map.get(i)) {
            Some((d, f)) => f + (at - d),
            None => at,
        }
    }
}

/// The documents to parse instead of `text`: the rest of the document
/// (the text without its VM tables, each replaced by a line break) and one
/// slice per group of VM tables. `None`: parse `text` whole.
pub fn split(text: &str) -> Option<Vec<Doc<'_>>> {
    if text.len() < SPLIT_FROM {
        return None;
    }
    let tables = vm_tables(text)?;
    if tables.is_empty() {
        return None;
    }
    // Group consecutive VM tables into pieces (see PIECE_MIN).
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut open = false;
    for (r, name) in tables {
        match groups.last_mut() {
            Some(g) if open && g.end == r.start => g.end = r.end,
            _ => groups.push(r),
        }
        let g = groups.last().map_or(0, Range::len);
        open = g < PIECE_MAX && (g < PIECE_MIN || !picks(name));
    }
    let mut rest = String::new();
    let mut map = Vec::new();
    let mut from = 0;
    for g in groups
        .iter()
        .chain(std::iter::once(&(text.len()..text.len())))
    {
        map.push((rest.len(), from));
        rest.push_str(&text[from..g.start]);
        rest.push('\n');
        from = g.end;
    }
    let mut docs = vec![Doc {
        text: rest.into(),
        map,
    }];
    docs.extend(groups.into_iter().map(|g| Doc {
        map: vec![(0, g.start)],
        text: text[g].into(),
    }));
    Some(docs)
}

/// The byte ranges of the `[vms.NAME]` tables (each with its sub-tables,
/// which must follow it) and their names, or `None` when the text is not
/// cut safely this way.
fn vm_tables(text: &str) -> Option<Vec<(Range<usize>, &str)>> {
    let mut out = Vec::new();
    let mut current: Option<(usize, &str)> = None;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let start = at;
        at += line.len();
        if !line.starts_with('[') {
            continue;
        }
        let header = line.trim_end();
        if let Some(name) = plain_vm_header(header) {
            if let Some((s, n)) = current.take() {
                out.push((s..start, n));
            }
            current = Some((start, name));
            continue;
        }
        let sub_of = |name: &str| {
            header.starts_with(&format!("[vms.{name}."))
                || header.starts_with(&format!("[[vms.{name}."))
        };
        match current {
            Some((_, name)) if sub_of(name) => {}
            _ => {
                if let Some((s, n)) = current.take() {
                    out.push((s..start, n));
                }
                // A VM's sub-table away from its VM (or any other header
                // under `vms`): only a whole parse gets this right.
                if header.starts_with("[vms.") || header.starts_with("[[vms.") {
                    return None;
                }
            }
        }
    }
    if let Some((s, n)) = current {
        out.push((s..text.len(), n));
    }
    Some(out)
}

/// `NAME` of a line `[vms.NAME]` (maybe followed by a comment) with a bare
/// name.
fn plain_vm_header(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("[vms.")?;
    let end = rest.find(']')?;
    let name = &rest[..end];
    let after = rest[end + 1..].trim_start();
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (bare && (after.is_empty() || after.starts_with('#'))).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big(extra: &str) -> String {
        let mut s = String::from("[protect]\nports = [5900]\n");
        let allow: Vec<String> = (0..20_000).map(|u| format!("\"#{u}\"")).collect();
        for i in 0..10 {
            s.push_str(&format!(
                "[vms.v{i}]\nserver = \"localhost\"\nports = [{}]\nallow = [{}]\n",
                5900 + i,
                allow.join(", ")
            ));
            s.push_str(&format!("[[vms.v{i}.schedule]]\nallow = [\"#1\"]\n{extra}"));
        }
        s.push_str("[settings]\nmode = \"enforce\"\n");
        s
    }

    #[test]
    fn small_texts_are_parsed_whole() {
        assert!(split("[vms.a]\nserver = \"localhost\"\n").is_none());
    }

    #[test]
    fn pieces_keep_every_byte_where_it_was() {
        let text = big("");
        let docs = split(&text).expect("split");
        assert!(docs.len() >= 3, "the rest and at least two pieces");
        // Every byte of every document is the file's byte at its mapped
        // offset, and every non-blank byte of the file is in one document.
        let mut seen = vec![0u8; text.len()];
        for d in &docs {
            for (i, b) in d.text.bytes().enumerate() {
                let at = Doc::file_offset(&d.map, i);
                if at < text.len() && text.as_bytes()[at] == b {
                    seen[at] += 1;
                } else {
                    assert_eq!(b, b'\n', "byte {i} of a document is not the file's");
                }
            }
        }
        for (i, b) in text.bytes().enumerate() {
            if b != b'\n' {
                assert_eq!(seen[i], 1, "byte {i} ({})", b as char);
            }
        }
        assert!(docs[0].text.contains("[settings]") && docs[0].text.contains("[protect]"));
        assert!(!docs[0].text.contains("[vms."));
    }

    /// A large policy parses to the same thing whole or in pieces.
    #[test]
    fn pieces_parse_to_the_same_policy() {
        use crate::{directory::FakeDirectory, policy::parse};
        let text = big("days = [\"mon\"]\n");
        assert!(split(&text).is_some());
        let dir = FakeDirectory::default();
        let split_parse = parse(&text, std::path::Path::new("p.toml"), &dir).expect("parses");
        assert_eq!(split_parse.vms.len(), 10);
        assert_eq!(split_parse.vms["v7"].uids().len(), 20_000);
        assert_eq!(split_parse.vms["v7"].schedules.len(), 1);
        assert_eq!(split_parse.settings.mode, crate::policy::Mode::Enforce);
        // A broken piece: the whole parse's error, with its position.
        let broken = text.replace("[vms.v8]\nserver = \"localhost\"", "[vms.v8]\nserver = 7");
        let e = parse(&broken, std::path::Path::new("p.toml"), &dir).expect_err("refused");
        let line = broken[..broken.find("server = 7").unwrap_or(0)]
            .lines()
            .count()
            + 1;
        assert!(e.to_string().contains(&format!("p.toml:{line}:")), "{e}");
        // An error found after parsing, in a piece: the same place too.
        let unknown = text.replace(
            "[vms.v8]\nserver = \"localhost\"",
            "[vms.v8]\nserver = \"nowhere\"",
        );
        let at = unknown.find("\"nowhere\"").unwrap_or(0);
        let (line, col) = (
            unknown[..at].lines().count(),
            at - unknown[..at].rfind('\n').unwrap_or(0),
        );
        let e = parse(&unknown, std::path::Path::new("p.toml"), &dir).expect_err("refused");
        assert!(
            e.to_string().contains(&format!("p.toml:{line}:{col}")),
            "{e}"
        );
    }

    #[test]
    fn a_sub_table_away_from_its_vm_is_parsed_whole() {
        let mut text = big("");
        text.push_str("[[vms.v3.schedule]]\nallow = [\"#2\"]\n");
        assert!(split(&text).is_none());
        let quoted = big("").replace("[vms.v4]", "[vms.\"v4\"]");
        assert!(split(&quoted).is_none());
    }
}
