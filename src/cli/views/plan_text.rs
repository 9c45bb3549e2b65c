//! The terminal view of a plan, in Terraform's vocabulary: `+` create,
//! `-` destroy, `~` update in place, `-/+` replace; then deferred actions,
//! warnings, and "Plan: N to add, N to change, N to destroy." Reads well
//! without colour; colour is only added when asked for.

use std::fmt::Write;

use super::summary_line;
use crate::core::plan::diff::attribute_diff;
use crate::core::plan::document::PlanDocument;
use crate::core::plan::{ActionKind, ChangeAction, DeferredKind, ResourceChange, ResourceKind};
use crate::util::time::{ts, until};

/// ANSI styling, or none.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() }
    }
    pub fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    pub fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
    pub fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    pub fn cyan(&self, s: &str) -> String {
        self.paint("36", s)
    }
}

fn symbol(c: &ResourceChange, st: Style) -> String {
    if c.is_replace() {
        return format!("{}/{}", st.red("-"), st.green("+"));
    }
    match c.actions.first() {
        Some(ChangeAction::Create) => format!("  {}", st.green("+")),
        Some(ChangeAction::Delete) => format!("  {}", st.red("-")),
        _ => format!("  {}", st.yellow("~")),
    }
}

fn verb(c: &ResourceChange) -> &'static str {
    if c.is_replace() {
        return "must be replaced";
    }
    match c.actions.first() {
        Some(ChangeAction::Create) => "will be created",
        Some(ChangeAction::Delete) => "will be destroyed",
        _ => "will be updated in-place",
    }
}

fn kind_word(k: ResourceKind) -> &'static str {
    match k {
        ResourceKind::Machine => "machine",
        ResourceKind::Host => "host",
        ResourceKind::Runner => "runner",
    }
}

/// Text that may come from machines, forges or clouds, made safe for a terminal.
fn safe(s: &str) -> String {
    crate::util::text::terminal(s)
}

/// Renders the plan for a terminal.
pub fn render(doc: &PlanDocument, st: Style) -> String {
    let mut o = String::new();
    if doc.resource_changes.is_empty() && doc.drift_pending() {
        let _ = writeln!(o, "{}", st.bold("Nothing can be changed yet, but the fleet does not match the fleet file."));
        let _ = writeln!(o, "Tenant `{}`: see what waits, and for what, under Deferred.", doc.tenant);
    } else if doc.resource_changes.is_empty() {
        let _ = writeln!(o, "{}", st.bold("No changes."));
        let _ = writeln!(o, "The fleet of tenant `{}` matches the fleet file.", doc.tenant);
    } else {
        let _ = writeln!(o, "nimbus will perform the following actions for tenant `{}`:", doc.tenant);
        for c in &doc.resource_changes {
            let _ = writeln!(o);
            let _ = writeln!(o, "  {}", st.bold(&format!("# {} {}", safe(&c.address), verb(c))));
            let _ = writeln!(o, "  # ({})", safe(&c.reason));
            if doc.pending_review.contains(&c.address) {
                let _ = writeln!(o, "  # (`nimbus reconcile` leaves this for review: apply it with `nimbus apply`)");
            }
            let _ = writeln!(o, "{} {} {:?} {{", symbol(c, st), kind_word(c.kind), safe(&c.name));
            let diff = attribute_diff(c);
            let width = diff.iter().map(|d| d.0.len()).max().unwrap_or(0);
            for (k, b, a, forces) in diff {
                let line = match (b, a) {
                    (None, Some(a)) => format!("      {} {k:width$} = {}", st.green("+"), safe(&a)),
                    (Some(b), None) => format!("      {} {k:width$} = {}", st.red("-"), safe(&b)),
                    (Some(b), Some(a)) => format!("      {} {k:width$} = {} -> {}", st.yellow("~"), safe(&b), safe(&a)),
                    (None, None) => continue,
                };
                let note = if forces { format!(" {}", st.red("# forces replacement")) } else { String::new() };
                let _ = writeln!(o, "{line}{note}");
            }
            if !c.run_steps.is_empty() && !c.actions.contains(&ChangeAction::Create) {
                let _ = writeln!(o, "      {} run setup: {}", st.yellow("~"), c.run_steps.join(", "));
            }
            for d in &c.script_diffs {
                let _ = writeln!(
                    o,
                    "      {} script of step `{}` changed (from the {}):",
                    st.yellow("~"),
                    safe(&d.step),
                    safe(&d.from)
                );
                for line in d.diff.lines() {
                    let shown = match line.chars().next() {
                        Some('+') if !line.starts_with("+++") => st.green(&safe(line)),
                        Some('-') if !line.starts_with("---") => st.red(&safe(line)),
                        _ => safe(line),
                    };
                    let _ = writeln!(o, "        {shown}");
                }
            }
            let _ = writeln!(o, "    }}");
        }
    }
    if !doc.deferred.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", st.bold("Deferred (not possible yet):"));
        for d in &doc.deferred {
            let what = match &d.action {
                ActionKind::ReleaseHost { .. } => "release",
                other => other.name(),
            };
            let when = match (&d.due_at, d.kind) {
                (Some(t), _) => format!("due {} ({})", ts(t), until(t, &doc.planned_at)),
                (None, DeferredKind::BusyRunner) => "when the running job finishes".to_string(),
                (None, DeferredKind::NotVisibleYet) => "once the provider shows it".to_string(),
                (None, DeferredKind::Budget) => "when the budget allows".to_string(),
                (None, DeferredKind::HeldByPolicy) => "kept by hosts.release".to_string(),
                (None, _) => "due when the provider allows".to_string(),
            };
            let _ = writeln!(o, "  {} {} {what}, {when}", st.cyan("⏲"), safe(&d.address));
            let _ = writeln!(o, "      {}", safe(&d.reason));
        }
    }
    if !doc.warnings.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", st.bold("Warnings:"));
        for w in &doc.warnings {
            let _ = writeln!(o, "  {} {}: {}", st.yellow("!"), safe(&w.address), safe(&w.message));
        }
    }
    if let Some(p) = doc.policy.as_ref().filter(|p| p.denied()) {
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", st.bold(&format!("Policy denied this plan ({} file(s) checked):", p.files.len())));
        for d in &p.denies {
            let _ = writeln!(o, "  {} {}", st.red("✗"), safe(d));
        }
    }
    if !doc.resource_changes.is_empty() || !doc.deferred.is_empty() {
        let _ = writeln!(o);
        let mut line = st.bold(&summary_line(&doc.summary));
        if doc.summary.deferred > 0 {
            line.push_str(&format!(" {} deferred.", doc.summary.deferred));
        }
        if doc.summary.jobs_interrupted > 0 {
            line.push_str(&st.red(&format!(
                " {} running job(s) will be interrupted (--interrupt-jobs).",
                doc.summary.jobs_interrupted
            )));
        }
        let _ = writeln!(o, "{line}");
    }
    if let Some(c) = doc.cost.as_ref().filter(|c| c.committed > 0.0 || c.per_day > 0.0 || !c.unpriced.is_empty()) {
        let _ = writeln!(o, "{}", c.line());
    }
    o
}
