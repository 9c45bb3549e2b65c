//! Issue 20: the host ledger, hold-or-release decisions, budgets, plan costs, and `nimbus simulate` with its
//! offline lower bound. Pure logic (no peers) except the CLI tests at the end.

use chrono::{DateTime, Duration, TimeZone, Utc};
use nimbus::core::cost::{Billing, LedgerState, ReleasePolicy, ledger, parse_money, release_decision};
use nimbus::core::model::*;
use nimbus::core::plan::{ActionKind, DeferredKind, plan};
use nimbus::sim::{Rng, brute_force, class_bound, parse_trace};
use nimbus::testing::{desired, pool};

use crate::common::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn host(id: &str, allocated_at: DateTime<Utc>) -> Host {
    Host {
        provider: "aws".into(),
        id: id.into(),
        tags: machine_tags("acme", "aws", "mac", "nimbus.acme.mac.0", None),
        instance_type: "mac2.metal".into(),
        availability_zone: "us-east-1a".into(),
        state: HostState::Available,
        allocated_at,
        available_since: None,
        instance_ids: vec![],
    }
}

fn fleet_with(policy: Option<ReleasePolicy>) -> Desired {
    let mut d = desired("acme", vec![pool("mac", "aws", 0, "mac2.metal", "ami-1")]);
    d.providers.get_mut("aws").unwrap().host_release = policy;
    d
}

/// The ledger's arithmetic at its boundaries: exactly 24 h, the clock-skew margin, a provider clock ahead of
/// this one, a host that does not say when it was allocated.
#[test]
fn ledger_arithmetic_at_the_boundaries() {
    let d = fleet_with(None);
    let price = 0.65;
    // Exactly 24 h after allocation: 24 host-hours billed, the window ends now, but the 5-minute margin keeps it.
    let h = host("h-24", t0() - Duration::hours(24));
    let e = &ledger(&d, std::slice::from_ref(&h), t0())[0];
    assert_eq!(e.hours_billed, Some(24.0));
    assert_eq!(e.hours_held, Some(24.0));
    assert_eq!(e.window_ends_at, Some(t0()));
    assert!((e.cost_so_far.unwrap() - 24.0 * price).abs() < 1e-9, "{e:?}");
    assert_eq!(e.state, LedgerState::Idle, "inside the margin against clock skew: {}", e.reason);
    assert_eq!(e.release_at, Some(t0() + Duration::minutes(5)));
    // Past the margin: due, and the money it saves is said.
    let e = &ledger(&d, std::slice::from_ref(&h), t0() + Duration::minutes(5))[0];
    assert_eq!(e.state, LedgerState::Due, "{}", e.reason);
    assert!(e.reason.contains("saving $15.60/day"), "{}", e.reason);
    // One hour in: the whole 24-hour minimum is billed already (it is committed).
    let e = &ledger(&d, &[host("h-1", t0() - Duration::hours(1))], t0())[0];
    assert_eq!((e.hours_held, e.hours_billed), (Some(1.0), Some(24.0)));
    assert_eq!(e.state, LedgerState::Idle);
    assert!(e.reason.contains("kept for demand at no extra cost"), "{}", e.reason);
    // 30 h in: billed per second past the minimum.
    let e = &ledger(&d, &[host("h-30", t0() - Duration::hours(30))], t0())[0];
    assert_eq!(e.hours_billed, Some(30.0));
    // The provider's clock ahead of ours: an allocation "in the future" holds 0 h and bills the minimum.
    let e = &ledger(&d, &[host("h-skew", t0() + Duration::minutes(3))], t0())[0];
    assert_eq!((e.hours_held, e.hours_billed), (Some(0.0), Some(24.0)));
    assert_eq!(e.state, LedgerState::Idle);
    // No allocation time: nothing is guessed, and nimbus never releases it.
    let e = &ledger(&d, &[host("h-unknown", UNKNOWN_ALLOCATION)], t0())[0];
    assert_eq!((e.allocated_at, e.hours_billed, e.cost_so_far, e.window_ends_at), (None, None, None, None));
    assert_eq!(e.state, LedgerState::Held);
    assert!(e.reason.contains("allocation time is unknown"), "{}", e.reason);
    // In use and scrubbing.
    let mut busy = host("h-busy", t0() - Duration::hours(40));
    busy.instance_ids = vec!["i-1".into()];
    let mut scrub = host("h-scrub", t0() - Duration::hours(40));
    scrub.state = HostState::Pending;
    let states: Vec<LedgerState> = ledger(&d, &[busy, scrub], t0()).iter().map(|e| e.state).collect();
    assert_eq!(states, [LedgerState::InUse, LedgerState::Scrubbing]);
    // Billing models: per second with a minimum, per started hour, free.
    let sec = Billing { unit: BillingUnit::Second, minimum: std::time::Duration::from_secs(60) };
    assert_eq!(sec.billed_hours(std::time::Duration::from_secs(30)), 60.0 / 3600.0);
    let hour = Billing { unit: BillingUnit::Hour, minimum: std::time::Duration::ZERO };
    assert_eq!(hour.billed_hours(std::time::Duration::from_secs(3601)), 2.0);
    assert_eq!(hour.paid_until(t0(), t0() + Duration::minutes(70)), t0() + Duration::hours(2));
    assert_eq!(Billing::FREE.billed_hours(std::time::Duration::from_secs(99_999)), 0.0);
    assert_eq!(parse_money("$1,200.50"), Some(1200.5));
    assert_eq!(parse_money("lots"), None);
}

