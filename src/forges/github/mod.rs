//! GitHub through octocrab, authenticated as a GitHub App installation: a
//! JWT signed with the App key is exchanged for an installation token, which
//! octocrab caches until it expires. Every request carries
//! `Accept: application/vnd.github+json` and `X-GitHub-Api-Version`.
//! Rate limits are honoured: a 403/429 with `x-ratelimit-remaining: 0` waits
//! until `x-ratelimit-reset`, and `retry-after` is obeyed (bounded).

pub mod agent;
pub mod config;

use std::time::Duration;

use async_trait::async_trait;
use http::header::{ACCEPT, HeaderMap};
use http::{HeaderName, Method, StatusCode};
use octocrab::Octocrab;
use octocrab::models::{AppId, InstallationId};
use serde::Deserialize;
use serde_json::json;

use super::{Forge, ForgeError, Registration, RunnerAgent, Secret, tenant_runners};
use crate::core::model::ForgeRunner;

pub const API_VERSION: &str = "2022-11-28";
/// The runner agent used when the fleet file names none.
pub const DEFAULT_RUNNER_URL: &str =
    "https://github.com/actions/runner/releases/download/v{version}/actions-runner-{os}-{arch}-{version}.tar.gz";
const PAGE: usize = 100;
/// The longest nimbus waits for a rate limit to reset before giving up.
const MAX_RATE_WAIT: Duration = Duration::from_secs(120);

pub struct GitHubForge {
    octo: Octocrab,
    org: String,
    web_url: String,
    /// The fleet file's `runner_group_id`; `None` is the organisation's default group (id 1).
    runner_group_id: Option<u64>,
    /// The group's name, looked up once (the agent's `config.sh` takes a name).
    group_name: tokio::sync::OnceCell<String>,
    agent: agent::GithubAgent,
    /// Repositories whose queued jobs are read (`forge.repos`); `None`: the installation's.
    repos: Option<Vec<String>>,
    /// Conditional requests: the last ETag and body per path. A 304 answers from here (and does not count
    /// against the rate limit).
    etags: std::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
    /// Requests made for demand, and how many of them were answered 304.
    pub demand_calls: std::sync::atomic::AtomicU64,
    pub not_modified: std::sync::atomic::AtomicU64,
    /// The last `x-ratelimit-remaining` seen (-1: none yet).
    pub rate_remaining: std::sync::atomic::AtomicI64,
}

#[derive(Deserialize)]
struct RepoList {
    total_count: usize,
    repositories: Vec<RepoJson>,
}

#[derive(Deserialize)]
struct RepoJson {
    name: String,
    owner: OwnerJson,
}

#[derive(Deserialize)]
struct OwnerJson {
    login: String,
}

#[derive(Deserialize)]
struct RunList {
    total_count: usize,
    workflow_runs: Vec<RunJson>,
}

#[derive(Deserialize)]
struct RunJson {
    id: u64,
}

#[derive(Deserialize)]
struct JobList {
    jobs: Vec<JobJson>,
}

#[derive(Deserialize)]
struct JobJson {
    id: u64,
    status: String,
    #[serde(default)]
    labels: Vec<String>,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Deserialize)]
struct GroupJson {
    name: String,
}

#[derive(Deserialize)]
struct RunnerList {
    #[serde(default)]
    total_count: usize,
    #[serde(default)]
    runners: Vec<RunnerJson>,
}

#[derive(Deserialize)]
struct RunnerJson {
    id: u64,
    name: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    busy: bool,
    #[serde(default)]
    labels: Vec<LabelJson>,
}

#[derive(Deserialize)]
struct LabelJson {
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct TokenJson {
    token: String,
}

#[derive(Deserialize)]
struct JitJson {
    runner: JitRunner,
    encoded_jit_config: String,
}

#[derive(Deserialize)]
struct JitRunner {
    id: u64,
}

fn failed(e: impl std::fmt::Display) -> ForgeError {
    ForgeError::other(e.to_string())
}

impl GitHubForge {
    /// The forge of a fleet file's `github` section; the App key is read from its `{env:}`/`{file:}`.
    pub fn from_config(c: &config::GithubConfig, base_dir: &std::path::Path) -> Result<Self, ForgeError> {
        let pem = crate::util::secrets::read("forge.private_key", &c.private_key, base_dir)
            .map_err(|e| ForgeError::Auth(format!("{e}; set the variable or fix the path in `forge.private_key`")))?;
        GitHubForge::new(
            c.api_url.as_deref(),
            c.app_id,
            c.installation_id,
            &pem,
            &c.org,
            c.runner_group_id,
            c.runner_download_url.as_deref(),
        )
        .map(|f| {
            f.with_sha256(c.runner_sha256.clone().unwrap_or_default())
                .with_repos(c.repos.clone())
                .with_runner_version(c.runner_version.as_deref().unwrap_or(agent::DEFAULT_RUNNER_VERSION))
        })
        .map_err(|e| ForgeError::Auth(format!("{e}; use the App's private key as downloaded from GitHub (PEM)")))
    }

