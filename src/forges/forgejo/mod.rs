//! Forgejo and Gitea: the `/api/v1/{scope}/actions/runners` API, and `forgejo-runner` / `act_runner` on the
//! machine.
//!
//! - **Forgejo ≥ 15**: `POST …/actions/runners {name, description, ephemeral}` makes the runner and answers
//!   its `uuid` and `token`; nimbus writes the runner's `.runner` file from them (the token arrives on stdin)
//!   and starts `forgejo-runner daemon`, or `one-job` for an ephemeral runner (the server deletes it after).
//! - **Gitea ≥ 1.24** (and a Forgejo without that route): a registration token (`POST …/registration-token`),
//!   and `act_runner register --no-interactive --token-file` from a file only the runner's user can read,
//!   removed after (act_runner ≥ 3.0 reads the token from a file; nothing reaches a command line).
//!
//! | nimbus | Forgejo | Gitea |
//! | --- | --- | --- |
//! | online | `status` is `idle` or `active` | `status == "online"` |
//! | busy | `status == "active"` | `busy` |
//! | labels | `labels` | `labels[].name` |
//! | queued job | `GET …/actions/runners/jobs` with status `waiting` | `GET …/actions/jobs?status=queued` |
//!
//! Labels are declared by the runner when it starts; neither forge changes them through the API, so a label
//! change re-registers the runner (deregister, then register again).

pub mod config;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use self::config::{Flavour, ForgejoConfig, ForgejoScope};
use super::{AgentInstall, AgentTarget, Forge, ForgeError, Registration, RunnerAgent, Secret, tenant_runners};
use crate::core::model::{ForgeRunner, QueuedJob};
use crate::util::http::{Body, HyperClient};
use crate::util::shell;

pub const DEFAULT_FORGEJO_RUNNER_VERSION: &str = "12.1.2";
pub const DEFAULT_GITEA_RUNNER_VERSION: &str = "3.3.0";
pub const FORGEJO_RUNNER_URL: &str =
    "https://code.forgejo.org/forgejo/runner/releases/download/v{version}/forgejo-runner-{version}-{os}-{arch}";
pub const GITEA_RUNNER_URL: &str = "https://dl.gitea.com/act_runner/{version}/act_runner-{version}-{os}-{arch}";
const LIMIT: usize = 50;

pub struct ForgejoForge {
    api: String,
    web: String,
    token: Secret,
    config: ForgejoConfig,
    client: HyperClient,
    agent: ForgejoAgent,
    requests: AtomicU64,
}

impl ForgejoForge {
    pub fn from_config(c: &ForgejoConfig, base_dir: &std::path::Path) -> Result<Self, ForgeError> {
        let token = crate::util::secrets::read("forge.token", &c.token, base_dir)
            .map_err(|e| ForgeError::Auth(format!("{e}; set the variable or fix the path in `forge.token`")))?;
        ForgejoForge::new(c.clone(), Secret::new(token))
    }

    pub fn new(config: ForgejoConfig, token: Secret) -> Result<Self, ForgeError> {
        let web = config.url.trim_end_matches('/').to_string();
        Ok(ForgejoForge {
            api: format!("{web}/api/v1"),
            web,
            token,
            agent: ForgejoAgent::from_config(&config),
            config,
            client: crate::util::http::client().map_err(ForgeError::other)?,
            requests: AtomicU64::new(0),
        })
    }