/// `hosts.release` decides for an idle host past its window: asap releases at the window's end, idle-for waits
/// for the idle time, never keeps it; inside its window a host is always kept. A pool's policy wins over its
/// provider's. The plan says why, with the money.
#[test]
fn hold_or_release_follows_the_policy() {
    let allocated = t0() - Duration::hours(30);
    let mut h = host("h-1", allocated);
    h.available_since = Some(t0() - Duration::hours(1));
    let window = allocated + Duration::hours(24) + Duration::minutes(5);
    assert_eq!(release_decision(&fleet_with(None), &h, t0()), Ok(window));
    assert_eq!(release_decision(&fleet_with(Some(ReleasePolicy::EndOfWindow)), &h, t0()), Ok(t0()));
    let idle_2h = ReleasePolicy::IdleFor(nimbus::config::HumanDuration(std::time::Duration::from_secs(7200)));
    assert_eq!(release_decision(&fleet_with(Some(idle_2h)), &h, t0()), Ok(t0() + Duration::hours(1)));
    assert!(release_decision(&fleet_with(Some(ReleasePolicy::Never)), &h, t0()).is_err());

    let world = |h: &Host| Actual { hosts: vec![h.clone()], runners: Some(vec![]), ..Actual::default() };
    // asap: released now, saying what that saves.
    let p = plan(&fleet_with(None), &world(&h), t0());
    assert!(p.actions().any(|(_, a)| matches!(a.kind, ActionKind::ReleaseHost { .. })));
    assert!(p.changes[0].reason.contains("releasing it saves $15.60/day"), "{}", p.changes[0].reason);
    // idle-for 2h: kept one more hour, said with its time and money.
    let p = plan(&fleet_with(Some(idle_2h)), &world(&h), t0());
    assert_eq!(p.actions().count(), 0);
    assert_eq!(p.deferred[0].kind, DeferredKind::HeldByPolicy);
    assert_eq!(p.deferred[0].due_at, Some(t0() + Duration::hours(1)));
    assert!(
        p.deferred[0].reason.contains("idle-for: 2h") && p.deferred[0].reason.contains("$15.60/day"),
        "{}",
        p.deferred[0].reason
    );
    // never: kept, no due time.
    let p = plan(&fleet_with(Some(ReleasePolicy::Never)), &world(&h), t0());
    assert_eq!(p.actions().count(), 0);
    assert_eq!((p.deferred[0].kind, p.deferred[0].due_at), (DeferredKind::HeldByPolicy, None));
    // The pool's policy wins over the provider's.
    let mut d = fleet_with(Some(ReleasePolicy::Never));
    d.pools[0].host_release = Some(ReleasePolicy::Asap);
    assert!(plan(&d, &world(&h), t0()).actions().any(|(_, a)| matches!(a.kind, ActionKind::ReleaseHost { .. })));
    // Inside its window a host is kept whatever the policy, with what it would save.
    let young = host("h-2", t0() - Duration::hours(2));
    let p = plan(&fleet_with(None), &world(&young), t0());
    assert_eq!(p.actions().count(), 0);
    assert_eq!(p.deferred[0].kind, DeferredKind::AllocationWindow);
    assert!(p.deferred[0].reason.contains("kept for demand at no extra cost"), "{}", p.deferred[0].reason);
}

