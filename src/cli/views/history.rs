//! `nimbus history`: runs, events, and one run's actions.

use crate::state::journal::{ActionRow, EventRow, RunRow};
use crate::util::text::terminal;

pub fn actions(id: i64, actions: &[ActionRow], json: bool) {
    if json {
        outln!("{}", serde_json::to_string_pretty(actions).expect("serialises"));
        return;
    }
    outln!("Run {id}: {} action(s)", actions.len());
    for a in actions {
        outln!(
            "  {:>4}  {:<9} {:<22} {}{}{}",
            a.action_id,
            a.status,
            a.kind,
            a.address,
            // Errors quote what machines and clouds said: defused for the terminal.
            a.error.as_ref().map(|e| format!("  error: {}", terminal(e))).unwrap_or_default(),
            a.log_path.as_ref().map(|p| format!("  log: {p}")).unwrap_or_default()
        );
    }
}

pub fn runs_and_events(runs: &[RunRow], events: &[EventRow], json: bool) {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "events": events })).expect("serialises")
        );
        return;
    }
    outln!("Runs (newest first):");
    for r in runs {
        outln!(
            "  {:>5}  {:<11} {}  {}{}  {}",
            r.id,
            r.status,
            r.started_at,
            r.command,
            // Who made it, when it was not a person at the command line: `api`, `reconcile`.
            r.actor.as_deref().filter(|a| *a != "cli").map(|a| format!(" (by {a})")).unwrap_or_default(),
            r.summary.clone().unwrap_or_default()
        );
    }
    outln!("\nEvents (newest first):");
    for e in events {
        outln!("  {}  {:<6} {:<5} {:<10} {}", e.ts, e.category, e.level, terminal(&e.actor), terminal(&e.message));
    }
}
