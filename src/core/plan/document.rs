//! The versioned JSON plan document ([`PlanDocument`]): the single model of a
//! plan for output. The terminal and Markdown views (`cli::views`) are drawn
//! from it; the saved plan (`planfile`) is this document plus the fleet file.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::plan::{Action, Deferred, Plan, ResourceChange, Summary, Warning};

/// `format_version` of the JSON plan. Minor versions only add keys; consumers ignore unknown keys.
pub const PLAN_FORMAT_VERSION: &str = "1.7";

/// The JSON plan document (`nimbus plan --json`, and the saved plan of `-out`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanDocument {
    pub format_version: String,
    pub nimbus_version: String,
    pub tenant: String,
    /// The time the plan was made as of (`--at` moves it).
    pub planned_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<Observed>,
    pub summary: Summary,
    pub resource_changes: Vec<ResourceChange>,
    pub actions: Vec<ActionDoc>,
    pub deferred: Vec<Deferred>,
    pub warnings: Vec<Warning>,
    /// Addresses of changes `nimbus reconcile` leaves for a person by its `reconcile.auto_apply` policy
    /// (shown when the fleet uses the controller: a `reconcile:` section or a pool with `scale:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_review: Vec<String>,
    /// What the plan commits (host-hours and money, per action and in total) and what the fleet costs per day at
    /// its planned size (format 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::core::cost::PlanCost>,
    /// What the Rego policies said (`--policy`, `policy.paths`; format 1.6): a plan with `denies` is not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::engine::policy::PolicyReport>,
}

/// The fleet file a plan was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FleetRef {
    pub path: String,
    /// sha256 of the file's bytes: a saved plan is refused when the file changed.
    pub sha256: String,
    /// The file's text, in a saved plan (`-out`): `apply PLANFILE` plans again from it and the world, and
    /// carries out the plan only if the result is the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// What the plan was compared against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Observed {
    /// `discovery` or `inventory`.
    pub source: String,
    /// Fingerprint of the observed world: a saved plan is refused when it changed.
    pub fingerprint: String,
}

/// An action with its id and dependencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ActionDoc {
    pub id: usize,
    pub depends_on: Vec<usize>,
    #[serde(flatten)]
    pub action: Action,
}

/// The JSON schema of the plan document (`schemas/plan.schema.json`, `nimbus schema plan`).
pub fn schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&schemars::schema_for!(PlanDocument)).expect("schema serialises");
    s.push('\n');
    s
}

/// Checks a document's JSON against a schema before anything reads it: the JSON path and message of the first
/// error, or nothing.
pub fn check_against(schema_text: &str, doc: &serde_json::Value) -> Result<(), String> {
    let schema: serde_json::Value = serde_json::from_str(schema_text).map_err(|e| e.to_string())?;
    let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
    match validator.iter_errors(doc).next() {
        None => Ok(()),
        Some(e) => {
            let path = e.instance_path.to_string();
            Err(format!("at `{}`: {e}", if path.is_empty() { "/".to_string() } else { path }))
        }
    }
}

/// A resource change with Terraform's fields: `type`, `provider_name` and the `change` object.
use super::attrs::Attrs;

fn terraform_shaped(plan: &Plan, c: &ResourceChange) -> ResourceChange {
    use crate::core::plan::ResourceKind;
    let mut c = c.clone();
    c.resource_type = match c.kind {
        ResourceKind::Machine => "nimbus_machine",
        ResourceKind::Host => "nimbus_host",
        ResourceKind::Runner => "nimbus_runner",
    }
    .to_string();
    c.provider_name = c
        .action_ids
        .iter()
        .filter_map(|id| plan.graph.node_weight(petgraph::graph::NodeIndex::new(*id)))
        .find_map(|a| a.kind.provider().map(str::to_string))
        .or_else(|| c.after.as_ref().or(c.before.as_ref()).and_then(Attrs::provider).map(str::to_string))
        .unwrap_or_else(|| "forge".into());
    c.change = Some(crate::core::plan::TerraformChange {
        actions: c.actions.clone(),
        before: c.before.as_ref().map(Attrs::to_json),
        after: c.after.as_ref().map(Attrs::to_json),
        replace_paths: c.replace_paths.iter().map(|p| vec![p.clone()]).collect(),
    });
    c
}

