//! The plan's data: actions in a dependency graph, the resource changes they
//! add up to, deferred actions and warnings.

use chrono::{DateTime, Utc};
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use super::attrs::Attrs;
use crate::config::RunnerMode;

use super::reason::{ChangeReason, ReplaceCause, UpdateCause};
use crate::core::model::MachineSpec;

/// One step of an apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Action {
    /// The resource this step belongs to (`macos[2]`, `host.h-0123`, `runner.NAME`).
    pub address: String,
    #[serde(flatten)]
    pub kind: ActionKind,
}

/// Where a launch places its instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostRef {
    /// A host that exists now (kept, or idle and reused).
    Existing { host_id: String },
    /// The host allocated by the action with this id.
    Allocated { action: usize },
}

/// A setup step to run, by name and script hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepRef {
    pub name: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionKind {
    AllocateHost {
        provider: String,
        pool: String,
        machine: String,
        instance_type: String,
        availability_zone: String,
        /// More zones to try, in order, when `availability_zone` has no capacity.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fallback_zones: Vec<String>,
        /// Known hosts tagged for this machine that the plan has already decided about; the provider's
        /// lookup by tag must not return them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exclude_hosts: Vec<String>,
    },
    LaunchInstance {
        provider: String,
        pool: String,
        machine: String,
        spec: MachineSpec,
        host: Option<HostRef>,
    },
    WaitReachable {
        provider: String,
        machine: String,
    },
    /// Gives a machine a fresh root file system from `image`, keeping the instance (and its host).
    ReimageMachine {
        provider: String,
        machine: String,
        instance_id: String,
        image: String,
    },
    /// Restarts the runner agent of a machine whose runner is offline.
    RestartRunner {
        provider: String,
        machine: String,
    },
    /// Updates the runner agent of an idle persistent runner in place to `to` (`forge.runner_version`), keeping
    /// its registration.
    UpdateRunnerAgent {
        provider: String,
        machine: String,
        from: String,
        to: String,
    },
    /// Sets the user's tags `set` and removes the keys `remove` on a machine's instance, its volumes and its
    /// `host`, in place; nimbus's own tags are never touched.
    UpdateTags {
        provider: String,
        machine: String,
        instance_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_id: Option<String>,
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        set: std::collections::BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remove: Vec<String>,
    },
    /// Replaces an empty or damaged on-machine state database with a fresh one (setup then runs again).
    RepairState {
        provider: String,
        machine: String,
    },
    RunSetup {
        provider: String,
        pool: String,
        machine: String,
        steps: Vec<StepRef>,
    },
    RegisterRunner {
        provider: String,
        pool: String,
        machine: String,
        labels: Vec<String>,
        mode: RunnerMode,
    },
    UpdateRunnerLabels {
        machine: String,
        runner_id: u64,
        labels: Vec<String>,
        previous: Vec<String>,
    },
    DeregisterRunner {
        runner_id: u64,
        runner_name: String,
    },
    TerminateInstance {
        provider: String,
        machine: String,
        instance_id: String,
    },
    ReleaseHost {
        provider: String,
        host_id: String,
    },
}

impl ActionKind {
    /// Short snake_case name, as in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            ActionKind::AllocateHost { .. } => "allocate_host",
            ActionKind::LaunchInstance { .. } => "launch_instance",
            ActionKind::WaitReachable { .. } => "wait_reachable",
            ActionKind::RepairState { .. } => "repair_state",
            ActionKind::RestartRunner { .. } => "restart_runner",
            ActionKind::UpdateRunnerAgent { .. } => "update_runner_agent",
            ActionKind::UpdateTags { .. } => "update_tags",
            ActionKind::ReimageMachine { .. } => "reimage_machine",
            ActionKind::RunSetup { .. } => "run_setup",
            ActionKind::RegisterRunner { .. } => "register_runner",
            ActionKind::UpdateRunnerLabels { .. } => "update_runner_labels",
            ActionKind::DeregisterRunner { .. } => "deregister_runner",
            ActionKind::TerminateInstance { .. } => "terminate_instance",
            ActionKind::ReleaseHost { .. } => "release_host",
        }
    }

    /// The fleet provider the action goes to (`None`: the forge).
    pub fn provider(&self) -> Option<&str> {
        match self {
            ActionKind::AllocateHost { provider, .. }
            | ActionKind::LaunchInstance { provider, .. }
            | ActionKind::WaitReachable { provider, .. }
            | ActionKind::ReimageMachine { provider, .. }
            | ActionKind::RestartRunner { provider, .. }
            | ActionKind::UpdateRunnerAgent { provider, .. }
            | ActionKind::UpdateTags { provider, .. }
            | ActionKind::RepairState { provider, .. }
            | ActionKind::RunSetup { provider, .. }
            | ActionKind::RegisterRunner { provider, .. }
            | ActionKind::TerminateInstance { provider, .. }
            | ActionKind::ReleaseHost { provider, .. } => Some(provider),
            ActionKind::UpdateRunnerLabels { .. } | ActionKind::DeregisterRunner { .. } => None,
        }
    }

    /// The machine the action is about, if any.
    pub fn machine(&self) -> Option<&str> {
        match self {
            ActionKind::AllocateHost { machine, .. }
            | ActionKind::LaunchInstance { machine, .. }
            | ActionKind::WaitReachable { machine, .. }
            | ActionKind::RestartRunner { machine, .. }
            | ActionKind::UpdateRunnerAgent { machine, .. }
            | ActionKind::UpdateTags { machine, .. }
            | ActionKind::ReimageMachine { machine, .. }
            | ActionKind::RepairState { machine, .. }
            | ActionKind::RunSetup { machine, .. }
            | ActionKind::RegisterRunner { machine, .. }
            | ActionKind::UpdateRunnerLabels { machine, .. }
            | ActionKind::TerminateInstance { machine, .. } => Some(machine),
            ActionKind::DeregisterRunner { runner_name, .. } => Some(runner_name),
            ActionKind::ReleaseHost { .. } => None,
        }
    }
}

