//! GitLab: runners made with `POST /user/runners` (a `glrt-` authentication token), `gitlab-runner` on the
//! machine registered non-interactively with it, and demand from the pending jobs of listed projects.
//!
//! | nimbus | GitLab |
//! | --- | --- |
//! | runner name | the runner's `description` (`nimbus.<tenant>.<pool>.<i>`) |
//! | labels | `tag_list` |
//! | online | `status == "online"` and not `paused` |
//! | busy | a job in `GET /runners/:id/jobs?status=running` |
//! | queued job | `GET /projects/:id/jobs?scope[]=pending`, matched by its `tag_list` |
//!
//! The token never reaches a command line: the agent gets it in its environment (`CI_SERVER_TOKEN`), and an
//! ephemeral runner runs `run-single` from the `config.toml` registration wrote.

pub mod config;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use self::config::{GitlabConfig, GitlabRunnerType};
use super::{AgentInstall, AgentTarget, Forge, ForgeError, Registration, RunnerAgent, Secret, tenant_runners};
use crate::core::model::{ForgeRunner, QueuedJob};
use crate::util::http::{Body, HyperClient};
use crate::util::shell;

/// The `gitlab-runner` release installed unless the fleet file says otherwise.
pub const DEFAULT_RUNNER_VERSION: &str = "17.11.0";
/// GitLab's own downloads of `gitlab-runner`.
pub const DEFAULT_DOWNLOAD_URL: &str =
    "https://gitlab-runner-downloads.s3.amazonaws.com/v{version}/binaries/gitlab-runner-{os}-{arch}";
const PAGE: usize = 100;

pub struct GitlabForge {
    api: String,
    web: String,
    token: Secret,
    config: GitlabConfig,
    client: HyperClient,
    agent: GitlabAgent,
    requests: AtomicU64,
}

#[derive(Debug, Deserialize)]
struct RunnerJson {
    id: u64,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    paused: Option<bool>,
    #[serde(default)]
    tag_list: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct JobJson {
    id: u64,
    #[serde(default)]
    tag_list: Vec<String>,
    #[serde(default)]
    created_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl GitlabForge {
    pub fn from_config(c: &GitlabConfig, base_dir: &std::path::Path) -> Result<Self, ForgeError> {
        let token = crate::util::secrets::read("forge.token", &c.token, base_dir)
            .map_err(|e| ForgeError::Auth(format!("{e}; set the variable or fix the path in `forge.token`")))?;
        GitlabForge::new(c.clone(), Secret::new(token))
    }

    pub fn new(config: GitlabConfig, token: Secret) -> Result<Self, ForgeError> {
        let web = config.url.trim_end_matches('/').to_string();
        Ok(GitlabForge {
            api: format!("{web}/api/v4"),
            web,
            token,
            agent: GitlabAgent::from_config(&config),
            config,
            client: crate::util::http::client().map_err(ForgeError::other)?,
            requests: AtomicU64::new(0),
        })
    }

    /// One request; a 429 waits for `Retry-After` (at most 60 s, three times) and is then `Throttled`.
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
                &[("private-token", self.token.expose().to_string()), ("accept", "application/json".into())],
                body.clone().map(Body::Json),
            )
            .await
            .map_err(ForgeError::other)?;
            let outcome = match a.status {
                429 => crate::util::telemetry::ApiOutcome::Throttled,
                s if s < 400 || s == 404 => crate::util::telemetry::ApiOutcome::Ok,
                _ => crate::util::telemetry::ApiOutcome::Error,
            };
            crate::util::telemetry::count_api_request("forge", "gitlab", outcome);
            if a.status == 429 && attempt < 3 {
                let wait = a.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1u64).min(60);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            if a.status >= 400 {
                let message = a.json["message"].to_string();
                return Err(ForgeError::from_status(
                    a.status,
                    format!("{method} {path}: HTTP {}: {message}", a.status),
                ));
            }
            return Ok(a);
        }
        unreachable!("the loop returns")
    }

    /// Every page of a list (`X-Next-Page`).
    async fn pages<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<Vec<T>, ForgeError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        let mut page = 1u64;
        loop {
            let a = self.call("GET", &format!("{path}{sep}per_page={PAGE}&page={page}"), None).await?;
            let items: Vec<T> =
                serde_json::from_value(a.json.clone()).map_err(|e| ForgeError::other(format!("GET {path}: {e}")))?;
            let n = items.len();
            out.extend(items);
            match a.header("x-next-page").and_then(|v| v.parse::<u64>().ok()) {
                Some(next) if next > page && n > 0 => page = next,
                _ => break,
            }
        }
        Ok(out)
    }

    fn runners_path(&self) -> String {
        match self.config.runner_type {
            GitlabRunnerType::Instance => "/runners/all?type=instance_type".into(),
            GitlabRunnerType::Group => format!("/groups/{}/runners", self.config.group_id.unwrap_or_default()),
            GitlabRunnerType::Project => format!("/projects/{}/runners", self.config.project_id.unwrap_or_default()),
        }
    }
}

