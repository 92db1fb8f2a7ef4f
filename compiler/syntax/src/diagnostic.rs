//! Diagnostics shared by every front-end stage, and their rendering with source lines and carets.

use crate::ast::Span;
use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term;

/// Index of a source file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// A span in a particular file with a message shown under the caret.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub file: FileId,
    pub span: Span,
    pub message: String,
}

/// One problem found in the source, pointing at where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// The first label is the primary location; the rest add context.
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a label; the first one added is the primary location.
    pub fn with_label(mut self, file: FileId, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            file,
            span,
            message: message.into(),
        });
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The source files a compilation read, so diagnostics can show their lines.
#[derive(Default)]
pub struct SourceMap {
    files: Vec<(String, String)>,
}

impl SourceMap {
    pub fn new() -> SourceMap {
        SourceMap::default()
    }

    pub fn add(&mut self, name: impl Into<String>, source: impl Into<String>) -> FileId {
        self.files.push((name.into(), source.into()));
        FileId(self.files.len() as u32 - 1)
    }

    pub fn name(&self, id: FileId) -> &str {
        &self.files[id.0 as usize].0
    }

    pub fn source(&self, id: FileId) -> &str {
        &self.files[id.0 as usize].1
    }

    /// Renders diagnostics as plain text (no colours): the message, the file, line and
    /// column, the source line with a caret under the span, and the notes.
    pub fn render(&self, diagnostics: &[Diagnostic]) -> String {
        let mut files = SimpleFiles::new();
        for (name, source) in &self.files {
            files.add(name.as_str(), source.as_str());
        }
        let config = term::Config::default();
        let mut out = term::termcolor::NoColor::new(Vec::new());
        for diagnostic in diagnostics {
            let severity = match diagnostic.severity {
                Severity::Error => cs::Severity::Error,
                Severity::Warning => cs::Severity::Warning,
            };
            let labels = diagnostic
                .labels
                .iter()
                .enumerate()
                .map(|(i, label)| {
                    let style = if i == 0 {
                        cs::LabelStyle::Primary
                    } else {
                        cs::LabelStyle::Secondary
                    };
                    let len = self.files[label.file.0 as usize].1.len();
                    let start = (label.span.start as usize).min(len);
                    let end = (label.span.end as usize).clamp(start, len);
                    cs::Label::new(style, label.file.0 as usize, start..end)
                        .with_message(label.message.clone())
                })
                .collect();
            let rendered = cs::Diagnostic::new(severity)
                .with_message(diagnostic.message.clone())
                .with_labels(labels)
                .with_notes(diagnostic.notes.clone());
            // Writing into a Vec cannot fail, and every label was clamped into its file.
            term::emit(&mut out, &config, &files, &rendered).expect("render diagnostic");
        }
        String::from_utf8_lossy(&out.into_inner()).into_owned()
    }
}
