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
                    let found = world.hosts.iter().find(|h| {
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
                    world.hosts.push(Host {
                        provider: provider.clone(),
                        id,
                        tags: machine_tags(&desired.tenant, provider, pool, machine, None),
                        instance_type: instance_type.clone(),
                        availability_zone: availability_zone.clone(),
                        state: HostState::Available,
                        allocated_at: now,
                        available_since: None,
                        instance_ids: vec![],
                    });
                }
                ActionKind::LaunchInstance { provider, pool, machine, spec, host } => {
                    assert!(
                        !world.machines.iter().any(|m| m.name() == Some(machine) && !m.state.is_gone()),
                        "duplicate machine {machine}"
                    );
                    let instance_id = self.id("i");
                    let host_id = host.as_ref().map(|h| match h {
                        HostRef::Existing { host_id } => host_id.clone(),
                        HostRef::Allocated { action } => allocated[action].clone(),
                    });
                    if let Some(hid) = &host_id {
                        let h = world.hosts.iter_mut().find(|h| &h.id == hid).expect("host exists");
                        assert!(h.instance_ids.is_empty(), "host {hid} already has an instance");
                        assert_eq!(h.state, HostState::Available, "host {hid} is not available (scrubbing?)");
                        assert!(desired.host_settled(h, now), "host {hid} was used before it settled after its scrub");
                        assert_eq!(Some(&h.instance_type), spec.instance_type.as_ref());
                        h.instance_ids.push(instance_id.clone());
                        h.tags = machine_tags(&desired.tenant, provider, pool, machine, None);
                    }
                    world.machines.push(ActualMachine {
                        provider: provider.clone(),
                        instance_id,
                        tags: machine_tags(&desired.tenant, provider, pool, machine, None),
                        state: InstanceState::Running,
                        image: spec.image.clone(),
                        instance_type: spec.instance_type.clone(),
                        availability_zone: spec.availability_zone.clone(),
                        host_id,
                        launched_at: now,
                        address: None,
                        on_machine: OnMachine::Read { state: MachineState::default() },
                        unreachable_since: None,
                    });
                }
                ActionKind::WaitReachable { .. } => {}
                ActionKind::ReimageMachine { machine, image, .. } => {
                    let m = live_mut(world, machine);
                    assert_eq!(m.state, InstanceState::Running, "reimaged {machine} while it was not running");
                    m.image = image.clone();
                    m.on_machine = OnMachine::Read { state: MachineState::default() };
                }
                ActionKind::RestartRunner { machine, .. } => {
                    for r in world.runners.iter_mut().flatten().filter(|r| &r.name == machine) {
                        r.online = true;
                        r.offline_since = None;
                    }
                }
                ActionKind::UpdateRunnerAgent { machine, to, .. } => {
                    let busy = world.runners.iter().flatten().any(|r| &r.name == machine && r.busy);
                    assert!(!busy, "updated the agent of {machine} under a job");
                    if let OnMachine::Read { state } = &mut live_mut(world, machine).on_machine
                        && let Some(r) = &mut state.runner
                    {
                        r.agent_version = Some(to.clone());
                    }
                }
                ActionKind::RepairState { machine, .. } => {
                    live_mut(world, machine).on_machine = OnMachine::Read { state: MachineState::default() };
                }
                ActionKind::RunSetup { machine, steps, .. } => {
                    let m = live_mut(world, machine);
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
                    if let OnMachine::Read { state } = &mut live_mut(world, machine).on_machine {
                        state.runner = Some(RunnerRecord {
                            name: machine.clone(),
                            labels: labels.clone(),
                            runner_id: None,
                            agent_version,
                        });
                    }
                    let runners = world.runners.get_or_insert_with(Vec::new);
                    assert!(!runners.iter().any(|r| &r.name == machine), "runner {machine} registered twice");
                    self.next_id += 1;
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
                    let r = world
                        .runners
                        .as_mut()
                        .and_then(|rs| rs.iter_mut().find(|r| r.id == *runner_id))
                        .expect("runner exists");
                    assert!(!r.busy || desired.interrupt_jobs, "relabelled runner {} in the middle of a job", r.name);
                    r.labels = labels.clone();
                }
                ActionKind::DeregisterRunner { runner_id, .. } => {
                    let rs = world.runners.as_mut().expect("forge read");
                    if let Some(r) = rs.iter().find(|r| r.id == *runner_id) {
                        assert!(!r.busy || desired.interrupt_jobs, "deregistered runner {} running a job", r.name);
                    }
                    let before = rs.len();
                    rs.retain(|r| r.id != *runner_id);
                    assert_eq!(before, rs.len() + 1, "runner {runner_id} did not exist");
                }
                ActionKind::TerminateInstance { instance_id, machine, .. } => {
                    let busy = world.runners.iter().flatten().any(|r| &r.name == machine && r.busy);
                    assert!(!busy || desired.interrupt_jobs, "terminated {machine} while its runner runs a job");
                    let m = world.machines.iter_mut().find(|m| &m.instance_id == instance_id).expect("instance exists");
                    m.state = InstanceState::Terminated;
                    for h in &mut world.hosts {
                        if h.instance_ids.contains(instance_id) {
                            // As EC2 does: the host is scrubbed after its instance ends, and unusable meanwhile.
                            h.state = HostState::Pending;
                        }
                        h.instance_ids.retain(|i| i != instance_id);
                    }
                }
                ActionKind::ReleaseHost { host_id, .. } => {
                    let h = world.hosts.iter_mut().find(|h| &h.id == host_id).expect("host exists");
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
    }
}

fn live_mut<'a>(world: &'a mut Actual, name: &str) -> &'a mut ActualMachine {
    world
        .machines
        .iter_mut()
        .find(|m| m.name() == Some(name) && !m.state.is_gone())
        .unwrap_or_else(|| panic!("machine {name} is not live"))
}
