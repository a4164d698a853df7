//! User-facing diagnostics: a message pinned to a span, rendered with the source line and a caret.
//!
//! This is the only module that knows about the rendering crate (codespan-reporting).

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, Chars, Config};

use crate::ast::Span;

/// An error in the user's source.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// The headline: what is wrong.
    pub message: String,
    /// Where it is wrong.
    pub span: Span,
    /// A short text under the caret.
    pub label: String,
    /// Other places that explain the error.
    pub related: Vec<(Span, String)>,
    /// Free-text notes shown after the source excerpt.
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic { message: message.into(), span, label: String::new(), related: vec![], notes: vec![] }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.related.push((span, label.into()));
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// Renders the diagnostic as plain text (no colour):
    /// `error: ...`, then `┌─ path:line:column`, the source line, and a caret under the span.
    pub fn render(&self, path: &str, source: &str) -> String {
        let file = SimpleFile::new(path, source);
        let clamp = |span: Span| {
            let end = span.end.min(source.len());
            let start = span.start.min(end);
            start..end
        };
        let mut labels = vec![Label::primary((), clamp(self.span)).with_message(&self.label)];
        for (span, text) in &self.related {
            labels.push(Label::secondary((), clamp(*span)).with_message(text));
        }
        let diagnostic =
            CsDiagnostic::error().with_message(&self.message).with_labels(labels).with_notes(self.notes.clone());
        let config = Config { chars: Chars::ascii(), ..Config::default() };
        term::emit_into_string(&config, &file, &diagnostic)
            .unwrap_or_else(|err| format!("error: {} (could not render: {err})\n", self.message))
    }
}

/// Renders several diagnostics, one after the other.
pub fn render_all(diagnostics: &[Diagnostic], path: &str, source: &str) -> String {
    diagnostics.iter().map(|d| d.render(path, source)).collect::<Vec<_>>().concat()
}

/// The 1-based line and column of a byte offset.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_line_and_caret() {
        let source = "kernel k {\n  X[] = $\n}\n";
        let text = Diagnostic::error("unexpected character", Span::new(19, 20))
            .with_label("not part of the language")
            .render("a.ein", source);
        assert!(text.contains("a.ein:2:9"), "{text}");
        assert!(text.contains("X[] = $"), "{text}");
        assert!(text.contains('^'), "{text}");
        assert_eq!(line_column(source, 19), (2, 9));
    }
}
