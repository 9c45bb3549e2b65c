//! The planner: a pure function `(Desired, Actual, now) -> Plan`.
//!
//! No async, no I/O, no printing. It decides which machines to create,
//! update in place, replace or destroy; orders the steps as a petgraph DAG;
//! and defers host releases that fall inside the provider's minimum
//! allocation window, saying when they become due. Resources that are not
//! tagged for the desired tenant are invisible to it.

pub mod attrs;
pub mod diff;
pub mod document;
mod hosts;
mod machines;
pub mod model;
pub mod planfile;
mod pools;
pub mod reason;
mod runners;

pub use model::*;

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::core::model::*;
use chrono::{DateTime, Utc};
use petgraph::graph::{DiGraph, NodeIndex};
use reason::ReplaceCause;

/// What forces a machine's replacement.
type Replacement = Vec<ReplaceCause>;

/// Plans the changes that turn `actual` into `desired` as of `now`.
///
/// Pure and deterministic: the same inputs give the same plan.
pub fn plan(desired: &Desired, actual: &Actual, now: DateTime<Utc>) -> Plan {
    let mut b = Builder::new(desired, actual, now);
    b.run();
    b.finish()
}

struct Builder<'a> {
    desired: &'a Desired,
    now: DateTime<Utc>,
    graph: DiGraph<Action, ()>,
    changes: Vec<ResourceChange>,
    deferred: Vec<Deferred>,
    warnings: Vec<Warning>,
    /// Owned hosts by id.
    hosts: HashMap<&'a str, &'a Host>,
    /// Hosts already spoken for (a kept machine runs on it, it is reused, or released).
    claimed_hosts: HashSet<&'a str>,
    /// Available hosts with no instance, by (provider, type, zone), oldest allocation first.
    idle_by_kind: HashMap<(String, String, String), Vec<&'a str>>,
    /// Owned, live machines by pool tag.
    by_pool: BTreeMap<&'a str, Vec<&'a ActualMachine>>,
    /// Forge runners by name (only when a forge is configured and was read).
    runners: Option<HashMap<&'a str, &'a ForgeRunner>>,
    /// Runner names handled by some chain.
    runners_handled: HashSet<std::borrow::Cow<'a, str>>,
    /// Machine indexes held by unusable resources, by pool: never reused, never created again.
    occupied: HashMap<String, BTreeSet<u32>>,
    /// Machine indexes other fleet files' machines hold, by pool: not this fleet's, never created here.
    reserved: HashMap<String, BTreeSet<u32>>,
    /// Names of other fleet files' machines: their runners are never ghosts here.
    other_fleet_names: HashSet<String>,
    /// Pools this fleet's journal acted on (see [`Actual::known_pools`]).
    known_pools: Option<&'a BTreeSet<String>>,
    /// The terminate action of each machine being torn down, by name: a new machine of the same name waits for it.
    teardowns: HashMap<String, Vec<usize>>,
    /// Known hosts by the machine their tag names.
    hosts_by_machine_tag: HashMap<&'a str, HostIds<'a>>,
    /// Machines whose removal waits for their runner's job: a new machine of the same name waits too.
    held_for_jobs: HashSet<String>,
    /// Running jobs this plan kills (`interrupt_jobs`).
    jobs_interrupted: usize,
    /// Instances recent runs made that discovery does not show yet.
    made_unseen: &'a [MadeUnseen],
    /// This tenant's live machines (every provider, every pool).
    live_machines: Vec<&'a ActualMachine>,
    /// Hosts per instance type, held and planned (for `budget.max_hosts`).
    hosts_per_type: HashMap<String, u32>,
    /// Dollars this plan commits so far (for `budget.max_commit_per_plan`).
    committed: f64,
}

/// The ids of the hosts tagged for one machine: almost always one, kept without an allocation.
#[derive(Default)]
struct HostIds<'a> {
    first: Option<&'a str>,
    more: Vec<&'a str>,
}

