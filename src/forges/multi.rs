//! A fleet with several forges (`forges:` and `pools[].forge`): one [`Forge`] that routes each call to the
//! forge of the pool a runner belongs to (by its name, `nimbus.<tenant>.<pool>.<i>`). Runner ids of different
//! forges may collide, so the ids it hands out carry the forge's index: `id · 16 + index`.

use std::sync::Arc;

use async_trait::async_trait;

use super::{AgentInstall, AgentTarget, Forge, ForgeError, Registration, RunnerAgent};
use crate::core::model::{ForgeRunner, QueuedJob};

const SLOTS: u64 = 16;

/// A member forge: its name, the forge, its `runner_dir`, and the pools it serves.
pub type Member = (String, Arc<dyn Forge>, Option<String>, Vec<String>);
/// A member's agent: the pools, the forge, its `runner_dir`.
type AgentOf = (Vec<String>, Arc<dyn Forge>, Option<String>);

pub struct MultiForge {
    /// (name, forge, its runner_dir, the pools it serves).
    forges: Vec<Member>,
    agent: MultiAgent,
}

struct MultiAgent {
    /// (pools, the forge's agent, its runner_dir), by index.
    agents: Vec<AgentOf>,
}

impl MultiForge {
    /// `forges`: (name, forge, runner_dir, pools). At most 16.
    pub fn new(forges: Vec<Member>) -> Result<Self, ForgeError> {
        if forges.len() as u64 > SLOTS {
            return Err(ForgeError::other(format!("at most {SLOTS} forges in one fleet")));
        }
        let agent =
            MultiAgent { agents: forges.iter().map(|(_, f, d, p)| (p.clone(), f.clone(), d.clone())).collect() };
        Ok(MultiForge { forges, agent })
    }

    fn index_of_machine(&self, name: &str) -> Result<usize, ForgeError> {
        let pool = crate::core::model::parse_machine_name(name).map(|(_, p, _)| p).unwrap_or_default();
        self.forges
            .iter()
            .position(|(_, _, _, pools)| pools.iter().any(|p| p == pool))
            .ok_or_else(|| ForgeError::other(format!("no forge serves the pool of `{name}`")))
    }

    fn split(&self, id: u64) -> Result<(usize, u64), ForgeError> {
        let i = (id % SLOTS) as usize;
        if i >= self.forges.len() {
            return Err(ForgeError::NotFound(format!("runner {id} (of no forge of this fleet)")));
        }
        Ok((i, id / SLOTS))
    }
}

#[async_trait]
impl Forge for MultiForge {
    async fn list_runners(&self, tenant: &str) -> Result<Vec<ForgeRunner>, ForgeError> {
        let mut out = Vec::new();
        for (i, (_, f, _, pools)) in self.forges.iter().enumerate() {
            for mut r in f.list_runners(tenant).await? {
                // A forge lists the runners of its own pools only (another forge's pool is not its business).
                let pool =
                    crate::core::model::parse_machine_name(&r.name).map(|(_, p, _)| p.to_string()).unwrap_or_default();
                if !pools.contains(&pool) {
                    continue;
                }
                r.id = r.id * SLOTS + i as u64;
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn register(&self, name: &str, labels: &[String], ephemeral: bool) -> Result<Registration, ForgeError> {
        let i = self.index_of_machine(name)?;
        let mut reg = self.forges[i].1.register(name, labels, ephemeral).await?;
        reg.runner_id = reg.runner_id.map(|id| id * SLOTS + i as u64);
        Ok(reg)
    }

    async fn delete_runner(&self, id: u64) -> Result<(), ForgeError> {
        let (i, id) = match self.split(id) {
            Ok(x) => x,
            Err(ForgeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.forges[i].1.delete_runner(id).await
    }

    async fn set_labels(&self, id: u64, labels: &[String]) -> Result<(), ForgeError> {
        let (i, id) = self.split(id)?;
        self.forges[i].1.set_labels(id, labels).await
    }

    fn agent(&self) -> &dyn RunnerAgent {
        &self.agent
    }

    async fn queued_jobs(&self) -> Result<Vec<QueuedJob>, ForgeError> {
        let mut out = Vec::new();
        for (i, (_, f, _, _)) in self.forges.iter().enumerate() {
            out.extend(f.queued_jobs().await?.into_iter().map(|mut j| {
                j.id = j.id * SLOTS + i as u64;
                j
            }));
        }
        Ok(out)
    }

    fn demand_stats(&self) -> (u64, u64, i64) {
        self.forges
            .iter()
            .map(|(_, f, _, _)| f.demand_stats())
            .fold((0, 0, -1), |a, b| (a.0 + b.0, a.1 + b.1, a.2.max(b.2)))
    }
}

impl MultiAgent {
    fn of(&self, machine: &str) -> Option<&AgentOf> {
        let pool = crate::core::model::parse_machine_name(machine).map(|(_, p, _)| p).unwrap_or_default();
        self.agents.iter().find(|(pools, _, _)| pools.iter().any(|p| p == pool))
    }

    /// The target with the forge's own `runner_dir`.
    fn with_dir<'a>(t: &AgentTarget<'a>, dir: &'a Option<String>) -> AgentTarget<'a> {
        AgentTarget { machine: t.machine, labels: t.labels, os: t.os, arch: t.arch, dir: dir.as_deref() }
    }
}

const NO_FORGE: &str = "echo 'no forge of this fleet serves this machine`s pool' >&2; exit 1\n";

impl RunnerAgent for MultiAgent {
    fn install(&self, t: &AgentTarget, reg: &Registration) -> AgentInstall {
        match self.of(t.machine) {
            Some((_, f, dir)) => {
                // The forge sees its own runner id again.
                let mut reg = reg.clone();
                reg.runner_id = reg.runner_id.map(|id| id / SLOTS);
                f.agent().install(&Self::with_dir(t, dir), &reg)
            }
            None => AgentInstall { script: NO_FORGE.into(), stdin: Vec::new() },
        }
    }
    fn remove(&self, t: &AgentTarget) -> String {
        self.of(t.machine)
            .map(|(_, f, dir)| f.agent().remove(&Self::with_dir(t, dir)))
            .unwrap_or_else(|| NO_FORGE.into())
    }
    fn restart(&self, t: &AgentTarget) -> String {
        self.of(t.machine)
            .map(|(_, f, dir)| f.agent().restart(&Self::with_dir(t, dir)))
            .unwrap_or_else(|| NO_FORGE.into())
    }
    fn update(&self, t: &AgentTarget) -> String {
        self.of(t.machine)
            .map(|(_, f, dir)| f.agent().update(&Self::with_dir(t, dir)))
            .unwrap_or_else(|| NO_FORGE.into())
    }
    fn installed_version(&self, t: &AgentTarget) -> String {
        self.of(t.machine)
            .map(|(_, f, dir)| f.agent().installed_version(&Self::with_dir(t, dir)))
            .unwrap_or_else(|| "true\n".into())
    }
    fn version(&self) -> Option<&str> {
        None
    }
}
