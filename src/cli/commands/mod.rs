//! The CLI's commands. Only this module builds real clients (providers,
//! forge, SSH) and decides exit codes; stdout carries data, stderr status.

mod apply;
mod discover;
mod force_unlock;
mod history;
mod hosts;
mod plan;
mod reconcile;
mod simulate;
mod validate;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::cli::{Cli, ColorChoice, Command};
use crate::config::{self, LoadedConfig};

/// Exit codes, Terraform's convention.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const CHANGES: u8 = 2;
    /// Stopped by SIGINT or SIGTERM (128 + 2, as shells report it).
    pub const INTERRUPTED: u8 = 130;
}

pub use crate::cli::error::CommandError;

/// Output settings shared by commands.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub stdout_color: bool,
    pub stderr_color: bool,
}

impl Output {
    pub fn from_choice(c: ColorChoice) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let pick = |tty: bool| match c {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => tty && !no_color,
        };
        Output {
            stdout_color: pick(std::io::stdout().is_terminal()),
            stderr_color: pick(std::io::stderr().is_terminal()),
        }
    }
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> u8 {
    let out = Output::from_choice(cli.color);
    if let Some(f) = cli.log_format {
        crate::util::telemetry::init(f, out.stderr_color);
    }
    let result = match cli.command {
        Command::Apply(a) => apply::apply(&a, out, cli.log_format == Some(crate::cli::LogFormat::Json)),
        Command::Reconcile(a) => reconcile::reconcile(&a),
        Command::History(a) => history::history(&a),
        Command::ForceUnlock(a) => force_unlock::force_unlock(&a),
        Command::Validate(a) => validate::validate(&a.file),
        Command::Plan(a) => plan::plan(&a, out),
        Command::Discover(a) => discover::discover(&a),
        Command::Hosts(a) => hosts::hosts(&a),
        Command::Simulate(a) => simulate::simulate(&a),
        Command::Schema { of } => {
            out!(
                "{}",
                match of {
                    crate::cli::SchemaOf::Fleet => config::json_schema_text(),
                    crate::cli::SchemaOf::Plan => crate::core::plan::document::schema_text(),
                    crate::cli::SchemaOf::Inventory => crate::core::model::inventory_schema_text(),
                }
            );
            Ok(exit::OK)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "nimbus", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            match clap_mangen::Man::new(cmd).render(&mut out) {
                Ok(()) => {
                    out!("{}", String::from_utf8_lossy(&out));
                    Ok(exit::OK)
                }
                Err(source) => Err(CommandError::Io { what: "render", path: "man page".into(), source }),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            crate::cli::error::report(&e, out.stderr_color);
            exit::ERROR
        }
    }
}

pub use crate::engine::clients::{build_forge, build_providers, runner_dir, ssh_connector};

pub use crate::core::model::sha256_hex;

pub use crate::engine::fleet::{journal_path, remote_state, retention};

/// A journal opened for reading: the local file, or a downloaded copy of the remote one (removed on drop).
pub struct ReadJournal {
    pub journal: crate::state::journal::Journal,
    /// Where the journal was read from, for messages.
    pub source: String,
    /// The private folder a downloaded copy lives in.
    copy: Option<PathBuf>,
}

impl Drop for ReadJournal {
    fn drop(&mut self) {
        if let Some(dir) = &self.copy {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The journal to read (plan, history): with an S3 backend, the copy last uploaded, downloaded without taking
/// the lock; `None` when there is none yet. A local journal is opened (created) where it lives.
pub fn read_journal(loaded: &LoadedConfig, flag: Option<&Path>) -> Result<Option<ReadJournal>, CommandError> {
    // `--journal FILE` reads that file, whatever the backend.
    let Some(state) = remote_state(loaded).filter(|_| flag.is_none()) else {
        let path = journal_path(loaded, flag);
        let journal = crate::state::journal::Journal::open(&path)?;
        return Ok(Some(ReadJournal { journal, source: path.display().to_string(), copy: None }));
    };
    let (image, url) = runtime().block_on(async {
        let s3 = crate::state::remote::S3State::from_config_in(state, &loaded.base_dir).await?;
        Ok::<_, CommandError>((s3.download().await?, s3.url()))
    })?;
    let Some((image, _)) = image else { return Ok(None) };
    // A folder only this user can enter, made fresh (never one that exists, or a link planted in its place).
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = Utc::now().timestamp_subsec_nanos();
    let dir = std::env::temp_dir().join(format!("nimbus-journal-{}-{n}-{nanos:x}", std::process::id()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|source| CommandError::Io {
            what: "create a private folder for",
            path: dir.clone(),
            source,
        })?;
    }
    let copy = dir.join("journal.db");
    let guard = ReadJournal {
        journal: {
            crate::state::journal::Journal::restore(&copy, &image)?;
            crate::state::journal::Journal::open(&copy)?
        },
        source: url,
        copy: Some(dir),
    };
    Ok(Some(guard))
}

/// A warning when a provider's clock and this computer's differ by more than a minute (host windows are
/// compared on this computer's clock, with `window_margin` to spare).
pub fn clock_warnings(providers: &[std::sync::Arc<dyn crate::providers::Provider>]) -> Vec<crate::core::plan::Warning> {
    providers
        .iter()
        .filter_map(|p| {
            let skew = p.clock_skew()?;
            (skew.num_seconds().abs() > 60).then(|| crate::core::plan::Warning {
                address: format!("provider.{}", p.name()),
                message: format!(
                    "the provider's clock is {}s {} this computer's: host windows are compared on this computer's clock (with `window_margin` to spare); set its clock right (NTP)",
                    skew.num_seconds().abs(),
                    if skew.num_seconds() > 0 { "ahead of" } else { "behind" }
                ),
                kind: crate::core::plan::WarningKind::Other,
            })
        })
        .collect()
}

/// The plan document of `desired` against `actual` as of `at`.
pub fn document(
    loaded: &LoadedConfig,
    desired: &crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    at: DateTime<Utc>,
    source: &str,
) -> crate::core::plan::document::PlanDocument {
    crate::engine::fleet::document_from(loaded, desired, actual, at, source)
}

/// Parses `--at`: RFC 3339, or `+DURATION` relative to `now` (`+25h`, `+2d`, `+1h30m`).
pub fn parse_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, CommandError> {
    let bad = || {
        CommandError::usage(
            format!("`--at {s}` is not a time"),
            "write an RFC 3339 time such as `2026-11-25T12:00:00Z`, or a duration from now such as `+25h`",
        )
    };
    if let Some(rel) = s.strip_prefix('+').or_else(|| s.strip_prefix("now+")) {
        let d = humantime::parse_duration(rel.trim()).map_err(|_| bad())?;
        return Ok(now + chrono::Duration::from_std(d).map_err(|_| bad())?);
    }
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|_| bad())
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("tokio runtime starts")
}
