//! `nimbus apply` and `nimbus history`.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::plan::observe_with;
use super::{CommandError, Output, build_providers, exit, runtime, sha256_hex};
use crate::apply::Applier;
use crate::cli::{ApplyArgs, HistoryArgs};
use crate::config::{self, LoadedConfig};
use crate::exec::{ExecEvent, ExecReport, Outcome, execute_until};
use crate::journal::{ApplyLock, Category, Journal, Retention, RunStatus};
use crate::model::Desired;
use crate::plan::{Action, ActionKind, ChangeAction, ResourceKind, Summary, plan as make_plan};
use crate::render::{FleetRef, Observed, PlanDocument, text};

/// A saved plan made "as of" a time later than this is refused: it could release hosts early.
const FUTURE_SKEW: chrono::Duration = chrono::Duration::minutes(5);

fn journal_path(loaded: &LoadedConfig, flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match loaded.config.journal.as_ref().and_then(|j| j.path.as_ref()) {
        Some(p) => loaded.resolve(p),
        None => loaded.base_dir.join(".nimbus").join("journal.db"),
    }
}

fn retention(loaded: &LoadedConfig) -> Retention {
    let d = Retention::default();
    let j = loaded.config.journal.as_ref();
    Retention {
        actions: j.and_then(|j| j.retain_actions).map(|x| x.0).unwrap_or(d.actions),
        events: j.and_then(|j| j.retain_events).map(|x| x.0).unwrap_or(d.events),
    }
}

fn stale(message: String) -> CommandError {
    CommandError::usage(format!("stale plan: {message}"), "run `nimbus plan -out FILE` again and apply the new plan")
}

fn tampered(why: &str) -> CommandError {
    CommandError::usage(
        format!("refusing to apply the saved plan: {why}"),
        "a saved plan is carried out only as nimbus plans it; run `nimbus plan -out FILE` again and apply that file unedited",
    )
}

fn confirm() -> bool {
    err!("\nDo you want to perform these actions?\n  Only `yes` will be accepted to approve.\n\n  Enter a value: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => false,
        Ok(_) => line.trim() == "yes",
    }
}

fn actor() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

