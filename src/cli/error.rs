//! The CLI's error: what went wrong, of which kind, and what to do about it, rendered in one place with
//! miette (file, line and column with the source snippet for fleet files; `help:` hints for all).

use std::fmt;
use std::path::PathBuf;

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme};

use crate::config::ConfigError;
use crate::core::plan::planfile::PlanfileError;
use crate::forges::ForgeError;
use crate::providers::ProviderError;
use crate::state::journal::JournalError;

/// Who can fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The command line or a file the user gave (a saved plan, an inventory).
    User,
    /// The fleet file.
    Config,
    /// A provider or forge said no, or could not be reached.
    Provider,
    /// nimbus itself or this computer (journal, files).
    Internal,
}

/// Why a command failed. Every variant exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Forge(#[from] ForgeError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Planfile(#[from] PlanfileError),
    /// Remote state (the S3 backend's lock and journal).
    #[error(transparent)]
    State(#[from] crate::state::remote::RemoteError),
    #[error("{message}")]
    Usage { message: String, hint: Option<String> },
    #[error("cannot {what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::engine::clients::ClientError> for CommandError {
    fn from(e: crate::engine::clients::ClientError) -> Self {
        match e {
            crate::engine::clients::ClientError::Provider(p) => CommandError::Provider(p),
            crate::engine::clients::ClientError::Forge(f) => CommandError::Forge(f),
            crate::engine::clients::ClientError::Ssh { message, hint } => {
                CommandError::Usage { message, hint: Some(hint) }
            }
        }
    }
}

impl From<crate::engine::reconcile::ReconcileError> for CommandError {
    fn from(e: crate::engine::reconcile::ReconcileError) -> Self {
        use crate::engine::reconcile::ReconcileError as R;
        match e {
            R::Session(s) => s.into(),
            R::Journal(j) => CommandError::Journal(j),
            R::Discovery(d) => d.into(),
            R::Forge(f) => CommandError::Forge(f),
            R::Provider(p) => CommandError::Provider(p),
        }
    }
}

impl From<crate::engine::discovery::DiscoveryError> for CommandError {
    fn from(e: crate::engine::discovery::DiscoveryError) -> Self {
        match e {
            crate::engine::discovery::DiscoveryError::Provider(p) => CommandError::Provider(p),
            crate::engine::discovery::DiscoveryError::Forge(f) => CommandError::Forge(f),
        }
    }
}

impl From<crate::engine::apply::SessionError> for CommandError {
    fn from(e: crate::engine::apply::SessionError) -> Self {
        match e {
            crate::engine::apply::SessionError::Journal(j) => CommandError::Journal(j),
            crate::engine::apply::SessionError::Remote(r) => CommandError::State(r),
        }
    }
}

impl CommandError {
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        CommandError::Usage { message: message.into(), hint: Some(hint.into()) }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::Config(ConfigError::Read { .. }) => ErrorKind::User,
            CommandError::Config(_) => ErrorKind::Config,
            CommandError::Provider(_) | CommandError::Forge(_) => ErrorKind::Provider,
            CommandError::Journal(JournalError::Locked { .. }) => ErrorKind::User,
            CommandError::Journal(_) | CommandError::Io { .. } => ErrorKind::Internal,
            CommandError::Planfile(PlanfileError::Read { .. } | PlanfileError::Write { .. }) => ErrorKind::Internal,
            CommandError::Planfile(_) | CommandError::Usage { .. } => ErrorKind::User,
            CommandError::State(e) if e.is_user_error() => ErrorKind::User,
            CommandError::State(_) => ErrorKind::Provider,
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            CommandError::Config(_) => None, // the diagnostics carry their own
            CommandError::Provider(e) => Some(e.hint().to_string()),
            CommandError::Forge(e) => Some(e.hint().to_string()),
            CommandError::Journal(JournalError::Locked { lock, .. }) => Some(format!(
                "wait for it to finish; the lock is `{}` and is released when that process exits",
                lock.display()
            )),
            CommandError::Journal(JournalError::Corrupt { path, .. }) => Some(format!(
                "move it aside (`mv {p} {p}.damaged`) and run again: nimbus starts a new journal; the old one keeps what it could",
                p = path.display()
            )),
            CommandError::Journal(_) => {
                Some("check that the journal's folder is writable and the file is a nimbus journal".into())
            }
            CommandError::Planfile(e) => Some(e.hint().to_string()),
            CommandError::State(e) => Some(e.hint()),
            CommandError::Usage { hint, .. } => hint.clone(),
            CommandError::Io { .. } => Some("check the path and its permissions".into()),
        }
    }
}

impl Diagnostic for CommandError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            CommandError::Config(e) => e.code(),
            _ => None,
        }
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            CommandError::Config(e) => e.help(),
            _ => self.hint().map(|h| Box::new(h) as Box<dyn fmt::Display>),
        }
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        match self {
            CommandError::Config(e) => e.source_code(),
            _ => None,
        }
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        match self {
            CommandError::Config(e) => e.labels(),
            _ => None,
        }
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            CommandError::Config(e) => e.related(),
            _ => None,
        }
    }
}

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

/// Prints an error to stderr, once. An invalid fleet file prints each problem on its own; an internal error
/// says so.
pub fn report(e: &CommandError, color: bool) {
    if let CommandError::Config(ConfigError::Invalid { diagnostics, .. } | ConfigError::Untrusted { diagnostics, .. }) =
        e
    {
        for d in diagnostics {
            err!("{}", render(d, color));
        }
        if diagnostics.len() > 1 {
            errln!("error: {e}");
        }
        return;
    }
    if e.kind() == ErrorKind::Internal {
        errln!("internal error (nimbus or this computer, not the fleet):");
    }
    err!("{}", render(&Defused::of(e), color));
}

/// An error as shown: its message, hint and causes with control characters defused (they may quote what a
/// machine, forge or cloud said).
#[derive(Debug)]
struct Defused {
    message: String,
    help: Option<String>,
    source: Option<Box<Defused>>,
}

impl Defused {
    fn of(e: &dyn Diagnostic) -> Defused {
        Defused {
            message: crate::util::text::terminal_lines(&e.to_string()),
            help: e.help().map(|h| crate::util::text::terminal_lines(&h.to_string())),
            source: e.source().map(|s| Box::new(Defused::cause(s))),
        }
    }

    fn cause(e: &(dyn std::error::Error + 'static)) -> Defused {
        Defused {
            message: crate::util::text::terminal_lines(&e.to_string()),
            help: None,
            source: e.source().map(|s| Box::new(Defused::cause(s))),
        }
    }
}

impl fmt::Display for Defused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Defused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl Diagnostic for Defused {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
}