    /// `key_pem` is the App's private key; it is used to sign JWTs and dropped.
    pub fn new(
        api_url: Option<&str>,
        app_id: u64,
        installation_id: u64,
        key_pem: &str,
        org: &str,
        runner_group_id: Option<u64>,
        download_url: Option<&str>,
    ) -> Result<Self, ForgeError> {
        let key = octocrab::jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes())
            .map_err(|e| failed(format!("the GitHub App private key is not an RSA PEM key ({e})")))?;
        let mut b = Octocrab::builder()
            .app(AppId(app_id), key)
            .add_header(ACCEPT, "application/vnd.github+json".to_string())
            .add_header(HeaderName::from_static("x-github-api-version"), API_VERSION.to_string());
        if let Some(u) = api_url {
            b = b.base_uri(u).map_err(failed)?;
        }
        let app = b.build().map_err(failed)?;
        let octo = app.installation(InstallationId(installation_id)).map_err(failed)?;
        let web_url = match api_url {
            // GitHub Enterprise Server: https://HOST/api/v3 → https://HOST
            Some(u) if u.trim_end_matches('/').ends_with("/api/v3") => {
                format!("{}/{org}", u.trim_end_matches('/').trim_end_matches("/api/v3"))
            }
            _ => format!("https://github.com/{org}"),
        };
        Ok(GitHubForge {
            octo,
            org: org.to_string(),
            web_url,
            runner_group_id,
            group_name: tokio::sync::OnceCell::new(),
            agent: agent::GithubAgent::new(download_url.unwrap_or(DEFAULT_RUNNER_URL)),
            repos: None,
            etags: Default::default(),
            demand_calls: Default::default(),
            not_modified: Default::default(),
            rate_remaining: std::sync::atomic::AtomicI64::new(-1),
        })
    }

    /// Reads queued jobs of these repositories (names in the org) only.
    pub fn with_repos(mut self, repos: Option<Vec<String>>) -> Self {
        self.repos = repos;
        self
    }

