//! The controller behind `nimbus reconcile`: discover → plan → apply, again and again, by itself.
//!
//! One [`iterate`] takes the fleet's lock (local or S3) for its own work only — never while it waits between
//! iterations — reads the truth (the cloud, the forge's runners and queued jobs, the machines), records its
//! observations in the journal (offline, unreachable and idle clocks advance without anyone planning), sizes
//! the pools that follow demand ([`crate::core::scale`]), plans, and applies what its [`Policy`] allows. The
//! rest is left for a person: logged, reported, and counted as pending review. An iteration that changed
//! something is one journal run of `reconcile` by actor `reconcile`.
//!
//! # Guarantees
//! - A busy runner is never removed (the planner's drain rules); scale-in waits for `idle_timeout`.
//! - When `stop` turns true nothing new starts; running actions finish within `shutdown_timeout`, after which
//!   they are abandoned: their journal records become ORPHANED and the run INTERRUPTED. The lock is freed.
//! - A lock held by someone else (an operator's apply) is not waited for: the iteration says who holds it
//!   and the loop tries again at the next interval.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::config::{AutoApply, LoadedConfig, ReconcileConfig};
use crate::core::model::Desired;
use crate::core::plan::document::PlanDocument;
use crate::core::plan::reason::{ChangeReason, ReplaceCause};
use crate::core::plan::{ResourceChange, Summary};
use crate::core::scale::Demand;
use crate::engine::apply::SessionError;
use crate::forges::Forge;
use crate::providers::Provider;
use crate::state::journal::{Category, JournalError, RunStatus};

/// The default time between iterations.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The default time a stopping controller lets running actions finish.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest pause after errors (the backoff doubles up to it).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What the controller applies by itself (`reconcile.auto_apply`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    allowed: BTreeSet<AutoApply>,
}

impl Default for Policy {
    /// Scaling, in-place updates, repairs, restarts, reimages and due host releases; not the fleet file's
    /// replacements, nor removing a pool.
    fn default() -> Self {
        use AutoApply::*;
        Policy { allowed: [Scale, Update, Repair, Restart, Reimage, ReleaseHosts].into_iter().collect() }
    }
}

impl Policy {
    pub fn from_config(c: Option<&ReconcileConfig>) -> Policy {
        match c.and_then(|c| c.auto_apply.as_ref()) {
            Some(list) => Policy { allowed: list.iter().copied().collect() },
            None => Policy::default(),
        }
    }

    pub fn allows(&self, class: AutoApply) -> bool {
        self.allowed.contains(&class)
    }
}

/// Which kind of change a resource change is, for the policy.
pub fn class_of(c: &ResourceChange) -> AutoApply {
    // A change that does not say why (a plan of an older nimbus) waits for a person.
    let Some(cause) = &c.cause else { return AutoApply::Replace };
    match cause {
        ChangeReason::PoolWants { .. } | ChangeReason::ScaleDown { .. } => AutoApply::Scale,
        ChangeReason::PoolRemoved { .. } | ChangeReason::PoolMoved { .. } => AutoApply::RemovePool,
        ChangeReason::Replace { causes } => {
            let from_file = causes.iter().any(|c| {
                matches!(
                    c,
                    ReplaceCause::Image { .. }
                        | ReplaceCause::InstanceType { .. }
                        | ReplaceCause::AvailabilityZone { .. }
                )
            });
            if from_file {
                AutoApply::Replace
            } else if causes.iter().all(|c| matches!(c, ReplaceCause::JobDone)) {
                AutoApply::Reimage
            } else {
                AutoApply::Repair
            }
        }
        ChangeReason::Update { causes } => {
            use crate::core::plan::reason::UpdateCause as U;
            if causes.iter().any(|c| matches!(c, U::Reimage)) {
                AutoApply::Reimage
            } else if causes.iter().all(|c| matches!(c, U::RunnerOffline { .. })) {
                AutoApply::Restart
            } else if causes.iter().any(|c| matches!(c, U::BadState { .. })) {
                AutoApply::Repair
            } else {
                AutoApply::Update
            }
        }
        ChangeReason::GhostRunner | ChangeReason::Copy { .. } => AutoApply::Repair,
        ChangeReason::IdleHost => AutoApply::ReleaseHosts,
    }
}