impl<'a> HostIds<'a> {
    fn push(&mut self, id: &'a str) {
        match self.first {
            None => self.first = Some(id),
            Some(_) => self.more.push(id),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.first.into_iter().chain(self.more.iter().copied())
    }

    /// In id order.
    fn sort(&mut self) {
        if !self.more.is_empty() {
            let mut all: Vec<&'a str> = self.iter().collect();
            all.sort_unstable();
            self.first = Some(all[0]);
            self.more = all.split_off(1);
        }
    }
}

fn machine_index(m: &ActualMachine) -> Option<u32> {
    m.name().and_then(parse_machine_name).map(|(_, _, i)| i)
}

fn address(pool: &str, index: u32) -> String {
    String::from(Address::machine(pool, index))
}

fn machine_address(m: &ActualMachine) -> String {
    match (m.pool(), machine_index(m)) {
        (Some(p), Some(i)) => address(p, i),
        _ => format!("machine.{}", m.instance_id),
    }
}

impl<'a> Builder<'a> {
    fn new(desired: &'a Desired, actual: &'a Actual, now: DateTime<Utc>) -> Self {
        let tenant = desired.tenant.as_str();
        let configured = |p: &str| desired.providers.contains_key(p);
        // Looked up by id; where their order shows (idle hosts), it is sorted there.
        let mut hosts: HashMap<&str, &Host> = HashMap::with_capacity_and_hasher(actual.hosts.len(), Default::default());
        hosts.extend(
            actual
                .hosts
                .iter()
                .filter(|h| owned_by(&h.tags, tenant) && configured(&h.provider) && h.state != HostState::Released)
                .map(|h| (h.id.as_str(), h)),
        );
        let mut by_pool: BTreeMap<&str, Vec<&ActualMachine>> = BTreeMap::new();
        let mut warnings = Vec::new();
        // This tenant's live machines (every provider, every pool), found once.
        let live_machines: Vec<&ActualMachine> =
            actual.machines.iter().filter(|m| !m.state.is_gone() && owned_by(&m.tags, tenant)).collect();
        // (pool, index, instance id, machine) of every named machine, sorted once: each pool's machines in index
        // order, each pool's list allocated once (growing 20 lists one push at a time was a tenth of a
        // 100,000-machine plan).
        let mut named_machines: Vec<(&str, u32, &str, usize, &ActualMachine)> = Vec::with_capacity(live_machines.len());
        for &m in &live_machines {
            if !configured(&m.provider) {
                warnings.push(Warning {
                    address: machine_address(m),
                    message: format!("provider `{}` is not in the fleet file; this machine is left alone", m.provider),
                    kind: WarningKind::Other,
                });
                continue;
            }
            let named = m.name().and_then(parse_machine_name).filter(|(t, p, _)| *t == tenant && Some(*p) == m.pool());
            match named {
                Some((_, pool, index)) => {
                    named_machines.push((pool, index, m.instance_id.as_str(), named_machines.len(), m))
                }
                None => warnings.push(Warning {
                    address: machine_address(m),
                    message: format!(
                        "instance `{}` carries this tenant's tags but no valid `{}` tag; it is left alone",
                        m.instance_id,
                        tags::MACHINE
                    ),
                    kind: WarningKind::Other,
                }),
            }
        }
        // Unique keys (the position last), so an unstable sort, which needs no buffer, orders as a stable one.
        named_machines.sort_unstable_by(|a, b| (a.0, a.1, a.2, a.3).cmp(&(b.0, b.1, b.2, b.3)));
        for run in named_machines.chunk_by(|a, b| a.0 == b.0) {
            by_pool.insert(run[0].0, run.iter().map(|x| x.4).collect());
        }
        drop(named_machines);
        let runners = match (&actual.runners, desired.forge) {
            (Some(rs), true) => {
                let mut m: HashMap<&str, &ForgeRunner> =
                    HashMap::with_capacity_and_hasher(rs.len(), Default::default());
                m.extend(rs.iter().map(|r| (r.name.as_str(), r)));
                Some(m)
            }
            (None, true) => {
                warnings.push(Warning {
                    address: "forge".into(),
                    message: "the forge's runners were not read; runner registrations are not planned".into(),
                    kind: WarningKind::Other,
                });
                None
            }
            _ => None,
        };
        let mut occupied: HashMap<String, BTreeSet<u32>> = HashMap::default();
        for u in &actual.unusable {
            let named = u.machine.as_deref().and_then(parse_machine_name).filter(|(t, _, _)| *t == tenant);
            if let Some((_, pool, index)) = named {
                occupied.entry(pool.to_string()).or_default().insert(index);
            }
            warnings.push(Warning {
                address: match named {
                    Some((_, pool, index)) => address(pool, index),
                    None => format!("unusable.{}", u.id),
                },
                message: format!("{}; it is left alone and its name is not reused ({})", u.reason, u.hint),
                kind: WarningKind::Unusable,
            });
        }
        let mut reserved: HashMap<String, BTreeSet<u32>> = HashMap::default();
        let mut other_fleet_names = HashSet::default();
        let mut shared: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
        for o in &actual.other_fleets {
            let Some(name) = o.machine.as_deref() else { continue };
            other_fleet_names.insert(name.to_string());
            if o.fleet.is_empty() {
                let pool = parse_machine_name(name).map(|(_, p, _)| p).unwrap_or("?");
                warnings.push(Warning {
                    address: format!("machine.{}", o.id),
                    message: format!(
                        "`{name}` has no `{}` tag (it was made before nimbus recorded fleets) and its pool `{pool}` is not in this fleet file, so it is left alone; if it is this fleet's, declare pool `{pool}` again (`count: 0` removes it), or tag it with this fleet's id",
                        tags::FLEET
                    ),
                    kind: WarningKind::Other,
                });
            }
            if let Some((t, pool, index)) = parse_machine_name(name)
                && t == tenant
                && !o.fleet.is_empty()
            {
                reserved.entry(pool.to_string()).or_default().insert(index);
                if desired.pools.iter().any(|p| p.name == pool) {
                    shared.entry((pool, o.fleet.as_str())).or_default().push(name.to_string());
                }
            }
        }
        for ((pool, fleet), names) in shared {
            warnings.push(Warning {
                address: format!("pool.{pool}"),
                message: format!(
                    "fleet `{fleet}` has machines of a pool named `{pool}` too ({}); they are left alone, and no machine of pool `{pool}` is created until this is settled: if `{fleet}` is this fleet under another id (a moved file, a checkout without git), set `fleet: {fleet}` or list it in `adopt_fleets`; if they are two fleets, rename one of the pools",
                    names.join(", ")
                ),
                kind: WarningKind::Other,
            });
        }
        let mut hosts_by_machine_tag: HashMap<&str, HostIds> =
            HashMap::with_capacity_and_hasher(hosts.len(), Default::default());
        for h in hosts.values() {
            if let Some(m) = h.tags.get(tags::MACHINE) {
                hosts_by_machine_tag.entry(m).or_default().push(h.id.as_str());
            }
        }
        // In id order, whatever the map's.
        for v in hosts_by_machine_tag.values_mut() {
            v.sort();
        }
        let mut idle_by_kind: HashMap<(String, String, String), Vec<&str>> = HashMap::default();
        // Reusable: available, empty, and past the settling time after a scrub (EC2 Mac hosts are unusable for a
        // few minutes after they report available).
        let settled = |h: &Host| desired.host_settled(h, now);
        let mut idle: Vec<&&Host> = hosts
            .values()
            .filter(|h| h.state == HostState::Available && h.instance_ids.is_empty() && settled(h))
            .collect();
        idle.sort_by(|a, b| (a.allocated_at, &a.id).cmp(&(b.allocated_at, &b.id)));
        for h in idle {
            idle_by_kind
                .entry((h.provider.clone(), h.instance_type.clone(), h.availability_zone.clone()))
                .or_default()
                .push(h.id.as_str());
        }
        Builder {
            desired,
            now,
            graph: DiGraph::new(),
            changes: Vec::new(),
            deferred: Vec::new(),
            warnings,
            hosts,
            claimed_hosts: HashSet::default(),
            idle_by_kind,
            by_pool,
            runners,
            runners_handled: HashSet::default(),
            occupied,
            reserved,
            other_fleet_names,
            known_pools: actual.known_pools.as_ref(),
            teardowns: HashMap::default(),
            hosts_by_machine_tag,
            held_for_jobs: HashSet::default(),
            jobs_interrupted: 0,
            made_unseen: &actual.made_unseen,
            live_machines,
            hosts_per_type: {
                let mut m: HashMap<String, u32> = HashMap::default();
                for h in actual.hosts.iter().filter(|h| h.state != HostState::Released && owned_by(&h.tags, tenant)) {
                    match m.get_mut(h.instance_type.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            m.insert(h.instance_type.clone(), 1);
                        }
                    }
                }
                m
            },
            committed: 0.0,
        }
    }