/// Terraform's `change` object of a resource change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TerraformChange {
    pub actions: Vec<ChangeAction>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    #[serde(default)]
    pub replace_paths: Vec<Vec<String>>,
}

/// How a setup step's script changed: a unified diff of the old text and the new.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ScriptDiff {
    pub step: String,
    /// Where the old text comes from: `machine` (what last ran there, from the journal) or `trusted base`.
    pub from: String,
    /// The unified diff (`---`/`+++` headers, `@@` hunks).
    pub diff: String,
}

/// What happens to a resource, in Terraform's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    Create,
    Update,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Machine,
    Host,
    Runner,
}

/// A change to one resource: the unit of the summary line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResourceChange {
    pub address: String,
    pub kind: ResourceKind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `["create"]`, `["update"]`, `["delete"]`, or `["delete", "create"]` for a replacement.
    pub actions: Vec<ChangeAction>,
    /// Why, in a sentence.
    pub reason: String,
    /// Why, as data (plan format 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<ChangeReason>,
    /// Attributes before (null for a create).
    pub before: Option<Attrs>,
    /// Attributes after (null for a delete).
    pub after: Option<Attrs>,
    /// Attributes whose change forces the replacement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replace_paths: Vec<String>,
    /// Setup steps that will run, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run_steps: Vec<String>,
    /// Terraform's JSON plan shape (format 1.6): the resource type (`nimbus_machine`, `nimbus_host`,
    /// `nimbus_runner`).
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub resource_type: String,
    /// Terraform's `provider_name`: the fleet file's provider (`forge` for runners).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider_name: String,
    /// Terraform's `change` object: `actions`, `before`, `after`, `replace_paths` (the same values as the flat
    /// fields, which stay for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<TerraformChange>,
    /// Setup steps whose script changed: the diff of the old text and the new (format 1.6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub script_diffs: Vec<ScriptDiff>,
    /// Ids of the actions that carry out this change.
    pub action_ids: Vec<usize>,
}

/// Which resource a change is about.
pub struct Subject {
    pub address: String,
    pub kind: ResourceKind,
    pub name: String,
    pub pool: Option<String>,
}

impl Subject {
    pub fn machine(address: String, name: String, pool: Option<&str>) -> Self {
        Subject { address, kind: ResourceKind::Machine, name, pool: pool.map(str::to_string) }
    }
}

impl ResourceChange {
    fn new(s: Subject, actions: Vec<ChangeAction>, cause: ChangeReason) -> Self {
        ResourceChange {
            address: s.address,
            kind: s.kind,
            name: s.name,
            pool: s.pool,
            actions,
            reason: cause.to_string(),
            cause: Some(cause),
            before: None,
            after: None,
            replace_paths: Vec::new(),
            run_steps: Vec::new(),
            action_ids: Vec::new(),
            resource_type: String::new(),
            provider_name: String::new(),
            change: None,
            script_diffs: Vec::new(),
        }
    }

    /// `+`: a resource that does not exist yet.
    pub fn create(s: Subject, cause: ChangeReason, after: Attrs, run_steps: Vec<String>, ids: Vec<usize>) -> Self {
        ResourceChange {
            after: Some(after),
            run_steps,
            action_ids: ids,
            ..Self::new(s, vec![ChangeAction::Create], cause)
        }
    }

    /// `~`: changes made in place.
    pub fn update(
        s: Subject,
        causes: Vec<UpdateCause>,
        before: Attrs,
        after: Attrs,
        run_steps: Vec<String>,
        ids: Vec<usize>,
    ) -> Self {
        ResourceChange {
            before: Some(before),
            after: Some(after),
            run_steps,
            action_ids: ids,
            ..Self::new(s, vec![ChangeAction::Update], ChangeReason::Update { causes })
        }
    }