    fn prefix(&self) -> String {
        match &self.config.scope {
            ForgejoScope::Org(o) => format!("/orgs/{o}"),
            ForgejoScope::Repo(r) => format!("/repos/{r}"),
            ForgejoScope::User(_) => "/user".into(),
            ForgejoScope::Admin(_) => "/admin".into(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<crate::util::http::Answer, ForgeError> {
        let url = format!("{}{path}", self.api);
        for attempt in 1..=3 {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let a = crate::util::http::send(
                &self.client,
                method,
                &url,
                &[("authorization", format!("token {}", self.token.expose())), ("accept", "application/json".into())],
                body.clone().map(Body::Json),
            )
            .await
            .map_err(ForgeError::other)?;
            let outcome = match a.status {
                429 => crate::util::telemetry::ApiOutcome::Throttled,
                s if s < 400 || s == 404 => crate::util::telemetry::ApiOutcome::Ok,
                _ => crate::util::telemetry::ApiOutcome::Error,
            };
            crate::util::telemetry::count_api_request("forge", "forgejo", outcome);
            if a.status == 429 && attempt < 3 {
                let wait = a.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1u64).min(60);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            if a.status >= 400 {
                let message = a.json["message"].as_str().unwrap_or_default().to_string();
                return Err(ForgeError::from_status(
                    a.status,
                    format!("{method} {path}: HTTP {}: {message}", a.status),
                ));
            }
            return Ok(a);
        }
        unreachable!("the loop returns")
    }

    /// Every page of a list: Forgejo answers an array, Gitea `{<key>: [...], total_count}`.
    async fn pages(&self, path: &str, key: &str) -> Result<Vec<serde_json::Value>, ForgeError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        for page in 1.. {
            let a = self.call("GET", &format!("{path}{sep}page={page}&limit={LIMIT}"), None).await?;
            let items = match &a.json {
                serde_json::Value::Array(v) => v.clone(),
                other => other[key].as_array().cloned().unwrap_or_default(),
            };
            let n = items.len();
            out.extend(items);
            let total = a
                .header("x-total-count")
                .and_then(|v| v.parse::<usize>().ok())
                .or(a.json["total_count"].as_u64().map(|t| t as usize));
            if n < LIMIT || total.is_some_and(|t| out.len() >= t) {
                break;
            }
        }
        Ok(out)
    }
}

fn runner_of(v: &serde_json::Value) -> Option<ForgeRunner> {
    let labels = v["labels"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str().or(l["name"].as_str()).map(str::to_string)).collect())
        .unwrap_or_default();
    let status = v["status"].as_str().unwrap_or("offline");
    let busy = v["busy"].as_bool().unwrap_or(status == "active");
    Some(ForgeRunner {
        id: v["id"].as_u64()?,
        name: v["name"].as_str()?.to_string(),
        labels,
        online: status != "offline" || busy,
        busy,
        offline_since: None,
        idle_since: None,
    })
}

#[async_trait]
impl Forge for ForgejoForge {
    async fn list_runners(&self, tenant: &str) -> Result<Vec<ForgeRunner>, ForgeError> {
        let all = self.pages(&format!("{}/actions/runners", self.prefix()), "runners").await?;
        Ok(tenant_runners(all.iter().filter_map(runner_of).collect(), tenant))
    }

