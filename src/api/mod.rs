//! nimbus as a library: a [`Nimbus`] facade over the engine, fed by a [`Storage`] of tenants and their fleets.
//!
//! An application that keeps its tenants, their providers and their forge in its own database implements
//! [`Storage`]; `fleet.yaml` is one implementation ([`FileStorage`]), an in-memory map another
//! ([`MemoryStorage`]).
//!
//! # Guarantees
//! - The facade is a thin client of the engine. [`Nimbus::provision`] and [`Nimbus::terminate`] change the
//!   desired state in the [`Storage`] (the pool's `count`; for `terminate`, which machine goes), then run the
//!   same plan → apply path as `nimbus apply`: under the fleet's lock (local or S3), recorded in the journal as
//!   runs by actor `api` (`nimbus history` shows them), with the same telemetry. An `apply` afterwards has
//!   nothing to do, and neither call can race an apply of the same fleet.
//! - A tenant's call never sees or touches another tenant's resources; a busy runner is never terminated; a
//!   dedicated host is released by the plan's rules (never inside its minimum allocation period: until then
//!   [`Nimbus::list_hosts`] shows it `held`, with its release time).
//!
//! ```text
//! use nimbus::api::{MemoryStorage, Nimbus, Termination};
//!
//! let storage = MemoryStorage::default();
//! storage.put(fleet_config_for_acme, "/srv/fleets/acme")?;    // a `FleetConfig`, as `fleet.yaml` holds it
//! let nimbus = Nimbus::new(storage);
//! let m = nimbus.provision("acme", "ci").await?;             // one more machine in pool `ci`, set up
//! let all = nimbus.list_machines("acme").await?;
//! match nimbus.can_terminate("acme", &m.name).await? {
//!     Termination::Busy { .. } => {}                            // a job runs: nothing can go
//!     _ => { nimbus.terminate("acme", &m.name).await?; }       // the instance goes (its host when due)
//! }
//! ```
//!
//! `examples/embed/` is a complete program serving two tenants from a [`MemoryStorage`] on the local provider.

mod storage;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use storage::{FileStorage, MemoryStorage, Storage, StorageError};

use crate::config::LoadedConfig;
use crate::core::model::{Actual, ActualMachine, Desired, HostState};
use crate::core::plan::ChangeAction;
use crate::core::plan::document::PlanDocument;
use crate::engine::apply::SessionError;
use crate::engine::clients::{ClientError, build_forge, build_providers};
use crate::engine::discovery::{DiscoveryError, discover_for_change, discover_with_forge};
use crate::engine::walk::{ActionError, Outcome};
use crate::forges::{Forge, ForgeError};
use crate::providers::ProviderError;
use crate::state::journal::JournalError;

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
    /// The fleet's lock (another apply runs) or its journal.
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("tenant `{tenant}` has no pool `{pool}`")]
    UnknownPool { tenant: String, pool: String },
    #[error("tenant `{tenant}` has no machine `{machine}`")]
    UnknownMachine { tenant: String, machine: String },
    /// The pool follows demand (`scale:`): its size is the controller's, not a count to change.
    #[error("pool `{pool}` follows demand (`scale:`); `nimbus reconcile` sizes it")]
    FollowsDemand { pool: String },
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

/// Whether a machine can be terminated now: the seed's reasons, as values. What can go is explicit:
/// [`Termination::Allowed`] (the instance and its host, if any), [`Termination::MinimumAllocationPeriod`]
/// (the instance now, its dedicated host only once the period ends), [`Termination::Busy`] (nothing).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Termination {
    /// The machine can go now, and its dedicated host (if it has one) too.
    Allowed,
    /// Its runner is running a job: nothing can go until the job ends.
    Busy { runner_id: u64 },
    /// The instance can go now; its dedicated host is inside its minimum allocation period and stays allocated
    /// (held) for `remaining`, until `releasable_at`.
    MinimumAllocationPeriod {
        host_id: String,
        /// Written as whole seconds.
        #[serde(serialize_with = "as_secs")]
        remaining: Duration,
        releasable_at: DateTime<Utc>,
    },
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

