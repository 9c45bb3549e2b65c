//! nimbus as a library: a [`Nimbus`] facade over the engine, fed by a [`Storage`] of tenants and their fleets.
//!
//! An application that keeps its tenants, their providers and their forge in its own database implements
//! [`Storage`]; `fleet.yaml` is one implementation ([`FileStorage`]), an in-memory map another
//! ([`MemoryStorage`]). Every call discovers what exists first (by tags, on the forge, on the machines), and
//! keeps nimbus's rules: a tenant's call never sees or touches another tenant's resources, a busy runner is
//! never terminated, and a dedicated host is never released inside its minimum allocation window.
//!
//! ```text
//! use nimbus::api::{MemoryStorage, Nimbus};
//!
//! let storage = MemoryStorage::default();
//! storage.put(fleet_config_for_acme, "/srv/fleets/acme")?;    // a `FleetConfig`, as `fleet.yaml` holds it
//! let nimbus = Nimbus::new(storage);
//! let m = nimbus.provision("acme", "ci").await?;             // one more machine in pool `ci`, set up
//! let all = nimbus.list_machines("acme").await?;
//! let t = nimbus.can_terminate("acme", &m.name).await?;      // busy? host window left?
//! if t.allowed { nimbus.terminate("acme", &m.name).await?; }
//! ```
//!
//! `examples/embed/` is a complete program serving two tenants from a [`MemoryStorage`] on the local provider.

mod storage;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use storage::{FileStorage, MemoryStorage, Storage, StorageError};

use crate::config::LoadedConfig;
use crate::core::model::{Actual, ActualMachine, Desired, HostState};
use crate::core::plan::{Action, ChangeAction, plan};
use crate::engine::actions::Applier;
use crate::engine::clients::{ClientError, build_forge, build_providers, runner_dir};
use crate::engine::discovery::{DiscoveryError, discover_with_forge};
use crate::engine::walk::{ActionError, ActionRunner, Outcome, Outputs, execute};
use crate::forges::{Forge, ForgeError};
use crate::providers::{MachineRef, Provider, ProviderError};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Clients(#[from] ClientError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Forge(#[from] ForgeError),
    #[error("tenant `{tenant}` has no pool `{pool}`")]
    UnknownPool { tenant: String, pool: String },
    #[error("tenant `{tenant}` has no machine `{machine}`")]
    UnknownMachine { tenant: String, machine: String },
    /// The machine's runner is running a job: it is not terminated (jobs are sacred).
    #[error("`{machine}` is running a job; it is not terminated")]
    Busy { machine: String },
    #[error("{action} for `{machine}` failed: {error}")]
    Action { machine: String, action: String, error: ActionError },
}

/// A machine as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Machine {
    /// `nimbus.<tenant>.<pool>.<index>`; also its runner's name.
    pub name: String,
    pub pool: String,
    pub provider: String,
    /// The provider's id (EC2 instance id, sandbox folder).
    pub instance_id: String,
    /// `running`, `pending`, `stopped`, …
    pub state: String,
    pub host_id: Option<String>,
    pub runner: Option<Runner>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Runner {
    pub id: u64,
    pub online: bool,
    pub busy: bool,
}

/// Whether a machine can be terminated now, and what its host's window says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Termination {
    pub allowed: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// The machine's dedicated host, if it has one; it stays allocated after the machine goes until this time.
    pub host_releasable_at: Option<DateTime<Utc>>,
    /// Time left in the host's minimum allocation window (zero once past it).
    pub host_window_remaining: Option<Duration>,
}

/// The facade: one per application, over its [`Storage`].
pub struct Nimbus<S: Storage> {
    storage: S,
}

struct Clients {
    loaded: LoadedConfig,
    providers: Vec<Arc<dyn Provider>>,
    forge: Option<Arc<dyn Forge>>,
    actual: Actual,
}