#[async_trait]
impl Forge for GitlabForge {
    async fn list_runners(&self, tenant: &str) -> Result<Vec<ForgeRunner>, ForgeError> {
        let listed: Vec<RunnerJson> = self.pages(&self.runners_path()).await?;
        let mut out = Vec::new();
        for r in listed {
            let name = r.description.clone().unwrap_or_default();
            if crate::core::model::parse_machine_name(&name).is_none_or(|(t, _, _)| t != tenant) {
                continue;
            }
            // Tags are only in the runner's own record; running jobs in its job list.
            let one: RunnerJson =
                serde_json::from_value(self.call("GET", &format!("/runners/{}", r.id), None).await?.json)
                    .map_err(|e| ForgeError::other(format!("GET /runners/{}: {e}", r.id)))?;
            let online = one.status.as_deref().or(r.status.as_deref()) == Some("online")
                && !one.paused.or(r.paused).unwrap_or(false);
            let running = self.call("GET", &format!("/runners/{}/jobs?status=running&per_page=1", r.id), None).await?;
            let busy = running.json.as_array().is_some_and(|a| !a.is_empty());
            out.push(ForgeRunner {
                id: r.id,
                name,
                labels: one.tag_list.unwrap_or_default(),
                online: online || busy,
                busy,
                offline_since: None,
                idle_since: None,
            });
        }
        Ok(tenant_runners(out, tenant))
    }

    async fn register(&self, name: &str, labels: &[String], ephemeral: bool) -> Result<Registration, ForgeError> {
        let mut body = serde_json::json!({
            "description": name,
            "tag_list": labels,
            "run_untagged": false,
            "locked": true,
        });
        match self.config.runner_type {
            GitlabRunnerType::Instance => body["runner_type"] = "instance_type".into(),
            GitlabRunnerType::Group => {
                body["runner_type"] = "group_type".into();
                body["group_id"] = self.config.group_id.into();
            }
            GitlabRunnerType::Project => {
                body["runner_type"] = "project_type".into();
                body["project_id"] = self.config.project_id.into();
            }
        }
        let a = self.call("POST", "/user/runners", Some(body)).await?;
        let id = a.json["id"].as_u64().ok_or_else(|| ForgeError::other("POST /user/runners: no runner id"))?;
        let token = a.json["token"].as_str().ok_or_else(|| ForgeError::other("POST /user/runners: no token"))?;
        Ok(Registration {
            runner_id: Some(id),
            url: Some(self.web.clone()),
            secret: Secret::new(token),
            ephemeral,
            group: None,
        })
    }

