//! The executor: walks a plan's DAG concurrently with bounded parallelism.
//!
//! An action starts once everything it depends on succeeded. When one fails,
//! all its dependents are skipped (with the failed action as their root
//! cause) and independent branches carry on. Progress flows out as
//! [`ExecEvent`]s; the executor itself prints nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use tokio::task::JoinSet;

use crate::core::plan::Action;

/// Values actions hand to later ones (the host an allocation made, …), by action id.
pub type Outputs = Arc<Mutex<HashMap<usize, String>>>;

/// Why an action failed: a message for people, the exit code of a command that failed, and the typed error
/// it came from (its source chain is kept).
#[derive(Debug, Clone)]
pub struct ActionError {
    pub message: String,
    /// Exit code of the command that failed, when there was one.
    pub exit_code: Option<i32>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    /// Not a failure: the action cannot happen yet (a runner picked up a job). Its dependents wait too.
    pub deferred: bool,
    /// It ran past its time limit and was stopped (the journal says TIMEOUT).
    pub timed_out: bool,
}

impl ActionError {
    pub fn new(message: impl Into<String>) -> Self {
        ActionError { message: message.into(), exit_code: None, source: None, deferred: false, timed_out: false }
    }

    /// The action ran past its time limit and was stopped.
    pub fn timed_out(message: impl Into<String>) -> Self {
        ActionError { timed_out: true, exit_code: Some(124), ..ActionError::new(message) }
    }

    /// The action cannot happen yet; the apply goes on and succeeds, and the next plan shows it deferred.
    pub fn deferred(message: impl Into<String>) -> Self {
        ActionError { deferred: true, ..ActionError::new(message) }
    }

    /// A command on the machine failed with `code`.
    pub fn exit(message: impl Into<String>, code: i32) -> Self {
        ActionError { exit_code: Some(code), ..ActionError::new(message) }
    }

    fn from_error(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        let message = e.to_string();
        ActionError { source: Some(Arc::new(e)), ..ActionError::new(message) }
    }

    /// The provider error this failure came from, if any (to tell throttling or capacity from the rest).
    pub fn provider_error(&self) -> Option<&crate::providers::ProviderError> {
        self.source.as_deref().and_then(|e| e.downcast_ref())
    }
}

impl PartialEq for ActionError {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.exit_code == other.exit_code
    }
}
impl Eq for ActionError {}

impl std::fmt::Display for ActionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ActionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

macro_rules! action_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ActionError {
            fn from(e: $t) -> Self {
                ActionError::from_error(e)
            }
        }
    )*};
}
action_error_from!(
    crate::providers::ProviderError,
    crate::forges::ForgeError,
    crate::state::machine_db::StateError,
    crate::transport::TransportError
);

/// Carries out single actions.
#[async_trait]
pub trait ActionRunner: Send + Sync + 'static {
    async fn run(&self, id: usize, action: &Action, outputs: &Outputs) -> Result<(), ActionError>;
    /// The file an action's output is logged to, if any.
    fn log_path(&self, _id: usize, _action: &Action) -> Option<PathBuf> {
        None
    }
    /// Actions that succeeded without making anything new: the provider answered from the idempotency key with
    /// what an earlier run made. The summary does not count them as added.
    fn made_nothing_new(&self) -> std::collections::HashSet<usize> {
        std::collections::HashSet::new()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failed(ActionError),
    /// Could not happen yet (not a failure); its dependents are skipped with it as their root cause.
    Deferred(String),
    /// Not run because `root_cause` failed (or was deferred).
    Skipped {
        root_cause: usize,
    },
}

#[derive(Debug, Clone)]
pub enum ExecEvent {
    Started { id: usize, log_path: Option<PathBuf> },
    Finished { id: usize, outcome: Outcome, elapsed: Duration },
}

#[derive(Debug, Clone, Default)]
pub struct ExecReport {
    pub outcomes: BTreeMap<usize, Outcome>,
    /// Failed actions (each reported once; their skipped dependents are not).
    pub root_causes: Vec<usize>,
    pub wall: Duration,
    /// A stop was asked for: actions not in `outcomes` were never started.
    pub interrupted: bool,
    /// Actions that could not happen yet (their dependents were skipped); not failures.
    pub deferred: Vec<usize>,
}

impl ExecReport {
    pub fn succeeded(&self) -> bool {
        self.root_causes.is_empty() && !self.interrupted
    }
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.values().filter(|o| f(o)).count()
    }
}

