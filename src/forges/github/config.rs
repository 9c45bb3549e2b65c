//! The `github` forge's section of the fleet file and its rules.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::SecretRef;
use crate::config::validate::{At, Problem, agent_sha256_rules, problem, secret_rules};

/// GitHub, through a GitHub App installed on the organisation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// The GitHub App's id.
    pub app_id: u64,
    /// The installation id of the App on `org`.
    pub installation_id: u64,
    /// The App's private key (PEM): `{env: VAR}` or `{file: path}`, never inline.
    pub private_key: SecretRef,
    /// The organisation runners register with.
    pub org: String,
    /// REST API base URL (GitHub Enterprise Server, or a test peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// Numeric id of the runner group to register into (default 1, the org's default group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_group_id: Option<u64>,
    /// The runner agent release machines run (default: the one this nimbus pins, with its checksums). A machine
    /// whose persistent runner has an older release is updated in place while its runner is idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_version: Option<String>,
    /// Where machines download the runner agent; `{os}` (`linux`/`osx`), `{arch}` (`x64`/`arm64`) and `{version}`
    /// (`runner_version`) are filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_download_url: Option<String>,
    /// The sha256 of the agent download per platform (`linux-x64`, `linux-arm64`, `osx-x64`, `osx-arm64`). Needed
    /// with a `runner_download_url` of your own; official releases nimbus knows are pinned already. A download
    /// that does not match is not installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_sha256: Option<std::collections::BTreeMap<String, String>>,
    /// Where the runner agent is installed on machines (default `~/actions-runner`); `{machine}` is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_dir: Option<String>,
    /// Repositories (names in `org`) whose queued jobs `nimbus reconcile` reads for pools that follow demand.
    /// Default: every repository the App's installation can see (`GET /installation/repositories`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos: Option<Vec<String>>,
}

impl GithubConfig {
    pub fn validate(&self, out: &mut Vec<Problem>) {
        secret_rules(out, "forge.private_key", &self.private_key);
        if let Some(sums) = &self.runner_sha256 {
            agent_sha256_rules(
                out,
                sums,
                &["linux-x64", "linux-arm64", "osx-x64", "osx-arm64"],
                "give the download's sha256 as 64 hex digits (`sha256sum FILE`)",
            );
        }
        if let Some(v) = &self.runner_version {
            let ok = v.split('.').count() == 3
                && v.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if !ok {
                out.push(problem(
                    "forge.runner_version".into(),
                    At::Value,
                    format!("`{v}` is not a runner release"),
                    "not a release number",
                    format!(
                        "give a release of actions/runner as MAJOR.MINOR.PATCH, for example {}",
                        crate::forges::github::agent::DEFAULT_RUNNER_VERSION
                    ),
                ));
            }
        }
        if self.org.trim().is_empty() {
            out.push(problem(
                "forge.org".into(),
                At::Value,
                "`forge.org` is empty".into(),
                "empty",
                "name the GitHub organisation runners register with".to_string(),
            ));
        }
    }
}
