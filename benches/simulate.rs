//! Simulator benchmark (issue 20): one simulated week of a 200-machine fleet (the weekday trace scaled up
//! seven-fold, Mac and Linux), timed; then every shipped trace through `nimbus simulate`, with each policy's
//! billed hours over the offline lower bound at its own p95 wait (and the Mac hosts' alone).
//! Goal: the week in under 10 s. `cargo bench --bench simulate`. Figures are printed, never asserted.

use std::time::Instant;

use nimbus::sim::{TraceJob, lower_bound, parse_trace, run, simulate};

fn main() {
    let fleet = nimbus::config::load(std::path::Path::new("fixtures/traces/fleet.yaml")).expect("fixture fleet").config;
    let week = parse_trace(&std::fs::read_to_string("fixtures/traces/weekday-diurnal.csv").unwrap()).unwrap();
    // Seven copies, each shifted by a few seconds: ~7 times the demand, peaking at about 200 machines.
    let mut big: Vec<TraceJob> = Vec::new();
    for k in 0..7 {
        big.extend(week.iter().map(|j| TraceJob { submit: j.submit + k as f64 * 37.0, ..j.clone() }));
    }
    big.sort_by(|a, b| a.submit.total_cmp(&b.submit));
    let mut wide = fleet.clone();
    for p in &mut wide.pools {
        if let Some(s) = &mut p.scale {
            s.max = if p.name == "mac" { 80 } else { 160 };
        }
    }
    let t = Instant::now();
    let r = run(&wide, &big, 1, "fleet");
    let took = t.elapsed();
    println!(
        "simulate/week-200: {} jobs, peak {} machines, p95 wait {:.0}s, {:.0} billed hours: {:.2} s (goal < 10 s)",
        big.len(),
        r.peak_machines,
        r.wait_p95,
        r.billed_hours,
        took.as_secs_f64()
    );
    for name in ["weekday-diurnal", "release-day", "quiet-weekend"] {
        let trace = parse_trace(&std::fs::read_to_string(format!("fixtures/traces/{name}.csv")).unwrap()).unwrap();
        let t = Instant::now();
        let report = simulate(&fleet, &trace, 1);
        let took = t.elapsed();
        for p in &report.policies {
            let lb = lower_bound(&fleet, &trace, p.wait_p95);
            let mac = p.billed_by_type.get("mac2.metal").copied().unwrap_or(0.0);
            let mac_lb = lb.by_type.get("mac2.metal").map(|x| x.3).unwrap_or(0.0);
            println!(
                "simulate/{name}/{}: p95 wait {:.0}s, billed {:.1} h (bound {:.1} h, ratio {:.2}); Mac hosts {:.1} h (bound {:.1} h, ratio {:.2}); ${:.2}",
                p.policy,
                p.wait_p95,
                p.billed_hours,
                lb.billed_hours,
                p.billed_hours / lb.billed_hours.max(1e-9),
                mac,
                mac_lb,
                mac / mac_lb.max(1e-9),
                p.cost
            );
        }
        println!("simulate/{name}: three policies and the bound in {:.2} s", took.as_secs_f64());
    }
}
