//! The simulated world the planner's plans are applied to: a provider and a forge that do what the real peers
//! do, and refuse what they refuse (a busy runner removed, a host released inside its window, two instances
//! on one host, an instance on a host that is scrubbing or settling). Used by `nimbus simulate` and the tests.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use petgraph::algo::toposort;

use crate::core::model::*;
use crate::core::plan::{ActionKind, HostRef, Plan};

/// Applies `plan` to `world` as of `now`, the way real peers would.
pub struct Simulator {
    next_id: u64,
}

impl Default for Simulator {
    fn default() -> Self {
        Simulator { next_id: 1 }
    }
}

impl Simulator {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-sim{:05}", self.next_id)
    }

    pub fn apply(&mut self, desired: &Desired, world: &mut Actual, plan: &Plan, now: DateTime<Utc>) {
        self.apply_prefix(desired, world, plan, now, usize::MAX);
    }

    /// Applies only the first `limit` actions (in a dependency order), as an apply killed at that point
    /// would leave the world.
    pub fn apply_prefix(
        &mut self,
        desired: &Desired,
        world: &mut Actual,
        plan: &Plan,
        now: DateTime<Utc>,
        limit: usize,
    ) {
        let order = toposort(&plan.graph, None).expect("the plan is a DAG");
        let mut allocated: HashMap<usize, String> = HashMap::new();
        // Lookups by name and id are indexed (a world of 100,000 machines must not take quadratic time).
        let mut live: HashMap<String, usize> = HashMap::new();
        let mut by_instance: HashMap<String, usize> = HashMap::new();
        for (i, m) in world.machines.iter().enumerate() {
            by_instance.insert(m.instance_id.clone(), i);
            // Of two copies of one name, the first (as discovery lists them) is the one reached by name.
            if let Some(n) = m.name().filter(|_| !m.state.is_gone()) {
                live.entry(n.to_string()).or_insert(i);
            }
        }
        let mut host_at: HashMap<String, usize> = HashMap::new();
        let mut hosts_tagged: HashMap<String, Vec<usize>> = HashMap::new();
        let mut host_of_instance: HashMap<String, usize> = HashMap::new();
        for (i, h) in world.hosts.iter().enumerate() {
            host_at.insert(h.id.clone(), i);
            if let Some(m) = h.tags.get(tags::MACHINE) {
                hosts_tagged.entry(m.to_string()).or_default().push(i);
            }
            for inst in &h.instance_ids {
                host_of_instance.insert(inst.clone(), i);
            }
        }
        let mut runner_at: HashMap<String, usize> = HashMap::new();
        let mut runner_by_id: HashMap<u64, usize> = HashMap::new();
        for (i, r) in world.runners.iter().flatten().enumerate() {
            runner_at.insert(r.name.clone(), i);
            runner_by_id.insert(r.id, i);
        }
        let mut deregistered: std::collections::HashSet<u64> = Default::default();
        for idx in order.into_iter().take(limit) {
            let action = &plan.graph[idx];
            match &action.kind {
                ActionKind::AllocateHost {
                    provider,
                    pool,
                    machine,
                    instance_type,
                    availability_zone,
                    exclude_hosts,
                    ..
                } => {
                    // As the provider does: a host already tagged for this machine (a killed run's) is found by
                    // its tag, unless the plan excluded it.
                    let found = hosts_tagged.get(machine).into_iter().flatten().map(|i| &world.hosts[*i]).find(|h| {
                        h.provider == *provider
                            && owned_by(&h.tags, &desired.tenant)
                            && h.tags.get(tags::MACHINE) == Some(machine)
                            && h.instance_ids.is_empty()
                            && h.state == HostState::Available
                            && h.instance_type == *instance_type
                            && h.availability_zone == *availability_zone
                            && !exclude_hosts.contains(&h.id)
                    });
                    if let Some(h) = found {
                        allocated.insert(idx.index(), h.id.clone());
                        continue;
                    }
                    let id = self.id("h");
                    allocated.insert(idx.index(), id.clone());
                    host_at.insert(id.clone(), world.hosts.len());
                    hosts_tagged.entry(machine.clone()).or_default().push(world.hosts.len());
                    world.hosts.push(Host {
                        provider: provider.clone(),
                        id,
                        tags: with_user_tags(
                            &desired
                                .pools
                                .iter()
                                .find(|p| &p.name == pool)
                                .map(|p| p.spec.tags.clone())
                                .unwrap_or_default(),
                            machine_tags(&desired.tenant, provider, pool, machine, None),
                        ),
                        instance_type: instance_type.clone(),
                        availability_zone: availability_zone.clone(),
                        state: HostState::Available,
                        allocated_at: now,
                        available_since: None,
                        instance_ids: vec![],
                    });
                }
                ActionKind::LaunchInstance { provider, pool, machine, spec, host } => {
                    assert!(!live.contains_key(machine), "duplicate machine {machine}");
                    let instance_id = self.id("i");
                    let host_id = host.as_ref().map(|h| match h {
                        HostRef::Existing { host_id } => host_id.clone(),
                        HostRef::Allocated { action } => allocated[action].clone(),
                    });
                    if let Some(hid) = &host_id {
                        let at = *host_at.get(hid).expect("host exists");
                        host_of_instance.insert(instance_id.clone(), at);
                        hosts_tagged.entry(machine.clone()).or_default().push(at);
                        let h = &mut world.hosts[at];
                        assert!(h.instance_ids.is_empty(), "host {hid} already has an instance");
                        assert_eq!(h.state, HostState::Available, "host {hid} is not available (scrubbing?)");
                        assert!(desired.host_settled(h, now), "host {hid} was used before it settled after its scrub");
                        assert_eq!(Some(&h.instance_type), spec.instance_type.as_ref());
                        h.instance_ids.push(instance_id.clone());
                        h.tags =
                            with_user_tags(&spec.tags, machine_tags(&desired.tenant, provider, pool, machine, None));
                    }
                    live.insert(machine.clone(), world.machines.len());
                    by_instance.insert(instance_id.clone(), world.machines.len());
                    world.machines.push(ActualMachine {
                        provider: provider.as_str().into(),
                        instance_id,
                        // The user's tags, and nimbus's own (which win), as the providers tag.
                        tags: with_user_tags(&spec.tags, machine_tags(&desired.tenant, provider, pool, machine, None)),
                        state: InstanceState::Running,
                        image: spec.image.as_str().into(),
                        instance_type: spec.instance_type.as_deref().map(Sym::from),
                        availability_zone: spec.availability_zone.as_deref().map(Sym::from),
                        host_id,
                        launched_at: now,
                        address: None,
                        on_machine: OnMachine::Read { state: MachineState::default() },
                        unreachable_since: None,
                    });
                }
                ActionKind::WaitReachable { .. } => {}
                ActionKind::ReimageMachine { machine, image, .. } => {
                    let m = live_mut(world, &live, machine);
                    assert_eq!(m.state, InstanceState::Running, "reimaged {machine} while it was not running");
                    m.image = image.as_str().into();
                    m.on_machine = OnMachine::Read { state: MachineState::default() };
                }
                ActionKind::RestartRunner { machine, .. } => {
                    if let (Some(i), Some(rs)) = (runner_at.get(machine), world.runners.as_mut()) {
                        rs[*i].online = true;
                        rs[*i].offline_since = None;
                    }
                }
                ActionKind::UpdateRunnerAgent { machine, to, .. } => {
                    let busy =
                        runner_at.get(machine).is_some_and(|i| world.runners.as_ref().is_some_and(|rs| rs[*i].busy));
                    assert!(!busy, "updated the agent of {machine} under a job");
                    if let OnMachine::Read { state } = &mut live_mut(world, &live, machine).on_machine
                        && let Some(r) = &mut state.runner
                    {
                        r.agent_version = Some(to.clone());
                    }
                }
                ActionKind::RepairState { machine, .. } => {
                    live_mut(world, &live, machine).on_machine = OnMachine::Read { state: MachineState::default() };
                }
                ActionKind::UpdateTags { machine, host_id, set, remove, .. } => {
                    let m = live_mut(world, &live, machine);
                    for k in remove {
                        assert!(!crate::core::model::is_reserved_tag(k), "removed reserved tag {k} of {machine}");
                        m.tags.remove(k);
                    }
                    m.tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                    if let Some(h) = host_id
                        && let Some(h) = world.hosts.iter_mut().find(|x| &x.id == h)
                    {
                        for k in remove {
                            h.tags.remove(k);
                        }
                        h.tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                ActionKind::RunSetup { machine, steps, .. } => {
                    let m = live_mut(world, &live, machine);
                    let OnMachine::Read { state } = &mut m.on_machine else { panic!("setup on unread machine") };
                    for s in steps {
                        state.steps.retain(|r| r.name != s.name);
                        state.steps.push(StepRecord {
                            name: s.name.clone(),
                            hash: s.hash.clone(),
                            status: StepStatus::Done,
                        });
                    }
                }
                ActionKind::RegisterRunner { machine, labels, pool, .. } => {
                    // The machine records its runner (as the agent install does), no secret in it, and the agent
                    // release the forge installs.
                    let agent_version = desired
                        .pools
                        .iter()
                        .find(|p| &p.name == pool)
                        .and_then(|p| p.runner.as_ref())
                        .and_then(|r| r.agent_version.clone());
                    if let OnMachine::Read { state } = &mut live_mut(world, &live, machine).on_machine {
                        state.runner = Some(RunnerRecord {
                            name: machine.clone(),
                            labels: labels.clone(),
                            runner_id: None,
                            agent_version,
                        });
                    }
                    let runners = world.runners.get_or_insert_with(Vec::new);
                    assert!(
                        runner_at.get(machine).is_none_or(|i| deregistered.contains(&runners[*i].id)),
                        "runner {machine} registered twice"
                    );
                    self.next_id += 1;
                    runner_at.insert(machine.clone(), runners.len());
                    runner_by_id.insert(self.next_id, runners.len());
                    runners.push(ForgeRunner {
                        id: self.next_id,
                        name: machine.clone(),
                        labels: labels.clone(),
                        online: true,
                        busy: false,
                        offline_since: None,
                        idle_since: None,
                    });
                }
                ActionKind::UpdateRunnerLabels { runner_id, labels, .. } => {
                    let i = *runner_by_id
                        .get(runner_id)
                        .filter(|_| !deregistered.contains(runner_id))
                        .expect("runner exists");
                    let r = &mut world.runners.as_mut().expect("forge read")[i];
                    assert!(!r.busy || desired.interrupt_jobs, "relabelled runner {} in the middle of a job", r.name);
                    r.labels = labels.clone();
                }
                ActionKind::DeregisterRunner { runner_id, .. } => {
                    let rs = world.runners.as_mut().expect("forge read");
                    let i = runner_by_id.get(runner_id).filter(|_| !deregistered.contains(runner_id));
                    let i = *i.unwrap_or_else(|| panic!("runner {runner_id} did not exist"));
                    let r = &rs[i];
                    assert!(!r.busy || desired.interrupt_jobs, "deregistered runner {} running a job", r.name);
                    deregistered.insert(*runner_id);
                }
                ActionKind::TerminateInstance { instance_id, machine, .. } => {
                    let busy = runner_at.get(machine).is_some_and(|i| {
                        world.runners.as_ref().is_some_and(|rs| rs[*i].busy && !deregistered.contains(&rs[*i].id))
                    });
                    assert!(!busy || desired.interrupt_jobs, "terminated {machine} while its runner runs a job");
                    let i = *by_instance.get(instance_id).expect("instance exists");
                    let m = &mut world.machines[i];
                    m.state = InstanceState::Terminated;
                    if let Some(n) = m.name().map(str::to_string)
                        && live.get(&n) == Some(&i)
                    {
                        // A copy of the same name that still runs is reached by name from now on.
                        match world.machines.iter().position(|o| o.name() == Some(n.as_str()) && !o.state.is_gone()) {
                            Some(other) => live.insert(n, other),
                            None => live.remove(&n),
                        };
                    }
                    if let Some(h) = host_of_instance.remove(instance_id) {
                        let h = &mut world.hosts[h];
                        // As EC2 does: the host is scrubbed after its instance ends, and unusable meanwhile.
                        h.state = HostState::Pending;
                        h.instance_ids.retain(|i| i != instance_id);
                    }
                }
                ActionKind::ReleaseHost { host_id, .. } => {
                    let h = &mut world.hosts[*host_at.get(host_id).expect("host exists")];
                    assert!(h.instance_ids.is_empty(), "released host {host_id} with a live instance");
                    let window = desired
                        .providers
                        .get(&h.provider)
                        .map(|p| p.min_allocation_for(&h.instance_type))
                        .unwrap_or_default();
                    assert!(
                        h.allocated_at + chrono::Duration::from_std(window).unwrap() <= now,
                        "released host {host_id} inside its window"
                    );
                    h.state = HostState::Released;
                }
            }
        }
        world.machines.retain(|m| m.state != InstanceState::Terminated);
        world.hosts.retain(|h| h.state != HostState::Released);
        if let Some(rs) = world.runners.as_mut() {
            rs.retain(|r| !deregistered.contains(&r.id));
        }
    }
}

fn live_mut<'a>(world: &'a mut Actual, live: &HashMap<String, usize>, name: &str) -> &'a mut ActualMachine {
    let i = *live.get(name).unwrap_or_else(|| panic!("machine {name} is not live"));
    &mut world.machines[i]
}