/// Runs every action of `graph`, at most `parallelism` at a time.
pub async fn execute(
    graph: Arc<DiGraph<Action, ()>>,
    runner: Arc<dyn ActionRunner>,
    parallelism: usize,
    on_event: impl FnMut(&ExecEvent),
) -> ExecReport {
    let (_keep, stop) = tokio::sync::watch::channel(false);
    execute_until(graph, runner, parallelism, stop, on_event).await
}

/// Like [`execute`], until `stop` turns true: from then on nothing new starts, the running actions finish,
/// and the report says it was interrupted.
pub async fn execute_until(
    graph: Arc<DiGraph<Action, ()>>,
    runner: Arc<dyn ActionRunner>,
    parallelism: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut on_event: impl FnMut(&ExecEvent),
) -> ExecReport {
    let start = Instant::now();
    let parallelism = parallelism.max(1);
    let outputs: Outputs = Arc::default();
    let mut waiting: HashMap<usize, usize> =
        graph.node_indices().map(|n| (n.index(), graph.neighbors_directed(n, Direction::Incoming).count())).collect();
    let mut ready: VecDeque<usize> = graph.node_indices().map(|n| n.index()).filter(|i| waiting[i] == 0).collect();
    let mut report = ExecReport::default();
    let mut running: JoinSet<(usize, Result<(), ActionError>, Duration)> = JoinSet::new();

    loop {
        if *stop.borrow() {
            report.interrupted = true;
            ready.clear();
        }
        while running.len() < parallelism {
            let Some(id) = ready.pop_front() else { break };
            let action = graph[NodeIndex::new(id)].clone();
            on_event(&ExecEvent::Started { id, log_path: runner.log_path(id, &action) });
            let (runner, outputs) = (runner.clone(), outputs.clone());
            running.spawn(async move {
                let t = Instant::now();
                let r = runner.run(id, &action, &outputs).await;
                (id, r, t.elapsed())
            });
        }
        if running.is_empty() {
            break;
        }
        let joined = if report.interrupted {
            running.join_next().await
        } else {
            tokio::select! {
                j = running.join_next() => j,
                // Woken by a stop: go round to stop starting new actions, then wait for the running ones.
                r = stop.changed() => match r {
                    Ok(()) => continue,
                    Err(_) => running.join_next().await, // nobody can stop us any more
                },
            }
        };
        let Some(joined) = joined else { break };
        let (id, result, elapsed) = match joined {
            Ok(v) => v,
            Err(e) => {
                // A panicking action: find it by elimination is not possible, so fail loudly.
                panic!("an action task panicked: {e}");
            }
        };
        match result {
            Ok(()) => {
                report.outcomes.insert(id, Outcome::Success);
                on_event(&ExecEvent::Finished { id, outcome: Outcome::Success, elapsed });
                for next in graph.neighbors_directed(NodeIndex::new(id), Direction::Outgoing) {
                    let n = next.index();
                    if report.outcomes.contains_key(&n) {
                        continue;
                    }
                    let w = waiting.get_mut(&n).expect("node");
                    *w -= 1;
                    if *w == 0 {
                        ready.push_back(n);
                    }
                }
            }
            Err(e) => {
                let outcome = if e.deferred {
                    report.deferred.push(id);
                    Outcome::Deferred(e.message)
                } else {
                    report.root_causes.push(id);
                    Outcome::Failed(e)
                };
                report.outcomes.insert(id, outcome.clone());
                on_event(&ExecEvent::Finished { id, outcome, elapsed });
                // Skip everything downstream.
                let mut stack: Vec<NodeIndex> =
                    graph.neighbors_directed(NodeIndex::new(id), Direction::Outgoing).collect();
                while let Some(n) = stack.pop() {
                    if report.outcomes.contains_key(&n.index()) {
                        continue;
                    }
                    let skipped = Outcome::Skipped { root_cause: id };
                    report.outcomes.insert(n.index(), skipped.clone());
                    ready.retain(|r| *r != n.index());
                    on_event(&ExecEvent::Finished { id: n.index(), outcome: skipped, elapsed: Duration::ZERO });
                    stack.extend(graph.neighbors_directed(n, Direction::Outgoing));
                }
            }
        }
    }
    report.wall = start.elapsed();
    report
}
