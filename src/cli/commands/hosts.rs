//! `nimbus hosts [--json]`: the host ledger — every dedicated host of the fleet, what it cost so far, where it
//! stands (in use, idle, scrubbing, settling, due, held) and why it is kept or when it goes.

use chrono::Utc;

use super::plan::observe;
use super::{CommandError, exit};
use crate::cli::HostsArgs;
use crate::config;
use crate::core::cost::{LedgerEntry, money};
use crate::core::model::Desired;

/// The JSON document of `nimbus hosts --json`.
#[derive(Debug, serde::Serialize)]
pub struct HostsDocument {
    pub format_version: &'static str,
    pub tenant: String,
    pub observed_at: chrono::DateTime<Utc>,
    pub currency: &'static str,
    pub prices_taken: &'static str,
    pub hosts: Vec<LedgerEntry>,
    /// Dollars billed so far over every priced host.
    pub cost_so_far: f64,
    /// Dollars per day for every host held now.
    pub per_day: f64,
}

pub fn hosts(args: &HostsArgs) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    let (mut actual, _) = observe(&loaded)?;
    let now = Utc::now();
    if let Ok(Some(r)) = super::read_journal(&loaded, None) {
        let _ = crate::engine::discovery::annotate_with_history(&mut actual, &r.journal, now);
    }
    let desired = Desired::from_config(&loaded.config);
    let entries = crate::core::cost::ledger(&desired, &actual.hosts, now);
    let doc = HostsDocument {
        format_version: "1.0",
        tenant: loaded.config.tenant.clone(),
        observed_at: now,
        currency: "USD",
        prices_taken: crate::core::cost::PRICES_TAKEN,
        cost_so_far: entries.iter().filter_map(|e| e.cost_so_far).sum(),
        per_day: entries.iter().filter_map(|e| e.price_per_hour).map(|p| p * 24.0).sum(),
        hosts: entries,
    };
    if args.json {
        let mut s = serde_json::to_string_pretty(&doc).expect("ledger serialises");
        s.push('\n');
        out!("{s}");
        return Ok(exit::OK);
    }
    out!("{}", render(&doc));
    Ok(exit::OK)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "?".into())
}

/// The ledger as a table, each host's reason under it.
pub fn render(doc: &HostsDocument) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    if doc.hosts.is_empty() {
        let _ = writeln!(o, "No dedicated hosts for tenant `{}`.", doc.tenant);
        return o;
    }
    let _ = writeln!(
        o,
        "{:<21} {:<17} {:<10} {:<20} {:>8} {:>9} {:<20} MACHINE",
        "HOST", "TYPE", "STATE", "ALLOCATED", "BILLED h", "COST", "WINDOW ENDS"
    );
    for e in &doc.hosts {
        let ts =
            |t: Option<chrono::DateTime<Utc>>| t.map(|t| crate::util::time::ts(&t)).unwrap_or_else(|| "unknown".into());
        let _ = writeln!(
            o,
            "{:<21} {:<17} {:<10} {:<20} {:>8} {:>9} {:<20} {}",
            e.host_id,
            e.instance_type,
            e.state.as_str(),
            ts(e.allocated_at),
            opt(e.hours_billed, |h| format!("{h:.1}")),
            opt(e.cost_so_far, money),
            ts(e.window_ends_at),
            e.machine.as_deref().unwrap_or("-")
        );
        let _ = writeln!(o, "    {}", crate::util::text::terminal(&e.reason));
    }
    let _ = writeln!(
        o,
        "\n{} host(s): {} billed so far; {}/day while held. Prices as of {} (on-demand; `pricing:` overrides).",
        doc.hosts.len(),
        money(doc.cost_so_far),
        money(doc.per_day),
        doc.prices_taken
    );
    o
}
