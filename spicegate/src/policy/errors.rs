//! Errors collected with their file, line and column (through the
//! documents a large file was parsed in).

use std::ops::Range;

use super::*;

/// A name of the policy that did not resolve when it was read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    /// `user bob`, `group @staff`, `hostname kvm.lan`.
    pub name: String,
    /// `FILE:LINE:COL`.
    pub at: String,
    pub why: String,
}

pub(super) struct Errors<'a> {
    pub(super) sources: &'a [Source],
    /// What the first number of an error's place means: the file, and
    /// where the parsed document's bytes are in it (a file parsed in
    /// pieces, see policy_split; empty when parsed whole).
    pub(super) views: Vec<View>,
    pub(super) list: Vec<PolicyError>,
    pub(super) lenient: bool,
    /// Whether paths are checked against the file system (`metrics_file`).
    pub(super) check_paths: bool,
    pub(super) unresolved: Vec<Unresolved>,
}

/// Appended to the error of a name that does not resolve.
pub(super) const UNRESOLVED_HINT: &str = "; a reload with it is refused, but at start spicegate enforces the rest of the policy, grants nothing to it (and guards the ports of a server it names on every address) and keeps trying; `spicegate status` lists it";

/// A document parsed from part of (or all of) one source file.
pub(super) struct View {
    pub(super) file: usize,
    pub(super) map: Vec<(usize, usize)>,
}

impl Errors<'_> {
    /// The source file and 1-based line and column of `span` in document
    /// `view`.
    pub(super) fn locate(&self, view: usize, span: &Range<usize>) -> (&Source, usize, usize) {
        let (file, at) = match self.views.get(view) {
            Some(v) => (
                v.file,
                crate::policy_split::Doc::file_offset(&v.map, span.start),
            ),
            None => (view, span.start),
        };
        let src = &self.sources[file];
        let (line, col) = line_col(&src.text, at);
        (src, line, col)
    }

    /// `path:line:col` of `span` in document `view`.
    pub(super) fn at(&self, view: usize, span: &Range<usize>) -> String {
        let (src, line, col) = self.locate(view, span);
        format!("{}:{line}:{col}", src.path.display())
    }

    /// A name that does not resolve: an error, or, when lenient, an entry
    /// of the unresolved list. Returns whether it was lenient.
    pub(super) fn unresolved(
        &mut self,
        file: usize,
        span: &Range<usize>,
        name: String,
        message: String,
    ) -> bool {
        if self.lenient {
            let at = self.at(file, span);
            self.unresolved.push(Unresolved {
                name,
                at,
                why: message,
            });
        } else {
            self.push(file, span, format!("{message}{UNRESOLVED_HINT}"));
        }
        self.lenient
    }

    pub(super) fn push(&mut self, file: usize, span: &Range<usize>, message: String) {
        let (src, line, col) = self.locate(file, span);
        let file = src.path.clone();
        self.list.push(PolicyError {
            file,
            line,
            col,
            message,
        });
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