impl Termination {
    /// Whether the machine (its instance) can be terminated now.
    pub fn instance_can_go(&self) -> bool {
        !matches!(self, Termination::Busy { .. })
    }

    /// Whether its dedicated host (if any) can be released with it now.
    pub fn host_can_go(&self) -> bool {
        matches!(self, Termination::Allowed)
    }
}

/// A dedicated host of the tenant, as the ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Host {
    pub id: String,
    pub provider: String,
    pub instance_type: String,
    pub availability_zone: String,
    /// `in_use` (an instance runs on it), `scrubbing`, `held` (idle, inside its minimum allocation period),
    /// `due` (idle, past it: the next apply releases it unless a machine needs it), `other` (a provider state
    /// nimbus leaves alone).
    pub state: String,
    /// The machine its tag names, if any.
    pub machine: Option<String>,
    pub allocated_at: DateTime<Utc>,
    /// When it may be released (the end of its minimum allocation period, with the provider's margin).
    pub releasable_at: DateTime<Utc>,
}

/// The facade: one per application, over its [`Storage`].
pub struct Nimbus<S: Storage> {
    storage: S,
}

/// What a read-only call sees.
struct Clients {
    loaded: LoadedConfig,
    actual: Actual,
}

impl<S: Storage> Nimbus<S> {
    pub fn new(storage: S) -> Self {
        Nimbus { storage }
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Discovers what exists for `tenant` (read-only: no lock).
    async fn open(&self, tenant: &str) -> Result<Clients, ApiError> {
        let loaded = self.storage.fleet(tenant).await?;
        let providers = build_providers(&loaded, crate::engine::clients::Purpose::Look).await?;
        let forge = build_forge(&loaded)?;
        let actual = discover_with_forge(tenant, &providers, forge.as_deref()).await?;
        Ok(Clients { loaded, actual })
    }

    fn machine(actual: &Actual, m: &ActualMachine) -> Machine {
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let runner = actual.runners.as_ref().and_then(|rs| rs.iter().find(|r| r.name == name));
        Machine {
            pool: m.pool().unwrap_or_default().to_string(),
            provider: m.provider.to_string(),
            instance_id: m.instance_id.clone(),
            state: serde_json::to_value(m.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            host_id: m.host_id.clone(),
            runner: runner.map(|r| Runner { id: r.id, online: r.online, busy: r.busy }),
            name,
        }
    }

    fn live(actual: &Actual) -> impl Iterator<Item = &ActualMachine> {
        actual.machines.iter().filter(|m| !m.state.is_gone() && m.name().is_some())
    }

    /// The tenant's machines, as they are now.
    pub async fn list_machines(&self, tenant: &str) -> Result<Vec<Machine>, ApiError> {
        let c = self.open(tenant).await?;
        let mut out: Vec<Machine> = Self::live(&c.actual).map(|m| Self::machine(&c.actual, m)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One machine by name, if it exists.
    pub async fn get_machine(&self, tenant: &str, name: &str) -> Result<Option<Machine>, ApiError> {
        Ok(self.list_machines(tenant).await?.into_iter().find(|m| m.name == name))
    }

    /// The tenant's dedicated hosts: in use, scrubbing, held inside their minimum allocation period (with when
    /// they may be released), or due.
    pub async fn list_hosts(&self, tenant: &str) -> Result<Vec<Host>, ApiError> {
        let c = self.open(tenant).await?;
        let desired = Desired::from_config(&c.loaded.config);
        let now = Utc::now();
        let mut out: Vec<Host> = c
            .actual
            .hosts
            .iter()
            .filter(|h| h.state != HostState::Released)
            .map(|h| {
                let releasable_at = crate::core::model::host_window_end(&desired.providers, h);
                let state = match h.state {
                    _ if !h.instance_ids.is_empty() => "in_use",
                    HostState::Pending => "scrubbing",
                    HostState::Available if releasable_at > now => "held",
                    HostState::Available => "due",
                    _ => "other",
                };
                Host {
                    id: h.id.clone(),
                    provider: h.provider.clone(),
                    instance_type: h.instance_type.clone(),
                    availability_zone: h.availability_zone.clone(),
                    state: state.into(),
                    machine: h.tags.get(crate::core::names::tags::MACHINE).map(str::to_string),
                    allocated_at: h.allocated_at,
                    releasable_at,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Provisions one more machine in `pool`: the pool's count in the [`Storage`] goes up by one, then the
    /// fleet is planned and applied as `nimbus apply` does (a host if its type needs one, an idle one reused;
    /// the instance, its setup steps and its runner). Returns the machine made.
    pub async fn provision(&self, tenant: &str, pool: &str) -> Result<Machine, ApiError> {
        let loaded = self.storage.fleet(tenant).await?;
        let Some(p) = loaded.config.pools.iter().find(|p| p.name == pool) else {
            return Err(ApiError::UnknownPool { tenant: tenant.into(), pool: pool.into() });
        };
        let Some(count) = p.count else { return Err(ApiError::FollowsDemand { pool: pool.into() }) };
        let (doc, actual) = self.change(tenant, "provision", (pool, count + 1), Vec::new()).await?;
        // The machine made for the pool (the last, when other drift made more); else its newest machine.
        let made = doc
            .resource_changes
            .iter()
            .filter(|ch| ch.actions == [ChangeAction::Create] && ch.pool.as_deref() == Some(pool))
            .map(|ch| ch.name.clone())
            .max_by_key(|n| crate::core::names::parse_machine_name(n).map(|(_, _, i)| i));
        let name = match made {
            Some(n) => n,
            None => Self::live(&actual)
                .filter(|m| m.pool() == Some(pool))
                .filter_map(|m| m.name().map(str::to_string))
                .max_by_key(|n| crate::core::names::parse_machine_name(n).map(|(_, _, i)| i))
                .ok_or_else(|| ApiError::UnknownMachine { tenant: tenant.into(), machine: format!("{pool}[?]") })?,
        };
        self.get_machine(tenant, &name)
            .await?
            .ok_or_else(|| ApiError::UnknownMachine { tenant: tenant.into(), machine: name })
    }

    /// Whether `name` can be terminated now (read-only: takes no lock).
    pub async fn can_terminate(&self, tenant: &str, name: &str) -> Result<Termination, ApiError> {
        let c = self.open(tenant).await?;
        Self::termination(&c.loaded, &c.actual, tenant, name)
    }

    fn termination(loaded: &LoadedConfig, actual: &Actual, tenant: &str, name: &str) -> Result<Termination, ApiError> {
        let m = Self::live(actual)
            .find(|m| m.name() == Some(name))
            .ok_or_else(|| ApiError::UnknownMachine { tenant: tenant.into(), machine: name.into() })?;
        if let Some(r) = actual.runners.iter().flatten().find(|r| r.name == name && r.busy) {
            return Ok(Termination::Busy { runner_id: r.id });
        }
        let desired = Desired::from_config(&loaded.config);
        let host = m.host_id.as_ref().and_then(|h| actual.hosts.iter().find(|x| &x.id == h));
        let now = Utc::now();
        match host
            .filter(|h| h.state != HostState::Released)
            .map(|h| (h, crate::core::model::host_window_end(&desired.providers, h)))
        {
            Some((h, at)) if at > now => Ok(Termination::MinimumAllocationPeriod {
                host_id: h.id.clone(),
                remaining: (at - now).to_std().unwrap_or_default(),
                releasable_at: at,
            }),
            _ => Ok(Termination::Allowed),
        }
    }

    /// Terminates `name`: the pool's count in the [`Storage`] goes down by one and this machine is the one that
    /// goes; the fleet is then planned and applied as `nimbus apply` does (its runner is deregistered, the
    /// instance terminated, its host released when due and held until then). Refused while its runner runs a
    /// job. Returns what [`Nimbus::can_terminate`] said.
    pub async fn terminate(&self, tenant: &str, name: &str) -> Result<Termination, ApiError> {
        let c = self.open(tenant).await?;
        let t = Self::termination(&c.loaded, &c.actual, tenant, name)?;
        if !t.instance_can_go() {
            return Err(ApiError::Busy { machine: name.into() });
        }
        let m = Self::live(&c.actual).find(|m| m.name() == Some(name)).expect("checked above");
        let pool = m.pool().unwrap_or_default().to_string();
        let count = match c.loaded.config.pools.iter().find(|p| p.name == pool).map(|p| p.count) {
            Some(Some(n)) => n,
            Some(None) => return Err(ApiError::FollowsDemand { pool }),
            None => 0,
        };
        let (doc, _) =
            self.change(tenant, "terminate", (&pool, count.saturating_sub(1)), vec![name.to_string()]).await?;
        // The job may have started between the check and the plan: the plan then defers the removal.
        if doc
            .deferred
            .iter()
            .any(|d| d.kind == crate::core::plan::DeferredKind::BusyRunner && d.action.machine() == Some(name))
        {
            return Err(ApiError::Busy { machine: name.into() });
        }
        Ok(t)
    }

    /// Sets a pool's count in the storage (`count`), then plans and applies the tenant's fleet, as
    /// `nimbus apply` does, under the fleet's lock, as a journal run of `command` by actor `api`. `remove_first`
    /// names machines a scale-down removes before any other. Returns the plan and what was discovered.
    async fn change(
        &self,
        tenant: &str,
        command: &str,
        count: (&str, u32),
        remove_first: Vec<String>,
    ) -> Result<(PlanDocument, Actual), ApiError> {
        let before = self.storage.fleet(tenant).await?;
        // The fleet's lock first: nothing changes while another apply runs.
        let mut session = crate::engine::fleet::open_session(&before, None).await?;
        let result = async {
            self.storage.set_count(tenant, count.0, count.1).await?;
            let loaded = self.storage.fleet(tenant).await?;
            let providers = build_providers(&loaded, crate::engine::clients::Purpose::Change).await?;
            for p in &providers {
                p.prepare().await?;
            }
            let forge: Option<Arc<dyn Forge>> = build_forge(&loaded)?;
            let mut actual = discover_for_change(tenant, &providers, forge.as_deref()).await?;
            let now = Utc::now();
            crate::engine::discovery::annotate_with_history(&mut actual, session.journal(), now)?;
            let mut desired = Desired::from_config(&loaded.config);
            // Pools that follow demand keep the size the controller gives them.
            crate::engine::fleet::follow_demand(&loaded, &mut desired, &actual, forge.as_deref(), now).await?;
            desired.remove_first.extend(remove_first);
            let doc = crate::engine::fleet::document(&loaded, &desired, &actual, now);
            let fleet_path = loaded.path.display().to_string();
            if !doc.has_changes() {
                session.record_noop_by(tenant, &fleet_path, command, "api")?;
                return Ok((doc, actual));
            }
            let run = session.start_by(&doc, &fleet_path, None, command, "api")?;
            let applier = crate::engine::fleet::applier(
                &loaded,
                None,
                &session,
                run,
                desired,
                &actual,
                providers.clone(),
                forge,
                Some({
                    let d = session.log_dir(run);
                    let _ = std::fs::create_dir_all(&d);
                    d
                }),
            )?;
            let stop = Arc::new(tokio::sync::watch::channel(false).0);
            let outcome = session.execute(run, &doc, applier, 10, stop, &mut []).await?;
            if let Some(id) = outcome.report.root_causes.first()
                && let Some(Outcome::Failed(error)) = outcome.report.outcomes.get(id)
            {
                let a = &doc.actions[*id].action;
                return Err(ApiError::Action {
                    machine: a.kind.machine().unwrap_or(&a.address).to_string(),
                    action: a.kind.name().to_string(),
                    error: error.clone(),
                });
            }
            Ok((doc, actual))
        }
        .await;
        let closed = session.close().await;
        let out = result?;
        closed?;
        Ok(out)
    }
}
