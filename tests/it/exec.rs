//! The executor with a strict recording runner: dependency order, bounded
//! parallelism, skipped dependents, independent branches finishing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nimbus::core::plan::{Action, ActionKind};
use nimbus::engine::walk::{ActionError, ActionRunner, ExecEvent, Outcome, Outputs, execute};
use petgraph::graph::{DiGraph, NodeIndex};

struct Recorder {
    fail: HashSet<usize>,
    delay: Duration,
    running: AtomicUsize,
    max_running: AtomicUsize,
    order: Mutex<Vec<usize>>,
}

impl Recorder {
    fn new(fail: &[usize], delay_ms: u64) -> Arc<Self> {
        Arc::new(Recorder {
            fail: fail.iter().copied().collect(),
            delay: Duration::from_millis(delay_ms),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            order: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl ActionRunner for Recorder {
    async fn run(&self, id: usize, _a: &Action, _o: &Outputs) -> Result<(), ActionError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.order.lock().unwrap().push(id);
        if self.fail.contains(&id) { Err(ActionError::exit(format!("boom {id}"), 3)) } else { Ok(()) }
    }
}

fn action(i: usize) -> Action {
    Action {
        address: format!("m[{i}]"),
        kind: ActionKind::WaitReachable { provider: "p".into(), machine: format!("m{i}") },
    }
}

/// `chains` independent chains of `len` actions each.
fn chains(chains: usize, len: usize) -> DiGraph<Action, ()> {
    let mut g = DiGraph::new();
    for c in 0..chains {
        let mut prev: Option<NodeIndex> = None;
        for k in 0..len {
            let n = g.add_node(action(c * len + k));
            if let Some(p) = prev {
                g.add_edge(p, n, ());
            }
            prev = Some(n);
        }
    }
    g
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn respects_dependencies_and_parallelism() {
    let g = Arc::new(chains(6, 4));
    let r = Recorder::new(&[], 5);
    let report = rt().block_on(execute(g.clone(), r.clone(), 3, |_| {}));
    assert!(report.succeeded());
    assert_eq!(report.count(|o| *o == Outcome::Success), 24);
    assert!(r.max_running.load(Ordering::SeqCst) <= 3);
    assert_eq!(r.max_running.load(Ordering::SeqCst), 3, "uses the parallelism it has");
    let order = r.order.lock().unwrap().clone();
    let pos = |i: usize| order.iter().position(|x| *x == i).unwrap();
    for e in g.edge_indices() {
        let (a, b) = g.edge_endpoints(e).unwrap();
        assert!(pos(a.index()) < pos(b.index()), "{} ran before {}", b.index(), a.index());
    }
}

#[test]
fn failure_skips_dependents_and_keeps_independent_branches() {
    // Chains 0..4, 4..8, 8..12; action 5 (second of chain 1) fails.
    let g = Arc::new(chains(3, 4));
    let r = Recorder::new(&[5], 1);
    let mut events = Vec::new();
    let report = rt().block_on(execute(g, r.clone(), 10, |e| events.push(e.clone())));
    assert_eq!(report.root_causes, vec![5]);
    assert_eq!(report.outcomes[&5], Outcome::Failed(ActionError::exit("boom 5", 3)));
    for i in [6, 7] {
        assert_eq!(report.outcomes[&i], Outcome::Skipped { root_cause: 5 });
    }
    for i in [0, 1, 2, 3, 4, 8, 9, 10, 11] {
        assert_eq!(report.outcomes[&i], Outcome::Success, "action {i}");
    }
    let ran: HashSet<usize> = r.order.lock().unwrap().iter().copied().collect();
    assert!(!ran.contains(&6) && !ran.contains(&7), "skipped actions never run");
    let started = events.iter().filter(|e| matches!(e, ExecEvent::Started { .. })).count();
    let finished = events.iter().filter(|e| matches!(e, ExecEvent::Finished { .. })).count();
    assert_eq!((started, finished), (10, 12));
}

#[test]
fn diamond_waits_for_both_parents() {
    let mut g = DiGraph::new();
    let a = g.add_node(action(0));
    let b = g.add_node(action(1));
    let c = g.add_node(action(2));
    let d = g.add_node(action(3));
    g.add_edge(a, b, ());
    g.add_edge(a, c, ());
    g.add_edge(b, d, ());
    g.add_edge(c, d, ());
    let r = Recorder::new(&[2], 1);
    let report = rt().block_on(execute(Arc::new(g), r, 4, |_| {}));
    assert_eq!(report.outcomes[&1], Outcome::Success);
    assert_eq!(report.outcomes[&3], Outcome::Skipped { root_cause: 2 });
    assert_eq!(report.root_causes, vec![2]);
}
