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

/// One config file (or an embedded text) as read from disk.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    text: String,
    index: OnceLock<PathIndex>,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: String) -> Arc<Self> {
        Arc::new(Self {
            path: path.into(),
            text,
            index: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn index(&self) -> &PathIndex {
        self.index.get_or_init(|| PathIndex::build(&self.text))
    }
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
        let index = self.file.index();
        let mut candidate = path;
        loop {
            if let Some(position) = index.get(self.document, candidate) {
                return position;
            }
            match parent_path(candidate) {
                Some(parent) => candidate = parent,
                None => return index.document_start(self.document),
            }
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

/// Path → position of every node of every document in one file.
#[derive(Debug, Default)]
struct PathIndex {
    documents: Vec<HashMap<String, Position>>,
    starts: Vec<Position>,
}

impl PathIndex {
    fn build(text: &str) -> Self {
        let mut builder = IndexBuilder::default();
        // A syntax error stops the parser; whatever was indexed before it stays usable.
        let _ = Parser::new_from_str(text).load(&mut builder, true);
        builder.index
    }

    fn get(&self, document: usize, path: &str) -> Option<Position> {
        self.documents.get(document)?.get(path).copied()
    }

    fn document_start(&self, document: usize) -> Position {
        self.starts
            .get(document)
            .copied()
            .unwrap_or(Position { line: 1, column: 1 })
    }
}

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

#[derive(Default)]
struct IndexBuilder {
    index: PathIndex,
    stack: Vec<Frame>,
}

fn position_of(mark: Marker) -> Position {
    // yaml-rust2 columns are 0-based; editors and serde_yaml count from 1.
    Position {
        line: mark.line(),
        column: mark.col() + 1,
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
        let position = position_of(mark);
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
                    *pending_key = Some((scalar_key.unwrap_or("?").to_string(), position));
                    return None;
                }
            },
        };
        if let Some(document) = self.index.documents.last_mut() {
            document.entry(path.clone()).or_insert(at);
        }
        Some(path)
    }
}

impl MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::DocumentStart => {
                self.index.documents.push(HashMap::new());
                self.index.starts.push(position_of(mark));
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
    fn separates_documents() {
        let text = "a: 1\n---\nb:\n  c: 2\n";
        assert_eq!(
            origin(text, 1).position_of("b.c"),
            Position { line: 4, column: 3 }
        );
    }
}