/// The changes of `doc` the policy allows, as a plan document of their own (actions renumbered), and the ones
/// left for review. A change that needs an action of a change left for review waits with it.
pub fn split(doc: &PlanDocument, policy: &Policy) -> (PlanDocument, Vec<ResourceChange>) {
    let mut keep: Vec<bool> = doc.resource_changes.iter().map(|c| policy.allows(class_of(c))).collect();
    let owner: std::collections::HashMap<usize, usize> = doc
        .resource_changes
        .iter()
        .enumerate()
        .flat_map(|(ci, c)| c.action_ids.iter().map(move |a| (*a, ci)))
        .collect();
    // The actions of the changes kept so far.
    let kept_of = |keep: &[bool]| -> BTreeSet<usize> {
        doc.resource_changes
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .flat_map(|(c, _)| c.action_ids.iter().copied())
            .collect()
    };
    loop {
        let kept_actions = kept_of(&keep);
        let mut changed = false;
        for a in doc.actions.iter().filter(|a| kept_actions.contains(&a.id)) {
            if a.depends_on.iter().any(|d| !kept_actions.contains(d))
                && let Some(ci) = owner.get(&a.id)
                && keep[*ci]
            {
                keep[*ci] = false;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let kept = kept_of(&keep);
    let renumber: std::collections::HashMap<usize, usize> =
        kept.iter().enumerate().map(|(new, old)| (*old, new)).collect();
    let mut out = doc.clone();
    out.actions = doc
        .actions
        .iter()
        .filter(|a| kept.contains(&a.id))
        .map(|a| {
            let mut a = a.clone();
            a.id = renumber[&a.id];
            a.depends_on = a.depends_on.iter().map(|d| renumber[d]).collect();
            a
        })
        .collect();
    out.resource_changes = Vec::new();
    let mut pending = Vec::new();
    let mut summary = Summary {
        deferred: doc.summary.deferred,
        jobs_interrupted: doc.summary.jobs_interrupted,
        ..Summary::default()
    };
    for (c, k) in doc.resource_changes.iter().zip(&keep) {
        if *k {
            let mut c = c.clone();
            c.action_ids = c.action_ids.iter().map(|a| renumber[a]).collect();
            summary.count(&c);
            out.resource_changes.push(c);
        } else {
            pending.push(c.clone());
        }
    }
    out.summary = summary;
    (out, pending)
}

/// What one iteration did.
#[derive(Debug, Clone, Default)]
pub struct Iteration {
    /// The journal run of what it applied (none when it applied nothing).
    pub run: Option<i64>,
    /// What the run did, counted per resource change.
    pub done: Summary,
    pub status: Option<RunStatus>,
    /// Changes left for a person (`address: reason`), by the policy.
    pub pending_review: Vec<String>,
    /// Deferred actions (waiting for a job, a host's window, a scrub, a resource to show).
    pub deferred: usize,
    /// What demand decided for the pools that follow it.
    pub demand: Demand,
    /// Someone else held the fleet's lock: who (the iteration did nothing).
    pub locked_by: Option<String>,
    /// Actions abandoned at shutdown (still running past the shutdown timeout).
    pub abandoned: usize,
    /// Errors of actions (the root causes), as the journal has them.
    pub errors: Vec<String>,
    /// What the iteration saw, for the metrics.
    pub observed: Observed,
    /// Actions carried out: (kind, outcome, how many).
    pub actions: Vec<(String, String, usize)>,
    /// The forge's demand requests in this iteration: (requests, answered 304), and its API budget left.
    pub forge_requests: (u64, u64),
    pub forge_budget: Option<i64>,
    /// Launch → ready of the machines that became ready in this iteration.
    pub ready: Vec<Duration>,
    /// The jobs queued on the forge (for the queue-wait histogram: a job that leaves the queue started).
    pub queued: Vec<crate::core::model::QueuedJob>,
}

/// What an iteration saw of the fleet.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub pools: Vec<PoolObserved>,
    pub hosts: Vec<HostsObserved>,
    /// `budget.max_hosts` minus the hosts held, by instance type.
    pub budget_headroom: Vec<(String, i64)>,
    /// Dollars per day of the hosts held, and billed so far (the ledger's).
    pub cost_per_day: f64,
    pub cost_so_far: f64,
}

#[derive(Debug, Clone, Default)]
pub struct PoolObserved {
    pub pool: String,
    pub machines: usize,
    /// Machines by the lifecycle state their database records (`unknown` when it was not read).
    pub lifecycle: std::collections::BTreeMap<String, usize>,
    pub busy: usize,
    pub idle: usize,
    pub offline: usize,
    /// Queued jobs this pool serves (the first pool that can).
    pub queued: usize,
    pub oldest_queued_secs: i64,
}

#[derive(Debug, Clone, Default)]
pub struct HostsObserved {
    /// The ledger's state: `in_use`, `idle`, `scrubbing`, `settling`, `due`, `held`, `other`.
    pub state: String,
    pub count: usize,
    pub oldest_secs: i64,
}

/// Counts what `actual` and `jobs` show, per pool of `desired` and per host state.
fn observe(
    desired: &Desired,
    actual: &crate::core::model::Actual,
    jobs: &[crate::core::model::QueuedJob],
    now: chrono::DateTime<Utc>,
) -> Observed {
    let mut out = Observed::default();
    let tenant = desired.tenant.as_str();
    for pool in &desired.pools {
        let live: Vec<&crate::core::model::ActualMachine> = actual
            .machines
            .iter()
            .filter(|m| crate::core::model::owned_by(&m.tags, tenant) && !m.state.is_gone())
            .filter(|m| m.pool() == Some(pool.name.as_str()))
            .collect();
        let mut lifecycle: std::collections::BTreeMap<String, usize> = Default::default();
        for m in &live {
            let state = match &m.on_machine {
                crate::core::model::OnMachine::Read { state } => state.lifecycle.clone(),
                _ => None,
            };
            *lifecycle.entry(state.unwrap_or_else(|| "unknown".into())).or_default() += 1;
        }
        let mut names: Vec<&str> = live.iter().filter_map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        let runners: Vec<_> =
            names.iter().filter_map(|n| actual.runners.iter().flatten().find(|r| r.name == *n)).collect();
        let served: Vec<_> = jobs
            .iter()
            .filter(|j| {
                crate::core::scale::serving_pool(&desired.pools, &j.labels)
                    .is_some_and(|i| desired.pools[i].name == pool.name)
            })
            .collect();
        out.pools.push(PoolObserved {
            pool: pool.name.clone(),
            machines: names.len(),
            lifecycle,
            busy: runners.iter().filter(|r| r.busy).count(),
            idle: runners.iter().filter(|r| r.online && !r.busy).count(),
            offline: runners.iter().filter(|r| !r.online && !r.busy).count(),
            queued: served.len(),
            oldest_queued_secs: served.iter().map(|j| (now - j.queued_at).num_seconds()).max().unwrap_or(0),
        });
    }
    // Host states as the ledger has them (in_use, idle, scrubbing, settling, due, held, other).
    let mut hosts: std::collections::BTreeMap<&str, (usize, i64)> = Default::default();
    for e in crate::core::cost::ledger(desired, &actual.hosts, now) {
        let h = hosts.entry(e.state.as_str()).or_default();
        h.0 += 1;
        if let Some(held) = e.hours_held {
            h.1 = h.1.max((held * 3600.0) as i64);
        }
        out.cost_per_day += e.price_per_hour.unwrap_or(0.0) * 24.0;
        out.cost_so_far += e.cost_so_far.unwrap_or(0.0);
    }
    for (itype, max) in &desired.budget.max_hosts {
        let held = actual
            .hosts
            .iter()
            .filter(|h| h.state != crate::core::model::HostState::Released && &h.instance_type == itype)
            .count() as i64;
        out.budget_headroom.push((itype.clone(), *max as i64 - held));
    }
    out.hosts = hosts
        .into_iter()
        .map(|(state, (count, oldest_secs))| HostsObserved { state: state.into(), count, oldest_secs })
        .collect();
    out
}

/// Why an iteration failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Discovery(#[from] crate::engine::discovery::DiscoveryError),
    #[error(transparent)]
    Forge(#[from] crate::forges::ForgeError),
    #[error(transparent)]
    Provider(#[from] crate::providers::ProviderError),
}

/// Runs one iteration (see the module's guarantees). `stop` turning true asks it to stop.
#[allow(clippy::too_many_arguments)]
pub async fn iterate(
    loaded: &LoadedConfig,
    journal_flag: Option<&Path>,
    providers: &[Arc<dyn Provider>],
    forge: Option<Arc<dyn Forge>>,
    policy: &Policy,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown_timeout: Duration,
) -> Result<Iteration, ReconcileError> {
    let mut session = match crate::engine::fleet::open_session(loaded, journal_flag).await {
        Ok(s) => s,
        Err(SessionError::Journal(JournalError::Locked { holder, .. })) => {
            return Ok(Iteration { locked_by: Some(holder), ..Iteration::default() });
        }
        Err(SessionError::Remote(crate::state::remote::RemoteError::Locked { info, .. })) => {
            return Ok(Iteration { locked_by: Some(info.describe()), ..Iteration::default() });
        }
        Err(e) => return Err(e.into()),
    };
    let result = iterate_in(loaded, journal_flag, &mut session, providers, forge, policy, stop, shutdown_timeout).await;
    if let Err(e) = &result {
        let _ = session.journal().event(
            None,
            Category::Error,
            "error",
            "reconcile",
            &format!("reconcile iteration failed: {e}"),
            None,
        );
    }
    let closed = session.close().await;
    let it = result?;
    closed?;
    Ok(it)
}

#[allow(clippy::too_many_arguments)]
async fn iterate_in(
    loaded: &LoadedConfig,
    journal_flag: Option<&Path>,
    session: &mut crate::engine::apply::Session,
    providers: &[Arc<dyn Provider>],
    forge: Option<Arc<dyn Forge>>,
    policy: &Policy,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown_timeout: Duration,
) -> Result<Iteration, ReconcileError> {
    let tenant = loaded.config.tenant.as_str();
    for p in providers {
        p.prepare().await?;
    }
    let mut actual = crate::engine::discovery::discover_for_change(tenant, providers, forge.as_deref()).await?;
    let now = Utc::now();
    crate::engine::discovery::annotate_with_history(&mut actual, session.journal(), now)?;
    let before = forge.as_ref().map(|f| f.demand_stats()).unwrap_or((0, 0, -1));
    let jobs = match &forge {
        Some(f) => f.queued_jobs().await?,
        None => Vec::new(),
    };
    let after = forge.as_ref().map(|f| f.demand_stats()).unwrap_or((0, 0, -1));
    let mut desired = Desired::from_config(&loaded.config);
    let demand =
        crate::core::scale::follow_demand(&mut desired, &actual, &jobs, now, crate::engine::fleet::alert_after(loaded));
    let mut doc = crate::engine::fleet::document(loaded, &desired, &actual, now);
    doc.warnings.extend(crate::engine::fleet::unserved_warnings(&demand));
    let (allowed, pending) = split(&doc, policy);
    let mut it = Iteration {
        forge_requests: (after.0 - before.0, after.1 - before.1),
        forge_budget: (after.2 >= 0).then_some(after.2),
        observed: observe(&desired, &actual, &jobs, now),
        pending_review: pending.iter().map(|c| format!("{}: {}", c.address, c.reason)).collect(),
        deferred: doc.deferred.len(),
        demand,
        queued: jobs.clone(),
        ..Iteration::default()
    };
    for p in &pending {
        tracing::warn!(event = "nimbus.reconcile.pending_review", address = %p.address, reason = %p.reason, "left for review: {} ({})", p.address, p.reason);
    }
    if !allowed.has_changes() || *stop.borrow() {
        return Ok(it);
    }
    let fleet_path = loaded.path.display().to_string();
    let run = session.start_by(&allowed, &fleet_path, None, "reconcile", "reconcile")?;
    it.run = Some(run);
    let log_dir = session.log_dir(run);
    let _ = std::fs::create_dir_all(&log_dir);
    let applier = crate::engine::fleet::applier(
        loaded,
        journal_flag,
        session,
        run,
        desired,
        &actual,
        providers.to_vec(),
        forge,
        Some(log_dir),
    )?;
    let mut stopped = stop.subscribe();
    let outcome = {
        let exec = session.execute(run, &allowed, applier.clone(), 10, stop.clone(), &mut []);
        tokio::pin!(exec);
        tokio::select! {
            o = &mut exec => Some(o),
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(shutdown_timeout).await;
            } => None,
        }
    };
    match outcome {
        Some(o) => {
            let o = o?;
            let mut counted: std::collections::BTreeMap<(String, String), usize> = Default::default();
            for (id, outcome) in &o.report.outcomes {
                let word = match outcome {
                    crate::engine::walk::Outcome::Success => "success",
                    crate::engine::walk::Outcome::Failed(_) => "failure",
                    crate::engine::walk::Outcome::Deferred(_) => "deferred",
                    crate::engine::walk::Outcome::Skipped { .. } => "skipped",
                };
                *counted.entry((allowed.actions[*id].action.kind.name().to_string(), word.to_string())).or_default() +=
                    1;
            }
            it.actions = counted.into_iter().map(|((k, w), n)| (k, w, n)).collect();
            it.ready = applier.ready_times();
            it.done = o.tally.done;
            it.status = Some(o.status);
            it.errors = o
                .report
                .root_causes
                .iter()
                .filter_map(|id| match o.report.outcomes.get(id) {
                    Some(crate::engine::walk::Outcome::Failed(e)) => Some(format!(
                        "{} {}: {e}",
                        allowed.actions[*id].action.address,
                        allowed.actions[*id].action.kind.name()
                    )),
                    _ => None,
                })
                .collect();
        }
        None => {
            // Still running past the shutdown timeout: abandoned. Their records become ORPHANED and the run
            // INTERRUPTED, as after a crash; the next iteration (or apply) finds them where they stand.
            let j = session.journal();
            it.abandoned = j.recover()?;
            j.event(
                Some(run),
                Category::System,
                "warn",
                "reconcile",
                &format!(
                    "shutdown: {} running action(s) abandoned after the shutdown timeout of {}",
                    it.abandoned,
                    humantime::format_duration(shutdown_timeout)
                ),
                None,
            )?;
            it.status = Some(RunStatus::Interrupted);
        }
    }
    Ok(it)
}
