//! Jobs are sacred: a busy runner is never deregistered, relabelled or terminated unless `--interrupt-jobs`
//! says so; its removal waits (deferred, with the reason) and idle machines go first. The Simulator panics on
//! any action against a busy runner, so every apply below also checks the plan.

use chrono::{DateTime, TimeZone, Utc};
use nimbus::core::model::*;
use nimbus::core::plan::{ActionKind, DeferredKind, Plan, plan};
use nimbus::testing::{Simulator, desired, finish_jobs, pool, start_jobs};
use proptest::prelude::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn built(d: &Desired) -> (Actual, Simulator) {
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    let mut sim = Simulator::default();
    let p = plan(d, &world, t0());
    sim.apply(d, &mut world, &p, t0());
    (world, sim)
}

fn names(world: &Actual) -> Vec<String> {
    let mut v: Vec<String> = world.machines.iter().filter_map(|m| m.name().map(str::to_string)).collect();
    v.sort();
    v
}

fn busy_deferred(p: &Plan) -> Vec<(String, &'static str)> {
    p.deferred
        .iter()
        .filter(|d| d.kind == DeferredKind::BusyRunner)
        .map(|d| (d.address.clone(), d.action.name()))
        .collect()
}

#[test]
fn scale_down_removes_idle_machines_first_and_defers_busy_ones() {
    let mut d = desired("acme", vec![pool("linux", "aws", 3, "t3.large", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    start_jobs(&mut world, &["nimbus.acme.linux.0", "nimbus.acme.linux.2"]);
    d.pools[0].count = 1;
    let p = plan(&d, &world, t0());
    // The idle machine goes now; one busy machine waits for its job (the other busy one stays).
    let terminated: Vec<String> = p
        .actions()
        .filter_map(|(_, a)| match &a.kind {
            ActionKind::TerminateInstance { machine, .. } => Some(machine.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(terminated, ["nimbus.acme.linux.1"]);
    assert_eq!(
        busy_deferred(&p),
        [("linux[2]".into(), "deregister_runner"), ("linux[2]".into(), "terminate_instance")]
    );
    assert!(p.deferred.iter().all(|x| x.reason.contains("waiting for the running job to finish")));
    assert_eq!(p.summary().destroy, 1);
    sim.apply(&d, &mut world, &p, t0());
    assert_eq!(names(&world), ["nimbus.acme.linux.0", "nimbus.acme.linux.2"]);
    // Planning again, nothing more can happen while the job runs.
    assert!(plan(&d, &world, t0()).is_empty());
    // The jobs finish: the next apply completes the drain.
    finish_jobs(&mut world);
    let p = plan(&d, &world, t0());
    assert!(busy_deferred(&p).is_empty());
    sim.apply(&d, &mut world, &p, t0());
    assert_eq!(names(&world), ["nimbus.acme.linux.0"]);
    assert!(plan(&d, &world, t0()).is_empty());
}

#[test]
fn a_removed_pool_waits_for_its_busy_runners() {
    let d = desired("acme", vec![pool("linux", "aws", 2, "t3.large", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    start_jobs(&mut world, &["nimbus.acme.linux.1"]);
    let gone = desired("acme", vec![]);
    let p = plan(&gone, &world, t0());
    assert_eq!(p.summary().destroy, 1);
    assert_eq!(busy_deferred(&p).len(), 2);
    sim.apply(&gone, &mut world, &p, t0());
    assert_eq!(names(&world), ["nimbus.acme.linux.1"]);
    finish_jobs(&mut world);
    let p = plan(&gone, &world, t0());
    sim.apply(&gone, &mut world, &p, t0());
    assert!(names(&world).is_empty());
}

#[test]
fn an_image_change_replaces_idle_machines_and_waits_for_busy_ones() {
    let mut d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    start_jobs(&mut world, &["nimbus.acme.mac.0"]);
    d.pools[0].spec.image = "ami-2".into();
    let p = plan(&d, &world, t0());
    assert_eq!(p.summary().destroy, 1, "only the idle machine is replaced now (its new instance waits for the scrub)");
    assert_eq!(busy_deferred(&p), [("mac[0]".into(), "deregister_runner"), ("mac[0]".into(), "terminate_instance")]);
    sim.apply(&d, &mut world, &p, t0());
    finish_jobs(&mut world);
    let p = plan(&d, &world, t0());
    assert_eq!(p.summary().destroy, 1);
    sim.apply(&d, &mut world, &p, t0());
    // The scrubs end; the new instances land on their own hosts.
    let later = t0() + chrono::Duration::hours(3);
    nimbus::testing::finish_scrubs(&mut world, later);
    let p = plan(&d, &world, later + chrono::Duration::minutes(10));
    assert_eq!(p.summary().add, 2);
    sim.apply(&d, &mut world, &p, later + chrono::Duration::minutes(10));
    assert!(plan(&d, &world, later + chrono::Duration::minutes(10)).is_empty());
    assert!(world.machines.iter().all(|m| m.image == "ami-2"));
    // Replaced on their own hosts: no host was allocated for the replacements.
    assert_eq!(world.hosts.len(), 2);
}

#[test]
fn a_busy_runner_is_not_relabelled_mid_job() {
    let mut d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    start_jobs(&mut world, &["nimbus.acme.linux.0"]);
    d.pools[0].runner.as_mut().unwrap().labels = vec!["gpu".into()];
    let p = plan(&d, &world, t0());
    assert!(p.is_empty(), "{:?}", p.actions().map(|(_, a)| a.kind.name()).collect::<Vec<_>>());
    assert_eq!(busy_deferred(&p), [("linux[0]".into(), "update_runner_labels")]);
    sim.apply(&d, &mut world, &p, t0());
    finish_jobs(&mut world);
    let p = plan(&d, &world, t0());
    sim.apply(&d, &mut world, &p, t0());
    assert_eq!(world.runners.as_ref().unwrap()[0].labels, ["gpu"]);
}

#[test]
fn interrupting_jobs_is_explicit_and_counted() {
    let mut d = desired("acme", vec![pool("linux", "aws", 3, "t3.large", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    start_jobs(&mut world, &["nimbus.acme.linux.0", "nimbus.acme.linux.1", "nimbus.acme.linux.2"]);
    d.pools[0].count = 1;
    d.interrupt_jobs = true;
    let p = plan(&d, &world, t0());
    assert_eq!(p.summary().destroy, 2);
    assert_eq!(p.summary().jobs_interrupted, 2);
    assert!(busy_deferred(&p).is_empty());
    let doc = nimbus::core::plan::document::PlanDocument::from_plan(&p, None, None);
    let text = nimbus::cli::views::plan_text::render(&doc, nimbus::cli::views::plan_text::Style { color: false });
    assert!(text.contains("2 running job(s) will be interrupted (--interrupt-jobs)."), "{text}");
    let md = nimbus::cli::views::plan_markdown::render(&doc);
    assert!(md.contains("2 running job(s) will be interrupted"), "{md}");
    assert_eq!(doc.summary.jobs_interrupted, 2);
    sim.apply(&d, &mut world, &p, t0());
    assert_eq!(names(&world).len(), 1);
}

#[test]
fn the_deferral_is_shown_in_every_view() {
    let mut d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    let (mut world, _) = built(&d);
    start_jobs(&mut world, &["nimbus.acme.linux.0"]);
    d.pools[0].count = 0;
    let doc = nimbus::core::plan::document::PlanDocument::from_plan(&plan(&d, &world, t0()), None, None);
    let json: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
    assert_eq!(json["deferred"][0]["kind"], "busy_runner");
    assert!(json["deferred"][0]["reason"].as_str().unwrap().contains("waiting for the running job to finish"));
    let text = nimbus::cli::views::plan_text::render(&doc, nimbus::cli::views::plan_text::Style { color: false });
    assert!(text.contains("when the running job finishes") && text.contains("waiting for the running job"), "{text}");
    let md = nimbus::cli::views::plan_markdown::render(&doc);
    assert!(md.contains("when the running job finishes") && md.contains("waiting for the running job"), "{md}");
}

#[derive(Debug, Clone)]
struct Gen {
    count: u32,
    mac: bool,
    image: u8,
    labels: u8,
    runner: bool,
}

fn pool_gen() -> impl Strategy<Value = Gen> {
    (0u32..5, any::<bool>(), 0u8..2, 0u8..2, prop::bool::weighted(0.8))
        .prop_map(|(count, mac, image, labels, runner)| Gen { count, mac, image, labels, runner })
}

fn fleet(gens: &[Gen]) -> Desired {
    let names = ["a", "b", "c"];
    let pools = gens
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut p = pool(
                names[i],
                "aws",
                g.count,
                if g.mac { "mac2.metal" } else { "t3.large" },
                &format!("ami-{}", g.image),
            );
            p.runner = g.runner.then(|| {
                RunnerSpec::new(
                    (0..g.labels).map(|l| format!("l{l}")).collect(),
                    nimbus::config::RunnerMode::Persistent,
                )
            });
            p
        })
        .collect();
    desired("acme", pools)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Over random fleets, random changes and random busy runners, no plan without `interrupt_jobs` removes,
    /// relabels or terminates a busy runner (the Simulator panics if one does), and once the jobs end the
    /// fleet converges.
    #[test]
    fn no_plan_touches_a_busy_runner(
        first in prop::collection::vec(pool_gen(), 1..4),
        second in prop::collection::vec(pool_gen(), 0..4),
        busy in prop::collection::vec(any::<bool>(), 12),
    ) {
        let d0 = fleet(&first);
        let (mut world, mut sim) = built(&d0);
        let mut busy_names = Vec::new();
        for (i, m) in world.machines.iter().enumerate() {
            if busy[i % busy.len()] {
                busy_names.push(m.name().unwrap().to_string());
            }
        }
        let refs: Vec<&str> = busy_names.iter().map(String::as_str).collect();
        start_jobs(&mut world, &refs);
        // Only machines with a runner can run a job.
        let busy_names: Vec<String> =
            world.runners.iter().flatten().filter(|r| r.busy).map(|r| r.name.clone()).collect();
        let d1 = fleet(&second);
        let p = plan(&d1, &world, t0());
        for (_, a) in p.actions() {
            let touched = match &a.kind {
                ActionKind::DeregisterRunner { runner_name, .. } => Some(runner_name.clone()),
                ActionKind::TerminateInstance { machine, .. } | ActionKind::UpdateRunnerLabels { machine, .. } => Some(machine.clone()),
                _ => None,
            };
            if let Some(n) = touched {
                prop_assert!(!busy_names.contains(&n), "{} on busy {n}", a.kind.name());
            }
        }
        sim.apply(&d1, &mut world, &p, t0());
        finish_jobs(&mut world);
        let p = plan(&d1, &world, t0());
        sim.apply(&d1, &mut world, &p, t0());
        let left = plan(&d1, &world, t0());
        prop_assert!(left.is_empty(), "not converged: {:?}", left.actions().map(|(_, a)| format!("{} {}", a.address, a.kind.name())).collect::<Vec<_>>());
    }
}

/// The flag exists on `plan` and `apply`; a saved plan that interrupts jobs needs it again at apply time.
#[test]
fn the_interrupt_flag_is_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    for args in [&["plan", "--interrupt-jobs"][..], &["apply", "--interrupt-jobs", "--auto-approve"][..]] {
        let o = crate::common::nimbus_env(dir.path(), args, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", crate::common::text(&o));
    }
}

// ---------------------------------------------------------------- offline runners, unreachable machines

#[test]
fn an_offline_runner_past_its_grace_is_restarted_and_not_before() {
    let d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    let r = &mut world.runners.as_mut().unwrap()[0];
    r.online = false;
    r.offline_since = Some(t0() - chrono::Duration::minutes(5));
    assert!(plan(&d, &world, t0()).is_empty(), "inside the 10m grace");
    world.runners.as_mut().unwrap()[0].offline_since = Some(t0() - chrono::Duration::minutes(11));
    let p = plan(&d, &world, t0());
    assert_eq!(p.actions().map(|(_, a)| a.kind.name()).collect::<Vec<_>>(), ["restart_runner"]);
    assert!(p.changes[0].reason.contains("runner offline since 2026-11-24T11:49:00Z"), "{}", p.changes[0].reason);
    sim.apply(&d, &mut world, &p, t0());
    assert!(plan(&d, &world, t0()).is_empty());
}

#[test]
fn an_unreachable_machine_past_the_grace_is_replaced_unless_its_runner_is_alive() {
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mut world, mut sim) = built(&d);
    let host = world.machines[0].host_id.clone();
    world.machines[0].on_machine = OnMachine::Unreachable { reason: "connection timed out".into() };
    world.machines[0].unreachable_since = Some(t0() - chrono::Duration::minutes(30));
    // Its runner still shows online: the machine is alive, only nimbus's route to it is not.
    let p = plan(&d, &world, t0());
    assert!(p.is_empty());
    assert!(p.warnings.iter().any(|w| w.message.contains("unreachable")));
    world.runners.as_mut().unwrap()[0].online = false;
    let p = plan(&d, &world, t0());
    assert_eq!(p.summary().destroy, 1);
    assert!(p.changes[0].reason.contains("has not answered since"), "{}", p.changes[0].reason);
    sim.apply(&d, &mut world, &p, t0());
    let later = t0() + chrono::Duration::hours(3);
    nimbus::testing::finish_scrubs(&mut world, later);
    let p = plan(&d, &world, later + chrono::Duration::minutes(10));
    sim.apply(&d, &mut world, &p, later + chrono::Duration::minutes(10));
    assert_eq!(world.machines[0].host_id, host, "replaced on its own host after its scrub: no new 24 h allocation");
    assert!(plan(&d, &world, later + chrono::Duration::minutes(10)).is_empty());
    // A busy runner on an unreachable machine is still never killed.
    let (mut world, _) = built(&d);
    world.machines[0].on_machine = OnMachine::Unreachable { reason: "timeout".into() };
    world.machines[0].unreachable_since = Some(t0() - chrono::Duration::hours(1));
    world.runners.as_mut().unwrap()[0].online = false;
    world.runners.as_mut().unwrap()[0].busy = true;
    let p = plan(&d, &world, t0());
    assert!(p.is_empty() && busy_deferred(&p).len() == 2);
}

#[test]
fn the_journal_remembers_since_when() {
    let dir = tempfile::tempdir().unwrap();
    let j = nimbus::state::journal::Journal::open(&dir.path().join("j.db")).unwrap();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let first = j.observe("runner_offline", &names(&["a", "b"]), t0()).unwrap();
    let later = j.observe("runner_offline", &names(&["a"]), t0() + chrono::Duration::minutes(5)).unwrap();
    assert_eq!(later["a"], first["a"], "a stays offline since the first sighting");
    let back = j.observe("runner_offline", &names(&["a", "b"]), t0() + chrono::Duration::minutes(9)).unwrap();
    assert_eq!(back["b"], t0() + chrono::Duration::minutes(9), "b came back online in between: a new spell");
}

// ---------------------------------------------------------------- ephemeral machines are clean for every job

fn ephemeral(p: &mut DesiredPool) {
    p.runner = Some(RunnerSpec::new(vec!["ci".into()], nimbus::config::RunnerMode::Ephemeral));
}

#[test]
fn after_a_job_a_linux_machine_is_replaced() {
    let mut d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    ephemeral(&mut d.pools[0]);
    let (mut world, mut sim) = built(&d);
    let before = world.machines[0].instance_id.clone();
    assert!(plan(&d, &world, t0()).is_empty(), "registered and waiting for its job");
    nimbus::testing::complete_ephemeral_jobs(&mut world, &["nimbus.acme.linux.0"]);
    let p = plan(&d, &world, t0());
    assert_eq!(p.summary().add, 1);
    assert_eq!(p.summary().destroy, 1);
    assert_eq!(p.changes[0].replace_paths, ["job"]);
    assert!(p.changes[0].reason.contains("finished its job"), "{}", p.changes[0].reason);
    sim.apply(&d, &mut world, &p, t0());
    assert_ne!(world.machines[0].instance_id, before, "a new instance");
    assert!(plan(&d, &world, t0()).is_empty());
}

#[test]
fn after_a_job_a_mac_is_reimaged_on_the_same_host() {
    let mut d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    ephemeral(&mut d.pools[0]);
    let (mut world, mut sim) = built(&d);
    let (instance, host) = (world.machines[0].instance_id.clone(), world.machines[0].host_id.clone());
    nimbus::testing::complete_ephemeral_jobs(&mut world, &["nimbus.acme.mac.0"]);
    let p = plan(&d, &world, t0());
    let kinds: Vec<&str> = p.actions().map(|(_, a)| a.kind.name()).collect();
    assert_eq!(kinds, ["reimage_machine", "wait_reachable", "run_setup", "register_runner"]);
    assert!(p.deferred.is_empty(), "no host is released");
    assert_eq!(p.summary().change, 1);
    sim.apply(&d, &mut world, &p, t0());
    assert_eq!((world.machines[0].instance_id.clone(), world.machines[0].host_id.clone()), (instance, host));
    assert_eq!(world.hosts.len(), 1, "no host allocated");
    assert!(plan(&d, &world, t0()).is_empty());
}

#[test]
fn an_opted_out_pool_registers_again_without_a_reimage() {
    let mut d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    ephemeral(&mut d.pools[0]);
    d.pools[0].runner.as_mut().unwrap().reimage_after_job = false;
    let (mut world, _) = built(&d);
    nimbus::testing::complete_ephemeral_jobs(&mut world, &["nimbus.acme.linux.0"]);
    let p = plan(&d, &world, t0());
    assert_eq!(p.actions().map(|(_, a)| a.kind.name()).collect::<Vec<_>>(), ["register_runner"]);
}

/// Issue 12: the journal turns "seen scrubbing, now available" into the time a host came back, so the plan
/// waits out the settling minutes EC2 needs after a scrub.
#[test]
fn the_journal_times_a_hosts_return_from_its_scrub() {
    let dir = tempfile::tempdir().unwrap();
    let j = nimbus::state::journal::Journal::open(&dir.path().join("j.db")).unwrap();
    let d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    let (mut world, _) = built(&d);
    world.hosts[0].state = HostState::Pending;
    nimbus::engine::discovery::annotate_with_history(&mut world, &j, t0()).unwrap();
    assert_eq!(world.hosts[0].available_since, None);
    world.hosts[0].state = HostState::Available;
    nimbus::engine::discovery::annotate_with_history(&mut world, &j, t0() + chrono::Duration::hours(1)).unwrap();
    assert_eq!(world.hosts[0].available_since, Some(t0() + chrono::Duration::hours(1)));
    nimbus::engine::discovery::annotate_with_history(&mut world, &j, t0() + chrono::Duration::hours(2)).unwrap();
    assert_eq!(world.hosts[0].available_since, Some(t0() + chrono::Duration::hours(1)), "kept from the first sighting");
}
