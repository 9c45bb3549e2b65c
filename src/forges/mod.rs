//! Forges: where runners register. The network sits behind [`Forge`]; the
//! GitHub implementation uses octocrab with GitHub App authentication.
//! Registration tokens and JIT configs are [`Secret`]s: never printed,
//! logged, planned or stored.

#[cfg(feature = "testing")]
pub mod fake;

use std::path::Path;
use std::sync::Arc;

use crate::config::ForgeConfig;
pub mod forgejo;
pub mod github;
pub mod gitlab;
pub mod multi;

use async_trait::async_trait;

use crate::core::model::ForgeRunner;

/// Why a forge call failed, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("forge: {0} not found")]
    NotFound(String),
    /// Rate limited for longer than nimbus waits.
    #[error("forge: rate limited: {0}")]
    Throttled(String),
    /// The App's credentials or permissions.
    #[error("forge: not authorised: {0}")]
    Auth(String),
    /// The forge cannot take more (a runner group or org limit).
    #[error("forge: no capacity: {0}")]
    Capacity(String),
    /// The runner is in a state that does not allow it (busy, a name taken).
    #[error("forge: {0}")]
    Conflict(String),
    #[error("forge: {message}")]
    Other {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl ForgeError {
    pub fn other(message: impl Into<String>) -> Self {
        ForgeError::Other { message: message.into(), source: None }
    }

    /// Classifies an HTTP status from the forge's API.
    pub fn from_status(status: u16, message: String) -> Self {
        match status {
            401 | 403 => ForgeError::Auth(message),
            404 => ForgeError::NotFound(message),
            409 | 422 => ForgeError::Conflict(message),
            429 => ForgeError::Throttled(message),
            _ => ForgeError::other(message),
        }
    }

    pub fn hint(&self) -> &'static str {
        match self {
            ForgeError::NotFound(_) => "it was removed outside nimbus; plan again",
            ForgeError::Throttled(_) => "the forge's rate limit is exhausted; try again after it resets",
            ForgeError::Auth(_) => {
                "check `app_id`, `installation_id`, `org`, the App key, and that the App may manage self-hosted runners"
            }
            ForgeError::Capacity(_) => "the forge refuses more runners; check the runner group's limits",
            ForgeError::Conflict(_) => "the runner changed since the plan was made; plan again",
            ForgeError::Other { .. } => "RUST_LOG=debug with `--log-format json` shows more",
        }
    }
}

/// A value that must never be shown. `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The value, for handing to the machine (on stdin) and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a machine's agent needs to register its runner.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Set when the forge created the runner already (GitHub's JIT config): deleting it undoes the registration.
    pub runner_id: Option<u64>,
    /// Where the agent registers, when it needs to be told (GitHub: the organisation's URL).
    pub url: Option<String>,
    /// The credential the agent needs (a registration token, a JIT config). Handed to the machine on stdin only.
    pub secret: Secret,
    /// One job, then the runner is gone.
    pub ephemeral: bool,
    /// The runner group a persistent runner joins, by name (what the agent takes); `None`: the default group.
    /// (An ephemeral runner's group is in its JIT config.)
    pub group: Option<String>,
}

/// The machine a runner agent is installed on.
pub struct AgentTarget<'a> {
    /// The machine's name, which is also the runner's name.
    pub machine: &'a str,
    pub labels: &'a [String],
    pub os: crate::config::Os,
    pub arch: crate::config::Arch,
    /// Where the agent goes when the fleet file says (`{machine}` is replaced); otherwise the agent's default.
    pub dir: Option<&'a str>,
}

/// A script to run on the machine with `sh -c`, and what to feed it on stdin (the secret, never on argv).
pub struct AgentInstall {
    pub script: String,
    pub stdin: Vec<u8>,
}

/// The runner directory as a shell word: the fleet file's `runner_dir` (or `default`) with `{machine}` replaced;
/// a leading `$HOME/` is left to the shell, anything else quoted.
pub fn agent_dir_word(t: &AgentTarget, default: &str) -> String {
    let dir = t.dir.unwrap_or(default).replace("{machine}", t.machine);
    match dir.strip_prefix("$HOME/") {
        Some(rest) => format!("\"$HOME\"/{}", crate::util::shell::quote(rest)),
        None => crate::util::shell::quote(&dir),
    }
}

/// The `os-arch` names the Go-built agents use (`linux`/`darwin`, `amd64`/`arm64`).
pub fn go_platform(os: crate::config::Os, arch: crate::config::Arch) -> (&'static str, &'static str) {
    (
        match os {
            crate::config::Os::Macos => "darwin",
            crate::config::Os::Linux => "linux",
        },
        match arch {
            crate::config::Arch::Arm64 => "arm64",
            crate::config::Arch::X86_64 => "amd64",
        },
    )
}

/// [`checked_download`] of a Go-built agent for `t`'s platform: `template`'s `{os}`, `{arch}` and `{version}`
/// filled in, its sum looked up as `os-arch` in `sums` (`forge.runner_sha256`); `note` follows the missing
/// setting's name in the error.
pub fn go_agent_download(
    template: &str,
    version: &str,
    sums: &std::collections::BTreeMap<String, String>,
    t: &AgentTarget,
    file: &str,
    note: &str,
) -> String {
    let (os, arch) = go_platform(t.os, t.arch);
    let url = template.replace("{os}", os).replace("{arch}", arch).replace("{version}", version);
    let what = format!("forge.runner_sha256.{os}-{arch}{note}");
    checked_download(&url, sums.get(&format!("{os}-{arch}")), version, file, &what)
}

