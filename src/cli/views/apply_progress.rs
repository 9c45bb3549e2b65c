//! Apply progress on stderr: one line per action with elapsed time, a progress bar on a terminal, and the
//! closing summary ("Apply complete! Resources: …").

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::core::plan::Action;
use crate::engine::apply::{ApplyOutcome, Hook};
use crate::engine::walk::{ExecEvent, Outcome};
use crate::util::text::{terminal, terminal_lines};

/// Prints each action as it starts and ends.
pub struct Progress {
    bar: ProgressBar,
    quiet: bool,
    t0: Instant,
}

impl Progress {
    /// `total` actions; a bar only on a terminal; nothing at all when `quiet` (JSON logs on stderr).
    pub fn new(total: usize, terminal: bool, quiet: bool) -> Self {
        let bar = if terminal && !quiet {
            let b = ProgressBar::new(total as u64);
            b.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} actions  {elapsed}").expect("template"));
            b
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, quiet, t0: Instant::now() }
    }

    fn say(&self, line: String) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() { errln!("{line}") } else { self.bar.println(line) }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Hook for Progress {
    fn event(&mut self, a: &Action, ev: &ExecEvent) {
        let stamp = format!("[{:>6.1}s]", self.t0.elapsed().as_secs_f64());
        match ev {
            ExecEvent::Started { .. } => self.say(format!("{stamp} {}: {}…", a.address, a.kind.name())),
            ExecEvent::Finished { outcome, elapsed, .. } => {
                let secs = elapsed.as_secs_f64();
                self.say(match outcome {
                    Outcome::Success => format!("{stamp} {}: {} done ({secs:.1}s)", a.address, a.kind.name()),
                    // What a machine, forge or cloud said is shown with its control characters defused.
                    Outcome::Failed(e) => {
                        format!(
                            "{stamp} {}: {} FAILED ({secs:.1}s): {}",
                            a.address,
                            a.kind.name(),
                            terminal_lines(&e.to_string())
                        )
                    }
                    Outcome::Deferred(why) => {
                        format!("{stamp} {}: {} deferred: {}", a.address, a.kind.name(), terminal(why))
                    }
                    Outcome::Skipped { root_cause } => {
                        format!("{stamp} {}: {} skipped (action {root_cause} failed)", a.address, a.kind.name())
                    }
                });
                self.bar.inc(1);
            }
        }
    }
}

/// The closing lines of an apply. Returns whether it succeeded.
pub fn summary(o: &ApplyOutcome, deferred: usize, action: impl Fn(usize) -> Action, logs: &std::path::Path) {
    let done = o.tally.done;
    let resources = format!("Resources: {} added, {} changed, {} destroyed.", done.add, done.change, done.destroy);
    let incomplete = || {
        for (address, why) in &o.tally.incomplete {
            errln!("Incomplete: {address}: {}; `nimbus apply` continues it", terminal(why));
        }
    };
    let errors = || {
        let mut hints = Vec::new();
        for id in &o.report.root_causes {
            if let Some(Outcome::Failed(e)) = o.report.outcomes.get(id) {
                let a = action(*id);
                let skipped = o.report.count(|x| *x == Outcome::Skipped { root_cause: *id });
                errln!("Error: {} {}: {}", a.address, a.kind.name(), terminal_lines(&e.to_string()));
                if skipped > 0 {
                    errln!("  ({skipped} dependent action(s) skipped)");
                }
                if let Some(hint) = e.provider_error().map(|p| p.hint()).filter(|h| !hints.contains(h)) {
                    hints.push(hint);
                }
            }
        }
        for hint in hints {
            errln!("hint: {hint}");
        }
    };
    if !o.journal_errors.is_empty() {
        errln!("\nApply stopped: the journal could not be written, so no new actions were started. {resources}");
        for e in o.journal_errors.iter().take(3) {
            errln!("Error: journal: {}", terminal(e));
        }
        incomplete();
        errors();
        errln!(
            "hint: fix what the error says (a local journal: its folder's space and permissions) and run `nimbus apply` again to continue"
        );
        return;
    }
    if o.report.interrupted {
        errln!("\nApply interrupted. {resources}");
        incomplete();
        errln!("{} action(s) were not started. Run `nimbus apply` again to continue.", o.not_started);
        errors();
    } else if o.report.succeeded() {
        outln!("\nApply complete! {resources}");
        if deferred > 0 {
            outln!("{deferred} action(s) remain deferred; see `nimbus plan`.");
        }
        for id in &o.report.deferred {
            if let Some(Outcome::Deferred(why)) = o.report.outcomes.get(id) {
                let a = action(*id);
                outln!(
                    "Deferred: {} {}: {}; `nimbus plan` shows it until it can happen.",
                    a.address,
                    a.kind.name(),
                    terminal(why)
                );
            }
        }
    } else {
        errln!("\nApply failed. {resources}");
        incomplete();
        errors();
        errln!("hint: see `nimbus history --run {}` and the logs under `{}`", o.run, logs.display());
    }
}