/// `budget:` defers allocations past `max_hosts` or past what one plan may commit, with the reason; nothing
/// past the budget is allocated, and the drift stays visible.
#[test]
fn budgets_defer_the_excess_allocations() {
    let world = Actual { runners: Some(vec![]), ..Actual::default() };
    let mut d = desired("acme", vec![pool("mac", "aws", 3, "mac2.metal", "ami-1")]);
    d.budget.max_hosts.insert("mac2.metal".into(), 2);
    let p = plan(&d, &world, t0());
    let allocs = p.actions().filter(|(_, a)| matches!(a.kind, ActionKind::AllocateHost { .. })).count();
    assert_eq!(allocs, 2);
    assert_eq!(p.deferred.len(), 1);
    assert_eq!(p.deferred[0].kind, DeferredKind::Budget);
    assert!(p.deferred[0].reason.contains("budget.max_hosts allows 2 `mac2.metal` hosts"), "{}", p.deferred[0].reason);
    let doc = nimbus::core::plan::document::PlanDocument::from_plan(&p, None, None).with_cost(&d);
    assert!(doc.drift_pending(), "a machine the budget holds back is drift");
    let cost = doc.cost.unwrap();
    assert_eq!(cost.committed_hours, 48.0);
    assert!((cost.committed - 2.0 * 24.0 * 0.65).abs() < 1e-9, "{cost:?}");
    assert!((cost.per_day - 3.0 * 24.0 * 0.65).abs() < 1e-9, "the planned size is the pool's 3: {cost:?}");

    // Money: $20 per plan allows one host's 24-hour commitment ($15.60), not two.
    let mut d = desired("acme", vec![pool("mac", "aws", 3, "mac2.metal", "ami-1")]);
    d.budget.max_commit_per_plan = Some(20.0);
    let p = plan(&d, &world, t0());
    assert_eq!(p.actions().filter(|(_, a)| matches!(a.kind, ActionKind::AllocateHost { .. })).count(), 1);
    assert_eq!(p.deferred.iter().filter(|x| x.kind == DeferredKind::Budget).count(), 2);
    assert!(p.deferred[0].reason.contains("budget.max_commit_per_plan is $20.00"), "{}", p.deferred[0].reason);
    // An idle paid host is reused before allocating, and reusing costs no budget.
    let mut d = desired("acme", vec![pool("mac", "aws", 1, "mac2.metal", "ami-1")]);
    d.budget.max_hosts.insert("mac2.metal".into(), 1);
    let mut idle = host("h-idle", t0() - Duration::hours(3));
    idle.tags = machine_tags("acme", "aws", "mac", "nimbus.acme.mac.7", None);
    let w = Actual { hosts: vec![idle], runners: Some(vec![]), ..Actual::default() };
    let p = plan(&d, &w, t0());
    assert!(p.deferred.iter().all(|x| x.kind != DeferredKind::Budget), "{:?}", p.deferred);
    assert!(p.actions().all(|(_, a)| !matches!(a.kind, ActionKind::AllocateHost { .. })));
}

/// The lower bound is a lower bound: on random tiny traces it never exceeds the brute-force optimum (every way of
/// giving jobs to hosts), with and without a 24-hour minimum, a wait allowance and late jobs.
#[test]
fn the_lower_bound_never_exceeds_brute_force() {
    let mut rng = Rng::new(7);
    let mut tight = 0;
    for case in 0..400 {
        let n = 1 + (rng.next_u64() % 6) as usize;
        let jobs: Vec<(f64, f64)> = (0..n)
            .map(|_| ((rng.next_u64() % 200) as f64 * 600.0, 300.0 + (rng.next_u64() % 12) as f64 * 600.0))
            .collect();
        let minimum = [0.0, 3600.0, 86400.0][case % 3];
        let w = [0.0, 900.0][(case / 3) % 2];
        let total = if case % 5 == 0 { 20 + n } else { n };
        let late = total / 20;
        let (lb, _) = class_bound(&jobs, minimum, w, late);
        let bf = brute_force(&jobs, minimum, w, total).expect("some schedule is feasible");
        assert!(
            lb <= bf + 1e-6,
            "case {case}: bound {lb} > optimum {bf} for {jobs:?} (minimum {minimum}, w {w}, late {late})"
        );
        if (bf - lb).abs() < 1e-6 {
            tight += 1;
        }
    }
    assert!(tight > 100, "the bound is tight on many tiny traces ({tight} of 400)");
}