    async fn register(&self, name: &str, labels: &[String], ephemeral: bool) -> Result<Registration, ForgeError> {
        let path = format!("{}/actions/runners", self.prefix());
        if self.config.flavour == Flavour::Forgejo {
            let body = serde_json::json!({"name": name, "description": "nimbus", "ephemeral": ephemeral});
            match self.call("POST", &path, Some(body)).await {
                Ok(a) => {
                    let id = a.json["id"].as_u64().ok_or_else(|| ForgeError::other(format!("POST {path}: no id")))?;
                    let uuid = a.json["uuid"].as_str().unwrap_or_default();
                    let token = a.json["token"].as_str().unwrap_or_default();
                    if uuid.is_empty() || token.is_empty() {
                        return Err(ForgeError::other(format!("POST {path}: no uuid or token")));
                    }
                    let _ = labels;
                    return Ok(Registration {
                        runner_id: Some(id),
                        url: Some(self.web.clone()),
                        // The agent's `.runner` needs both: `uuid token id`, on stdin only.
                        secret: Secret::new(format!("{uuid} {token} {id}")),
                        ephemeral,
                        group: None,
                    });
                }
                // A Forgejo before 15 has no such route: registration tokens, as on Gitea.
                Err(ForgeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let a = match self.call("POST", &format!("{path}/registration-token"), None).await {
            Ok(a) => a,
            Err(ForgeError::NotFound(_)) => self.call("GET", &format!("{path}/registration-token"), None).await?,
            Err(e) => return Err(e),
        };
        let token = a.json["token"].as_str().ok_or_else(|| ForgeError::other("registration-token: no token"))?;
        Ok(Registration {
            runner_id: None,
            url: Some(self.web.clone()),
            secret: Secret::new(format!("token {token}")),
            ephemeral,
            group: None,
        })
    }

    async fn delete_runner(&self, id: u64) -> Result<(), ForgeError> {
        match self.call("DELETE", &format!("{}/actions/runners/{id}", self.prefix()), None).await {
            Ok(_) | Err(ForgeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn set_labels(&self, id: u64, _labels: &[String]) -> Result<(), ForgeError> {
        Err(ForgeError::Conflict(format!(
            "runner {id}: Forgejo and Gitea take a runner's labels from the runner itself, not the API; remove the runner (count: 0, apply) and add it again to change them"
        )))
    }

    fn agent(&self) -> &dyn RunnerAgent {
        &self.agent
    }

    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, ForgeError> {
        let (path, key, waiting) = match self.config.flavour {
            Flavour::Forgejo => (format!("{}/actions/runners/jobs", self.prefix()), "jobs", "waiting"),
            Flavour::Gitea => (format!("{}/actions/jobs?status=queued", self.prefix()), "jobs", "queued"),
        };
        let jobs = self.pages(&path, key).await?;
        Ok(jobs
            .iter()
            .filter(|j| j["status"].as_str().is_none_or(|s| s == waiting))
            .filter_map(|j| {
                let labels = j["runs_on"].as_array().or(j["labels"].as_array())?;
                Some(QueuedJob {
                    id: j["id"].as_u64()?,
                    labels: labels.iter().filter_map(|l| l.as_str().map(str::to_string)).collect(),
                    queued_at: j["created_at"].as_str().and_then(|t| t.parse().ok()).unwrap_or_else(chrono::Utc::now),
                })
            })
            .collect())
    }

    fn demand_stats(&self) -> (u64, u64, i64) {
        (self.requests.load(Ordering::Relaxed), 0, -1)
    }
}

/// `forgejo-runner` (or `act_runner`) on a machine, checksum-verified.
pub struct ForgejoAgent {
    pub flavour: Flavour,
    pub download_url: String,
    pub version: String,
    pub sha256: std::collections::BTreeMap<String, String>,
}

impl ForgejoAgent {
    pub fn from_config(c: &ForgejoConfig) -> Self {
        let (url, version) = match c.flavour {
            Flavour::Forgejo => (FORGEJO_RUNNER_URL, DEFAULT_FORGEJO_RUNNER_VERSION),
            Flavour::Gitea => (GITEA_RUNNER_URL, DEFAULT_GITEA_RUNNER_VERSION),
        };
        ForgejoAgent {
            flavour: c.flavour,
            download_url: c.runner_download_url.clone().unwrap_or_else(|| url.into()),
            version: c.runner_version.clone().unwrap_or_else(|| version.into()),
            sha256: c.runner_sha256.clone(),
        }
    }

    fn dir_word(t: &AgentTarget) -> String {
        super::agent_dir_word(t, "$HOME/forgejo-runner")
    }

    fn download(&self, t: &AgentTarget) -> String {
        super::go_agent_download(&self.download_url, &self.version, &self.sha256, t, "runner", "")
    }
}

impl RunnerAgent for ForgejoAgent {
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }

    fn install(&self, t: &AgentTarget, reg: &Registration) -> AgentInstall {
        let labels = t.labels.iter().map(|l| format!("{l}:host")).collect::<Vec<_>>();
        let register = if reg.runner_id.is_some() {
            // Made through the API: the `.runner` file from its uuid and token (read from stdin), mode 600.
            format!(
                "set -- $secret\nuuid=\"$1\"; token=\"$2\"; id=\"$3\"\numask 077\nprintf '{{\"id\":%s,\"uuid\":\"%s\",\"name\":\"%s\",\"token\":\"%s\",\"address\":\"%s\",\"labels\":%s}}\\n' \"$id\" \"$uuid\" {name} \"$token\" {url} {labels} > .runner\n",
                name = shell::quote(t.machine),
                url = shell::quote(reg.url.as_deref().unwrap_or_default()),
                labels = shell::quote(&serde_json::to_string(&labels).unwrap_or_default()),
            )
        } else {
            // A registration token: from a file only this user reads, removed after.
            format!(
                "set -- $secret\numask 077\nprintf '%s' \"$2\" > .registration-token\n./runner register --no-interactive --instance {url} --token-file .registration-token --name {name} --labels {labels}{eph}\nrm -f .registration-token\n",
                url = shell::quote(reg.url.as_deref().unwrap_or_default()),
                name = shell::quote(t.machine),
                labels = shell::quote(&labels.join(",")),
                eph = if reg.ephemeral { " --ephemeral" } else { "" },
            )
        };
        let start = if reg.ephemeral && self.flavour == Flavour::Forgejo {
            "nohup ./runner one-job >/dev/null 2>&1 &\n"
        } else {
            "nohup ./runner daemon >/dev/null 2>&1 &\n"
        };
        let script = format!(
            "set -e\nIFS= read -r secret\ndir={dir}\nmkdir -p \"$dir\"; cd \"$dir\"\nif [ ! -x ./runner ] || [ \"$(cat .nimbus-agent-version 2>/dev/null)\" != {v} ]; then\n{download}fi\n{register}{start}",
            dir = Self::dir_word(t),
            v = shell::quote(&self.version),
            download = self.download(t),
        );
        AgentInstall { script, stdin: format!("{}\n", reg.secret.expose()).into_bytes() }
    }

    fn remove(&self, t: &AgentTarget) -> String {
        format!(
            "dir={dir}\n[ -d \"$dir\" ] || exit 0\ncd \"$dir\"\n[ -f .runner-pid ] && kill \"$(cat .runner-pid)\" 2>/dev/null || true\nrm -f .runner .registration-token\n",
            dir = Self::dir_word(t)
        )
    }

    fn restart(&self, t: &AgentTarget) -> String {
        format!("set -e\ndir={dir}\ncd \"$dir\"\nnohup ./runner daemon >/dev/null 2>&1 &\n", dir = Self::dir_word(t))
    }

    fn installed_version(&self, t: &AgentTarget) -> String {
        format!("cat {dir}/.nimbus-agent-version 2>/dev/null || true\n", dir = Self::dir_word(t))
    }
}
