//! Config source text and positions.
//!
//! Every loaded document remembers where it came from ([`Origin`]). Positions of individual fields are
//! looked up by YAML path (`spec.http[0].route[1].destination.subset`) only when a diagnostic needs
//! one: the index is built once per file on first use, so loading a valid config never pays for it.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// One config file (or an embedded text) as read from disk, split into its YAML documents.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    text: String,
    documents: Vec<DocumentSpan>,
    index: OnceLock<Vec<PathIndex>>,
}

/// Where one document of a multi-document stream sits in the file.
#[derive(Debug, Clone)]
pub struct DocumentSpan {
    pub bytes: std::ops::Range<usize>,
    /// Lines before the document's first line.
    pub line_offset: usize,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: String) -> Arc<Self> {
        let documents = split_documents(&text);
        Arc::new(Self {
            path: path.into(),
            text,
            documents,
            index: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn documents(&self) -> &[DocumentSpan] {
        &self.documents
    }

    pub fn document_text(&self, document: usize) -> &str {
        self.documents
            .get(document)
            .and_then(|d| self.text.get(d.bytes.clone()))
            .unwrap_or("")
    }

    /// Whether positions inside the file were looked up, which indexes every document's paths
    /// (many times the text's size).
    pub fn is_indexed(&self) -> bool {
        self.index.get().is_some()
    }

    fn index(&self, document: usize) -> Option<&PathIndex> {
        self.index
            .get_or_init(|| {
                self.documents
                    .iter()
                    .map(|d| {
                        PathIndex::build(
                            self.text.get(d.bytes.clone()).unwrap_or(""),
                            d.line_offset,
                        )
                    })
                    .collect()
            })
            .get(document)
    }
}

/// Splits a YAML stream at its document markers. A line that starts with `---` or `...` followed by
/// a space or the line end always ends the current document in YAML (even inside a block scalar),
/// so splitting on them is exact, and lets each document be parsed on its own: a syntax error in one
/// cannot hide the others, and many documents parse in linear time.
pub fn split_documents(text: &str) -> Vec<DocumentSpan> {
    let mut spans = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut offset = 0;
    for (line_number, line) in text.split_inclusive('\n').enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r']))
        };
        if marker("---") && offset > start {
            spans.push(DocumentSpan {
                bytes: start..offset,
                line_offset: start_line,
            });
            start = offset;
            start_line = line_number;
        } else if marker("...") {
            spans.push(DocumentSpan {
                bytes: start..offset,
                line_offset: start_line,
            });
            start = offset + line.len();
            start_line = line_number + 1;
        }
        offset += line.len();
    }
    if offset > start {
        spans.push(DocumentSpan {
            bytes: start..offset,
            line_offset: start_line,
        });
    }
    spans
}

/// Where a document lives: its file and its position in the file's document stream.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<SourceFile>,
    pub document: usize,
}

impl Origin {
    /// The position of `path` inside this document, falling back to the nearest ancestor that exists
    /// (a missing optional field is reported where its parent is written).
    pub fn position_of(&self, path: &str) -> Position {
        let start = Position {
            line: self
                .file
                .documents()
                .get(self.document)
                .map_or(0, |d| d.line_offset)
                + 1,
            column: 1,
        };
        let Some(index) = self.file.index(self.document) else {
            return start;
        };
        let mut candidate = path;
        loop {
            if let Some(position) = index.get(candidate) {
                return position;
            }
            match parent_path(candidate) {
                Some(parent) => candidate = parent,
                None => return index.start.unwrap_or(start),
            }
        }
    }

    /// Where the key at `path` is written for the second time in its mapping.
    pub fn repeat_of(&self, path: &str) -> Option<Position> {
        self.file.index(self.document)?.repeats.get(path).copied()
    }

    /// The YAML path of the node written at `position` (a key or a value), if any.
    pub fn path_at(&self, position: Position) -> Option<String> {
        let index = self.file.index(self.document)?;
        index
            .paths
            .iter()
            .filter(|(_, p)| **p == position)
            .map(|(path, _)| path.clone())
            .max_by_key(String::len)
    }

    /// A position serde_yaml reported inside this document, made relative to the whole file.
    pub fn file_position(&self, line_in_document: usize, column: usize) -> Position {
        let offset = self
            .file
            .documents()
            .get(self.document)
            .map_or(0, |d| d.line_offset);
        Position {
            line: line_in_document + offset,
            column,
        }
    }

    pub fn file_name(&self) -> &Path {
        self.file.path()
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let position = self.position_of("");
        write!(
            f,
            "{}:{}:{}",
            self.file.path().display(),
            position.line,
            position.column
        )
    }
}

/// `a.b[2].c` → `a.b[2]` → `a.b` → `a` → `` → None.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// No Istio object nests flow collections (`[..]`, `{..}`) anywhere near this deep.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Finds where flow brackets nest deeper than [`MAX_FLOW_DEPTH`], in one linear pass that skips
/// quoted strings and comments. libyaml's scanner slows down quadratically with flow depth, so
/// hostile nesting is refused before it is parsed.
pub fn flow_too_deep(text: &str) -> Option<Position> {
    let mut depth = 0usize;
    for (line_number, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for (column, c) in line.char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                // A quote opens a quoted scalar only where a scalar can start; inside a plain
                // scalar (`it's`) it is an ordinary character.
                (None, '\'' | '"') if matches!(previous, ' ' | '\t' | '[' | '{' | ',' | ':') => {
                    quote = Some(c)
                }
                (None, '#') if previous == ' ' || previous == '\t' => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some(Position {
                            line: line_number + 1,
                            column: column + 1,
                        });
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            previous = c;
        }
    }
    None
}

