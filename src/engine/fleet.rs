//! A fleet as the engine runs it: its identity (the same in every clone of its repository and on every CI
//! runner that shares its state), where its state lives, and opening an apply session on it (the lock and the
//! journal). The CLI, the library facade and (later) the reconcile loop all open sessions here.

use std::path::{Path, PathBuf};

use crate::config::{LoadedConfig, StateBackend, StateConfig};
use crate::engine::apply::{Session, SessionError};
use crate::state::journal::Retention;

/// The journal's path: `--journal`, `journal.path`, or `.nimbus/journal.db` beside the fleet file. With an S3
/// backend it is the working copy of the bucket's journal.
pub fn journal_path(loaded: &LoadedConfig, flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match loaded.config.journal.as_ref().and_then(|j| j.path.as_ref()) {
        Some(p) => loaded.resolve(p),
        None => loaded.base_dir.join(".nimbus").join("journal.db"),
    }
}

/// The fleet's remote state, when `state.backend` is `s3`.
pub fn remote_state(loaded: &LoadedConfig) -> Option<&StateConfig> {
    loaded.config.state.as_ref().filter(|s| s.backend == StateBackend::S3)
}

pub fn retention(loaded: &LoadedConfig) -> Retention {
    let d = Retention::default();
    let j = loaded.config.journal.as_ref();
    Retention {
        actions: j.and_then(|j| j.retain_actions).map(|x| x.0).unwrap_or(d.actions),
        events: j.and_then(|j| j.retain_events).map(|x| x.0).unwrap_or(d.events),
    }
}

/// Where the fleet's state (lock and journal) lives. Shared state (S3) is named by its bucket and key, the
/// same in every clone; local state is one computer's file, so it is named by that computer and path (two
/// checkouts with local state are two states, and cannot know of each other's applies).
pub fn state_location(loaded: &LoadedConfig, journal_flag: Option<&Path>) -> String {
    match remote_state(loaded) {
        Some(s) => format!("s3://{}/{}", s.bucket.as_deref().unwrap_or_default(), s.key.as_deref().unwrap_or_default()),
        None => {
            let p = journal_path(loaded, journal_flag);
            let p = std::path::absolute(&p).unwrap_or(p);
            format!("local:{}:{}", crate::util::hostname().unwrap_or_default(), p.display())
        }
    }
}

/// The fleet's identity: tenant, fleet id and state location (`acme/fleets/mac.yaml@s3://bucket/key`). What
/// owns the locks an apply leaves on machines; never a checkout's path alone.
pub fn identity(loaded: &LoadedConfig, journal_flag: Option<&Path>) -> String {
    format!("{}/{}@{}", loaded.config.tenant, loaded.fleet_id(), state_location(loaded, journal_flag))
}

/// Opens an apply session on the fleet (with an S3 backend, `journal_flag` only moves the working copy): takes its lock (the S3 object, or the file beside the local journal),
/// opens the journal (downloaded with an S3 backend), and recovers what a killed run left. Must run inside a
/// Tokio runtime; the local lock is taken without blocking.
pub async fn open_session(loaded: &LoadedConfig, journal_flag: Option<&Path>) -> Result<Session, SessionError> {
    let working = journal_path(loaded, journal_flag);
    match remote_state(loaded) {
        Some(state) => {
            let s3 = crate::state::remote::S3State::from_config_in(state, &loaded.base_dir).await?;
            Session::open_remote(s3, &working, retention(loaded)).await
        }
        None => Ok(Session::open(&working, retention(loaded))?),
    }
}