impl<S: Storage> Nimbus<S> {
    pub fn new(storage: S) -> Self {
        Nimbus { storage }
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    async fn open(&self, tenant: &str) -> Result<Clients, ApiError> {
        let loaded = self.storage.fleet(tenant).await?;
        let providers = build_providers(&loaded, crate::engine::clients::Purpose::Change).await?;
        let forge = build_forge(&loaded)?;
        let actual = discover_with_forge(tenant, &providers, forge.as_deref()).await?;
        Ok(Clients { loaded, providers, forge, actual })
    }

    fn machine(c: &Clients, m: &ActualMachine) -> Machine {
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let runner = c.actual.runners.as_ref().and_then(|rs| rs.iter().find(|r| r.name == name));
        Machine {
            pool: m.pool().unwrap_or_default().to_string(),
            provider: m.provider.clone(),
            instance_id: m.instance_id.clone(),
            state: serde_json::to_value(m.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            host_id: m.host_id.clone(),
            runner: runner.map(|r| Runner { id: r.id, online: r.online, busy: r.busy }),
            name,
        }
    }

    fn live(c: &Clients) -> impl Iterator<Item = &ActualMachine> {
        c.actual.machines.iter().filter(|m| !m.state.is_gone() && m.name().is_some())
    }

    /// The tenant's machines, as they are now.
    pub async fn list_machines(&self, tenant: &str) -> Result<Vec<Machine>, ApiError> {
        let c = self.open(tenant).await?;
        let mut out: Vec<Machine> = Self::live(&c).map(|m| Self::machine(&c, m)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One machine by name, if it exists.
    pub async fn get_machine(&self, tenant: &str, name: &str) -> Result<Option<Machine>, ApiError> {
        Ok(self.list_machines(tenant).await?.into_iter().find(|m| m.name == name))
    }

    /// Provisions one more machine in `pool`: a host if its type needs one (an idle one is reused), the
    /// instance, its setup steps and its runner, as `apply` would. Other drift is left alone.
    pub async fn provision(&self, tenant: &str, pool: &str) -> Result<Machine, ApiError> {
        let c = self.open(tenant).await?;
        let mut desired = Desired::from_config(&c.loaded.config);
        let existing = Self::live(&c).filter(|m| m.pool() == Some(pool)).count() as u32;
        let Some(p) = desired.pools.iter_mut().find(|p| p.name == pool) else {
            return Err(ApiError::UnknownPool { tenant: tenant.into(), pool: pool.into() });
        };
        p.count = existing + 1;
        let planned = plan(&desired, &c.actual, Utc::now());
        let change = planned
            .changes
            .iter()
            .find(|ch| ch.actions == [ChangeAction::Create] && ch.pool.as_deref() == Some(pool))
            .expect("one more machine than exists is a create");
        let name = change.name.clone();
        let only: HashSet<usize> = change.action_ids.iter().copied().collect();
        let mut applier = Applier::new(desired, &c.actual, c.providers.clone(), None);
        if let Some(f) = c.forge.clone() {
            applier = applier.with_forge(f, runner_dir(&c.loaded));
        }
        let runner = Arc::new(Only { inner: applier, only });
        let report = execute(Arc::new(planned.graph.clone()), runner, 10, |_| {}).await;
        if let Some(id) = report.root_causes.first()
            && let Some(Outcome::Failed(error)) = report.outcomes.get(id)
        {
            let action = planned.graph[petgraph::graph::NodeIndex::new(*id)].kind.name().to_string();
            return Err(ApiError::Action { machine: name, action, error: error.clone() });
        }
        self.get_machine(tenant, &name)
            .await?
            .ok_or_else(|| ApiError::UnknownMachine { tenant: tenant.into(), machine: name })
    }

    /// Whether `name` can be terminated now: not while its runner runs a job. A dedicated host outlives the
    /// machine until its minimum allocation window ends; the answer says when that is.
    pub async fn can_terminate(&self, tenant: &str, name: &str) -> Result<Termination, ApiError> {
        let c = self.open(tenant).await?;
        Self::termination(&c, tenant, name)
    }

    fn termination(c: &Clients, tenant: &str, name: &str) -> Result<Termination, ApiError> {
        let m = Self::live(c)
            .find(|m| m.name() == Some(name))
            .ok_or_else(|| ApiError::UnknownMachine { tenant: tenant.into(), machine: name.into() })?;
        let busy = c.actual.runners.iter().flatten().any(|r| r.name == name && r.busy);
        let desired = Desired::from_config(&c.loaded.config);
        let host = m.host_id.as_ref().and_then(|h| c.actual.hosts.iter().find(|x| &x.id == h));
        let releasable_at = host.filter(|h| h.state != HostState::Released).map(|h| {
            let w = desired
                .providers
                .get(&h.provider)
                .map(|p| p.releasable_after(&h.instance_type))
                .unwrap_or(Duration::MAX);
            crate::core::model::window_end_at(h.allocated_at, w)
        });
        let remaining = releasable_at.map(|t| (t - Utc::now()).to_std().unwrap_or_default());
        Ok(Termination {
            allowed: !busy,
            reason: busy.then(|| "its runner is running a job".to_string()),
            host_releasable_at: releasable_at,
            host_window_remaining: remaining,
        })
    }

    /// Terminates `name`: its runner is deregistered, then the machine goes. Refused while its runner runs
    /// a job. Its host, if any, stays until its window ends (the next `apply` releases it when due).
    pub async fn terminate(&self, tenant: &str, name: &str) -> Result<Termination, ApiError> {
        let c = self.open(tenant).await?;
        let t = Self::termination(&c, tenant, name)?;
        if !t.allowed {
            return Err(ApiError::Busy { machine: name.into() });
        }
        let m = Self::live(&c).find(|m| m.name() == Some(name)).expect("checked above");
        if let (Some(f), Some(r)) = (&c.forge, c.actual.runners.iter().flatten().find(|r| r.name == name)) {
            f.delete_runner(r.id).await?;
        }
        let provider = c.providers.iter().find(|p| p.name() == m.provider).expect("discovered by it");
        let r = MachineRef { name: name.into(), instance_id: Some(m.instance_id.clone()), address: m.address.clone() };
        provider.terminate(&r).await?;
        Ok(t)
    }
}

/// Runs only some of a plan's actions; the rest count as done without running (they are not this call's).
struct Only {
    inner: Applier,
    only: HashSet<usize>,
}

#[async_trait::async_trait]
impl ActionRunner for Only {
    async fn run(&self, id: usize, action: &Action, outputs: &Outputs) -> Result<(), ActionError> {
        if self.only.contains(&id) { self.inner.run(id, action, outputs).await } else { Ok(()) }
    }
}
