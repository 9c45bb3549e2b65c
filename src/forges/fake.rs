//! A stateful, strict in-memory forge for scenario tests. Every request shape
//! it stands for is covered against GitHub's OpenAPI description by the
//! Prism contract tests (`tests/it/github_prism.rs`). It records calls.

use std::sync::Mutex;

use async_trait::async_trait;

use super::github::agent::GithubAgent;
use super::{Forge, ForgeError, Registration, RunnerAgent, Secret, tenant_runners};
use crate::core::model::ForgeRunner;

/// Stands in for GitHub, so its runners use GitHub's agent.
pub struct FakeForge {
    state: Mutex<State>,
    agent: GithubAgent,
}

#[derive(Default)]
struct State {
    next_id: u64,
    runners: Vec<ForgeRunner>,
    calls: Vec<String>,
    tokens_issued: Vec<String>,
    jobs: Vec<crate::core::model::QueuedJob>,
    next_job: u64,
}

impl FakeForge {
    pub fn new(download_url: impl Into<String>) -> Self {
        FakeForge {
            state: Mutex::new(State { next_id: 100, ..Default::default() }),
            agent: GithubAgent::new(download_url),
        }
    }
    /// The agent download's checksums (`os-arch` → sha256), as the fleet file's `forge.runner_sha256` gives them.
    pub fn with_sha256(mut self, platform: &str, sha256: &str) -> Self {
        self.agent.sha256.insert(platform.to_string(), sha256.to_string());
        self
    }
    /// The agent release it installs, as the fleet file's `forge.runner_version` gives it.
    pub fn with_version(mut self, version: &str) -> Self {
        self.agent.version = version.to_string();
        self
    }
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
    pub fn runners(&self) -> Vec<ForgeRunner> {
        self.state.lock().unwrap().runners.clone()
    }
    /// Tokens handed out, so tests can grep outputs for them.
    pub fn tokens_issued(&self) -> Vec<String> {
        self.state.lock().unwrap().tokens_issued.clone()
    }
    /// The machine side: a runner configured with `token` appears on the forge.
    pub fn runner_configured(&self, token: &str, name: &str, labels: &[String]) -> Result<u64, ForgeError> {
        let mut s = self.state.lock().unwrap();
        if !s.tokens_issued.iter().any(|t| t == token) {
            return Err(ForgeError::Auth("unknown registration token".into()));
        }
        if s.runners.iter().any(|r| r.name == name) {
            return Err(ForgeError::Conflict(format!("a runner named {name} exists")));
        }
        s.next_id += 1;
        let id = s.next_id;
        s.runners.push(ForgeRunner {
            id,
            name: name.into(),
            labels: labels.to_vec(),
            online: true,
            busy: false,
            offline_since: None,
            idle_since: None,
        });
        Ok(id)
    }
    /// An ephemeral runner ran its one job: the forge deletes it, as GitHub does a JIT runner.
    pub fn complete_job(&self, name: &str) {
        self.state.lock().unwrap().runners.retain(|r| r.name != name);
    }
    /// A runner picks up a job (`true`) or finishes it (`false`).
    pub fn set_busy(&self, name: &str, busy: bool) {
        let mut s = self.state.lock().unwrap();
        for r in s.runners.iter_mut().filter(|r| r.name == name) {
            r.busy = busy;
            r.online |= busy;
        }
    }
    pub fn set_online(&self, name: &str, online: bool) {
        let mut s = self.state.lock().unwrap();
        for r in s.runners.iter_mut().filter(|r| r.name == name) {
            r.online = online;
        }
    }
    /// A workflow job is queued, asking for `labels`; returns its id.
    pub fn queue_job(&self, labels: &[&str]) -> u64 {
        self.queue_job_at(labels, chrono::Utc::now())
    }
    pub fn queue_job_at(&self, labels: &[&str], at: chrono::DateTime<chrono::Utc>) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_job += 1;
        let id = s.next_job;
        s.jobs.push(crate::core::model::QueuedJob {
            id,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            queued_at: at,
        });
        id
    }
    /// The queued job `id` starts on runner `name` (it leaves the queue; the runner is busy). False when the
    /// runner is not there or busy.
    pub fn start_job(&self, id: u64, name: &str) -> bool {
        let mut s = self.state.lock().unwrap();
        let Some(r) = s.runners.iter_mut().find(|r| r.name == name && r.online && !r.busy) else { return false };
        r.busy = true;
        s.jobs.retain(|j| j.id != id);
        true
    }
    pub fn queued(&self) -> Vec<crate::core::model::QueuedJob> {
        self.state.lock().unwrap().jobs.clone()
    }
    pub fn add_runner(&self, name: &str, labels: &[&str]) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.runners.push(ForgeRunner {
            id,
            name: name.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            online: false,
            busy: false,
            offline_since: None,
            idle_since: None,
        });
        id
    }
}

#[async_trait]
impl Forge for FakeForge {
    async fn list_runners(&self, tenant: &str) -> Result<Vec<ForgeRunner>, ForgeError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("GET /orgs/{org}/actions/runners".into());
        Ok(tenant_runners(s.runners.clone(), tenant))
    }

    async fn register(&self, name: &str, labels: &[String], ephemeral: bool) -> Result<Registration, ForgeError> {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let token = format!("FAKE-TOKEN-{}-{}", s.next_id, name.len());
        s.tokens_issued.push(token.clone());
        if ephemeral {
            s.calls.push("POST /orgs/{org}/actions/runners/generate-jitconfig".into());
            if s.runners.iter().any(|r| r.name == name) {
                return Err(ForgeError::Conflict(format!("409: a runner named {name} exists")));
            }
            let id = s.next_id;
            s.runners.push(ForgeRunner {
                id,
                name: name.into(),
                labels: labels.to_vec(),
                online: false,
                busy: false,
                offline_since: None,
                idle_since: None,
            });
            Ok(Registration {
                runner_id: Some(id),
                url: None,
                secret: Secret::new(token),
                ephemeral: true,
                group: None,
            })
        } else {
            s.calls.push("POST /orgs/{org}/actions/runners/registration-token".into());
            Ok(Registration {
                runner_id: None,
                url: Some("https://github.com/acme".into()),
                secret: Secret::new(token),
                ephemeral: false,
                group: None,
            })
        }
    }

    async fn delete_runner(&self, id: u64) -> Result<(), ForgeError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("DELETE /orgs/{org}/actions/runners/{runner_id}".into());
        // As GitHub does: a runner running a job cannot be deleted (HTTP 422).
        if s.runners.iter().any(|r| r.id == id && r.busy) {
            return Err(ForgeError::Conflict(format!("runner {id} is currently running a job and cannot be deleted")));
        }
        s.runners.retain(|r| r.id != id);
        Ok(())
    }

    async fn set_labels(&self, id: u64, labels: &[String]) -> Result<(), ForgeError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("PUT /orgs/{org}/actions/runners/{runner_id}/labels".into());
        let r =
            s.runners.iter_mut().find(|r| r.id == id).ok_or_else(|| ForgeError::NotFound(format!("runner {id}")))?;
        r.labels = labels.to_vec();
        Ok(())
    }

    fn agent(&self) -> &dyn RunnerAgent {
        &self.agent
    }

    async fn queued_jobs(&self) -> Result<Vec<crate::core::model::QueuedJob>, ForgeError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push("GET /repos/{owner}/{repo}/actions/runs?status=queued".into());
        Ok(s.jobs.clone())
    }
}