    async fn delete_runner(&self, id: u64) -> Result<(), ForgeError> {
        match self.call("DELETE", &format!("/runners/{id}"), None).await {
            Ok(_) | Err(ForgeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn set_labels(&self, id: u64, labels: &[String]) -> Result<(), ForgeError> {
        self.call("PUT", &format!("/runners/{id}"), Some(serde_json::json!({ "tag_list": labels }))).await.map(|_| ())
    }

    fn agent(&self) -> &dyn RunnerAgent {
        &self.agent
    }

    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, ForgeError> {
        let mut out = Vec::new();
        for p in &self.config.projects {
            let jobs: Vec<JobJson> = self.pages(&format!("/projects/{p}/jobs?scope[]=pending")).await?;
            out.extend(jobs.into_iter().map(|j| QueuedJob {
                id: j.id,
                labels: j.tag_list,
                queued_at: j.created_at.unwrap_or_else(chrono::Utc::now),
            }));
        }
        Ok(out)
    }

    fn demand_stats(&self) -> (u64, u64, i64) {
        (self.requests.load(Ordering::Relaxed), 0, -1)
    }
}

/// `gitlab-runner` on a machine: a single binary, checked against its sha256, registered with the runner's
/// authentication token from the environment, run as a service (persistent) or for one job (ephemeral).
pub struct GitlabAgent {
    pub download_url: String,
    pub version: String,
    pub sha256: std::collections::BTreeMap<String, String>,
    pub executor: String,
}

impl GitlabAgent {
    pub fn from_config(c: &GitlabConfig) -> Self {
        GitlabAgent {
            download_url: c.runner_download_url.clone().unwrap_or_else(|| DEFAULT_DOWNLOAD_URL.into()),
            version: c.runner_version.clone().unwrap_or_else(|| DEFAULT_RUNNER_VERSION.into()),
            sha256: c.runner_sha256.clone(),
            executor: c.executor.clone().unwrap_or_else(|| "shell".into()),
        }
    }

    fn dir_word(t: &AgentTarget) -> String {
        super::agent_dir_word(t, "$HOME/gitlab-runner")
    }

    /// Download, verify and record the release (in the runner directory).
    fn download(&self, t: &AgentTarget) -> String {
        let note = " (from the release's release.sha256)";
        super::go_agent_download(&self.download_url, &self.version, &self.sha256, t, "gitlab-runner", note)
    }
}

impl RunnerAgent for GitlabAgent {
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }

    fn install(&self, t: &AgentTarget, reg: &Registration) -> AgentInstall {
        let start = if reg.ephemeral {
            format!(
                "nohup ./gitlab-runner run-single --config \"$dir/config.toml\" --runner {name} --max-builds 1 >/dev/null 2>&1 &\n",
                name = shell::quote(t.machine)
            )
        } else {
            "if (sudo -n ./gitlab-runner install --service nimbus-gitlab-runner --working-directory \"$dir\" --config \"$dir/config.toml\" && sudo -n ./gitlab-runner start --service nimbus-gitlab-runner) 2>/dev/null; then :; else nohup ./gitlab-runner run --config \"$dir/config.toml\" --working-directory \"$dir\" >/dev/null 2>&1 & fi\n".to_string()
        };
        let script = format!(
            "set -e\nIFS= read -r secret\ndir={dir}\nmkdir -p \"$dir\"; cd \"$dir\"\nif [ ! -x ./gitlab-runner ] || [ \"$(cat .nimbus-agent-version 2>/dev/null)\" != {v} ]; then\n{download}fi\n\
             CI_SERVER_URL={url} CI_SERVER_TOKEN=\"$secret\" RUNNER_NAME={name} RUNNER_EXECUTOR={exec} REGISTER_NON_INTERACTIVE=true ./gitlab-runner register --config \"$dir/config.toml\"\n{start}",
            dir = Self::dir_word(t),
            v = shell::quote(&self.version),
            download = self.download(t),
            url = shell::quote(reg.url.as_deref().unwrap_or_default()),
            name = shell::quote(t.machine),
            exec = shell::quote(&self.executor),
        );
        AgentInstall { script, stdin: format!("{}\n", reg.secret.expose()).into_bytes() }
    }

    fn remove(&self, t: &AgentTarget) -> String {
        format!(
            "dir={dir}\n[ -d \"$dir\" ] || exit 0\ncd \"$dir\"\n(sudo -n ./gitlab-runner stop --service nimbus-gitlab-runner; sudo -n ./gitlab-runner uninstall --service nimbus-gitlab-runner) >/dev/null 2>&1 || true\n[ -x ./gitlab-runner ] && ./gitlab-runner unregister --config \"$dir/config.toml\" --all-runners >/dev/null 2>&1 || true\nrm -f config.toml\n",
            dir = Self::dir_word(t)
        )
    }

    fn restart(&self, t: &AgentTarget) -> String {
        format!(
            "set -e\ndir={dir}\ncd \"$dir\"\nif sudo -n ./gitlab-runner restart --service nimbus-gitlab-runner 2>/dev/null; then :; else nohup ./gitlab-runner run --config \"$dir/config.toml\" --working-directory \"$dir\" >/dev/null 2>&1 & fi\n",
            dir = Self::dir_word(t)
        )
    }

    fn installed_version(&self, t: &AgentTarget) -> String {
        format!("cat {dir}/.nimbus-agent-version 2>/dev/null || true\n", dir = Self::dir_word(t))
    }
}
