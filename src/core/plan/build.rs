//! The planning algorithm. See the module docs of [`crate::core::plan`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{Value, json};

use super::model::*;
use crate::core::model::*;

/// Why a machine must be replaced, and the attributes that force it.
type Replacement = (String, Vec<String>);

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
    hosts: BTreeMap<&'a str, &'a Host>,
    /// Hosts already spoken for (a kept machine runs on it, it is reused, or released).
    claimed_hosts: HashSet<String>,
    /// Available hosts with no instance, by (provider, type, zone), oldest allocation first.
    idle_by_kind: HashMap<(String, String, String), Vec<String>>,
    /// Owned, live machines by pool tag.
    by_pool: BTreeMap<&'a str, Vec<&'a ActualMachine>>,
    /// Forge runners by name (only when a forge is configured and was read).
    runners: Option<HashMap<&'a str, &'a ForgeRunner>>,
    /// Runner names handled by some chain.
    runners_handled: HashSet<String>,
    /// Machine indexes held by unusable resources, by pool: never reused, never created again.
    occupied: HashMap<String, BTreeSet<u32>>,
    /// The terminate action of each machine being torn down, by name: a new machine of the same name waits for it.
    teardowns: HashMap<String, usize>,
    /// Known hosts by the machine their tag names.
    hosts_by_machine_tag: HashMap<&'a str, Vec<&'a str>>,
}

fn window_end(desired: &Desired, host: &Host) -> DateTime<Utc> {
    // Hosts of providers not in the fleet file are never planned for; should one get here, it is never due.
    let Some(p) = desired.providers.get(&host.provider) else { return DateTime::<Utc>::MAX_UTC };
    let w = p.min_allocation_for(&host.instance_type);
    host.allocated_at + chrono::Duration::from_std(w).unwrap_or(chrono::Duration::MAX)
}

fn machine_index(m: &ActualMachine) -> Option<u32> {
    m.name().and_then(parse_machine_name).map(|(_, _, i)| i)
}

