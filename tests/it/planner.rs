//! The planner on hand-made worlds: create chains, scale down, replacement,
//! in-place updates, orphans, deferral and tenant isolation. No peers.

use chrono::{DateTime, Duration, TimeZone, Utc};
use nimbus::core::model::*;
use nimbus::core::plan::{ActionKind, ChangeAction, HostRef, Plan, plan};
use nimbus::testing::{Simulator, desired, pool, step};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn kinds(p: &Plan) -> Vec<&'static str> {
    p.actions().map(|(_, a)| a.kind.name()).collect()
}

/// Plans and applies `d` from an empty world at `at`.
fn built(d: &Desired, at: DateTime<Utc>) -> (Actual, Simulator) {
    let mut world = Actual { runners: Some(vec![]), ..Actual::default() };
    let mut sim = Simulator::default();
    let p = plan(d, &world, at);
    sim.apply(d, &mut world, &p, at);
    (world, sim)
}

#[test]
fn empty_world_gets_full_create_chains_in_dependency_order() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let p = plan(&d, &Actual { runners: Some(vec![]), ..Default::default() }, t0());
    assert_eq!(p.summary().add, 2);
    assert_eq!(
        kinds(&p),
        [
            "allocate_host",
            "launch_instance",
            "wait_reachable",
            "run_setup",
            "register_runner",
            "allocate_host",
            "launch_instance",
            "wait_reachable",
            "run_setup",
            "register_runner"
        ]
    );
    // Each step waits for the one before it.
    for id in 1..5 {
        assert_eq!(p.depends_on(id), vec![id - 1]);
    }
    let names: Vec<&str> = p.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["nimbus.acme.mac.0", "nimbus.acme.mac.1"]);
}

#[test]
fn linux_pools_need_no_host() {
    let d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    let p = plan(&d, &Actual::default(), t0());
    assert_eq!(kinds(&p), ["launch_instance", "wait_reachable", "run_setup"]);
}

#[test]
fn converged_world_plans_no_changes() {
    let d = desired("acme", vec![pool("mac", "aws", 3, "mac2.metal", "ami-1")]);
    let (world, _) = built(&d, t0());
    let p = plan(&d, &world, t0() + Duration::hours(1));
    assert!(p.is_empty(), "{:?}", kinds(&p));
    assert!(p.changes.is_empty());
}

#[test]
fn scale_down_defers_release_inside_window_with_due_time() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let (world, _) = built(&d, t0());
    let d1 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let now = t0() + Duration::hours(3);
    let p = plan(&d1, &world, now);
    assert_eq!(kinds(&p), ["deregister_runner", "terminate_instance"]);
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].address, "mac[1]");
    assert_eq!(p.changes[0].actions, [ChangeAction::Delete]);
    assert_eq!(p.deferred.len(), 1);
    assert!(matches!(p.deferred[0].action, ActionKind::ReleaseHost { .. }));
    // The 24-hour window plus the 5-minute safety margin.
    assert_eq!(p.deferred[0].due_at, Some(t0() + Duration::hours(24) + Duration::minutes(5)));
}

#[test]
fn release_happens_once_the_window_has_passed() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let (world, _) = built(&d, t0());
    let d1 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let p = plan(&d1, &world, t0() + Duration::hours(25));
    assert_eq!(kinds(&p), ["deregister_runner", "terminate_instance", "release_host"]);
    assert_eq!(p.depends_on(2), vec![1]);
    assert!(p.deferred.is_empty());
}

#[test]
fn scale_down_removes_machines_with_releasable_hosts_first() {
    let d = desired("acme", vec![pool("mac", "aws", 3, "mac2.metal", "ami-1")]);
    let (mut world, _) = built(&d, t0());
    // mac[0]'s host is old: its window has passed; the others are new.
    let host0 = world.machines.iter().find(|m| m.name() == Some("nimbus.acme.mac.0")).unwrap().host_id.clone().unwrap();
    for h in &mut world.hosts {
        h.allocated_at = if h.id == host0 { t0() - Duration::hours(48) } else { t0() };
    }
    let d1 = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let p = plan(&d1, &world, t0() + Duration::hours(1));
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].address, "mac[0]", "the machine on the releasable host goes first");
    assert!(kinds(&p).contains(&"release_host"));
    assert!(p.deferred.is_empty());
}

