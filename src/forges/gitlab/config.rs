//! The `gitlab` forge's section of the fleet file and its rules.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::SecretRef;
use crate::config::validate::{
    At, GO_AGENT_PLATFORMS, Problem, agent_sha256_rules, instance_url_rules, problem, secret_rules,
};

/// Whose runners nimbus makes: the instance's, a group's or a project's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GitlabRunnerType {
    /// Instance runners (an administrator's token).
    Instance,
    /// Runners of `group_id` (a group Owner's token).
    Group,
    /// Runners of `project_id` (a project Maintainer's or Owner's token).
    Project,
}

/// GitLab (gitlab.com or self-managed), through a personal, group or project access token.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitlabConfig {
    /// The instance: `https://gitlab.com` or your own.
    pub url: String,
    /// An access token with the `create_runner` and `manage_runner` scopes (and `read_api` for the jobs of
    /// `projects`): `{env: VAR}` or `{file: path}`, never inline.
    pub token: SecretRef,
    pub runner_type: GitlabRunnerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<u64>,
    /// Projects (ids) whose pending jobs are the demand of pools that follow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<u64>,
    /// The `gitlab-runner` release machines run (default: the one this nimbus names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_version: Option<String>,
    /// Where machines download `gitlab-runner`; `{version}`, `{os}` (`linux`/`darwin`) and `{arch}`
    /// (`amd64`/`arm64`) are filled in. Default: GitLab's own downloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_download_url: Option<String>,
    /// The sha256 of the download per platform (`linux-amd64`, `linux-arm64`, `darwin-amd64`,
    /// `darwin-arm64`), as GitLab publishes them with the release (`release.sha256`). Required: nothing
    /// unverified is installed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runner_sha256: BTreeMap<String, String>,
    /// Where the agent goes on machines (default `~/gitlab-runner`); `{machine}` is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_dir: Option<String>,
    /// The executor jobs run with (default `shell`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
}

impl GitlabConfig {
    pub fn validate(&self, out: &mut Vec<Problem>) {
        secret_rules(out, "forge.token", &self.token);
        instance_url_rules(out, "forge.url", &self.url, "https://gitlab.com");
        let (needs, have) = match self.runner_type {
            GitlabRunnerType::Group => ("group_id", self.group_id.is_some()),
            GitlabRunnerType::Project => ("project_id", self.project_id.is_some()),
            GitlabRunnerType::Instance => ("", true),
        };
        if !have {
            out.push(problem(
                "forge.runner_type".into(),
                At::Value,
                format!("`runner_type` needs `forge.{needs}`"),
                "missing id",
                format!("add `{needs}:` with the numeric id shown on its settings page"),
            ));
        }
        agent_sha256_rules(
            out,
            &self.runner_sha256,
            &GO_AGENT_PLATFORMS,
            "copy it from the release's `release.sha256`",
        );
    }
}