/// Path → position of every node of one document.
#[derive(Debug, Default)]
struct PathIndex {
    paths: HashMap<String, Position>,
    /// Where a mapping key is written a second time, by its path.
    repeats: HashMap<String, Position>,
    start: Option<Position>,
    line_offset: usize,
}

impl PathIndex {
    fn build(text: &str, line_offset: usize) -> Self {
        let mut builder = IndexBuilder {
            index: PathIndex {
                line_offset,
                ..PathIndex::default()
            },
            stack: Vec::new(),
        };
        // A syntax error stops the parser; whatever was indexed before it stays usable.
        let _ = Parser::new_from_str(text).load(&mut builder, false);
        builder.index
    }

    fn get(&self, path: &str) -> Option<Position> {
        self.paths.get(path).copied()
    }
}

const MAX_INDEXED_DEPTH: usize = 128;
const MAX_INDEXED_NODES: usize = 500_000;
const MAX_INDEXED_KEY: usize = 256;

enum Frame {
    Mapping {
        path: String,
        pending_key: Option<(String, Position)>,
    },
    Sequence {
        path: String,
        next: usize,
    },
}

struct IndexBuilder {
    index: PathIndex,
    stack: Vec<Frame>,
}

impl PathIndex {
    fn position(&self, mark: Marker) -> Position {
        // yaml-rust2 columns are 0-based; editors and serde_yaml count from 1.
        Position {
            line: mark.line() + self.line_offset,
            column: mark.col() + 1,
        }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl IndexBuilder {
    /// A node starts at `mark`: if it is a mapping key, remember it; otherwise record its path and
    /// return it so a container can push a frame.
    fn node(&mut self, mark: Marker, scalar_key: Option<&str>) -> Option<String> {
        // Paths grow with depth and key length; past what a real config has, stop indexing (such
        // input is refused anyway, and indexing it would cost quadratic time and memory).
        if self.stack.len() > MAX_INDEXED_DEPTH || self.index.paths.len() >= MAX_INDEXED_NODES {
            return None;
        }
        let position = self.index.position(mark);
        let (path, at) = match self.stack.last_mut() {
            None => (String::new(), position),
            Some(Frame::Sequence { path, next }) => {
                let item = format!("{path}[{next}]");
                *next += 1;
                (item, position)
            }
            Some(Frame::Mapping { path, pending_key }) => match pending_key.take() {
                Some((key, key_position)) => (join(path, &key), key_position),
                None => {
                    let key = scalar_key.unwrap_or("?");
                    let key = key.get(..MAX_INDEXED_KEY).unwrap_or(key);
                    *pending_key = Some((key.to_string(), position));
                    return None;
                }
            },
        };
        if self.index.paths.contains_key(&path) {
            self.index.repeats.entry(path.clone()).or_insert(at);
        } else {
            self.index.paths.insert(path.clone(), at);
        }
        Some(path)
    }
}

impl MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::DocumentStart => {
                self.index.start = Some(self.index.position(mark));
                self.stack.clear();
            }
            Event::Scalar(value, ..) => {
                self.node(mark, Some(&value));
            }
            Event::Alias(_) => {
                self.node(mark, None);
            }
            Event::MappingStart(..) => {
                // A complex (mapping) key is not something Istio configs use; index it as "?".
                let path = self.node(mark, None).unwrap_or_default();
                self.stack.push(Frame::Mapping {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.node(mark, None).unwrap_or_default();
                self.stack.push(Frame::Sequence { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(text: &str, document: usize) -> Origin {
        Origin {
            file: SourceFile::new("t.yaml", text.to_string()),
            document,
        }
    }

    #[test]
    fn splits_at_markers_only_at_line_start() {
        let text = "a: 1\n---\nb: '---'\n  ---x\n--- \nc: 3\n...\n";
        let spans = split_documents(text);
        let docs: Vec<&str> = spans.iter().map(|d| &text[d.bytes.clone()]).collect();
        assert_eq!(docs, ["a: 1\n", "---\nb: '---'\n  ---x\n", "--- \nc: 3\n"]);
        assert_eq!(spans[2].line_offset, 4);
    }

    #[test]
    fn finds_nested_paths_and_falls_back_to_parents() {
        let text = "kind: VirtualService\nspec:\n  http:\n  - route:\n    - destination:\n        host: a\n";
        let o = origin(text, 0);
        assert_eq!(
            o.position_of("spec.http[0].route[0].destination.host"),
            Position { line: 6, column: 9 }
        );
        assert_eq!(
            o.position_of("spec.http[0].route[0].destination.subset"),
            Position { line: 5, column: 7 }
        );
        assert_eq!(o.position_of("spec"), Position { line: 2, column: 1 });
    }

    #[test]
    fn flow_depth_ignores_quoted_brackets_and_comments() {
        let quoted = format!(
            "a: '{}'\nb: \"{}\" # {}\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100)
        );
        assert_eq!(flow_too_deep(&quoted), None);
        let sneaky = format!("a: [it's, {}", "[".repeat(70));
        assert!(flow_too_deep(&sneaky).is_some());
        let deep = format!("a: {}", "[".repeat(65));
        assert_eq!(
            flow_too_deep(&deep),
            Some(Position {
                line: 1,
                column: 68
            })
        );
    }

    #[test]
    fn separates_documents() {
        let text = "a: 1\n---\nb:\n  c: 2\n";
        assert_eq!(
            origin(text, 1).position_of("b.c"),
            Position { line: 4, column: 3 }
        );
    }
}