    fn add(&mut self, address: &str, kind: ActionKind, deps: &[usize]) -> usize {
        let id = self.graph.add_node(Action { address: address.to_string(), kind });
        for d in deps {
            self.graph.add_edge(NodeIndex::new(*d), id, ());
        }
        id.index()
    }

    /// The instance of `name` a recent run made on `provider` that is not visible yet (within the grace).
    fn made_unseen(&self, provider: &str, name: &str) -> Option<&'a MadeUnseen> {
        self.made_unseen.iter().find(|u| {
            u.kind == "instance"
                && u.provider == provider
                && u.machine == name
                && window_end_at(u.made_at, NOT_VISIBLE_GRACE) > self.now
        })
    }

    fn runner(&self, name: &str) -> Option<&'a ForgeRunner> {
        self.runners.as_ref().and_then(|r| r.get(name).copied())
    }

    /// The runner of `name` is running a job.
    fn busy(&self, name: &str) -> bool {
        self.runner(name).is_some_and(|r| r.busy)
    }

    /// Whether a change that removes (or relabels) `name`'s runner must wait for its job: true unless the
    /// user asked to interrupt jobs, in which case the job is counted as one the plan kills.
    fn must_wait_for_job(&mut self, name: &str) -> bool {
        if !self.busy(name) {
            return false;
        }
        if self.desired.interrupt_jobs {
            self.jobs_interrupted += 1;
            return false;
        }
        true
    }

    /// Defers `action` of `address` until the running job of `name` finishes.
    fn defer_for_job(&mut self, address: &str, name: &str, action: ActionKind, what: &str) {
        self.deferred.push(Deferred {
            address: address.to_string(),
            action,
            due_at: None,
            reason: format!("waiting for the running job to finish: `{name}` is busy; {what}"),
            kind: DeferredKind::BusyRunner,
        });
    }

    fn finish(self) -> Plan {
        let mut changes = self.changes;
        changes.sort_by(|x, y| address_key(&x.address).cmp(&address_key(&y.address)));
        let mut deferred = self.deferred;
        deferred.sort_by(|a, b| a.address.cmp(&b.address));
        Plan {
            tenant: self.desired.tenant.clone(),
            planned_at: self.now,
            graph: self.graph,
            changes,
            deferred,
            warnings: self.warnings,
            jobs_interrupted: self.jobs_interrupted,
        }
    }
}

/// Sorts `pool[10]` after `pool[9]` (without allocating: it runs for every comparison).
fn address_key(a: &str) -> (&str, u64) {
    if let Some((p, rest)) = a.split_once('[')
        && let Ok(i) = rest.trim_end_matches(']').parse::<u64>()
    {
        return (p, i);
    }
    (a, 0)
}