pub fn apply(args: &ApplyArgs, out: Output, quiet_progress: bool) -> Result<u8, CommandError> {
    // Which fleet file, and which plan.
    let saved = match &args.planfile {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| CommandError::Io {
                what: "read plan",
                path: p.clone(),
                source,
            })?;
            let doc: PlanDocument = serde_json::from_str(&text).map_err(|e| {
                CommandError::usage(
                    format!("`{}` is not a nimbus plan: {e}", p.display()),
                    "save one with `nimbus plan -out FILE`",
                )
            })?;
            if doc.format_version.split('.').next() != Some("1") {
                return Err(CommandError::usage(
                    format!("plan format {} is not supported", doc.format_version),
                    "plan again with this nimbus",
                ));
            }
            Some(doc)
        }
        None => None,
    };
    let fleet_file = match (&saved, args.fleet.file.as_path()) {
        (Some(doc), f) if f == Path::new("fleet.yaml") && doc.fleet.is_some() => {
            PathBuf::from(&doc.fleet.as_ref().expect("checked").path)
        }
        (_, f) => f.to_path_buf(),
    };
    let loaded = config::load(&fleet_file)?;
    let journal_file = journal_path(&loaded, args.journal.as_deref());
    let lock_file = journal_file.with_file_name("apply.lock");
    let _lock = ApplyLock::acquire(&lock_file).map_err(|e| match e {
        crate::journal::JournalError::Locked { holder, lock } => CommandError::usage(
            format!("another apply of this fleet is running ({holder})"),
            format!("wait for it to finish; the lock is `{}` and is released when that process exits", lock.display()),
        ),
        other => CommandError::usage(other.to_string(), "check that the journal folder is writable"),
    })?;

    let rt = runtime();
    // Clients (octocrab) spawn helpers on the runtime when built.
    let _in_runtime = rt.enter();
    // Every apply opens (and so creates) the journal and records its run, even one with nothing to do.
    let mut journal = Journal::open(&journal_file)
        .map_err(|e| CommandError::usage(e.to_string(), "check that the journal folder is writable"))?;
    let jerr = |e: crate::journal::JournalError| CommandError::usage(e.to_string(), "check the journal database");
    let orphaned = journal.recover().map_err(jerr)?;
    if orphaned > 0 {
        errln!("note: {orphaned} action(s) of an interrupted run were marked ORPHANED; see `nimbus history`");
    }
    journal.prune(retention(&loaded)).map_err(jerr)?;

    let providers = rt.block_on(build_providers(&loaded))?;
    rt.block_on(async {
        for p in &providers {
            p.prepare().await?;
        }
        Ok::<_, CommandError>(())
    })?;
    // One forge client (and one installation token) for discovery and the actions.
    let forge = super::build_forge(&loaded)?;
    let actual = rt.block_on(observe_with(&loaded, &providers, forge.as_deref()))?;
    let desired = Desired::from_config(&loaded.config);
    let now = Utc::now();
    let document = |at| {
        PlanDocument::from_plan(
            &make_plan(&desired, &actual, at),
            Some(FleetRef {
                path: loaded.path.display().to_string(),
                sha256: sha256_hex(loaded.source.as_bytes()),
                content: None,
            }),
            Some(Observed { source: "discovery".into(), fingerprint: actual.fingerprint() }),
        )
    };

    let doc = match saved {
        Some(doc) => {
            let fleet_sha = sha256_hex(loaded.source.as_bytes());
            if doc.fleet.as_ref().map(|f| f.sha256.as_str()) != Some(fleet_sha.as_str()) {
                return Err(stale(format!("`{}` changed since the plan was made", loaded.path.display())));
            }
            if let Some(content) = doc.fleet.as_ref().and_then(|f| f.content.as_deref())
                && sha256_hex(content.as_bytes()) != fleet_sha
            {
                return Err(tampered("the fleet file stored in it does not match its own checksum"));
            }
            if doc.observed.as_ref().map(|o| o.fingerprint.as_str()) != Some(actual.fingerprint().as_str()) {
                return Err(stale("the fleet's machines, hosts or runners changed since the plan was made".into()));
            }
            if doc.planned_at > now + FUTURE_SKEW {
                return Err(CommandError::usage(
                    format!("the plan was made as of {}, which is in the future", crate::render::ts(&doc.planned_at)),
                    "a plan made with `--at` is for review only; plan without `--at` to apply",
                ));
            }
            // Never carry out the file's actions as written: plan again from the same fleet file and the
            // same world (the planner is deterministic) and go on only if the result is identical.
            let fresh = document(doc.planned_at);
            if fresh.tenant != doc.tenant {
                return Err(tampered(&format!(
                    "it names tenant `{}`, but the fleet file is for tenant `{}`",
                    doc.tenant, fresh.tenant
                )));
            }
            if fresh.actions != doc.actions || fresh.resource_changes != doc.resource_changes {
                return Err(tampered(
                    "its actions differ from what nimbus plans for the same fleet file and the same fleet",
                ));
            }
            fresh
        }
        None => {
            let doc = document(now);
            out!("{}", text::render(&doc, text::Style { color: out.stdout_color }));
            if doc.has_changes() && !args.auto_approve && !confirm() {
                errln!("\nApply cancelled.");
                return Ok(exit::ERROR);
            }
            doc
        }
    };
    let run = journal.start_run("apply", &loaded.config.tenant, &loaded.path.display().to_string()).map_err(jerr)?;
    if !doc.has_changes() {
        let summary = json!({ "added": 0, "changed": 0, "destroyed": 0, "actions": 0, "failed": 0, "skipped": 0 });
        journal.finish_run(run, true, &summary).map_err(jerr)?;
        journal
            .event(Some(run), Category::Audit, "info", &actor(), "apply finished: no changes", Some(summary))
            .map_err(jerr)?;
        if args.planfile.is_some() {
            outln!("No changes.");
        }
        return Ok(exit::OK);
    }

    let graph = Arc::new(
        doc.graph().map_err(|e| CommandError::usage(format!("the saved plan is damaged: {e}"), "plan again"))?,
    );
    let rows: Vec<(usize, String, String, serde_json::Value)> = doc
        .actions
        .iter()
        .map(|a| {
            (
                a.id,
                a.action.address.clone(),
                a.action.kind.name().to_string(),
                serde_json::to_value(&a.action.kind).unwrap_or_default(),
            )
        })
        .collect();
    journal.add_actions(run, &rows).map_err(jerr)?;
    journal
        .event(
            Some(run),
            Category::Audit,
            "info",
            &actor(),
            &format!("apply started: {}", crate::render::summary_line(&doc.summary)),
            Some(json!({ "run_id": run, "summary": doc.summary, "planfile": args.planfile })),
        )
        .map_err(jerr)?;
    tracing::info!(event = "nimbus.apply.start", tenant = %loaded.config.tenant, run, actions = doc.actions.len(), "nimbus.apply.start");

    // Absolute, so the journal's log paths work from any folder.
    let log_dir = std::path::absolute(journal_file.with_file_name("logs"))
        .unwrap_or_else(|_| journal_file.with_file_name("logs"))
        .join(format!("run-{run:05}"));
    std::fs::create_dir_all(&log_dir).map_err(|source| CommandError::Io {
        what: "create log folder",
        path: log_dir.clone(),
        source,
    })?;
    let mut applier = Applier::new(desired, &actual, providers.clone(), Some(log_dir));
    if let Some(f) = forge {
        applier = applier.with_forge(f, super::runner_dir(&loaded));
    }
    let applier = Arc::new(applier);

    // Progress: per action on stderr, with a bar on a terminal.
    let bar = if std::io::stderr().is_terminal() && !quiet_progress {
        let b = ProgressBar::new(graph.node_count() as u64);
        b.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} actions  {elapsed}").expect("template"));
        b
    } else {
        ProgressBar::hidden()
    };
    let started_at: std::cell::RefCell<HashMap<usize, Instant>> = Default::default();
    let t0 = Instant::now();
    let say = |line: String| {
        if quiet_progress {
            return;
        }
        if bar.is_hidden() { errln!("{line}") } else { bar.println(line) }
    };
    let action_of = |id: usize| -> &Action { &graph[petgraph::graph::NodeIndex::new(id)] };
    let mut journal_errors = Vec::new();
    // The first SIGINT or SIGTERM stops new actions and lets running ones finish; a second exits at once.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        let mut received = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            received += 1;
            if received == 1 {
                errln!(
                    "\nInterrupt received: no new actions start; waiting for the running ones to finish. Interrupt again to exit at once."
                );
                let _ = stop_tx.send(true);
            } else {
                errln!("\nSecond interrupt: exiting now. Run `nimbus apply` again to continue.");
                std::process::exit(i32::from(exit::INTERRUPTED));
            }
        }
    });
    let report = rt.block_on(execute_until(graph.clone(), applier, args.parallelism as usize, stop_rx, |ev| {
        let stamp = format!("[{:>6.1}s]", t0.elapsed().as_secs_f64());
        match ev {
            ExecEvent::Started { id, log_path } => {
                started_at.borrow_mut().insert(*id, Instant::now());
                let a = action_of(*id);
                say(format!("{stamp} {}: {}…", a.address, a.kind.name()));
                if let Err(e) = journal.action_started(run, *id, log_path.as_deref()) {
                    journal_errors.push(e.to_string());
                }
            }
            ExecEvent::Finished { id, outcome, elapsed } => {
                let a = action_of(*id);
                let (status, code, error) = match outcome {
                    Outcome::Success => {
                        say(format!("{stamp} {}: {} done ({:.1}s)", a.address, a.kind.name(), elapsed.as_secs_f64()));
                        ("SUCCESS", None, None)
                    }
                    Outcome::Failed(e) => {
                        say(format!(
                            "{stamp} {}: {} FAILED ({:.1}s): {}",
                            a.address,
                            a.kind.name(),
                            elapsed.as_secs_f64(),
                            e.message
                        ));
                        ("ERROR", e.exit_code, Some(e.message.clone()))
                    }
                    Outcome::Skipped { root_cause } => {
                        say(format!("{stamp} {}: {} skipped (action {root_cause} failed)", a.address, a.kind.name()));
                        ("SKIPPED", None, Some(format!("skipped: action {root_cause} failed")))
                    }
                };
                bar.inc(1);
                if let Err(e) = journal.action_finished(run, *id, status, code, error.as_deref()) {
                    journal_errors.push(e.to_string());
                }
                if let Outcome::Failed(e) = outcome {
                    let _ = journal.event(
                        Some(run),
                        Category::Error,
                        "error",
                        "nimbus",
                        &format!("{} {} failed: {}", a.address, a.kind.name(), e.message),
                        Some(json!({ "action_id": id, "exit_code": e.exit_code })),
                    );
                }
            }
        }
    }));
    bar.finish_and_clear();

    // What was done: a resource counts once the action that makes or removes it succeeded, even when a later
    // step of the same change did not (that change is named as incomplete).
    let tally = Tally::of(&doc, &report);
    let done = tally.done;
    let not_started = doc.actions.len() - report.outcomes.len();
    let summary = json!({
        "added": done.add, "changed": done.change, "destroyed": done.destroy,
        "incomplete": tally.incomplete.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        "actions": report.outcomes.len(), "failed": report.root_causes.len(),
        "skipped": report.count(|o| matches!(o, Outcome::Skipped { .. })),
        "not_started": not_started,
        "wall_ms": report.wall.as_millis() as u64,
    });
    let status = if report.interrupted {
        RunStatus::Interrupted
    } else if report.succeeded() {
        RunStatus::Success
    } else {
        RunStatus::Error
    };
    journal.finish_run_as(run, status, &summary).map_err(jerr)?;
    journal
        .event(
            Some(run),
            Category::Audit,
            "info",
            &actor(),
            &format!(
                "apply finished: {}",
                match status {
                    RunStatus::Success => "success",
                    RunStatus::Error => "error",
                    RunStatus::Interrupted => "interrupted",
                }
            ),
            Some(summary.clone()),
        )
        .map_err(jerr)?;
    tracing::info!(event = "nimbus.apply.complete", tenant = %loaded.config.tenant, run, duration_ms = report.wall.as_millis() as u64, success = report.succeeded(), "nimbus.apply.complete");
    for e in journal_errors.iter().take(3) {
        errln!("warning: journal: {e}");
    }

    let resources = format!("Resources: {} added, {} changed, {} destroyed.", done.add, done.change, done.destroy);
    let incomplete = || {
        for (address, why) in &tally.incomplete {
            errln!("Incomplete: {address}: {why}; `nimbus apply` continues it");
        }
    };
    if report.interrupted {
        errln!("\nApply interrupted. {resources}");
        incomplete();
        errln!("{not_started} action(s) were not started. Run `nimbus apply` again to continue.");
        for id in &report.root_causes {
            if let Some(Outcome::Failed(e)) = report.outcomes.get(id) {
                let a = action_of(*id);
                errln!("Error: {} {}: {}", a.address, a.kind.name(), e.message);
            }
        }
        return Ok(exit::INTERRUPTED);
    }
    if report.succeeded() {
        outln!("\nApply complete! {resources}");
        if !doc.deferred.is_empty() {
            outln!("{} action(s) remain deferred; see `nimbus plan`.", doc.deferred.len());
        }
        Ok(exit::OK)
    } else {
        errln!("\nApply failed. {resources}");
        incomplete();
        for id in &report.root_causes {
            let a = action_of(*id);
            if let Some(Outcome::Failed(e)) = report.outcomes.get(id) {
                let skipped = report.count(|o| *o == Outcome::Skipped { root_cause: *id });
                errln!("Error: {} {}: {}", a.address, a.kind.name(), e.message);
                if skipped > 0 {
                    errln!("  ({skipped} dependent action(s) skipped)");
                }
            }
        }
        errln!(
            "hint: see `nimbus history --run {run}` and the logs under `{}`",
            journal_file.with_file_name("logs").display()
        );
        Ok(exit::ERROR)
    }
}