/// Issue 12: a Mac replacement cannot launch on its old host at once: EC2 scrubs a host after its instance
/// ends (unusable for 50 minutes to hours, and a few minutes after it reports available). The plan waits for
/// the old host (no new host paid for) and says so; then the new instance launches on it.
#[test]
fn an_image_change_on_a_mac_waits_for_the_scrub_of_its_host() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mut world, mut sim) = built(&d, t0());
    let host = world.hosts[0].id.clone();
    let d1 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-2")]);
    let t1 = t0() + Duration::hours(2);
    let p = plan(&d1, &world, t1);
    assert_eq!(kinds(&p), ["deregister_runner", "terminate_instance"]);
    assert_eq!(
        p.changes[0].cause,
        Some(nimbus::core::plan::reason::ChangeReason::Replace {
            causes: vec![nimbus::core::plan::reason::ReplaceCause::Image { from: "ami-1".into(), to: "ami-2".into() }]
        })
    );
    let wait = &p.deferred[0];
    assert_eq!(wait.kind, nimbus::core::plan::DeferredKind::Scrubbing);
    assert!(
        matches!(&wait.action, ActionKind::LaunchInstance { host: Some(HostRef::Existing { host_id }), .. } if *host_id == host)
    );
    assert!(
        wait.reason.contains("scrubbed")
            && wait.reason.contains("expected by about")
            && wait.reason.contains("24 more host-hours"),
        "{}",
        wait.reason
    );
    sim.apply(&d1, &mut world, &p, t1);
    assert_eq!(world.hosts[0].state, HostState::Pending, "the host is scrubbing");
    // Still scrubbing: the machine waits for its host, and no host is allocated.
    let p = plan(&d1, &world, t1 + Duration::hours(1));
    assert!(p.is_empty() && p.deferred.iter().any(|x| x.reason.contains("waiting for its host")), "{:?}", kinds(&p));
    // Available, but not settled yet (5 minutes on EC2).
    let back = t1 + Duration::hours(2);
    nimbus::testing::finish_scrubs(&mut world, back);
    assert!(plan(&d1, &world, back + Duration::minutes(2)).is_empty());
    let p = plan(&d1, &world, back + Duration::minutes(6));
    assert_eq!(kinds(&p), ["launch_instance", "wait_reachable", "run_setup", "register_runner"]);
    sim.apply(&d1, &mut world, &p, back + Duration::minutes(6));
    assert_eq!(world.machines[0].host_id.as_deref(), Some(host.as_str()), "the same host");
    assert_eq!(world.hosts.len(), 1, "no host was allocated");
    assert!(plan(&d1, &world, back + Duration::minutes(7)).is_empty());
}

/// Issue 12: with another idle usable host the replacement takes it at once; with `mac_replacement: allocate`
/// it pays for a new host rather than wait.
#[test]
fn a_mac_replacement_takes_an_idle_host_or_allocates_when_told() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let (mut world, mut sim) = built(&d, t0());
    let d1 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let p = plan(&d1, &world, t0());
    sim.apply(&d1, &mut world, &p, t0());
    nimbus::testing::finish_scrubs(&mut world, t0());
    let idle = world.hosts.iter().find(|h| h.instance_ids.is_empty()).unwrap().id.clone();
    let mut d2 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-2")]);
    let p = plan(&d2, &world, t0() + Duration::hours(1));
    assert!(p.deferred.iter().all(|x| x.kind != nimbus::core::plan::DeferredKind::Scrubbing));
    assert!(p.actions().any(|(_, a)| matches!(&a.kind,
        ActionKind::LaunchInstance { host: Some(HostRef::Existing { host_id }), .. } if *host_id == idle)));
    // No idle host: `mac_replacement: allocate` allocates at once.
    let (world, _) = built(&desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]), t0());
    d2.pools[0].allocate_on_replace = true;
    let p = plan(&d2, &world, t0() + Duration::hours(1));
    assert!(kinds(&p).contains(&"allocate_host") && kinds(&p).contains(&"launch_instance"), "{:?}", kinds(&p));
}

#[test]
fn label_change_is_an_in_place_update() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (world, _) = built(&d, t0());
    let mut pl = pool("mac", "aws", 1, "mac2.metal", "ami-1");
    pl.runner.as_mut().unwrap().labels = vec!["ci".into(), "xcode-16".into()];
    let p = plan(&desired("acme", vec![pl]), &world, t0());
    assert_eq!(kinds(&p), ["update_runner_labels"]);
    assert_eq!(p.changes[0].actions, [ChangeAction::Update]);
    assert_eq!(p.summary().change, 1);
}