impl PlanDocument {
    pub fn from_plan(plan: &Plan, fleet: Option<FleetRef>, observed: Option<Observed>) -> Self {
        PlanDocument {
            format_version: PLAN_FORMAT_VERSION.to_string(),
            nimbus_version: env!("CARGO_PKG_VERSION").to_string(),
            tenant: plan.tenant.clone(),
            planned_at: plan.planned_at,
            fleet,
            observed,
            summary: plan.summary(),
            resource_changes: plan.changes.iter().map(|c| terraform_shaped(plan, c)).collect(),
            actions: plan
                .actions()
                .map(|(id, a)| ActionDoc { id, depends_on: plan.depends_on(id), action: a.clone() })
                .collect(),
            deferred: plan.deferred.clone(),
            warnings: plan.warnings.clone(),
            pending_review: Vec::new(),
            cost: None,
            policy: None,
        }
    }

    /// Adds what the plan commits and costs, at `desired`'s prices and planned sizes.
    pub fn with_cost(mut self, desired: &crate::core::model::Desired) -> Self {
        let actions: Vec<(usize, String, &crate::core::plan::ActionKind)> =
            self.actions.iter().map(|a| (a.id, a.action.address.clone(), &a.action.kind)).collect();
        let cost = crate::core::cost::plan_cost(desired, &actions, &Default::default());
        self.cost = Some(cost);
        self
    }

    /// Rebuilds the action graph of a saved plan.
    pub fn graph(&self) -> Result<petgraph::graph::DiGraph<Action, ()>, String> {
        let mut g = petgraph::graph::DiGraph::new();
        for (i, a) in self.actions.iter().enumerate() {
            if a.id != i {
                return Err(format!("action ids are not dense (found {} at position {i})", a.id));
            }
            g.add_node(a.action.clone());
        }
        for a in &self.actions {
            for d in &a.depends_on {
                if *d >= self.actions.len() {
                    return Err(format!("action {} depends on unknown action {d}", a.id));
                }
                g.add_edge(petgraph::graph::NodeIndex::new(*d), petgraph::graph::NodeIndex::new(a.id), ());
            }
        }
        if petgraph::algo::is_cyclic_directed(&g) {
            return Err("the actions form a cycle".into());
        }
        Ok(g)
    }

    pub fn has_changes(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Drift that nothing can change yet: a desired machine that is missing (its creation waits for a host's
    /// scrub or a job), or a copy of a machine whose removal waits for a job. A drift check never calls that
    /// "no changes". (A machine made by a recent run and not visible yet is not drift.)
    pub fn drift_pending(&self) -> bool {
        self.deferred.iter().any(|d| {
            d.kind != crate::core::plan::DeferredKind::NotVisibleYet
                && (matches!(d.action, crate::core::plan::ActionKind::LaunchInstance { .. })
                    || d.address.contains('#')
                    || d.kind == crate::core::plan::DeferredKind::Budget)
        })
    }

    /// Warnings about parts of the fleet that could not be checked (unreachable machines, unusable
    /// resources). While there are any, `plan --detailed-exitcode` exits 1: "no changes" cannot be known.
    pub fn unchecked(&self) -> Vec<&Warning> {
        self.warnings.iter().filter(|w| w.kind.is_unchecked()).collect()
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("plan serialises");
        s.push('\n');
        // Debug builds (the test suite) check every plan they print against the published schema.
        #[cfg(debug_assertions)]
        {
            static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
            let v = SCHEMA.get_or_init(|| {
                let schema: serde_json::Value = serde_json::from_str(&schema_text()).expect("plan schema");
                jsonschema::validator_for(&schema).expect("plan schema compiles")
            });
            let value: serde_json::Value = serde_json::from_str(&s).expect("plan JSON");
            if let Some(e) = v.iter_errors(&value).next() {
                panic!("a plan does not match schemas/plan.schema.json at `{}`: {e}", e.instance_path);
            }
        }
        s
    }
}