/// What an apply did, counted per resource change.
pub struct Tally {
    pub done: Summary,
    /// Changes that were begun but not finished: (address, what is missing).
    pub incomplete: Vec<(String, String)>,
}

impl Tally {
    pub fn of(doc: &PlanDocument, report: &ExecReport) -> Tally {
        let ok = |i: &usize| report.outcomes.get(i) == Some(&Outcome::Success);
        let kind_of = |i: &usize| doc.actions.get(*i).map(|a| &a.action.kind);
        let mut done = Summary::default();
        let mut incomplete = Vec::new();
        for c in &doc.resource_changes {
            if c.action_ids.iter().all(ok) {
                done.count(c);
                continue;
            }
            // The action that makes the resource exist, and the one that makes it go.
            let made =
                c.action_ids.iter().any(|i| ok(i) && matches!(kind_of(i), Some(ActionKind::LaunchInstance { .. })));
            let gone = c.action_ids.iter().any(|i| {
                ok(i)
                    && matches!(
                        (kind_of(i), c.kind),
                        (Some(ActionKind::TerminateInstance { .. }), ResourceKind::Machine)
                            | (Some(ActionKind::ReleaseHost { .. }), ResourceKind::Host)
                            | (Some(ActionKind::DeregisterRunner { .. }), ResourceKind::Runner)
                    )
            });
            let any = c.action_ids.iter().any(ok);
            for a in &c.actions {
                match a {
                    ChangeAction::Create if made => done.add += 1,
                    ChangeAction::Delete if gone => done.destroy += 1,
                    ChangeAction::Update if any => done.change += 1,
                    _ => {}
                }
            }
            if any {
                let failed: Vec<String> = c
                    .action_ids
                    .iter()
                    .filter(|i| !ok(i))
                    .filter_map(|i| {
                        let k = kind_of(i)?.name();
                        Some(match report.outcomes.get(i) {
                            Some(Outcome::Failed(_)) => format!("{k} failed"),
                            Some(Outcome::Skipped { .. }) => format!("{k} skipped"),
                            _ => format!("{k} not started"),
                        })
                    })
                    .collect();
                incomplete.push((format!("{} ({})", c.address, c.name), failed.join(", ")));
            }
        }
        Tally { done, incomplete }
    }
}