fn address(pool: &str, index: u32) -> String {
    format!("{pool}[{index}]")
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
        let hosts: BTreeMap<&str, &Host> = actual
            .hosts
            .iter()
            .filter(|h| owned_by(&h.tags, tenant) && configured(&h.provider) && h.state != HostState::Released)
            .map(|h| (h.id.as_str(), h))
            .collect();
        let mut by_pool: BTreeMap<&str, Vec<&ActualMachine>> = BTreeMap::new();
        let mut warnings = Vec::new();
        for m in actual.machines.iter().filter(|m| owned_by(&m.tags, tenant) && !m.state.is_gone()) {
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
                Some((_, pool, _)) => by_pool.entry(pool).or_default().push(m),
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
        for v in by_pool.values_mut() {
            v.sort_by_key(|m| (machine_index(m), m.instance_id.clone()));
        }
        let runners = match (&actual.runners, desired.forge) {
            (Some(rs), true) => Some(rs.iter().map(|r| (r.name.as_str(), r)).collect()),
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
        let mut occupied: HashMap<String, BTreeSet<u32>> = HashMap::new();
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
        let mut hosts_by_machine_tag: HashMap<&str, Vec<&str>> = HashMap::new();
        for h in hosts.values() {
            if let Some(m) = h.tags.get(tags::MACHINE) {
                hosts_by_machine_tag.entry(m.as_str()).or_default().push(h.id.as_str());
            }
        }
        let mut idle_by_kind: HashMap<(String, String, String), Vec<String>> = HashMap::new();
        let mut idle: Vec<&&Host> =
            hosts.values().filter(|h| h.state == HostState::Available && h.instance_ids.is_empty()).collect();
        idle.sort_by_key(|h| (h.allocated_at, h.id.clone()));
        for h in idle {
            idle_by_kind
                .entry((h.provider.clone(), h.instance_type.clone(), h.availability_zone.clone()))
                .or_default()
                .push(h.id.clone());
        }
        Builder {
            desired,
            now,
            graph: DiGraph::new(),
            changes: Vec::new(),
            deferred: Vec::new(),
            warnings,
            hosts,
            claimed_hosts: HashSet::new(),
            idle_by_kind,
            by_pool,
            runners,
            runners_handled: HashSet::new(),
            occupied,
            teardowns: HashMap::new(),
            hosts_by_machine_tag,
        }
    }

    fn add(&mut self, address: &str, kind: ActionKind, deps: &[usize]) -> usize {
        let id = self.graph.add_node(Action { address: address.to_string(), kind });
        for d in deps {
            self.graph.add_edge(NodeIndex::new(*d), id, ());
        }
        id.index()
    }

    fn runner(&self, name: &str) -> Option<&'a ForgeRunner> {
        self.runners.as_ref().and_then(|r| r.get(name).copied())
    }

    fn host_releasable_now(&self, host_id: Option<&str>) -> bool {
        match host_id.and_then(|h| self.hosts.get(h)) {
            Some(h) => window_end(self.desired, h) <= self.now,
            None => true,
        }
    }

    fn run(&mut self) {
        let desired = self.desired;
        let mut pools: Vec<&DesiredPool> = desired.pools.iter().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        // Hosts that kept machines run on are not idle.
        for p in &pools {
            for m in self.by_pool.get(p.name.as_str()).into_iter().flatten() {
                if let Some(h) = &m.host_id {
                    self.claimed_hosts.insert(h.clone());
                }
            }
        }
        let wanted: BTreeSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();

        // Destroy orphans first, so the hosts they free are accounted for.
        let orphan_pools: Vec<&str> = self.by_pool.keys().copied().filter(|p| !wanted.contains(p)).collect();
        for pool in orphan_pools {
            let ms = self.by_pool.get(pool).cloned().unwrap_or_default();
            for m in ms {
                self.destroy(m, format!("pool `{pool}` is no longer in the fleet file"));
            }
        }
        for p in pools {
            self.plan_pool(p);
        }
        self.ghost_runners();
        self.idle_hosts();
    }

    fn plan_pool(&mut self, pool: &'a DesiredPool) {
        let existing: Vec<&'a ActualMachine> = self.by_pool.get(pool.name.as_str()).cloned().unwrap_or_default();
        let (same_provider, moved): (Vec<_>, Vec<_>) = existing.into_iter().partition(|m| m.provider == pool.provider);
        for m in moved {
            self.destroy(
                m,
                format!(
                    "pool `{}` moved from provider `{}` to `{}` in the fleet file: this machine is destroyed on `{}` and created again on `{}`",
                    pool.name, m.provider, pool.provider, m.provider, pool.provider
                ),
            );
        }

        // Which machines stay: drop those needing replacement first, then those whose hosts can be released now,
        // then the highest indexes.
        let mut ranked: Vec<(&'a ActualMachine, Option<Replacement>)> =
            same_provider.into_iter().map(|m| (m, self.replacement_reason(pool, m))).collect();
        let count = pool.count as usize;
        let mut removed = Vec::new();
        if ranked.len() > count {
            let mut order: Vec<usize> = (0..ranked.len()).collect();
            order.sort_by_key(|&i| {
                let (m, repl) = &ranked[i];
                (repl.is_none(), !self.host_releasable_now(m.host_id.as_deref()), std::cmp::Reverse(machine_index(m)))
            });
            let drop: HashSet<usize> = order.into_iter().take(ranked.len() - count).collect();
            let mut keep = Vec::new();
            for (i, r) in ranked.into_iter().enumerate() {
                if drop.contains(&i) { removed.push(r.0) } else { keep.push(r) }
            }
            ranked = keep;
        }
        let total = ranked.len() + removed.len();
        for m in removed {
            self.destroy(m, format!("pool `{}` scales from {} to {}", pool.name, total, pool.count));
        }
        let mut used: BTreeSet<u32> = ranked.iter().filter_map(|(m, _)| machine_index(m)).collect();
        // Unusable machines of this pool exist: they count, and their names stay theirs.
        let held: BTreeSet<u32> = self.occupied.get(&pool.name).cloned().unwrap_or_default();
        let held_only = held.difference(&used).count();
        used.extend(held);
        for (m, repl) in ranked.iter().cloned() {
            match repl {
                Some((reason, paths)) => self.replace(pool, m, reason, paths),
                None => self.converge(pool, m),
            }
        }
        let missing = count.saturating_sub(ranked.len() + held_only);
        let mut next = 0u32;
        for _ in 0..missing {
            while used.contains(&next) {
                next += 1;
            }
            used.insert(next);
            self.create(pool, next, format!("pool `{}` wants {} machine(s)", pool.name, pool.count));
        }
    }

    /// Why a kept machine must be replaced, and which attributes force it.
    fn replacement_reason(&self, pool: &DesiredPool, m: &ActualMachine) -> Option<Replacement> {
        let s = &pool.spec;
        let mut paths = Vec::new();
        let mut why = Vec::new();
        if m.image != s.image {
            paths.push("image".to_string());
            why.push(format!("image changes from `{}` to `{}`", m.image, s.image));
        }
        if s.instance_type.is_some() && m.instance_type != s.instance_type {
            paths.push("instance_type".to_string());
            why.push(format!(
                "instance type changes from `{}` to `{}`",
                m.instance_type.as_deref().unwrap_or("-"),
                s.instance_type.as_deref().unwrap_or("-")
            ));
        }
        if s.availability_zone.is_some() && m.availability_zone != s.availability_zone {
            paths.push("availability_zone".to_string());
            why.push(format!(
                "availability zone changes from `{}` to `{}`",
                m.availability_zone.as_deref().unwrap_or("-"),
                s.availability_zone.as_deref().unwrap_or("-")
            ));
        }
        if matches!(m.state, InstanceState::Stopped | InstanceState::Stopping) {
            paths.push("state".to_string());
            why.push("the instance is stopped".to_string());
        }
        if why.is_empty() { None } else { Some((why.join("; "), paths)) }
    }

    fn machine_after(&self, pool: &DesiredPool, host: Value) -> Value {
        json!({
            "pool": pool.name,
            "provider": pool.provider,
            "os": pool.spec.os,
            "arch": pool.spec.arch,
            "image": pool.spec.image,
            "instance_type": pool.spec.instance_type,
            "availability_zone": pool.spec.availability_zone,
            "host": host,
            "labels": if self.desired.forge { pool.runner.as_ref().map(|r| json!(r.labels)) } else { None },
            "setup": pool.setup.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        })
    }

    fn machine_before(&self, m: &ActualMachine) -> Value {
        let (labels, setup) = match &m.on_machine {
            OnMachine::Read { state } => (
                state.runner.as_ref().map(|r| json!(r.labels)),
                json!(
                    state
                        .steps
                        .iter()
                        .filter(|s| s.status == StepStatus::Done)
                        .map(|s| s.name.clone())
                        .collect::<Vec<_>>()
                ),
            ),
            _ => (None, Value::Null),
        };
        let labels = m.name().and_then(|n| self.runner(n)).map(|r| json!(r.labels)).or(labels);
        json!({
            "pool": m.pool(),
            "provider": m.provider,
            "instance_id": m.instance_id,
            "state": m.state,
            "image": m.image,
            "instance_type": m.instance_type,
            "availability_zone": m.availability_zone,
            "host": m.host_id,
            "labels": labels,
            "setup": setup,
        })
    }

    /// Allocates (or reuses) a host when the pool needs one. Returns the host ref and the actions to wait for.
    fn host_for(&mut self, pool: &DesiredPool, name: &str, addr: &str) -> (Option<HostRef>, Vec<usize>, Value) {
        let provider = &self.desired.providers[&pool.provider];
        if !provider.needs_host(pool.spec.instance_type.as_deref()) {
            return (None, Vec::new(), Value::Null);
        }
        let itype = pool.spec.instance_type.clone().unwrap_or_default();
        let az = pool.spec.availability_zone.clone().unwrap_or_default();
        let kind = (pool.provider.clone(), itype.clone(), az.clone());
        // An idle host left tagged for this very machine (a killed apply allocated it) comes first.
        let tagged = self.hosts_by_machine_tag.get(name).into_iter().flatten().copied().find(|id| {
            !self.claimed_hosts.contains(*id) && self.idle_by_kind.get(&kind).is_some_and(|v| v.iter().any(|x| x == id))
        });
        // Then an idle host of the same type and zone; the one allocated last (the most paid-for time left).
        let idle = match tagged {
            Some(id) => Some(id.to_string()),
            None => self.idle_by_kind.get_mut(&kind).and_then(|v| {
                while let Some(id) = v.pop() {
                    if !self.claimed_hosts.contains(&id) {
                        return Some(id);
                    }
                }
                None
            }),
        };
        if let Some(id) = idle {
            self.claimed_hosts.insert(id.clone());
            return (Some(HostRef::Existing { host_id: id.clone() }), Vec::new(), json!(id));
        }
        let a = self.add(
            addr,
            ActionKind::AllocateHost {
                provider: pool.provider.clone(),
                pool: pool.name.clone(),
                machine: name.to_string(),
                instance_type: itype,
                availability_zone: az,
                exclude_hosts: {
                    let mut v: Vec<String> =
                        self.hosts_by_machine_tag.get(name).into_iter().flatten().map(|h| h.to_string()).collect();
                    v.sort();
                    v
                },
            },
            &[],
        );
        (Some(HostRef::Allocated { action: a }), vec![a], json!("(new dedicated host)"))
    }

    /// Launch → wait → setup → register, after `deps`. Returns the action ids.
    fn bring_up(
        &mut self,
        pool: &DesiredPool,
        name: &str,
        addr: &str,
        host: Option<HostRef>,
        deps: Vec<usize>,
    ) -> Vec<usize> {
        let mut ids = Vec::new();
        let mut deps = deps;
        // A machine of the same name going away (its pool moved provider) must be gone first.
        if let Some(t) = self.teardowns.get(name).copied()
            && !deps.contains(&t)
        {
            deps.push(t);
        }
        let launch = self.add(
            addr,
            ActionKind::LaunchInstance {
                provider: pool.provider.clone(),
                pool: pool.name.clone(),
                machine: name.to_string(),
                spec: pool.spec.clone(),
                host,
            },
            &deps,
        );
        ids.push(launch);
        let wait = self.add(
            addr,
            ActionKind::WaitReachable { provider: pool.provider.clone(), machine: name.to_string() },
            &[launch],
        );
        ids.push(wait);
        let mut last = wait;
        if !pool.setup.is_empty() {
            last = self.add(
                addr,
                ActionKind::RunSetup {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.to_string(),
                    steps: pool.setup.iter().map(|s| StepRef { name: s.name.clone(), hash: s.hash.clone() }).collect(),
                },
                &[wait],
            );
            ids.push(last);
        }
        if let (Some(r), true) = (&pool.runner, self.runners.is_some()) {
            let mut deps = vec![last];
            // A stale runner of the same name must go first (unless a teardown already does that).
            if let Some(old) = self.runner(name).filter(|_| !self.runners_handled.contains(name)) {
                let d = self.add(
                    addr,
                    ActionKind::DeregisterRunner { runner_id: old.id, runner_name: old.name.clone() },
                    &[],
                );
                ids.push(d);
                deps.push(d);
                self.runners_handled.insert(name.to_string());
            }
            ids.push(self.add(
                addr,
                ActionKind::RegisterRunner {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.to_string(),
                    labels: r.labels.clone(),
                    mode: r.mode,
                },
                &deps,
            ));
        }
        ids
    }

    fn create(&mut self, pool: &DesiredPool, index: u32, reason: String) {
        let name = machine_name(&self.desired.tenant, &pool.name, index);
        let addr = address(&pool.name, index);
        let (host, deps, host_attr) = self.host_for(pool, &name, &addr);
        let mut ids = deps.clone();
        ids.extend(self.bring_up(pool, &name, &addr, host, deps));
        ids.sort_unstable();
        self.changes.push(ResourceChange {
            address: addr,
            kind: ResourceKind::Machine,
            name,
            pool: Some(pool.name.clone()),
            actions: vec![ChangeAction::Create],
            reason,
            before: None,
            after: Some(self.machine_after(pool, host_attr)),
            replace_paths: Vec::new(),
            run_steps: pool.setup.iter().map(|s| s.name.clone()).collect(),
            action_ids: ids,
        });
    }

    /// Deregister → terminate; returns (ids, terminate id).
    fn tear_down(&mut self, m: &'a ActualMachine, addr: &str) -> (Vec<usize>, usize) {
        let mut ids = Vec::new();
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let mut deps = Vec::new();
        if let Some(r) = self.runner(&name) {
            let d = self.add(addr, ActionKind::DeregisterRunner { runner_id: r.id, runner_name: r.name.clone() }, &[]);
            ids.push(d);
            deps.push(d);
            self.runners_handled.insert(name.clone());
        }
        let t = self.add(
            addr,
            ActionKind::TerminateInstance {
                provider: m.provider.clone(),
                machine: name,
                instance_id: m.instance_id.clone(),
            },
            &deps,
        );
        ids.push(t);
        if let Some(n) = m.name() {
            self.teardowns.insert(n.to_string(), t);
        }
        (ids, t)
    }

    /// Releases a host after `after`, or defers it while inside its window.
    fn release_or_defer(&mut self, host_id: &str, after: &[usize], ids: &mut Vec<usize>) {
        let Some(h) = self.hosts.get(host_id).copied() else { return };
        self.claimed_hosts.insert(h.id.clone());
        let due = window_end(self.desired, h);
        let addr = format!("host.{}", h.id);
        let kind = ActionKind::ReleaseHost { provider: h.provider.clone(), host_id: h.id.clone() };
        if due > self.now {
            self.deferred.push(Deferred {
                address: addr,
                action: kind,
                due_at: Some(due),
                reason: format!(
                    "host allocated at {} is inside its minimum allocation window",
                    h.allocated_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            });
        } else {
            ids.push(self.add(&addr, kind, after));
        }
    }

    fn destroy(&mut self, m: &'a ActualMachine, reason: String) {
        let addr = machine_address(m);
        let (mut ids, t) = self.tear_down(m, &addr);
        if let Some(h) = m.host_id.clone() {
            self.release_or_defer(&h, &[t], &mut ids);
        }
        self.changes.push(ResourceChange {
            address: addr,
            kind: ResourceKind::Machine,
            name: m.name().unwrap_or(&m.instance_id).to_string(),
            pool: m.pool().map(str::to_string),
            actions: vec![ChangeAction::Delete],
            reason,
            before: Some(self.machine_before(m)),
            after: None,
            replace_paths: Vec::new(),
            run_steps: Vec::new(),
            action_ids: ids,
        });
    }

    fn replace(&mut self, pool: &DesiredPool, m: &'a ActualMachine, reason: String, paths: Vec<String>) {
        let addr = machine_address(m);
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let (mut ids, t) = self.tear_down(m, &addr);
        // Keep the host when it still fits; otherwise let it go and find another.
        let keep_host = m.host_id.as_ref().filter(|h| {
            self.hosts.get(h.as_str()).is_some_and(|h| {
                Some(&h.instance_type) == pool.spec.instance_type.as_ref()
                    && Some(&h.availability_zone) == pool.spec.availability_zone.as_ref()
            })
        });
        let (host, mut deps, host_attr) = match keep_host {
            Some(h) => (Some(HostRef::Existing { host_id: h.clone() }), vec![], json!(h)),
            None => {
                if let Some(h) = m.host_id.clone() {
                    self.release_or_defer(&h, &[t], &mut ids);
                }
                self.host_for(pool, &name, &addr)
            }
        };
        ids.extend(deps.iter().copied());
        deps.push(t);
        ids.extend(self.bring_up(pool, &name, &addr, host, deps));
        ids.sort_unstable();
        self.changes.push(ResourceChange {
            address: addr,
            kind: ResourceKind::Machine,
            name,
            pool: Some(pool.name.clone()),
            actions: vec![ChangeAction::Delete, ChangeAction::Create],
            reason,
            before: Some(self.machine_before(m)),
            after: Some(self.machine_after(pool, host_attr)),
            replace_paths: paths,
            run_steps: pool.setup.iter().map(|s| s.name.clone()).collect(),
            action_ids: ids,
        });
    }

    /// In-place changes for a kept machine: unfinished or changed setup steps, runner registration and labels.
    fn converge(&mut self, pool: &DesiredPool, m: &'a ActualMachine) {
        let addr = machine_address(m);
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let mut bad_state = None;
        let state = match (&m.on_machine, m.state) {
            (OnMachine::Read { state }, _) => state.clone(),
            (OnMachine::Unreachable { reason }, _) => {
                self.warnings.push(Warning {
                    address: addr,
                    message: format!("`{name}` is unreachable ({reason}); its setup and runner cannot be checked"),
                    kind: WarningKind::Unreachable,
                });
                return;
            }
            // The machine answered but its state database is empty or damaged: rewrite it, then set up again.
            (OnMachine::BadState { reason }, _) => {
                bad_state = Some(reason.clone());
                MachineState::default()
            }
            // Launched but never set up (an apply stopped early): continue from the start.
            (OnMachine::NotRead, InstanceState::Pending) => MachineState::default(),
            // Nothing on the machine to check for this pool.
            (OnMachine::NotRead, _) if pool.setup.is_empty() && (pool.runner.is_none() || self.runners.is_none()) => {
                return;
            }
            (OnMachine::NotRead, _) => {
                self.warnings.push(Warning {
                    address: addr,
                    message: format!("the state of `{name}` was not read; its setup and runner were not checked"),
                    kind: WarningKind::Other,
                });
                return;
            }
        };
        let mut ids = Vec::new();
        let mut why = Vec::new();
        let mut last = None;
        if m.state == InstanceState::Pending {
            let w = self.add(
                &addr,
                ActionKind::WaitReachable { provider: pool.provider.clone(), machine: name.clone() },
                &[],
            );
            ids.push(w);
            last = Some(w);
        }
        if let Some(reason) = &bad_state {
            why.push(format!("{reason}; it is replaced by a fresh one and every setup step runs again from the first"));
            let deps: Vec<usize> = last.into_iter().collect();
            let r = self.add(
                &addr,
                ActionKind::RepairState { provider: pool.provider.clone(), machine: name.clone() },
                &deps,
            );
            ids.push(r);
            last = Some(r);
        }
        // Resume from the first step that is not done with the same script.
        let first_todo = pool.setup.iter().position(|s| {
            !state.steps.iter().any(|r| r.name == s.name && r.hash == s.hash && r.status == StepStatus::Done)
        });
        let mut run_steps = Vec::new();
        if let Some(i) = first_todo {
            let steps: Vec<StepRef> =
                pool.setup[i..].iter().map(|s| StepRef { name: s.name.clone(), hash: s.hash.clone() }).collect();
            for s in &steps {
                let old = state.steps.iter().find(|r| r.name == s.name);
                let what = match old {
                    None => "new",
                    Some(r) if r.status == StepStatus::Failed => "failed before",
                    Some(r) if r.status == StepStatus::Running => "interrupted",
                    Some(r) if r.hash != s.hash => "changed",
                    Some(_) => "after a changed step",
                };
                why.push(format!("setup step `{}` ({what})", s.name));
                run_steps.push(s.name.clone());
            }
            let deps: Vec<usize> = last.into_iter().collect();
            let s = self.add(
                &addr,
                ActionKind::RunSetup {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.clone(),
                    steps,
                },
                &deps,
            );
            ids.push(s);
            last = Some(s);
        }
        if self.runners.is_some() {
            let registered = self.runner(&name);
            match (&pool.runner, registered) {
                (Some(r), None) => {
                    why.push("runner is not registered".to_string());
                    let deps: Vec<usize> = last.into_iter().collect();
                    ids.push(self.add(
                        &addr,
                        ActionKind::RegisterRunner {
                            provider: pool.provider.clone(),
                            pool: pool.name.clone(),
                            machine: name.clone(),
                            labels: r.labels.clone(),
                            mode: r.mode,
                        },
                        &deps,
                    ));
                }
                (Some(r), Some(fr)) => {
                    self.runners_handled.insert(name.clone());
                    if !same_labels(&r.labels, &fr.labels) {
                        why.push("runner labels change".to_string());
                        ids.push(self.add(
                            &addr,
                            ActionKind::UpdateRunnerLabels {
                                machine: name.clone(),
                                runner_id: fr.id,
                                labels: r.labels.clone(),
                                previous: fr.labels.clone(),
                            },
                            &[],
                        ));
                    }
                }
                (None, Some(fr)) => {
                    self.runners_handled.insert(name.clone());
                    why.push("the pool no longer has a runner".to_string());
                    ids.push(self.add(
                        &addr,
                        ActionKind::DeregisterRunner { runner_id: fr.id, runner_name: fr.name.clone() },
                        &[],
                    ));
                }
                (None, None) => {}
            }
        }
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        let host_attr = json!(m.host_id);
        let mut after = self.machine_after(pool, host_attr);
        if let Some(o) = after.as_object_mut() {
            o.insert("instance_id".into(), json!(m.instance_id));
            o.insert("state".into(), json!(m.state));
        }
        self.changes.push(ResourceChange {
            address: addr,
            kind: ResourceKind::Machine,
            name,
            pool: Some(pool.name.clone()),
            actions: vec![ChangeAction::Update],
            reason: why.join("; "),
            before: Some(self.machine_before(m)),
            after: Some(after),
            replace_paths: Vec::new(),
            run_steps,
            action_ids: ids,
        });
    }

    /// Runners that carry this tenant's names but have no machine.
    fn ghost_runners(&mut self) {
        let Some(runners) = self.runners.clone() else { return };
        let tenant = self.desired.tenant.clone();
        // A runner whose machine exists is never a ghost, even when that machine is unreachable.
        let live: HashSet<&str> = self.by_pool.values().flatten().filter_map(|m| m.name()).collect();
        let mut ghosts: Vec<&ForgeRunner> = runners
            .values()
            .copied()
            .filter(|r| parse_machine_name(&r.name).is_some_and(|(t, _, _)| t == tenant))
            .filter(|r| !self.runners_handled.contains(&r.name) && !live.contains(r.name.as_str()))
            .collect();
        ghosts.sort_by_key(|r| (r.name.clone(), r.id));
        for r in ghosts {
            let addr = format!("runner.{}", r.name);
            let id =
                self.add(&addr, ActionKind::DeregisterRunner { runner_id: r.id, runner_name: r.name.clone() }, &[]);
            self.changes.push(ResourceChange {
                address: addr,
                kind: ResourceKind::Runner,
                name: r.name.clone(),
                pool: parse_machine_name(&r.name).map(|(_, p, _)| p.to_string()),
                actions: vec![ChangeAction::Delete],
                reason: "runner is registered but has no machine".into(),
                before: Some(json!({ "id": r.id, "labels": r.labels, "online": r.online })),
                after: None,
                replace_paths: Vec::new(),
                run_steps: Vec::new(),
                action_ids: vec![id],
            });
        }
    }

    /// Owned hosts with no instance that nothing claimed: release when due, else defer.
    fn idle_hosts(&mut self) {
        let idle: Vec<&'a Host> = self
            .hosts
            .values()
            .copied()
            .filter(|h| h.instance_ids.is_empty() && !self.claimed_hosts.contains(&h.id))
            .collect();
        for h in idle {
            let addr = format!("host.{}", h.id);
            let due = window_end(self.desired, h);
            match h.state {
                HostState::Available => {
                    let mut ids = Vec::new();
                    self.release_or_defer(&h.id, &[], &mut ids);
                    if !ids.is_empty() {
                        self.changes.push(ResourceChange {
                            address: addr,
                            kind: ResourceKind::Host,
                            name: h.id.clone(),
                            pool: h.tags.get(tags::POOL).cloned(),
                            actions: vec![ChangeAction::Delete],
                            reason: "host is idle and past its minimum allocation window".into(),
                            before: Some(host_attrs(h)),
                            after: None,
                            replace_paths: Vec::new(),
                            run_steps: Vec::new(),
                            action_ids: ids,
                        });
                    }
                }
                HostState::Pending => self.deferred.push(Deferred {
                    address: addr,
                    action: ActionKind::ReleaseHost { provider: h.provider.clone(), host_id: h.id.clone() },
                    due_at: Some(due).filter(|d| *d > self.now),
                    reason: "host is being scrubbed; it can be reused or released once it is available".into(),
                }),
                HostState::UnderAssessment | HostState::PermanentFailure => self.warnings.push(Warning {
                    address: addr,
                    message: format!("host `{}` is {:?}; nimbus leaves it to the provider", h.id, h.state),
                    kind: WarningKind::Other,
                }),
                HostState::Released => {}
            }
        }
    }

    fn finish(self) -> Plan {
        let mut changes = self.changes;
        changes.sort_by_key(|a| address_key(&a.address));
        let mut deferred = self.deferred;
        deferred.sort_by(|a, b| a.address.cmp(&b.address));
        Plan {
            tenant: self.desired.tenant.clone(),
            planned_at: self.now,
            graph: self.graph,
            changes,
            deferred,
            warnings: self.warnings,
        }
    }
}

/// Sorts `pool[10]` after `pool[9]`.
fn address_key(a: &str) -> (String, u64, String) {
    if let Some((p, rest)) = a.split_once('[')
        && let Ok(i) = rest.trim_end_matches(']').parse::<u64>()
    {
        return (p.to_string(), i, String::new());
    }
    (a.to_string(), 0, String::new())
}

fn host_attrs(h: &Host) -> Value {
    json!({
        "instance_type": h.instance_type,
        "availability_zone": h.availability_zone,
        "state": h.state,
        "allocated_at": h.allocated_at,
    })
}

/// Forge labels compare case-insensitively and as sets.
fn same_labels(a: &[String], b: &[String]) -> bool {
    let norm = |v: &[String]| v.iter().map(|s| s.to_lowercase()).collect::<BTreeSet<_>>();
    norm(a) == norm(b)
}