/// Shell lines (in the runner directory) that download a single-binary agent from `url` into `file`, refuse it
/// unless its sha256 is `sum` (and refuse to download at all without one: `what` names the missing setting),
/// make it executable, and record `version` in `.nimbus-agent-version`.
pub fn checked_download(url: &str, sum: Option<&String>, version: &str, file: &str, what: &str) -> String {
    use crate::util::shell::quote;
    match sum {
        None => format!("  echo \"no sha256 is known for \"{u}\": add {what}\" >&2; exit 1\n", u = quote(url)),
        Some(sum) => format!(
            "  if command -v curl >/dev/null; then curl -fsSL {u} -o {f}.new; else wget -q -O {f}.new {u}; fi\n  sum=$( (sha256sum {f}.new 2>/dev/null || shasum -a 256 {f}.new) | cut -d' ' -f1)\n  if [ \"$sum\" != {want} ]; then rm -f {f}.new; echo \"the agent from \"{u}\" has sha256 $sum, not \"{want}\": not installing it\" >&2; exit 1; fi\n  chmod +x {f}.new; mv {f}.new {f}; printf '%s\\n' {v} > .nimbus-agent-version\n",
            u = quote(url),
            f = file,
            want = quote(&sum.to_ascii_lowercase()),
            v = quote(version),
        ),
    }
}

/// A forge's runner agent on a machine: install, register, start, and remove. The agent's own naming of
/// OS and architecture is its business.
pub trait RunnerAgent: Send + Sync {
    /// Installs the agent if it is missing, registers the runner with `reg`, and starts it.
    fn install(&self, target: &AgentTarget, reg: &Registration) -> AgentInstall;
    /// Stops and unregisters the agent on a machine that stays.
    fn remove(&self, target: &AgentTarget) -> String;
    /// Restarts the agent of a registered runner that went offline.
    fn restart(&self, target: &AgentTarget) -> String;
    /// The agent release this forge installs (`forge.runner_version`); `None`: the forge does not say.
    fn version(&self) -> Option<&str> {
        None
    }
    /// Updates the agent of a registered, idle runner in place to [`RunnerAgent::version`] and restarts it,
    /// keeping its registration. Exits 75 without changing anything when a job is running on the machine.
    fn update(&self, target: &AgentTarget) -> String {
        let _ = target;
        "echo \"this forge's agent cannot be updated in place\" >&2; exit 1\n".into()
    }
    /// A script printing the agent release installed on the machine (nothing when unknown).
    fn installed_version(&self, target: &AgentTarget) -> String {
        let _ = target;
        "true\n".into()
    }
}

#[async_trait]
pub trait Forge: Send + Sync {
    /// Runners whose names belong to `tenant` (`nimbus.<tenant>.…`), all pages.
    async fn list_runners(&self, tenant: &str) -> Result<Vec<ForgeRunner>, ForgeError>;
    /// A registration for a persistent runner, or a JIT config for an ephemeral one.
    async fn register(&self, name: &str, labels: &[String], ephemeral: bool) -> Result<Registration, ForgeError>;
    /// Deletes a runner; one already gone is not an error.
    async fn delete_runner(&self, id: u64) -> Result<(), ForgeError>;
    /// Replaces a runner's custom labels.
    async fn set_labels(&self, id: u64, labels: &[String]) -> Result<(), ForgeError>;
    /// The forge's runner agent.
    fn agent(&self) -> &dyn RunnerAgent;
    /// Jobs queued for self-hosted runners, read on every reconcile iteration (webhooks only wake the loop
    /// early). A forge that cannot tell reports none.
    async fn queued_jobs(&self) -> Result<Vec<crate::core::model::QueuedJob>, ForgeError> {
        Ok(Vec::new())
    }
    /// What reading demand cost so far: (requests, of them answered 304 Not Modified, the API budget left as the
    /// last answer said (-1: unknown)).
    fn demand_stats(&self) -> (u64, u64, i64) {
        (0, 0, -1)
    }
}

/// Only this tenant's runners.
pub fn tenant_runners(all: Vec<ForgeRunner>, tenant: &str) -> Vec<ForgeRunner> {
    all.into_iter()
        .filter(|r| crate::core::model::parse_machine_name(&r.name).is_some_and(|(t, _, _)| t == tenant))
        .collect()
}

/// Builds the forge of the fleet file's `forge:` section (reading its secrets): the one registration point
/// for forge kinds.
pub fn build(config: &ForgeConfig, base_dir: &Path) -> Result<Arc<dyn Forge>, ForgeError> {
    Ok(match config {
        ForgeConfig::Github(c) => Arc::new(github::GitHubForge::from_config(c, base_dir)?),
        ForgeConfig::Gitlab(c) => Arc::new(gitlab::GitlabForge::from_config(c, base_dir)?),
        ForgeConfig::Forgejo(c) => Arc::new(forgejo::ForgejoForge::from_config(c, base_dir)?),
    })
}

/// Where the forge's runner agent is installed on machines, when the fleet file says.
pub fn runner_dir(config: &ForgeConfig) -> Option<String> {
    match config {
        ForgeConfig::Github(c) => c.runner_dir.clone(),
        ForgeConfig::Gitlab(c) => c.runner_dir.clone(),
        ForgeConfig::Forgejo(c) => c.runner_dir.clone(),
    }
}
