//! The Markdown view of a plan, for pull-request comments. GitHub refuses
//! comments over 65,536 characters, so a large plan is summarised: first the
//! per-resource details go, then the table is grouped by pool and action, and
//! finally rows are cut with a count of what was left out.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::summary_line;
use crate::core::plan::diff::attribute_diff;
use crate::core::plan::document::PlanDocument;
use crate::core::plan::{ChangeAction, DeferredKind, ResourceChange};
use crate::util::time::{ts, until};

/// GitHub's limit on a comment body, in characters.
pub const GITHUB_COMMENT_LIMIT: usize = 65_536;
/// What we aim under, leaving room for a workflow to add a header.
pub const BUDGET: usize = 60_000;

/// A marker a workflow can search for to update its comment in place.
pub const MARKER: &str = "<!-- nimbus-plan -->";

fn action_word(c: &ResourceChange) -> &'static str {
    if c.is_replace() {
        return "replace";
    }
    match c.actions.first() {
        Some(ChangeAction::Create) => "create",
        Some(ChangeAction::Delete) => "destroy",
        _ => "update",
    }
}

fn icon(word: &str) -> &'static str {
    match word {
        "create" => "➕",
        "destroy" => "➖",
        "replace" => "🔄",
        _ => "✏️",
    }
}

/// Text that may come from machines, forges or clouds: shown literally (no mentions, links, images, HTML).
fn escape(s: &str) -> String {
    crate::util::text::markdown(s)
}

fn code(s: &str) -> String {
    crate::util::text::markdown_code(s)
}

/// Renders the plan as Markdown, never longer than [`BUDGET`] characters.
pub fn render(doc: &PlanDocument) -> String {
    let full = render_with(doc, Detail::Full);
    if full.chars().count() <= BUDGET {
        return full;
    }
    let table = render_with(doc, Detail::Table);
    if table.chars().count() <= BUDGET {
        return table;
    }
    render_with(doc, Detail::Grouped)
}

#[derive(Clone, Copy, PartialEq)]
enum Detail {
    Full,
    Table,
    Grouped,
}