/// The action runner of run `run` of this fleet: idempotency keys from the session's journal, machines' setup
/// locks owned by the fleet's [`identity`] and the run, runner actions on `forge`.
#[allow(clippy::too_many_arguments)]
pub fn applier(
    loaded: &LoadedConfig,
    journal_flag: Option<&Path>,
    session: &Session,
    run: i64,
    desired: crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    providers: Vec<std::sync::Arc<dyn crate::providers::Provider>>,
    forge: Option<std::sync::Arc<dyn crate::forges::Forge>>,
    log_dir: Option<PathBuf>,
) -> Result<std::sync::Arc<crate::engine::actions::Applier>, crate::state::journal::JournalError> {
    let journal = session.journal();
    // The scripts this run may run, so that later plans can show how a step changed.
    journal.record_scripts(
        desired.pools.iter().flat_map(|p| p.setup.iter()).map(|s| (s.name.as_str(), s.hash.as_str(), s.run.as_str())),
    )?;
    let path = std::path::absolute(journal.path()).unwrap_or_else(|_| journal.path().to_path_buf());
    let started = journal.run_status(run)?.map(|(_, at)| at).unwrap_or_default();
    let mut applier = crate::engine::actions::Applier::new(desired, actual, providers, log_dir)
        .with_setup_owner(identity(loaded, journal_flag), run, started)
        .with_idempotency_keys(&path)?;
    if let Some(f) = forge {
        applier = applier.with_forge(f, crate::engine::clients::runner_dir(loaded));
    }
    Ok(std::sync::Arc::new(applier))
}

/// The plan document of `desired` against `actual` as of `at`, from discovery.
pub fn document(
    loaded: &LoadedConfig,
    desired: &crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    at: chrono::DateTime<chrono::Utc>,
) -> crate::core::plan::document::PlanDocument {
    document_from(loaded, desired, actual, at, "discovery")
}

/// [`document`], naming what `actual` came from (`discovery`, `inventory`).
pub fn document_from(
    loaded: &LoadedConfig,
    desired: &crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    at: chrono::DateTime<chrono::Utc>,
    source: &str,
) -> crate::core::plan::document::PlanDocument {
    use crate::core::plan::document::{FleetRef, Observed, PlanDocument};
    PlanDocument::from_plan(
        &crate::core::plan::plan(desired, actual, at),
        Some(FleetRef {
            path: loaded.path.display().to_string(),
            sha256: crate::core::model::sha256_hex(loaded.source.as_bytes()),
            content: None,
        }),
        Some(Observed { source: source.into(), fingerprint: actual.fingerprint() }),
    )
    .with_cost(desired)
}

/// Sizes the pools that follow demand (`scale:`) in `desired` from the forge's queued jobs and what exists, as
/// `nimbus reconcile` does, so that `plan` and `apply` agree with the controller (they never undo what demand
/// made). The forge is asked only when some pool follows demand. Jobs no pool can take are warnings.
pub async fn follow_demand(
    loaded: &LoadedConfig,
    desired: &mut crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    forge: Option<&dyn crate::forges::Forge>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<crate::core::plan::Warning>, crate::forges::ForgeError> {
    if desired.pools.iter().all(|p| p.scale.is_none()) {
        return Ok(Vec::new());
    }
    let jobs = match forge {
        Some(f) => f.queued_jobs().await?,
        None => Vec::new(),
    };
    let demand = crate::core::scale::follow_demand(desired, actual, &jobs, now, alert_after(loaded));
    Ok(unserved_warnings(&demand))
}

/// `reconcile.alert_after`, or [`crate::core::scale::ALERT_AFTER`].
pub fn alert_after(loaded: &LoadedConfig) -> std::time::Duration {
    loaded.config.reconcile.as_ref().and_then(|r| r.alert_after).map(|d| d.0).unwrap_or(crate::core::scale::ALERT_AFTER)
}

/// The plan's warnings for jobs waiting with no pool able to take them.
pub fn unserved_warnings(demand: &crate::core::scale::Demand) -> Vec<crate::core::plan::Warning> {
    demand
        .unserved
        .iter()
        .map(|u| crate::core::plan::Warning {
            address: format!("forge.job.{}", u.job),
            message: format!(
                "job {} ({}) has been queued since {}: {}",
                u.job,
                u.labels.join(", "),
                crate::util::time::ts(&u.queued_at),
                u.why
            ),
            kind: crate::core::plan::WarningKind::Other,
        })
        .collect()
}

/// Checks `doc` against the fleet's Rego policies (`policy.paths`, relative to the fleet file) and `extra` ones
/// (`--policy`): the report goes into the document, and `warn` messages become its warnings. Nothing to check:
/// nothing changes.
pub fn check_policies(
    loaded: &LoadedConfig,
    extra: &[std::path::PathBuf],
    doc: &mut crate::core::plan::document::PlanDocument,
) -> Result<(), crate::engine::policy::PolicyError> {
    let base = loaded.path.parent().unwrap_or(std::path::Path::new("."));
    let mut paths: Vec<std::path::PathBuf> =
        loaded.config.policy.iter().flat_map(|p| p.paths.iter()).map(|p| base.join(p)).collect();
    paths.extend(extra.iter().cloned());
    if paths.is_empty() {
        return Ok(());
    }
    let mut policies = crate::engine::policy::Policies::load(&paths)?;
    doc.policy = None;
    let report = policies.evaluate(&doc.to_json())?;
    for w in &report.warnings {
        doc.warnings.push(crate::core::plan::Warning {
            address: "policy".into(),
            message: w.clone(),
            kind: crate::core::plan::WarningKind::Other,
        });
    }
    doc.policy = Some(report);
    Ok(())
}

/// A unified diff of two scripts (`similar`), with headers naming where each comes from.
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(3).header(old_name, new_name).to_string()
}

