//! `nimbus simulate --trace TRACE.csv -f fleet.yaml [--json] [--seed N]`: the trace replayed through the
//! controller's policy in virtual time (`crate::sim`), beside a static pool sized for the peak, releasing hosts as
//! soon as allowed, and the offline lower bound.

use super::{CommandError, exit};
use crate::cli::SimulateArgs;
use crate::config;
use crate::core::cost::money;

pub fn simulate(args: &SimulateArgs) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    let text = std::fs::read_to_string(&args.trace).map_err(|source| CommandError::Io {
        what: "read trace",
        path: args.trace.clone(),
        source,
    })?;
    let trace = crate::sim::parse_trace(&text).map_err(|e| {
        CommandError::usage(
            format!("`{}` {}: {}", args.trace.display(), format_args!("line {}", e.line), e.message),
            "a trace is CSV with the header `submit,duration,labels`: seconds from the start, seconds it runs, labels separated by `;` (see the README)",
        )
    })?;
    if trace.is_empty() {
        return Err(CommandError::usage(
            format!("`{}` has no jobs", args.trace.display()),
            "add one line per job after the header `submit,duration,labels`",
        ));
    }
    let report = crate::sim::simulate(&loaded.config, &trace, args.seed);
    if args.json {
        let mut s = serde_json::to_string_pretty(&report).expect("report serialises");
        s.push('\n');
        out!("{s}");
        return Ok(exit::OK);
    }
    out!("{}", render(&report));
    Ok(exit::OK)
}

fn dur(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

pub fn render(r: &crate::sim::Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "{} jobs over {}, seed {}.", r.jobs, dur(r.horizon), r.seed);
    if r.unserved > 0 {
        let _ = writeln!(o, "{} job(s) ask for labels no pool has: never started, not counted.", r.unserved);
    }
    let _ = writeln!(
        o,
        "\n{:<14} {:>9} {:>9} {:>9} {:>12} {:>11} {:>6} {:>5}",
        "POLICY", "WAIT p50", "WAIT p95", "WAIT max", "BILLED h", "COST", "IDLE", "PEAK"
    );
    for p in &r.policies {
        let _ = writeln!(
            o,
            "{:<14} {:>9} {:>9} {:>9} {:>12.1} {:>11} {:>5.0}% {:>5}",
            p.policy,
            dur(p.wait_p50),
            dur(p.wait_p95),
            dur(p.wait_max),
            p.billed_hours,
            money(p.cost),
            p.idle_share * 100.0,
            p.peak_machines
        );
    }
    let lb = &r.lower_bound;
    let _ = writeln!(
        o,
        "{:<14} {:>9} {:>9} {:>9} {:>12.1} {:>11}",
        "lower-bound",
        "",
        dur(lb.p95_wait),
        "",
        lb.billed_hours,
        money(lb.cost)
    );
    let _ = writeln!(
        o,
        "\nThe fleet's policy bills {:.2}× the offline lower bound at its p95 wait ({}).",
        r.ratio_to_lower_bound,
        dur(lb.p95_wait)
    );
    for (t, (work, hosts, min, hours)) in &lb.by_type {
        let _ = writeln!(
            o,
            "  {t}: {work:.1} job-hours, at least {hosts} host(s) × {min:.1} h minimum → at least {hours:.1} h billed"
        );
    }
    o
}