    /// A GET with `If-None-Match` when the path was read before: a 304 is answered from the last body.
    async fn get_cached<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, ForgeError> {
        use std::sync::atomic::Ordering::Relaxed;
        let cached = self.etags.lock().expect("lock").get(path).cloned();
        let mut headers = HeaderMap::new();
        if let Some((etag, _)) = &cached
            && let Ok(v) = http::HeaderValue::from_str(etag)
        {
            headers.insert(http::header::IF_NONE_MATCH, v);
        }
        self.demand_calls.fetch_add(1, Relaxed);
        let resp = self.octo._get_with_headers(path, Some(headers)).await.map_err(|e| {
            count_request(None, false);
            failed(format!("GET {path}: {e}"))
        })?;
        let status = resp.status();
        count_request(Some(status), rate_limit_wait(status, resp.headers()).is_some());
        if let Some(r) =
            resp.headers().get("x-ratelimit-remaining").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
        {
            self.rate_remaining.store(r, Relaxed);
        }
        let etag = resp.headers().get(http::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
        if let Some(w) = rate_limit_wait(status, resp.headers()) {
            return Err(ForgeError::Throttled(format!("GET {path}: rate limited for {}s", w.as_secs())));
        }
        let text = if status == StatusCode::NOT_MODIFIED {
            self.not_modified.fetch_add(1, Relaxed);
            match cached {
                Some((_, body)) => body,
                None => return Err(failed(format!("GET {path}: 304 without an earlier answer"))),
            }
        } else {
            let text = self.octo.body_to_string(resp).await.map_err(failed)?;
            if !status.is_success() {
                return Err(ForgeError::from_status(
                    status.as_u16(),
                    format!("GET {path}: HTTP {status}: {}", first_line(&text)),
                ));
            }
            if let Some(e) = etag {
                self.etags.lock().expect("lock").insert(path.to_string(), (e, text.clone()));
            }
            text
        };
        serde_json::from_str(&text).map_err(|e| failed(format!("GET {path}: unexpected response: {e}")))
    }

    /// `owner/name` of every repository whose jobs are read.
    async fn demand_repos(&self) -> Result<Vec<String>, ForgeError> {
        if let Some(r) = &self.repos {
            return Ok(r.iter().map(|n| format!("{}/{n}", self.org)).collect());
        }
        let mut out = Vec::new();
        for page in 1.. {
            let list: RepoList =
                self.get_cached(&format!("/installation/repositories?per_page={PAGE}&page={page}")).await?;
            let n = list.repositories.len();
            out.extend(list.repositories.into_iter().map(|r| format!("{}/{}", r.owner.login, r.name)));
            if n < PAGE || out.len() >= list.total_count {
                break;
            }
        }
        Ok(out)
    }

    /// Installs this release of the agent (`forge.runner_version`).
    pub fn with_runner_version(mut self, version: &str) -> Self {
        self.agent.version = version.to_string();
        self
    }

    /// The fleet file's checksums for the agent download (`os-arch` → sha256), over the pinned ones.
    pub fn with_sha256(mut self, sums: std::collections::BTreeMap<String, String>) -> Self {
        self.agent.sha256 = sums;
        self
    }

    /// The configured runner group's name (`GET /orgs/{org}/actions/runner-groups/{id}`), once.
    async fn group_name(&self, id: u64) -> Result<String, ForgeError> {
        self.group_name
            .get_or_try_init(|| async {
                let path = format!("/orgs/{}/actions/runner-groups/{id}", self.org);
                let g: GroupJson = self.ok_json(Method::GET, &path, None).await.map_err(|e| match e {
                    ForgeError::NotFound(m) => ForgeError::NotFound(format!(
                        "{m}; runner group {id} (forge.runner_group_id) does not exist in {}, or the App cannot see it",
                        self.org
                    )),
                    e => e,
                })?;
                Ok(g.name)
            })
            .await
            .cloned()
    }

    /// Sends one request, waiting out rate limits; returns status and body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, String), ForgeError> {
        let mut waited = Duration::ZERO;
        loop {
            let resp = match method {
                Method::GET => self.octo._get(path).await,
                Method::POST => self.octo._post(path, body.as_ref()).await,
                Method::PUT => self.octo._put(path, body.as_ref()).await,
                Method::DELETE => self.octo._delete(path, body.as_ref()).await,
                _ => return Err(failed(format!("unsupported method {method}"))),
            }
            .map_err(|e| {
                count_request(None, false);
                failed(format!("{method} {path}: {e}"))
            })?;
            let status = resp.status();
            let wait = rate_limit_wait(status, resp.headers());
            count_request(Some(status), wait.is_some());
            let text = self.octo.body_to_string(resp).await.map_err(failed)?;
            match wait {
                Some(w) if waited + w <= MAX_RATE_WAIT => {
                    tracing::warn!(
                        event = "nimbus.forge.rate_limited",
                        wait_s = w.as_secs(),
                        "GitHub rate limit; waiting {}s",
                        w.as_secs()
                    );
                    tokio::time::sleep(w).await;
                    waited += w;
                }
                Some(_) => {
                    return Err(ForgeError::Throttled(format!(
                        "{method} {path}: rate limited for longer than {}s",
                        MAX_RATE_WAIT.as_secs()
                    )));
                }
                None => return Ok((status, text)),
            }
        }
    }

    async fn ok_json<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ForgeError> {
        let (status, text) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(ForgeError::from_status(
                status.as_u16(),
                format!("{method} {path}: HTTP {status}: {}", first_line(&text)),
            ));
        }
        serde_json::from_str(&text).map_err(|e| failed(format!("{method} {path}: unexpected response: {e}")))
    }
}

/// Counts one request to GitHub for the metrics (`api_requests{kind="forge",name="github"}`).
fn count_request(status: Option<StatusCode>, throttled: bool) {
    use crate::util::telemetry::{ApiOutcome, count_api_request};
    let outcome = match status {
        _ if throttled => ApiOutcome::Throttled,
        Some(s) if s.is_success() || s == StatusCode::NOT_MODIFIED || s == StatusCode::NOT_FOUND => ApiOutcome::Ok,
        _ => ApiOutcome::Error,
    };
    count_api_request("forge", "github", outcome);
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").get(..200).unwrap_or(s.lines().next().unwrap_or(""))
}

/// How long a rate-limited response asks us to wait, if it is one.
pub fn rate_limit_wait(status: StatusCode, h: &HeaderMap) -> Option<Duration> {
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let num = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(s) = num("retry-after") {
        return Some(Duration::from_secs(s.max(1)));
    }
    if num("x-ratelimit-remaining") == Some(0) {
        let reset = num("x-ratelimit-reset")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        return Some(Duration::from_secs(reset.saturating_sub(now).max(1)));
    }
    None
}