    /// `-/+`: destroyed and created again; `causes` name the attributes that force it.
    pub fn replace(
        s: Subject,
        causes: Vec<ReplaceCause>,
        before: Attrs,
        after: Attrs,
        run_steps: Vec<String>,
        ids: Vec<usize>,
    ) -> Self {
        let replace_paths = causes.iter().map(|c| c.path().to_string()).collect();
        ResourceChange {
            before: Some(before),
            after: Some(after),
            replace_paths,
            run_steps,
            action_ids: ids,
            ..Self::new(s, vec![ChangeAction::Delete, ChangeAction::Create], ChangeReason::Replace { causes })
        }
    }

    /// `-`: a resource that goes.
    pub fn delete(s: Subject, cause: ChangeReason, before: Attrs, ids: Vec<usize>) -> Self {
        ResourceChange { before: Some(before), action_ids: ids, ..Self::new(s, vec![ChangeAction::Delete], cause) }
    }

    pub fn is_replace(&self) -> bool {
        self.actions == [ChangeAction::Delete, ChangeAction::Create]
    }
}

/// An action that may not run yet, and when it may.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Deferred {
    pub address: String,
    pub action: ActionKind,
    /// When it becomes possible; `None` when that depends on the provider (host scrubbing) or on a job.
    pub due_at: Option<DateTime<Utc>>,
    pub reason: String,
    /// What it waits for.
    #[serde(default)]
    pub kind: DeferredKind,
}

/// What a deferred action waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeferredKind {
    /// A host inside its minimum allocation window.
    #[default]
    AllocationWindow,
    /// A host being scrubbed by the provider.
    Scrubbing,
    /// A runner running a job: the job finishes first.
    BusyRunner,
    /// Made by an earlier run (its idempotency key recorded it) but not visible yet: the provider's reads lag
    /// behind its writes. Waited for, never made again; not drift until [`NOT_VISIBLE_GRACE`] has passed.
    NotVisibleYet,
    /// Past the fleet's `budget:` (hosts of a type, or money one plan may commit): waits for a person.
    Budget,
    /// An idle host past its window that `hosts.release` keeps.
    HeldByPolicy,
}

/// How long a resource a run made may stay invisible to discovery before the plan counts it as missing again
/// (EC2's eventually consistent Describe calls usually catch up within seconds).
pub const NOT_VISIBLE_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// Something the plan cannot act on but the operator should know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Warning {
    pub address: String,
    pub message: String,
    #[serde(default)]
    pub kind: WarningKind,
}

/// What a warning is about. `unreachable` and `unusable` mean part of the fleet could not be checked:
/// `plan --detailed-exitcode` then exits 1, never 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// A machine that could not be reached: its setup and runner were not checked.
    Unreachable,
    /// A resource of this tenant that cannot be read or attributed: left alone.
    Unusable,
    #[default]
    Other,
}

impl WarningKind {
    /// Whether part of the fleet went unchecked.
    pub fn is_unchecked(self) -> bool {
        matches!(self, WarningKind::Unreachable | WarningKind::Unusable)
    }
}

/// The result of planning.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tenant: String,
    pub planned_at: DateTime<Utc>,
    /// Actions; an edge `a → b` means `b` waits for `a`.
    pub graph: DiGraph<Action, ()>,
    pub changes: Vec<ResourceChange>,
    pub deferred: Vec<Deferred>,
    pub warnings: Vec<Warning>,
    /// Running jobs the plan kills (only with `interrupt_jobs`).
    pub jobs_interrupted: usize,
}

/// The summary line's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub destroy: usize,
    pub deferred: usize,
    /// Running jobs the plan kills (`--interrupt-jobs`); absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub jobs_interrupted: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    pub fn actions(&self) -> impl Iterator<Item = (usize, &Action)> {
        self.graph.node_indices().map(|i| (i.index(), &self.graph[i]))
    }

    pub fn depends_on(&self, id: usize) -> Vec<usize> {
        let mut v: Vec<usize> =
            self.graph.neighbors_directed(NodeIndex::new(id), Direction::Incoming).map(|n| n.index()).collect();
        v.sort_unstable();
        v
    }

    pub fn summary(&self) -> Summary {
        let mut s =
            Summary { deferred: self.deferred.len(), jobs_interrupted: self.jobs_interrupted, ..Summary::default() };
        for c in &self.changes {
            s.count(c);
        }
        s
    }
}

impl Summary {
    /// Adds a resource change: a replacement counts once to add and once to destroy.
    pub fn count(&mut self, c: &ResourceChange) {
        for a in &c.actions {
            match a {
                ChangeAction::Create => self.add += 1,
                ChangeAction::Update => self.change += 1,
                ChangeAction::Delete => self.destroy += 1,
            }
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
