//! The CLI's commands. Only this module builds real clients (providers,
//! forge, SSH) and decides exit codes; stdout carries data, stderr status.

mod apply;
mod discover;
mod history;
mod plan;
mod validate;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::cli::{Cli, ColorChoice, Command};
use crate::config::{self, LoadedConfig};
use crate::forges::Forge;
use crate::providers::Provider;
use crate::transport::ssh::{JumpHost, SshAuth, SshConnector, SshSettings};

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
        Command::History(a) => history::history(&a),
        Command::Validate(a) => validate::validate(&a.file),
        Command::Plan(a) => plan::plan(&a, out),
        Command::Discover(a) => discover::discover(&a),
        Command::Schema => {
            out!("{}", config::json_schema_text());
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

/// The forge of the fleet file's `forge:` section.
pub fn build_forge(loaded: &LoadedConfig) -> Result<Option<Arc<dyn Forge>>, CommandError> {
    match &loaded.config.forge {
        Some(f) => Ok(Some(crate::forges::build(f, &loaded.base_dir)?)),
        None => Ok(None),
    }
}

/// Where runners are installed on machines (the forge's `runner_dir`).
pub fn runner_dir(loaded: &LoadedConfig) -> Option<String> {
    loaded.config.forge.as_ref().and_then(crate::forges::runner_dir)
}

/// The SSH connector of the fleet file's `ssh:` section, with its key read.
pub fn ssh_connector(loaded: &LoadedConfig) -> Result<Option<Arc<SshConnector>>, CommandError> {
    let Some(ssh) = &loaded.config.ssh else { return Ok(None) };
    let auth = match &ssh.key {
        None => SshAuth::Agent,
        Some(r) => {
            let text = crate::util::secrets::read("ssh.key", r, &loaded.base_dir)
                .map_err(|e| CommandError::usage(e.to_string(), "set the variable or fix the path in `ssh.key`"))?;
            let key = russh::keys::decode_secret_key(&text, None).map_err(|e| {
                // The error never includes the key.
                CommandError::usage(
                    format!("`ssh.key` is not a usable private key: {e}"),
                    "use an unencrypted OpenSSH or PEM private key",
                )
            })?;
            SshAuth::Key(Arc::new(key))
        }
    };
    let known_hosts = match &ssh.known_hosts {
        Some(p) => loaded.resolve(&crate::util::secrets::expand_home(p)),
        None => loaded.base_dir.join(".nimbus").join("known_hosts"),
    };
    let jump = match &ssh.jump_host {
        Some(j) => Some(JumpHost::parse(j, &ssh.user).ok_or_else(|| {
            CommandError::usage(
                format!("`ssh.jump_host` `{j}` is not `user@host:port`"),
                "e.g. `jump_host: ec2-user@bastion.example.com:22`",
            )
        })?),
        None => None,
    };
    Ok(Some(SshConnector::new(SshSettings {
        user: ssh.user.clone(),
        port: ssh.port.unwrap_or(22),
        auth,
        known_hosts,
        proxy_command: ssh.proxy_command.clone(),
        jump,
        connect_timeout: ssh.connect_timeout.map(|d| d.0).unwrap_or(std::time::Duration::from_secs(20)),
        state_path: ssh.state_path.clone().unwrap_or_else(|| crate::transport::ssh::REMOTE_STATE_PATH.to_string()),
    })))
}

/// Builds the providers the fleet file names.
pub async fn build_providers(loaded: &LoadedConfig) -> Result<Vec<Arc<dyn Provider>>, CommandError> {
    let ssh = ssh_connector(loaded)?;
    let mut out = Vec::new();
    for (name, p) in &loaded.config.providers {
        let ctx = crate::providers::BuildContext {
            tenant: loaded.config.tenant.clone(),
            base_dir: loaded.base_dir.clone(),
            ssh: ssh.clone(),
            // Resources made before nimbus tagged providers belong to the only provider of their kind.
            sole_of_kind: loaded.config.providers.values().filter(|q| q.kind() == p.kind()).count() == 1,
        };
        out.push(crate::providers::build(name, p, &ctx).await?);
    }
    Ok(out)
}

pub use crate::core::model::sha256_hex;

/// The journal's path: `--journal`, `journal.path`, or `.nimbus/journal.db` beside the fleet file.
pub fn journal_path(loaded: &LoadedConfig, flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match loaded.config.journal.as_ref().and_then(|j| j.path.as_ref()) {
        Some(p) => loaded.resolve(p),
        None => loaded.base_dir.join(".nimbus").join("journal.db"),
    }
}

pub fn retention(loaded: &LoadedConfig) -> crate::state::journal::Retention {
    let d = crate::state::journal::Retention::default();
    let j = loaded.config.journal.as_ref();
    crate::state::journal::Retention {
        actions: j.and_then(|j| j.retain_actions).map(|x| x.0).unwrap_or(d.actions),
        events: j.and_then(|j| j.retain_events).map(|x| x.0).unwrap_or(d.events),
    }
}

/// The plan document of `desired` against `actual` as of `at`.
pub fn document(
    loaded: &LoadedConfig,
    desired: &crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    at: DateTime<Utc>,
    source: &str,
) -> crate::core::plan::document::PlanDocument {
    use crate::core::plan::document::{FleetRef, Observed, PlanDocument};
    PlanDocument::from_plan(
        &crate::core::plan::plan(desired, actual, at),
        Some(FleetRef {
            path: loaded.path.display().to_string(),
            sha256: sha256_hex(loaded.source.as_bytes()),
            content: None,
        }),
        Some(Observed { source: source.into(), fingerprint: actual.fingerprint() }),
    )
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
