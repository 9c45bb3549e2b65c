//! Why a resource changes, as data. The plan document carries both the sentence (`reason`) and this
//! (`cause`), so tools can act on the kind without parsing text.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a resource is created, changed, replaced or destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangeReason {
    /// The pool wants more machines than exist.
    PoolWants { pool: String, count: u32 },
    /// The pool has more machines than it wants.
    ScaleDown { pool: String, from: usize, to: u32 },
    /// The pool is gone from the fleet file.
    PoolRemoved { pool: String },
    /// The fleet file moved the pool to another provider.
    PoolMoved { pool: String, from: String, to: String },
    /// Something that cannot change in place changed.
    Replace { causes: Vec<ReplaceCause> },
    /// Changes made in place.
    Update { causes: Vec<UpdateCause> },
    /// A runner named for this tenant with no machine.
    GhostRunner,
    /// A host with no instance, past its window, that nothing needs.
    IdleHost,
    /// A second instance (or host) carries the name of a machine that already has one: one name, one machine.
    Copy { name: String, kept: String, why_kept: String },
}

/// What forces a replacement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "attribute", rename_all = "snake_case")]
pub enum ReplaceCause {
    Image {
        from: String,
        to: String,
    },
    InstanceType {
        from: Option<String>,
        to: Option<String>,
    },
    AvailabilityZone {
        from: Option<String>,
        to: Option<String>,
    },
    Stopped,
    /// The machine has not answered since `since`, past the grace period, and its runner is not online.
    Unreachable {
        since: chrono::DateTime<chrono::Utc>,
    },
    /// Its ephemeral runner finished its job: a fresh machine takes the next one.
    JobDone,
}

/// What an in-place update does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum UpdateCause {
    /// The on-machine state database is empty or damaged: it is replaced and setup runs again.
    BadState {
        reason: String,
    },
    /// A setup step runs.
    Step {
        name: String,
        why: StepWhy,
    },
    RunnerMissing,
    Labels,
    RunnerRemoved,
    /// The runner has been offline since `since`, past the grace period, on a reachable machine: its agent
    /// is restarted.
    RunnerOffline {
        since: chrono::DateTime<chrono::Utc>,
    },
    /// Its ephemeral runner finished its job: the machine is reimaged in place, set up and registered again.
    Reimage,
    /// Its persistent runner's agent is older than `forge.runner_version`: updated in place while idle.
    AgentVersion {
        from: String,
        to: String,
    },
    /// The user's tags changed: these keys are set (added or changed) and removed, in place.
    Tags {
        set: Vec<String>,
        removed: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepWhy {
    New,
    FailedBefore,
    TimedOut,
    Interrupted,
    Changed,
    AfterAChangedStep,
}

impl ReplaceCause {
    /// The attribute whose change forces the replacement (`replace_paths`).
    pub fn path(&self) -> &'static str {
        match self {
            ReplaceCause::Image { .. } => "image",
            ReplaceCause::InstanceType { .. } => "instance_type",
            ReplaceCause::AvailabilityZone { .. } => "availability_zone",
            ReplaceCause::Stopped => "state",
            ReplaceCause::Unreachable { .. } => "reachable",
            ReplaceCause::JobDone => "job",
        }
    }
}

fn or_dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

impl fmt::Display for ReplaceCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplaceCause::Image { from, to } => write!(f, "image changes from `{from}` to `{to}`"),
            ReplaceCause::InstanceType { from, to } => {
                write!(f, "instance type changes from `{}` to `{}`", or_dash(from), or_dash(to))
            }
            ReplaceCause::AvailabilityZone { from, to } => {
                write!(f, "availability zone changes from `{}` to `{}`", or_dash(from), or_dash(to))
            }
            ReplaceCause::Stopped => f.write_str("the instance is stopped"),
            ReplaceCause::JobDone => {
                f.write_str("its ephemeral runner finished its job; a fresh machine takes the next one")
            }
            ReplaceCause::Unreachable { since } => write!(
                f,
                "the machine has not answered since {} (longer than the runner's offline grace) and its runner is not online",
                crate::util::time::ts(since)
            ),
        }
    }
}

impl fmt::Display for UpdateCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateCause::BadState { reason } => {
                write!(f, "{reason}; it is replaced by a fresh one and every setup step runs again from the first")
            }
            UpdateCause::Step { name, why } => {
                let why = match why {
                    StepWhy::New => "new",
                    StepWhy::FailedBefore => "failed before",
                    StepWhy::TimedOut => "timed out before",
                    StepWhy::Interrupted => "interrupted",
                    StepWhy::Changed => "changed",
                    StepWhy::AfterAChangedStep => "after a changed step",
                };
                write!(f, "setup step `{name}` ({why})")
            }
            UpdateCause::RunnerMissing => f.write_str("runner is not registered"),
            UpdateCause::Labels => f.write_str("runner labels change"),
            UpdateCause::RunnerRemoved => f.write_str("the pool no longer has a runner"),
            UpdateCause::Reimage => f.write_str(
                "its ephemeral runner finished its job: the machine is reimaged (same instance and host), set up and registered again",
            ),
            UpdateCause::Tags { set, removed } => {
                let keys = |ks: &[String]| ks.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
                match (set.is_empty(), removed.is_empty()) {
                    (false, true) => write!(f, "tags set in place: {}", keys(set)),
                    (true, false) => write!(f, "tags removed in place: {}", keys(removed)),
                    _ => write!(f, "tags set in place: {}; removed: {}", keys(set), keys(removed)),
                }
            }
            UpdateCause::AgentVersion { from, to } => {
                write!(f, "runner agent {from} is older than forge.runner_version {to}: updated in place while idle")
            }
            UpdateCause::RunnerOffline { since } => write!(
                f,
                "runner offline since {} (longer than its offline grace) on a reachable machine: its agent is restarted",
                crate::util::time::ts(since)
            ),
        }
    }
}

fn joined<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            f.write_str("; ")?;
        }
        write!(f, "{x}")?;
    }
    Ok(())
}

impl fmt::Display for ChangeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeReason::PoolWants { pool, count } => write!(f, "pool `{pool}` wants {count} machine(s)"),
            ChangeReason::ScaleDown { pool, from, to } => write!(f, "pool `{pool}` scales from {from} to {to}"),
            ChangeReason::PoolRemoved { pool } => write!(f, "pool `{pool}` is no longer in the fleet file"),
            ChangeReason::PoolMoved { pool, from, to } => write!(
                f,
                "pool `{pool}` moved from provider `{from}` to `{to}` in the fleet file: this machine is destroyed on `{from}` and created again on `{to}`"
            ),
            ChangeReason::Replace { causes } => joined(f, causes),
            ChangeReason::Update { causes } => joined(f, causes),
            ChangeReason::GhostRunner => f.write_str("runner is registered but has no machine"),
            ChangeReason::IdleHost => f.write_str("host is idle and past its minimum allocation window"),
            ChangeReason::Copy { name, kept, why_kept } => write!(
                f,
                "a copy: another instance carries the name `{name}`; one name is one machine, so `{kept}` stays ({why_kept}) and this one goes"
            ),
        }
    }
}