#[test]
fn new_or_changed_setup_step_runs_from_that_step() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (world, _) = built(&d, t0());
    let mut pl = pool("mac", "aws", 1, "mac2.metal", "ami-1");
    pl.setup.push(step("xcode", "install xcode"));
    let p = plan(&desired("acme", vec![pl.clone()]), &world, t0());
    assert_eq!(kinds(&p), ["run_setup"]);
    assert_eq!(p.changes[0].run_steps, ["xcode"]);
    pl.setup[0] = step("base", "echo changed");
    let p = plan(&desired("acme", vec![pl]), &world, t0());
    assert_eq!(p.changes[0].run_steps, ["base", "xcode"]);
    assert!(p.changes[0].reason.contains("(changed)"), "{}", p.changes[0].reason);
}

#[test]
fn failed_step_resumes_from_that_step() {
    let mut pl = pool("mac", "aws", 1, "mac2.metal", "ami-1");
    pl.setup = vec![step("a", "a"), step("b", "b"), step("c", "c")];
    let d = desired("acme", vec![pl]);
    let (mut world, _) = built(&d, t0());
    let OnMachine::Read { state } = &mut world.machines[0].on_machine else { panic!() };
    state.steps[1].status = StepStatus::Failed;
    state.steps.pop();
    let p = plan(&d, &world, t0());
    assert_eq!(p.changes[0].run_steps, ["b", "c"]);
}

#[test]
fn orphans_are_destroyed_and_ghost_runners_deregistered() {
    let d =
        desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1"), pool("old", "aws", 1, "t3.large", "ami-1")]);
    let (mut world, _) = built(&d, t0());
    world.runners.as_mut().unwrap().push(ForgeRunner {
        id: 999,
        name: "nimbus.acme.mac.7".into(),
        labels: vec![],
        online: false,
        busy: false,
        offline_since: None,
        idle_since: None,
    });
    let d1 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let p = plan(&d1, &world, t0());
    let addrs: Vec<(&str, &str)> = p.changes.iter().map(|c| (c.address.as_str(), c.reason.as_str())).collect();
    assert_eq!(
        addrs,
        [
            ("old[0]", "pool `old` is no longer in the fleet file"),
            ("runner.nimbus.acme.mac.7", "runner is registered but has no machine")
        ]
    );
}

/// Issue 13.5: with this fleet's journal read, a leftover runner is removed only if its pool is declared here or
/// the journal acted on it: another fleet file's runners (on providers this one cannot see) are not ghosts.
#[test]
fn another_fleets_runners_are_not_ghosts() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mut world, _) = built(&d, t0());
    for (id, name) in [(901, "nimbus.acme.linux.0"), (902, "nimbus.acme.gone.3"), (903, "nimbus.acme.mac.7")] {
        world.runners.as_mut().unwrap().push(ForgeRunner {
            id,
            name: name.into(),
            labels: vec![],
            online: false,
            busy: false,
            offline_since: None,
            idle_since: None,
        });
    }
    let ghosts =
        |world: &Actual| -> Vec<String> { plan(&d, world, t0()).changes.iter().map(|c| c.address.clone()).collect() };
    // Without a journal (a library caller, an offline inventory): every runner named for the tenant.
    assert_eq!(ghosts(&world), ["runner.nimbus.acme.gone.3", "runner.nimbus.acme.linux.0", "runner.nimbus.acme.mac.7"]);
    // With it: `mac` is declared, `gone` was this fleet's once (its journal says), `linux` never was.
    world.known_pools = Some(["gone".to_string()].into());
    assert_eq!(ghosts(&world), ["runner.nimbus.acme.gone.3", "runner.nimbus.acme.mac.7"]);
}

#[test]
fn idle_host_inside_window_is_reused_before_allocating() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let (world, mut sim) = built(&d, t0());
    let mut world = world;
    let d1 = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let p = plan(&d1, &world, t0() + Duration::hours(1));
    sim.apply(&d1, &mut world, &p, t0() + Duration::hours(1));
    assert_eq!(world.hosts.len(), 2, "the idle host is kept inside its window");
    // Its scrub over (and settled), the idle host is reused.
    nimbus::testing::finish_scrubs(&mut world, t0() + Duration::hours(2));
    let p = plan(&d, &world, t0() + Duration::hours(3));
    assert!(!kinds(&p).contains(&"allocate_host"), "{:?}", kinds(&p));
    let idle = world.hosts.iter().find(|h| h.instance_ids.is_empty()).unwrap().id.clone();
    assert!(p.actions().any(|(_, a)| matches!(&a.kind,
        ActionKind::LaunchInstance { host: Some(HostRef::Existing { host_id }), .. } if *host_id == idle)));
}

