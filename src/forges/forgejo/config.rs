//! The `forgejo` forge's section of the fleet file (Forgejo, and Gitea with `flavour: gitea`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::SecretRef;
use crate::config::validate::{
    At, GO_AGENT_PLATFORMS, Problem, agent_sha256_rules, instance_url_rules, problem, secret_rules,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Flavour {
    /// Forgejo ≥ 15 (runners made through the API, ephemeral ones included), with `forgejo-runner`.
    #[default]
    Forgejo,
    /// Gitea ≥ 1.24 (registration tokens), with `act_runner` ≥ 0.2.12 / `gitea-runner`.
    Gitea,
}

/// Whose runners: an organisation's, a repository's, the token's user's, or the instance's (site admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ForgejoScope {
    Org(String),
    /// `owner/name`.
    Repo(String),
    User(bool),
    Admin(bool),
}

/// Forgejo (or Gitea), through an access token.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgejoConfig {
    /// The instance: `https://codeberg.org` or your own.
    pub url: String,
    /// An access token (Forgejo: `write:organization`, `write:repository`, `write:user` or `write:admin`,
    /// as the scope needs): `{env: VAR}` or `{file: path}`, never inline.
    pub token: SecretRef,
    #[serde(default)]
    pub flavour: Flavour,
    /// `{org: acme}`, `{repo: acme/app}`, `{user: true}` or `{admin: true}`.
    pub scope: ForgejoScope,
    /// The runner release machines run (default: the one this nimbus names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_version: Option<String>,
    /// Where machines download the runner; `{version}`, `{os}` (`linux`/`darwin`) and `{arch}`
    /// (`amd64`/`arm64`) are filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_download_url: Option<String>,
    /// The sha256 of the download per platform (`linux-amd64`, …), as the release publishes them. Required.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runner_sha256: BTreeMap<String, String>,
    /// Where the runner goes on machines (default `~/forgejo-runner`); `{machine}` is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_dir: Option<String>,
}

impl ForgejoConfig {
    pub fn validate(&self, out: &mut Vec<Problem>) {
        secret_rules(out, "forge.token", &self.token);
        instance_url_rules(out, "forge.url", &self.url, "https://codeberg.org");
        agent_sha256_rules(out, &self.runner_sha256, &GO_AGENT_PLATFORMS, "copy it from the release's checksums");
        if let ForgejoScope::Repo(r) = &self.scope
            && r.split('/').filter(|p| !p.is_empty()).count() != 2
        {
            out.push(problem(
                "forge.scope.repo".into(),
                At::Value,
                format!("`{r}` is not `owner/name`"),
                "not a repository",
                "write the repository as `owner/name`".to_string(),
            ));
        }
    }
}
