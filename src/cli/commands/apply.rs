//! `nimbus apply`: parse → plan (or check a saved plan) → confirm → engine → view.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;

use super::{CommandError, Output, build_providers, document, exit, runtime, sha256_hex};
use crate::cli::ApplyArgs;
use crate::cli::views::apply_progress::{self, Progress};
use crate::cli::views::plan_text as text;
use crate::config;
use crate::core::model::Desired;
use crate::core::plan::planfile::{self, Current};
use crate::engine::apply::Session;
use crate::state::journal::RunStatus;

fn confirm() -> bool {
    err!("\nDo you want to perform these actions?\n  Only `yes` will be accepted to approve.\n\n  Enter a value: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => false,
        Ok(_) => line.trim() == "yes",
    }
}

/// The first SIGINT or SIGTERM turns the returned flag on (nothing new starts, running actions finish); a
/// second exits at once.
fn stop_on_signals(rt: &tokio::runtime::Runtime) -> Arc<tokio::sync::watch::Sender<bool>> {
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let stop_tx = stop.clone();
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
                // A remote lock is freed first (briefly), so the next apply need not wait out its lease.
                crate::engine::apply::before_abort().await;
                std::process::exit(i32::from(exit::INTERRUPTED));
            }
        }
    });
    stop
}

pub fn apply(args: &ApplyArgs, out: Output, quiet_progress: bool) -> Result<u8, CommandError> {
    // Which fleet file, and which plan.
    let saved = args.planfile.as_deref().map(planfile::load).transpose()?;
    let fleet_file = match (&saved, args.fleet.file.as_path()) {
        (Some(doc), f) if f == Path::new("fleet.yaml") && doc.fleet.is_some() => {
            PathBuf::from(&doc.fleet.as_ref().expect("checked").path)
        }
        (_, f) => f.to_path_buf(),
    };
    let loaded = config::load(&fleet_file)?;
    for w in config::warnings(&loaded.config) {
        errln!("warning: {w}");
    }
    let rt = runtime();
    // Clients (octocrab) spawn helpers on the runtime when built.
    let _in_runtime = rt.enter();
    // The lock, then the journal (created if missing: every apply records its run). With an S3 backend both
    // are remote: the lock object, and the journal downloaded here and uploaded as the apply goes.
    let mut session = rt.block_on(crate::engine::fleet::open_session(&loaded, args.journal.as_deref()))?;
    if session.orphaned > 0 {
        errln!("note: {} action(s) of an interrupted run were marked ORPHANED; see `nimbus history`", session.orphaned);
    }
    let result = apply_in(args, out, quiet_progress, &loaded, saved, &rt, &mut session);
    // The last upload of a remote journal, and the lock's release, whatever happened.
    let closed = rt.block_on(session.close());
    match (result, closed) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(c)) => {
            errln!("error: {}", crate::util::text::terminal(&c.to_string()));
            Err(e)
        }
    }
}

/// The policies' verdict on the plan, before anything runs: a `deny` refuses the apply.
fn policy_gate(
    loaded: &config::LoadedConfig,
    extra: &[PathBuf],
    doc: &mut crate::core::plan::document::PlanDocument,
) -> Result<(), CommandError> {
    crate::engine::fleet::check_policies(loaded, extra, doc).map_err(|e| {
        CommandError::usage(e.to_string(), "fix the policy file, or the path given to --policy / policy.paths")
    })?;
    match doc.policy.as_ref().filter(|p| p.denied()) {
        Some(p) => Err(CommandError::usage(
            format!("the policies deny this plan, so nothing was applied: {}", p.denies.join("; ")),
            "change the fleet file (or the policy) until no `deny` rule fires",
        )),
        None => Ok(()),
    }
}