fn shipped(name: &str) -> Vec<nimbus::sim::TraceJob> {
    parse_trace(&std::fs::read_to_string(format!("fixtures/traces/{name}.csv")).unwrap()).unwrap()
}

fn sim_fleet() -> nimbus::config::FleetConfig {
    nimbus::config::load(std::path::Path::new("fixtures/traces/fleet.yaml")).unwrap().config
}

/// On every shipped trace: the simulation runs every job (the world refuses killing a busy runner, releasing a
/// host inside its window, or using a scrubbing host: a policy that tried would panic here), and the lower bound
/// at each policy's own p95 wait is at most what that policy billed. The quiet weekend twice with one seed gives
/// the same report; another seed moves boot and scrub times.
#[test]
fn simulations_are_deterministic_and_never_beat_the_lower_bound() {
    let fleet = sim_fleet();
    for name in ["quiet-weekend", "release-day", "weekday-diurnal"] {
        let trace = shipped(name);
        let r = nimbus::sim::simulate(&fleet, &trace, 1);
        assert_eq!(r.unserved, 0);
        for p in &r.policies {
            assert_eq!(p.jobs, trace.len(), "{name} {}: every job ran", p.policy);
            let lb = nimbus::sim::lower_bound(&fleet, &trace, p.wait_p95);
            assert!(
                lb.billed_hours <= p.billed_hours + 1e-6,
                "{name} {}: lower bound {} > billed {}",
                p.policy,
                lb.billed_hours,
                p.billed_hours
            );
            assert!(lb.cost <= p.cost + 1e-6);
        }
        assert!(r.ratio_to_lower_bound >= 1.0);
    }
    let trace = shipped("quiet-weekend");
    let a = nimbus::sim::simulate(&fleet, &trace, 42);
    let b = nimbus::sim::simulate(&fleet, &trace, 42);
    assert_eq!(a, b, "the same seed, the same report");
    let c = nimbus::sim::simulate(&fleet, &trace, 43);
    assert_ne!(a.policies, c.policies, "the seed drives boot and scrub times");
}

/// Traces are checked line by line, with the line number in the error.
#[test]
fn a_bad_trace_says_which_line() {
    assert!(parse_trace("submit,duration,labels\n0,60,linux\n").is_ok());
    let e = parse_trace("submit,duration,labels\n0,60,linux\nsoon,60,linux\n").unwrap_err();
    assert_eq!(e.line, 3);
    assert!(e.message.contains("`soon` is not a number"), "{e}");
    assert_eq!(parse_trace("0,60,linux\n").unwrap_err().line, 1, "the header is required");
    assert_eq!(parse_trace("submit,duration,labels\n# c\n\n5,60,\n").unwrap_err().line, 4);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("fixtures/traces/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    std::fs::write(dir.path().join("t.csv"), "submit,duration,labels\n1,2,linux\n3,x,linux\n").unwrap();
    let o = nimbus_env(dir.path(), &["simulate", "--trace", "t.csv"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 3"), "{}", text(&o));
}

/// `nimbus simulate` on a shipped trace: the JSON report has the three policies and the bound.
#[test]
fn simulate_reports_policies_and_the_bound() {
    let here = std::env::current_dir().unwrap();
    let o = nimbus_env(
        &here,
        &["simulate", "--trace", "fixtures/traces/quiet-weekend.csv", "-f", "fixtures/traces/fleet.yaml", "--json"],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["policies"].as_array().unwrap().iter().map(|p| p["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["fleet", "static-peak", "release-asap"]);
    assert!(v["lower_bound"]["billed_hours"].as_f64().unwrap() > 0.0);
    assert!(v["ratio_to_lower_bound"].as_f64().unwrap() >= 1.0);
    let o = nimbus_env(
        &here,
        &["simulate", "--trace", "fixtures/traces/quiet-weekend.csv", "-f", "fixtures/traces/fleet.yaml"],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("lower-bound") && out.contains("static-peak"), "{out}");
}