pub fn history(args: &HistoryArgs) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    let path = journal_path(&loaded, args.journal.as_deref());
    if !path.exists() {
        return Err(CommandError::usage(
            format!("no journal at `{}`", path.display()),
            "the journal is created by the first `nimbus apply`",
        ));
    }
    let j = Journal::open(&path).map_err(|e| CommandError::usage(e.to_string(), "check the journal database"))?;
    let jerr = |e: crate::journal::JournalError| CommandError::usage(e.to_string(), "check the journal database");
    if let Some(run) = &args.run {
        let id = if run == "latest" {
            j.latest_run()
                .map_err(jerr)?
                .ok_or_else(|| CommandError::usage("the journal has no runs", "run `nimbus apply` first"))?
        } else {
            run.parse().map_err(|_| {
                CommandError::usage(
                    format!("`{run}` is not a run id"),
                    "use a number from `nimbus history`, or `latest`",
                )
            })?
        };
        let actions = j.actions(id).map_err(jerr)?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&actions).expect("serialises"));
        } else {
            outln!("Run {id}: {} action(s)", actions.len());
            for a in actions {
                outln!(
                    "  {:>4}  {:<9} {:<22} {}{}{}",
                    a.action_id,
                    a.status,
                    a.kind,
                    a.address,
                    a.error.map(|e| format!("  error: {e}")).unwrap_or_default(),
                    a.log_path.map(|p| format!("  log: {p}")).unwrap_or_default()
                );
            }
        }
        return Ok(exit::OK);
    }
    let runs = j.runs(args.limit).map_err(jerr)?;
    let events = j.events(args.limit).map_err(jerr)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&json!({ "runs": runs, "events": events })).expect("serialises"));
        return Ok(exit::OK);
    }
    outln!("Runs (newest first):");
    for r in &runs {
        outln!(
            "  {:>5}  {:<11} {}  {}  {}",
            r.id,
            r.status,
            r.started_at,
            r.command,
            r.summary.clone().unwrap_or_default()
        );
    }
    outln!("\nEvents (newest first):");
    for e in &events {
        outln!("  {}  {:<6} {:<5} {:<10} {}", e.ts, e.category, e.level, e.actor, e.message);
    }
    Ok(exit::OK)
}