#[async_trait]
impl Forge for GitHubForge {
    async fn list_runners(&self, tenant: &str) -> Result<Vec<ForgeRunner>, ForgeError> {
        let mut all = Vec::new();
        for page in 1.. {
            let path = format!("/orgs/{}/actions/runners?per_page={PAGE}&page={page}", self.org);
            let list: RunnerList = self.ok_json(Method::GET, &path, None).await?;
            let n = list.runners.len();
            all.extend(list.runners.into_iter().map(|r| ForgeRunner {
                id: r.id,
                name: r.name,
                // Only custom labels: the read-only ones (self-hosted, OS, arch) are the forge's own.
                labels:
                    r.labels.into_iter().filter(|l| l.kind.as_deref() != Some("read-only")).map(|l| l.name).collect(),
                online: r.status == "online",
                busy: r.busy,
                offline_since: None,
                idle_since: None,
            }));
            if n < PAGE || all.len() >= list.total_count {
                break;
            }
        }
        Ok(tenant_runners(all, tenant))
    }

    async fn register(&self, name: &str, labels: &[String], ephemeral: bool) -> Result<Registration, ForgeError> {
        if ephemeral {
            let mut labels = labels.to_vec();
            if labels.is_empty() {
                labels.push("self-hosted".into());
            }
            let body = json!({ "name": name, "runner_group_id": self.runner_group_id.unwrap_or(1), "labels": labels, "work_folder": "_work" });
            let path = format!("/orgs/{}/actions/runners/generate-jitconfig", self.org);
            let jit: JitJson = self.ok_json(Method::POST, &path, Some(body)).await?;
            Ok(Registration {
                runner_id: Some(jit.runner.id),
                url: None,
                secret: Secret::new(jit.encoded_jit_config),
                ephemeral: true,
                group: None,
            })
        } else {
            let path = format!("/orgs/{}/actions/runners/registration-token", self.org);
            let t: TokenJson = self.ok_json(Method::POST, &path, None).await?;
            // A persistent runner joins the configured group too, so the group's repository access applies to it.
            let group = match self.runner_group_id {
                Some(id) => Some(self.group_name(id).await?),
                None => None,
            };
            Ok(Registration {
                runner_id: None,
                url: Some(self.web_url.clone()),
                secret: Secret::new(t.token),
                ephemeral: false,
                group,
            })
        }
    }

    async fn delete_runner(&self, id: u64) -> Result<(), ForgeError> {
        let path = format!("/orgs/{}/actions/runners/{id}", self.org);
        let (status, text) = self.call(Method::DELETE, &path, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(ForgeError::from_status(
                status.as_u16(),
                format!("DELETE {path}: HTTP {status}: {}", first_line(&text)),
            ))
        }
    }

    async fn set_labels(&self, id: u64, labels: &[String]) -> Result<(), ForgeError> {
        let path = format!("/orgs/{}/actions/runners/{id}/labels", self.org);
        let _: serde_json::Value = self.ok_json(Method::PUT, &path, Some(json!({ "labels": labels }))).await?;
        Ok(())
    }

    fn agent(&self) -> &dyn RunnerAgent {
        &self.agent
    }

    fn demand_stats(&self) -> (u64, u64, i64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.demand_calls.load(Relaxed), self.not_modified.load(Relaxed), self.rate_remaining.load(Relaxed))
    }

    /// Queued jobs of the fleet's repositories: each repository's queued workflow runs, then their jobs still
    /// queued, paginated; every request conditional on its last ETag.
    async fn queued_jobs(&self) -> Result<Vec<crate::core::model::QueuedJob>, ForgeError> {
        let mut out = Vec::new();
        for repo in self.demand_repos().await? {
            let mut runs = Vec::new();
            for page in 1.. {
                let path = format!("/repos/{repo}/actions/runs?status=queued&per_page={PAGE}&page={page}");
                let list: RunList = self.get_cached(&path).await?;
                let n = list.workflow_runs.len();
                runs.extend(list.workflow_runs.into_iter().map(|r| r.id));
                if n < PAGE || runs.len() >= list.total_count {
                    break;
                }
            }
            for run in runs {
                let path = format!("/repos/{repo}/actions/runs/{run}/jobs?filter=latest&per_page={PAGE}");
                let list: JobList = self.get_cached(&path).await?;
                out.extend(list.jobs.into_iter().filter(|j| j.status == "queued").map(|j| {
                    crate::core::model::QueuedJob {
                        id: j.id,
                        labels: j.labels,
                        queued_at: j.created_at.or(j.started_at).unwrap_or_else(chrono::Utc::now),
                    }
                }));
            }
        }
        Ok(out)
    }
}
