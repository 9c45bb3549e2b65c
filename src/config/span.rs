//! Source positions for `fleet.yaml`: a map from each node's path
//! (`pools[0].machine.image`) to where its key and value stand in the file,
//! so that every error, including ones found after parsing, points at a line
//! and column. Also finds duplicate mapping keys, which serde would silently
//! accept or report without a position.

use std::collections::{BTreeSet, HashMap};

use miette::SourceSpan;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One segment of a node path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path the way users read it: `pools[0].machine.image`.
pub fn path_string(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub struct NodePos {
    pub key: Option<SourceSpan>,
    pub value: SourceSpan,
}

#[derive(Debug, Clone)]
pub struct DuplicateKey {
    pub path: String,
    pub key: String,
    pub span: SourceSpan,
}

/// Positions of every node of a YAML document.
#[derive(Debug, Default)]
pub struct SpanIndex {
    nodes: HashMap<String, NodePos>,
    pub duplicates: Vec<DuplicateKey>,
}

/// A YAML syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub message: String,
    pub span: SourceSpan,
}

impl SpanIndex {
    pub fn build(src: &str) -> Result<SpanIndex, SyntaxError> {
        let lines = LineTable::new(src);
        let mut rx = Receiver { src, lines: &lines, stack: Vec::new(), out: SpanIndex::default() };
        let mut parser = Parser::new_from_str(src);
        parser.load(&mut rx, false).map_err(|e| {
            let m = e.marker();
            SyntaxError { message: e.info().to_string(), span: lines.span_at(src, m.line(), m.col(), 1) }
        })?;
        Ok(rx.out)
    }