#[test]
fn scrubbing_host_waits() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mut world, _) = built(&d, t0());
    let d0 = desired("acme", vec![pool("mac", "aws", 0, "mac2.metal", "ami-1")]);
    world.machines.clear();
    world.runners = Some(vec![]);
    world.hosts[0].instance_ids.clear();
    world.hosts[0].state = HostState::Pending;
    let p = plan(&d0, &world, t0() + Duration::hours(30));
    assert!(p.is_empty());
    assert_eq!(p.deferred.len(), 1);
    assert_eq!(p.deferred[0].due_at, None);
    // A new machine does not land on a scrubbing host: it waits for its own host ...
    let p = plan(&d, &world, t0() + Duration::hours(30));
    assert!(p.is_empty() && p.deferred.iter().any(|x| x.reason.contains("waiting for its host")));
    // ... or, told to, allocates another.
    let mut d2 = d.clone();
    d2.pools[0].allocate_on_replace = true;
    let p = plan(&d2, &world, t0() + Duration::hours(30));
    assert_eq!(kinds(&p)[0], "allocate_host");
}

#[test]
fn unreachable_machine_is_reported_not_guessed() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mut world, _) = built(&d, t0());
    world.machines[0].on_machine = OnMachine::Unreachable { reason: "connection refused".into() };
    let mut pl = pool("mac", "aws", 1, "mac2.metal", "ami-1");
    pl.setup.push(step("new", "x"));
    let p = plan(&desired("acme", vec![pl]), &world, t0());
    assert!(p.is_empty(), "{:?}", kinds(&p));
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].message.contains("unreachable (connection refused)"));
}

#[test]
fn other_tenants_and_untagged_resources_are_invisible() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mine, _) = built(&d, t0());
    let (mut theirs, _) = built(&desired("acme-dev", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]), t0());
    // Their ids must not collide with ours for the check below to mean anything.
    for m in &mut theirs.machines {
        m.instance_id = format!("x{}", m.instance_id);
        m.host_id = m.host_id.as_ref().map(|h| format!("x{h}"));
    }
    for h in &mut theirs.hosts {
        h.id = format!("x{}", h.id);
        h.instance_ids = h.instance_ids.iter().map(|i| format!("x{i}")).collect();
    }
    for r in theirs.runners.as_mut().unwrap() {
        r.id += 10_000;
    }
    let mut world = mine.clone();
    world.machines.extend(theirs.machines.clone());
    world.hosts.extend(theirs.hosts.clone());
    world.runners.as_mut().unwrap().extend(theirs.runners.clone().unwrap());
    let mut untagged = theirs.machines[0].clone();
    untagged.instance_id = "i-manual".into();
    untagged.tags.clear();
    world.machines.push(untagged);
    // Even a fleet of zero touches nothing but acme's.
    let p = plan(&desired("acme", vec![]), &world, t0() + Duration::hours(30));
    for (_, a) in p.actions() {
        let s = format!("{:?}", a.kind);
        assert!(!s.contains("acme-dev") && !s.contains("i-manual"), "{s}");
        for m in theirs.machines.iter() {
            assert!(!s.contains(&m.instance_id), "{s}");
        }
        for h in theirs.hosts.iter() {
            assert!(!s.contains(&h.id), "{s}");
        }
    }
    assert_eq!(p.summary().destroy, 1);
}

#[test]
fn no_forge_read_means_no_runner_actions() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "t3.large", "ami-1")]);
    let (mut world, _) = built(&d, t0());
    world.runners = None;
    assert!(plan(&d, &world, t0()).is_empty());
}

#[test]
fn planning_is_deterministic() {
    let d = desired("acme", vec![pool("b", "aws", 3, "mac2.metal", "ami-1"), pool("a", "aws", 2, "t3.large", "ami-1")]);
    let (world, _) = built(&desired("acme", vec![pool("b", "aws", 5, "mac2.metal", "ami-0")]), t0());
    let p1 = plan(&d, &world, t0());
    let p2 = plan(&d, &world, t0());
    assert_eq!(format!("{:?}", p1.changes), format!("{:?}", p2.changes));
    assert_eq!(kinds(&p1), kinds(&p2));
}