/// The apply itself, inside an open session.
fn apply_in(
    args: &ApplyArgs,
    out: Output,
    quiet_progress: bool,
    loaded: &config::LoadedConfig,
    saved: Option<crate::core::plan::document::PlanDocument>,
    rt: &tokio::runtime::Runtime,
    session: &mut Session,
) -> Result<u8, CommandError> {
    let loaded = loaded.clone();
    let providers = rt.block_on(build_providers(&loaded, crate::engine::clients::Purpose::Change))?;
    rt.block_on(async {
        for p in &providers {
            p.prepare().await?;
        }
        Ok::<_, CommandError>(())
    })?;
    // One forge client (and one installation token) for discovery and the actions.
    let forge = super::build_forge(&loaded)?;
    let mut actual = rt
        .block_on(crate::engine::discovery::discover_for_change(&loaded.config.tenant, &providers, forge.as_deref()))
        .map_err(CommandError::from)?;
    crate::engine::discovery::annotate_with_history(&mut actual, session.journal(), Utc::now())?;
    let mut desired = Desired::from_config(&loaded.config);
    desired.interrupt_jobs = args.interrupt_jobs;
    let now = Utc::now();
    // Pools that follow demand are sized as the controller sizes them: an apply never undoes its work.
    let demand_warnings =
        rt.block_on(crate::engine::fleet::follow_demand(&loaded, &mut desired, &actual, forge.as_deref(), now))?;
    let fleet_path = loaded.path.display().to_string();

    let doc = match saved {
        Some(saved) => {
            if saved.summary.jobs_interrupted > 0 && !args.interrupt_jobs {
                return Err(CommandError::usage(
                    format!("the saved plan interrupts {} running job(s)", saved.summary.jobs_interrupted),
                    "apply it with `--interrupt-jobs` if that is intended, or plan again without it",
                ));
            }
            let current = Current {
                fleet_sha256: &sha256_hex(loaded.source.as_bytes()),
                fleet_path: &loaded.path,
                fingerprint: &actual.fingerprint(),
                now,
            };
            let mut doc =
                planfile::check(&saved, &current, |at| document(&loaded, &desired, &actual, at, "discovery"))?;
            policy_gate(&loaded, &args.policy, &mut doc)?;
            doc
        }
        None => {
            let mut doc = document(&loaded, &desired, &actual, now, "discovery");
            doc.warnings.extend(super::clock_warnings(&providers));
            doc.warnings.extend(demand_warnings);
            if let Err(e) = policy_gate(&loaded, &args.policy, &mut doc) {
                out!("{}", text::render(&doc, text::Style { color: out.stdout_color }));
                return Err(e);
            }
            out!("{}", text::render(&doc, text::Style { color: out.stdout_color }));
            if doc.has_changes() && !args.auto_approve && !confirm() {
                errln!("\nApply cancelled.");
                return Ok(exit::ERROR);
            }
            doc
        }
    };
    if !doc.has_changes() {
        session.record_noop(&loaded.config.tenant, &fleet_path)?;
        if args.planfile.is_some() {
            outln!("No changes.");
        }
        return Ok(exit::OK);
    }

    let run = session.start(&doc, &fleet_path, args.planfile.as_deref())?;
    let log_dir = session.log_dir(run);
    std::fs::create_dir_all(&log_dir).map_err(|source| CommandError::Io {
        what: "create log folder",
        path: log_dir.clone(),
        source,
    })?;
    let applier = crate::engine::fleet::applier(
        &loaded,
        args.journal.as_deref(),
        session,
        run,
        desired,
        &actual,
        providers,
        forge,
        Some(log_dir.clone()),
    )?;
    let stop = stop_on_signals(rt);
    let mut progress = Progress::new(doc.actions.len(), std::io::stderr().is_terminal(), quiet_progress);
    let outcome = rt.block_on(session.execute(
        run,
        &doc,
        applier.clone(),
        args.parallelism as usize,
        stop,
        &mut [&mut progress],
    ))?;
    progress.finish();
    let logs = log_dir.parent().map(Path::to_path_buf).unwrap_or(log_dir);
    apply_progress::summary(&outcome, doc.deferred.len(), |id| doc.actions[id].action.clone(), &logs);
    Ok(match outcome.status {
        RunStatus::Success => exit::OK,
        RunStatus::Error => exit::ERROR,
        RunStatus::Interrupted => exit::INTERRUPTED,
    })
}