/// Adds to each machine change the diffs of the setup scripts it runs again: from what last ran on the machine
/// (its recorded hash, whose text the journal kept) and, with a trusted base fleet file (a pull request's plan),
/// from the base's script of the same pool and step.
pub fn add_script_diffs(
    doc: &mut crate::core::plan::document::PlanDocument,
    desired: &crate::core::model::Desired,
    actual: &crate::core::model::Actual,
    journal: Option<&crate::state::journal::Journal>,
    base: Option<&crate::config::FleetConfig>,
) {
    use crate::core::model::OnMachine;
    use crate::core::plan::ScriptDiff;
    for c in &mut doc.resource_changes {
        if c.run_steps.is_empty() {
            continue;
        }
        let Some(pool) = c.pool.as_deref().and_then(|p| desired.pools.iter().find(|d| d.name == p)) else { continue };
        let recorded = actual
            .machines
            .iter()
            .find(|m| m.name() == Some(c.name.as_str()) && !m.state.is_gone())
            .and_then(|m| match &m.on_machine {
                OnMachine::Read { state } => Some(state.steps.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for step in pool.setup.iter().filter(|s| c.run_steps.contains(&s.name)) {
            if let Some(old) = recorded.iter().find(|r| r.name == step.name && r.hash != step.hash)
                && let Some(text) = journal.and_then(|j| j.script(&old.hash).ok().flatten())
            {
                c.script_diffs.push(ScriptDiff {
                    step: step.name.clone(),
                    from: "machine".into(),
                    diff: unified_diff(
                        &text,
                        &step.run,
                        &format!("{} (as it last ran)", step.name),
                        &format!("{} (fleet file)", step.name),
                    ),
                });
            }
            let base_text = base
                .and_then(|b| b.pools.iter().find(|p| p.name == pool.name))
                .and_then(|p| p.setup.iter().find(|s| s.name == step.name))
                .map(|s| s.run.clone());
            if let Some(text) = base_text.filter(|t| *t != step.run) {
                c.script_diffs.push(ScriptDiff {
                    step: step.name.clone(),
                    from: "trusted base".into(),
                    diff: unified_diff(
                        &text,
                        &step.run,
                        &format!("{} (trusted base)", step.name),
                        &format!("{} (this fleet file)", step.name),
                    ),
                });
            }
        }
    }
}