    /// Position of the node at `path`, or of its nearest ancestor that exists.
    pub fn lookup(&self, path: &str) -> Option<NodePos> {
        let mut p = path.to_string();
        loop {
            if let Some(n) = self.nodes.get(&p) {
                return Some(*n);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    /// The span of a key if the node has one, else of its value.
    pub fn key_span(&self, path: &str) -> Option<SourceSpan> {
        self.lookup(path).map(|n| n.key.unwrap_or(n.value))
    }

    pub fn value_span(&self, path: &str) -> Option<SourceSpan> {
        self.lookup(path).map(|n| n.value)
    }

    /// Nodes strictly below `prefix`, in a stable order.
    pub fn descendants(&self, prefix: &str) -> Vec<(&str, NodePos)> {
        let mut v: Vec<(&str, NodePos)> = self
            .nodes
            .iter()
            .filter(|(p, _)| {
                p.len() > prefix.len()
                    && p.starts_with(prefix)
                    && (prefix.is_empty() || matches!(p.as_bytes()[prefix.len()], b'.' | b'['))
            })
            .map(|(p, n)| (p.as_str(), *n))
            .collect();
        v.sort_by_key(|(_, n)| n.value.offset());
        v
    }

    pub fn exists(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }
}

/// Byte offset of the start of each line, to turn yaml-rust2's (line, char column) into byte spans.
struct LineTable {
    starts: Vec<usize>,
}

impl LineTable {
    fn new(src: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        LineTable { starts }
    }

    /// `line` is 1-based, `col` 0-based in chars.
    fn offset(&self, src: &str, line: usize, col: usize) -> usize {
        let Some(&start) = self.starts.get(line.saturating_sub(1)) else {
            return src.len();
        };
        let rest = &src[start..];
        rest.char_indices().nth(col).map(|(i, _)| start + i).unwrap_or(src.len()).min(src.len())
    }

    fn span_at(&self, src: &str, line: usize, col: usize, len: usize) -> SourceSpan {
        let off = self.offset(src, line, col);
        let len = len.min(src.len().saturating_sub(off));
        SourceSpan::new(off.into(), len)
    }
}

enum Frame {
    Map { path: Vec<Seg>, key: Option<(String, SourceSpan)>, seen: BTreeSet<String> },
    Seq { path: Vec<Seg>, index: usize },
}

struct Receiver<'a> {
    src: &'a str,
    lines: &'a LineTable,
    stack: Vec<Frame>,
    out: SpanIndex,
}

impl Receiver<'_> {
    /// Span of a scalar value: from its start to the end of the line, less a trailing comment.
    fn scalar_span(&self, m: Marker, text: &str) -> SourceSpan {
        let off = self.lines.offset(self.src, m.line(), m.col());
        let rest = &self.src[off..];
        if !text.is_empty() && rest.starts_with(text) {
            return SourceSpan::new(off.into(), text.len());
        }
        let line_rest = rest.split('\n').next().unwrap_or("");
        if let Some(q @ ('"' | '\'')) = line_rest.chars().next()
            && let Some(end) = line_rest[1..].find(q)
        {
            return SourceSpan::new(off.into(), end + 2);
        }
        let visible = match line_rest.find(" #") {
            Some(i) => &line_rest[..i],
            None => line_rest,
        }
        .trim_end();
        let len = if visible.is_empty() { text.len().max(1) } else { visible.len() };
        SourceSpan::new(off.into(), len)
    }

    /// Where the node that starts now sits: `Some(path)` for a value, `None` when it is a mapping key.
    fn value_path(&mut self) -> Option<(Vec<Seg>, Option<SourceSpan>)> {
        match self.stack.last_mut() {
            None => Some((Vec::new(), None)),
            Some(Frame::Seq { path, index }) => {
                let mut p = path.clone();
                p.push(Seg::Index(*index));
                *index += 1;
                Some((p, None))
            }
            Some(Frame::Map { path, key, .. }) => {
                let (k, span) = key.take()?;
                let mut p = path.clone();
                p.push(Seg::Key(k));
                Some((p, Some(span)))
            }
        }
    }

    fn record(&mut self, path: &[Seg], key: Option<SourceSpan>, value: SourceSpan) {
        self.out.nodes.insert(path_string(path), NodePos { key, value });
    }
}

impl MarkedEventReceiver for Receiver<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                let span = self.scalar_span(mark, &text);
                match self.value_path() {
                    Some((path, key)) => self.record(&path, key, span),
                    None => {
                        // A mapping key.
                        let key_span = self.lines.span_at(self.src, mark.line(), mark.col(), text.len().max(1));
                        if let Some(Frame::Map { path, key, seen }) = self.stack.last_mut() {
                            if !seen.insert(text.clone()) {
                                self.out.duplicates.push(DuplicateKey {
                                    path: path_string(path),
                                    key: text.clone(),
                                    span: key_span,
                                });
                            }
                            *key = Some((text, key_span));
                        }
                    }
                }
            }
            Event::Alias(_) => {
                let span = self.lines.span_at(self.src, mark.line(), mark.col(), 1);
                if let Some((path, key)) = self.value_path() {
                    self.record(&path, key, span);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let span = self.lines.span_at(self.src, mark.line(), mark.col(), 1);
                let path = match self.value_path() {
                    Some((path, key)) => {
                        self.record(&path, key, span);
                        path
                    }
                    // A complex key: track it under a placeholder so the structure stays balanced.
                    None => vec![Seg::Key("?".into())],
                };
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None, seen: BTreeSet::new() }
                } else {
                    Frame::Seq { path, index: 0 }
                });
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

    #[test]
    fn indexes_nested_paths_and_duplicates() {
        let src = "version: 1\npools:\n  - name: a\n    count: 2\n  - name: b\n    name: c\n";
        let idx = SpanIndex::build(src).unwrap();
        let v = idx.value_span("pools[0].count").unwrap();
        assert_eq!(&src[v.offset()..v.offset() + v.len()], "2");
        let k = idx.key_span("pools[1].name").unwrap();
        assert_eq!(&src[k.offset()..k.offset() + k.len()], "name");
        assert_eq!(idx.duplicates.len(), 1);
        assert_eq!(idx.duplicates[0].path, "pools[1]");
        // Falls back to the nearest ancestor.
        assert!(idx.lookup("pools[0].machine.image").is_some());
    }

    #[test]
    fn trailing_comment_is_not_in_span() {
        let src = "a: hello world # note\n";
        let idx = SpanIndex::build(src).unwrap();
        let v = idx.value_span("a").unwrap();
        assert_eq!(&src[v.offset()..v.offset() + v.len()], "hello world");
    }
}
