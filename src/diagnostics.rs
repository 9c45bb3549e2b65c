//! Rendering of errors for people, with miette: file, line and column, the
//! source snippet, and `help:` hints. One place, so the CLI and tests agree.

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme};

/// Renders a diagnostic as the CLI prints it.
pub fn render(diag: &dyn Diagnostic, color: bool) -> String {
    let theme = if color { GraphicalTheme::unicode() } else { GraphicalTheme::unicode_nocolor() };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100).with_links(false);
    let mut out = String::new();
    match handler.render_report(&mut out, diag) {
        Ok(()) => out,
        Err(_) => format!("error: {diag}\n"),
    }
}