fn render_with(doc: &PlanDocument, detail: Detail) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{MARKER}");
    let _ = writeln!(o, "### nimbus plan for tenant {}", code(&doc.tenant));
    let _ = writeln!(o);
    if doc.resource_changes.is_empty() && doc.drift_pending() {
        let _ =
            writeln!(o, "**Nothing can be changed yet, but the fleet does not match the fleet file** (see Deferred).");
    } else if doc.resource_changes.is_empty() {
        let _ = writeln!(o, "**No changes.** The fleet matches the fleet file.");
    } else {
        let _ = writeln!(o, "**{}**", summary_line(&doc.summary));
    }
    if doc.summary.jobs_interrupted > 0 {
        let _ = writeln!(
            o,
            "⚠️ **{} running job(s) will be interrupted** (`--interrupt-jobs`).",
            doc.summary.jobs_interrupted
        );
    }
    if doc.summary.deferred > 0 {
        let _ = writeln!(o);
        let _ = writeln!(o, "⏲ {} action(s) deferred (see below).", doc.summary.deferred);
    }
    if !doc.resource_changes.is_empty() {
        let _ = writeln!(o);
        match detail {
            Detail::Full | Detail::Table => {
                let _ = writeln!(o, "| | Resource | Action | Reason |");
                let _ = writeln!(o, "|---|---|---|---|");
                let mut budget_left = BUDGET.saturating_sub(o.len() + 4_000);
                let mut cut = 0usize;
                for c in &doc.resource_changes {
                    let w = action_word(c);
                    let review = if doc.pending_review.contains(&c.address) {
                        " (left for review by `nimbus reconcile`)"
                    } else {
                        ""
                    };
                    let row = format!("| {} | {} | {w} | {}{review} |\n", icon(w), code(&c.address), escape(&c.reason));
                    if row.len() > budget_left {
                        cut += 1;
                        continue;
                    }
                    budget_left -= row.len();
                    o.push_str(&row);
                }
                if cut > 0 {
                    let _ = writeln!(o, "\n…and {cut} more change(s) not shown; run `nimbus plan` for all of them.");
                }
            }
            Detail::Grouped => {
                let mut groups: BTreeMap<(String, &str), usize> = BTreeMap::new();
                for c in &doc.resource_changes {
                    *groups.entry((c.pool.clone().unwrap_or_else(|| "(none)".into()), action_word(c))).or_default() +=
                        1;
                }
                let _ = writeln!(o, "The plan is too large to list here, so it is summarised by pool.");
                let _ = writeln!(o);
                let _ = writeln!(o, "| Pool | Action | Resources |");
                let _ = writeln!(o, "|---|---|---|");
                let mut cut = 0usize;
                for ((pool, w), n) in &groups {
                    let row = format!("| {} | {} {w} | {n} |\n", code(pool), icon(w));
                    if o.len() + row.len() > BUDGET - 2_000 {
                        cut += 1;
                        continue;
                    }
                    o.push_str(&row);
                }
                if cut > 0 {
                    let _ = writeln!(o, "\n…and {cut} more group(s) not shown.");
                }
            }
        }
    }
    if detail == Detail::Full && !doc.resource_changes.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "<details><summary>Details</summary>");
        let _ = writeln!(o);
        let _ = writeln!(o, "```diff");
        for c in &doc.resource_changes {
            let sym = match action_word(c) {
                "create" => "+",
                "destroy" => "-",
                "replace" => "!",
                _ => "~",
            };
            let _ = writeln!(o, "{sym} {} ({})", c.address, c.name);
            for (k, b, a, forces) in attribute_diff(c) {
                let note = if forces { "  # forces replacement" } else { "" };
                let line = match (b, a) {
                    (None, Some(a)) => format!("+     {k} = {a}"),
                    (Some(b), None) => format!("-     {k} = {b}"),
                    (Some(b), Some(a)) => format!("!     {k} = {b} -> {a}{note}"),
                    (None, None) => continue,
                };
                let _ = writeln!(o, "{}", line.replace("```", "'''"));
            }
        }
        let _ = writeln!(o, "```");
        let _ = writeln!(o);
        let _ = writeln!(o, "</details>");
        // Changed setup scripts: each distinct diff once, collapsed, with the machines it applies to.
        let mut diffs: Vec<(&str, &str, &str, Vec<&str>)> = Vec::new();
        for c in &doc.resource_changes {
            for d in &c.script_diffs {
                match diffs.iter_mut().find(|(s, f, t, _)| *s == d.step && *f == d.from && *t == d.diff) {
                    Some(e) => e.3.push(&c.address),
                    None => diffs.push((&d.step, &d.from, &d.diff, vec![&c.address])),
                }
            }
        }
        for (step, from, diff, addrs) in diffs {
            if o.len() + diff.len() > BUDGET - 3_000 {
                let _ = writeln!(
                    o,
                    "\n…the script diff of step `{}` is too long to show here; run `nimbus plan`.",
                    escape(step)
                );
                continue;
            }
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "<details><summary>Script of step <code>{}</code> changed (from the {}): {}</summary>",
                escape(step),
                escape(from),
                addrs.iter().map(|a| code(a)).collect::<Vec<_>>().join(", ")
            );
            let _ = writeln!(o);
            let _ = writeln!(o, "```diff");
            let _ = write!(o, "{}", diff.replace("```", "'''"));
            if !diff.ends_with('\n') {
                let _ = writeln!(o);
            }
            let _ = writeln!(o, "```");
            let _ = writeln!(o);
            let _ = writeln!(o, "</details>");
        }
    }
    if !doc.deferred.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "#### Deferred");
        let _ = writeln!(o);
        let _ = writeln!(o, "| Resource | Action | Due | Reason |");
        let _ = writeln!(o, "|---|---|---|---|");
        let mut cut = 0usize;
        for d in &doc.deferred {
            let due = match (d.due_at, d.kind) {
                (Some(t), _) => format!("{} ({})", ts(&t), until(&t, &doc.planned_at)),
                (None, DeferredKind::BusyRunner) => "when the running job finishes".into(),
                (None, DeferredKind::NotVisibleYet) => "once the provider shows it".into(),
                (None, DeferredKind::Budget) => "when the budget allows".into(),
                (None, DeferredKind::HeldByPolicy) => "kept by hosts.release".into(),
                (None, _) => "when the provider allows".into(),
            };
            let row = format!("| {} | {} | {due} | {} |\n", code(&d.address), d.action.name(), escape(&d.reason));
            if o.len() + row.len() > BUDGET - 1_500 {
                cut += 1;
                continue;
            }
            o.push_str(&row);
        }
        if cut > 0 {
            let _ = writeln!(o, "\n…and {cut} more deferred action(s).");
        }
    }
    if let Some(p) = doc.policy.as_ref().filter(|p| p.denied()) {
        let _ = writeln!(o);
        let _ = writeln!(o, "#### Policy: denied");
        let _ = writeln!(o);
        for d in &p.denies {
            let _ = writeln!(o, "- ❌ {}", escape(d));
        }
    }
    if !doc.warnings.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "#### Warnings");
        let _ = writeln!(o);
        let mut cut = 0usize;
        for w in &doc.warnings {
            let row = format!("- {}: {}\n", code(&w.address), escape(&w.message));
            if o.len() + row.len() > BUDGET - 500 {
                cut += 1;
                continue;
            }
            o.push_str(&row);
        }
        if cut > 0 {
            let _ = writeln!(o, "- …and {cut} more warning(s).");
        }
    }
    if let Some(c) = doc.cost.as_ref().filter(|c| c.committed > 0.0 || c.per_day > 0.0 || !c.unpriced.is_empty()) {
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", escape(&c.line()));
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "<sub>planned as of {} · plan format {}</sub>", ts(&doc.planned_at), doc.format_version);
    o
}