// ---------------------------------------------------------------- issue 9 regressions

/// A host a killed apply allocated for `nimbus.acme.mac.1`, never used.
fn leftover_host(machine: &str, id: &str) -> Host {
    Host {
        provider: "aws".into(),
        id: id.into(),
        tags: machine_tags("acme", "aws", "mac", machine, None),
        instance_type: "mac2.metal".into(),
        availability_zone: "us-east-1a".into(),
        state: HostState::Available,
        allocated_at: t0() - Duration::hours(1),
        available_since: None,
        instance_ids: vec![],
    }
}

/// Issue 9.2: the rerun reuses the leftover host once, and the other machine's allocation may not find it
/// again by its stale tag.
#[test]
fn a_leftover_host_is_never_promised_to_two_machines() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    world.hosts.push(leftover_host("nimbus.acme.mac.1", "h-left"));
    let p = plan(&d, &world, t0());
    let reused: Vec<&str> = p
        .actions()
        .filter_map(|(_, a)| match &a.kind {
            ActionKind::LaunchInstance { host: Some(HostRef::Existing { host_id }), .. } => Some(host_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(reused, ["h-left"], "the leftover host is reused exactly once");
    let allocs: Vec<(String, Vec<String>)> = p
        .actions()
        .filter_map(|(_, a)| match &a.kind {
            ActionKind::AllocateHost { machine, exclude_hosts, .. } => Some((machine.clone(), exclude_hosts.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(allocs.len(), 1);
    // mac[0] took the leftover host; mac[1]'s lookup by tag must not find it again.
    assert_eq!(allocs[0], ("nimbus.acme.mac.1".to_string(), vec!["h-left".to_string()]));
    // A scrubbing host tagged for a machine cannot be reused, and its allocation must not find it either.
    let mut scrubbing = Actual { runners: Some(vec![]), ..Default::default() };
    scrubbing.hosts.push(leftover_host("nimbus.acme.mac.0", "h-scrub"));
    scrubbing.hosts[0].state = HostState::Pending;
    // (told to allocate rather than wait for the scrub, so the allocation's lookup is exercised)
    let mut d = d.clone();
    d.pools[0].allocate_on_replace = true;
    let p2 = plan(&d, &scrubbing, t0());
    let excl: Vec<(String, Vec<String>)> = p2
        .actions()
        .filter_map(|(_, a)| match &a.kind {
            ActionKind::AllocateHost { machine, exclude_hosts, .. } => Some((machine.clone(), exclude_hosts.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        excl,
        [("nimbus.acme.mac.0".to_string(), vec!["h-scrub".to_string()]), ("nimbus.acme.mac.1".to_string(), vec![])]
    );
    Simulator::default().apply(&d, &mut scrubbing, &p2, t0());
    // The simulator models the provider's lookup by tag; it panics on a second instance on one host.
    let mut sim = Simulator::default();
    sim.apply(&d, &mut world, &p, t0());
    assert!(plan(&d, &world, t0()).is_empty());
    let on_hosts: Vec<usize> = world.hosts.iter().map(|h| h.instance_ids.len()).collect();
    assert_eq!(on_hosts, [1, 1]);
}

/// Issue 9.1: a pool moved between providers is destroyed on one and created on the other, and the new
/// machine of the same name waits until the old one is gone.
#[test]
fn a_moved_pool_says_so_and_waits_for_the_old_machine() {
    let mut d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    d.providers.insert("other".into(), nimbus::testing::aws_provider());
    let (world, _) = built(&d, t0());
    d.pools[0].provider = "other".into();
    let p = plan(&d, &world, t0());
    let reasons: Vec<&str> = p.changes.iter().map(|c| c.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("moved from provider `aws` to `other`") && r.contains("destroyed on `aws`")),
        "{reasons:?}"
    );
    let terminate = p.actions().find(|(_, a)| a.kind.name() == "terminate_instance").unwrap().0;
    let launch = p.actions().find(|(_, a)| a.kind.name() == "launch_instance").unwrap().0;
    assert!(p.depends_on(launch).contains(&terminate), "launch must wait for the old machine's terminate");
}

/// Issue 9.7: an unusable resource keeps its name and counts; it is a warning of kind `unusable`.
#[test]
fn an_unusable_machine_is_left_alone_and_keeps_its_name() {
    let d = desired("acme", vec![pool("linux", "aws", 2, "t3.large", "ami-1")]);
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    world.unusable.push(Unusable {
        provider: "aws".into(),
        id: "nimbus.acme.linux.0".into(),
        machine: Some("nimbus.acme.linux.0".into()),
        reason: "`x/nimbus.json` is not a sandbox record".into(),
        hint: "repair it".into(),
    });
    let p = plan(&d, &world, t0());
    let created: Vec<&str> = p.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(created, ["nimbus.acme.linux.1"], "the broken machine's name is not reused, and it counts");
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(p.warnings[0].kind, nimbus::core::plan::WarningKind::Unusable);
    assert_eq!(p.warnings[0].address, "linux[0]");
    assert!(p.warnings[0].message.contains("not a sandbox record") && p.warnings[0].message.contains("repair it"));
    // Another tenant's broken folder is not ours to count.
    world.unusable[0].machine = Some("nimbus.other.linux.0".into());
    assert_eq!(plan(&d, &world, t0()).changes.len(), 2);
}

/// Issue 9.6: an empty or damaged state database is drift with a repair, not an unreachable machine.
#[test]
fn a_damaged_state_database_is_repaired_and_setup_runs_again() {
    let mut d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    d.pools[0].setup = vec![step("a", "echo a"), step("b", "echo b")];
    let (mut world, mut sim) = built(&d, t0());
    assert!(plan(&d, &world, t0()).is_empty());
    world.machines[0].on_machine = OnMachine::BadState { reason: "the state database is empty (0 bytes)".into() };
    let p = plan(&d, &world, t0());
    assert_eq!(kinds(&p), ["repair_state", "run_setup"]);
    assert!(p.warnings.is_empty());
    assert_eq!(p.changes[0].actions, [ChangeAction::Update]);
    assert!(p.changes[0].reason.contains("empty (0 bytes)"), "{}", p.changes[0].reason);
    assert_eq!(p.changes[0].run_steps, ["a", "b"]);
    sim.apply(&d, &mut world, &p, t0());
    assert!(plan(&d, &world, t0()).is_empty());
}

/// Issue 12: a host that reports no allocation time is never released (fail closed), and the window keeps a
/// safety margin against clock skew.
#[test]
fn hosts_are_released_late_never_early() {
    let d = desired("acme", vec![pool("mac", "aws", 0, "mac2.metal", "ami-1")]);
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    world.hosts.push(Host {
        provider: "aws".into(),
        id: "h-idle".into(),
        tags: machine_tags("acme", "aws", "mac", "nimbus.acme.mac.0", None),
        instance_type: "mac2.metal".into(),
        availability_zone: "us-east-1a".into(),
        state: HostState::Available,
        allocated_at: t0() - Duration::hours(24) - Duration::minutes(2),
        available_since: None,
        instance_ids: vec![],
    });
    // Past the 24 hours, inside the margin: not yet.
    let p = plan(&d, &world, t0());
    assert!(p.is_empty());
    assert_eq!(p.deferred[0].due_at, Some(t0() + Duration::minutes(3)));
    assert_eq!(kinds(&plan(&d, &world, t0() + Duration::minutes(3))), ["release_host"]);
    // No allocation time: never, with the reason.
    world.hosts[0].allocated_at = UNKNOWN_ALLOCATION;
    let p = plan(&d, &world, t0() + Duration::days(400));
    assert!(p.is_empty());
    assert_eq!(p.deferred[0].due_at, None);
    assert!(p.deferred[0].reason.contains("no allocation time"), "{}", p.deferred[0].reason);
}

/// Issue 18.6: two instances carry one machine's name. The plan removes the copy, never another healthy
/// machine to "scale down", keeps the one whose runner the forge registered (else the oldest), and never
/// deregisters the runner of that name; while the name is doubled the drift check cannot say "No changes".
#[test]
fn a_copy_of_a_machine_is_drift_and_the_registered_one_stays() {
    let mut p = pool("linux", "aws", 2, "t3.large", "ami-1");
    p.runner = Some(RunnerSpec::new(vec!["l".into()], nimbus::config::RunnerMode::Persistent));
    let d = desired("acme", vec![p]);
    let (mut world, _) = built(&d, t0());
    let name0 = machine_name("acme", "linux", 0);
    let original = world.machines.iter().find(|m| m.name() == Some(name0.as_str())).unwrap().clone();
    // A copy, launched earlier than the original (so "the oldest" would pick it), whose runner is not the one
    // the forge knows.
    let mut copy = original.clone();
    copy.instance_id = "i-copy".into();
    copy.launched_at = original.launched_at - Duration::hours(1);
    let runner_id = world.runners.as_ref().unwrap().iter().find(|r| r.name == name0).unwrap().id;
    if let OnMachine::Read { state } =
        &mut world.machines.iter_mut().find(|m| m.instance_id == original.instance_id).unwrap().on_machine
    {
        state.runner.as_mut().unwrap().runner_id = Some(runner_id);
    }
    if let OnMachine::Read { state } = &mut copy.on_machine {
        state.runner.as_mut().unwrap().runner_id = Some(runner_id + 1000);
    }
    world.machines.push(copy);
    let p = plan(&d, &world, t0());
    assert_eq!(kinds(&p), ["terminate_instance"], "{:?}", p.changes);
    let (_, a) = p.actions().next().unwrap();
    assert!(matches!(&a.kind, ActionKind::TerminateInstance { instance_id, .. } if instance_id == "i-copy"));
    assert_eq!(p.changes.len(), 1);
    assert!(
        p.changes[0].reason.contains("copy") && p.changes[0].reason.contains(&original.instance_id),
        "{}",
        p.changes[0].reason
    );

    // The copy's runner name is busy and the copy might be the one running the job (no runner ids recorded):
    // its removal waits, and the drift check still reports drift.
    for m in &mut world.machines {
        if let OnMachine::Read { state } = &mut m.on_machine {
            state.runner.as_mut().unwrap().runner_id = None;
        }
    }
    nimbus::testing::start_jobs(&mut world, &[name0.as_str()]);
    let p = plan(&d, &world, t0());
    assert!(p.is_empty(), "{:?}", p.changes);
    let doc = nimbus::core::plan::document::PlanDocument::from_plan(&p, None, None);
    assert!(doc.drift_pending(), "a doubled name is never \"No changes\"");
    let text = nimbus::cli::views::plan_text::render(&doc, nimbus::cli::views::plan_text::Style { color: false });
    assert!(!text.contains("No changes."), "{text}");
}

/// Issue 19.5: a persistent runner whose agent is older than `forge.runner_version` gets an in-place update, only
/// while idle; a busy one waits for its job; a newer, equal or unknown release, or an ephemeral runner, is left.
#[test]
fn an_older_runner_agent_is_updated_in_place_only_while_idle() {
    let with_version = |v: &str| {
        let mut p = pool("mac", "aws", 2, "mac2.metal", "ami-1");
        let r = p.runner.as_mut().unwrap();
        r.mode = nimbus::config::RunnerMode::Persistent;
        r.agent_version = Some(v.into());
        desired("acme", vec![p])
    };
    let (mut world, _) = built(&with_version("2.300.0"), t0());
    let names: Vec<String> = world.machines.iter().filter_map(|m| m.name().map(str::to_string)).collect();
    assert_eq!(names.len(), 2);
    // The first machine's runner is running a job.
    for r in world.runners.iter_mut().flatten().filter(|r| r.name == names[0]) {
        r.busy = true;
    }
    let p = plan(&with_version("2.321.0"), &world, t0());
    assert_eq!(kinds(&p), ["update_runner_agent"]);
    let (_, a) = p.actions().next().unwrap();
    match &a.kind {
        ActionKind::UpdateRunnerAgent { machine, from, to, .. } => {
            assert_eq!((machine.as_str(), from.as_str(), to.as_str()), (names[1].as_str(), "2.300.0", "2.321.0"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].actions, [ChangeAction::Update]);
    assert!(
        p.changes[0].reason.contains("2.300.0 is older than forge.runner_version 2.321.0"),
        "{}",
        p.changes[0].reason
    );
    assert_eq!(p.deferred.len(), 1, "the busy runner's update waits for its job");
    assert!(matches!(&p.deferred[0].action, ActionKind::UpdateRunnerAgent { machine, .. } if *machine == names[0]));
    // Even told to interrupt jobs, the agent is not updated under one.
    let mut d = with_version("2.321.0");
    d.interrupt_jobs = true;
    assert_eq!(kinds(&plan(&d, &world, t0())), ["update_runner_agent"]);

    // Numbers compare as numbers; newer and equal releases are left alone, and so is an unknown one.
    assert!(nimbus::forges::github::agent::version_older("2.99.0", "2.100.0"));
    for v in ["2.300.0", "2.299.9", "2.30.0"] {
        assert!(kinds(&plan(&with_version(v), &world, t0())).is_empty(), "{v}");
    }
    for m in world.machines.iter_mut() {
        if let OnMachine::Read { state } = &mut m.on_machine {
            state.runner.as_mut().unwrap().agent_version = None;
        }
    }
    assert!(kinds(&plan(&with_version("2.321.0"), &world, t0())).is_empty(), "unknown release: left");

    // An ephemeral runner gets the wanted release when it registers again, not in place.
    let mut p = pool("mac", "aws", 1, "mac2.metal", "ami-1");
    p.runner.as_mut().unwrap().mode = nimbus::config::RunnerMode::Ephemeral;
    p.runner.as_mut().unwrap().agent_version = Some("2.300.0".into());
    let (world, _) = built(&desired("acme", vec![p.clone()]), t0());
    p.runner.as_mut().unwrap().agent_version = Some("2.321.0".into());
    assert!(!kinds(&plan(&desired("acme", vec![p]), &world, t0())).contains(&"update_runner_agent"));
}

/// Issue 22.2: on a forge whose runners declare their own labels (Forgejo, Gitea), a label change registers the
/// runner again (deregister, then register with the new labels), never an API relabel.
#[test]
fn a_forge_that_cannot_relabel_registers_again() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (world, _) = built(&d, t0());
    let mut pl = pool("mac", "aws", 1, "mac2.metal", "ami-1");
    pl.runner.as_mut().unwrap().labels = vec!["ci".into(), "xcode-16".into()];
    let mut d2 = desired("acme", vec![pl]);
    d2.forge_cannot_relabel = true;
    let p = plan(&d2, &world, t0());
    assert_eq!(kinds(&p), ["deregister_runner", "register_runner"]);
    assert_eq!(p.summary().change, 1);
}

/// Issue 24.3: a changed user tag is an in-place update of the machine and its host (the keys set, the keys
/// removed), never a replacement, and it does not wait for a running job: tags do not touch the runner.
#[test]
fn a_changed_user_tag_is_an_in_place_update_of_machine_and_host() {
    let mut d = desired(
        "acme",
        vec![pool("mac", "aws", 1, "mac2.metal", "ami-1"), pool("linux", "aws", 1, "t3.large", "ami-1")],
    );
    for p in &mut d.pools {
        p.spec.tags = [("team".to_string(), "a".to_string()), ("old".to_string(), "x".to_string())].into();
    }
    let (mut world, _) = built(&d, t0());
    assert!(world.machines.iter().all(|m| &m.tags["team"] == "a"), "tagged at creation");
    assert!(world.hosts.iter().all(|h| &h.tags["team"] == "a"), "hosts too");
    assert_eq!(plan(&d, &world, t0()).summary().change, 0, "converged");
    // Both runners are busy: a tag change still goes ahead, in place.
    for r in world.runners.as_mut().unwrap() {
        r.busy = true;
    }
    for p in &mut d.pools {
        p.spec.tags = [("team".to_string(), "b".to_string())].into();
    }
    let p = plan(&d, &world, t0());
    assert_eq!((p.summary().add, p.summary().change, p.summary().destroy), (0, 2, 0));
    assert_eq!(kinds(&p), ["update_tags", "update_tags"]);
    let mac_host = world.hosts[0].id.clone();
    let updates: Vec<(Option<String>, Vec<String>)> = p
        .actions()
        .map(|(_, a)| match &a.kind {
            ActionKind::UpdateTags { host_id, set, remove, .. } => {
                assert_eq!(set, &[("team".to_string(), "b".to_string())].into());
                (host_id.clone(), remove.clone())
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(updates.contains(&(Some(mac_host), vec!["old".to_string()])), "the Mac machine's host too: {updates:?}");
    assert!(updates.contains(&(None, vec!["old".to_string()])), "{updates:?}");
    assert!(p.deferred.is_empty(), "no job to wait for: {:?}", p.deferred);
    let mut sim = Simulator::default();
    sim.apply(&d, &mut world, &p, t0());
    assert_eq!(plan(&d, &world, t0()).summary().change, 0, "converged after the update");
    // nimbus's own tags are never the user's: they are not removed.
    assert!(world.machines.iter().all(|m| m.tags.contains_key("nimbus:tenant") && &m.tags["team"] == "b"));
}
