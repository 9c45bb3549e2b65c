//! An apply, start to end: the lock, the journal, the walk of the plan's DAG, and the report.
//!
//! [`Session::open`] takes the fleet's apply lock and opens (creating) the journal, recovering what a killed
//! run left. [`Session::execute`] records the run and its actions, walks the graph with bounded parallelism
//! until done or stopped, and counts what was done ([`Tally`]). Progress goes to [`Hook`]s: the journal's own
//! hook is built in; the CLI adds its progress view.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use super::walk::{ActionRunner, ExecEvent, ExecReport, Outcome, execute_until};
use crate::core::plan::document::PlanDocument;
use crate::core::plan::{Action, ActionKind, ChangeAction, ResourceKind, Summary};
use crate::state::journal::{Category, Journal, JournalError, Retention, RunStatus};
use crate::state::lock::ApplyLock;
use crate::state::remote::{HeldLock, RemoteError, S3State};

/// Sees every action start and finish, in order.
pub trait Hook {
    fn event(&mut self, action: &Action, event: &ExecEvent);
}

/// An open apply: holds the lock for its lifetime (a remote lock until [`Session::close`]).
pub struct Session {
    journal: Journal,
    _lock: Option<ApplyLock>,
    remote: Option<Remote>,
    /// Actions a killed run left EXECUTING, now marked ORPHANED.
    pub orphaned: usize,
    /// What the session's run does (`apply`, `provision`, `reconcile`), for the journal's messages.
    command: String,
}

/// The remote side of a session: the lock (renewed by a task), and the journal's uploads.
struct Remote {
    state: S3State,
    lock: Arc<tokio::sync::Mutex<HeldLock>>,
    /// The ETag of the journal as last uploaded.
    etag: Arc<tokio::sync::Mutex<Option<String>>>,
    /// What stopped the lock's renewal or an upload: the apply must stop.
    failed: Arc<std::sync::Mutex<Option<RemoteError>>>,
    /// Counts journal writes: the uploader takes a snapshot when it moves.
    dirty: tokio::sync::watch::Sender<u64>,
    /// The running apply's stop switch: a lost lock or a second writer stops it at once.
    stop: StopSlot,
    /// Turns true when the session closes: the renewer and the uploader end at their next pause.
    closing: tokio::sync::watch::Sender<bool>,
    renewer: tokio::task::JoinHandle<()>,
    uploader: tokio::task::JoinHandle<()>,
    /// The journal's run of this session, once recorded: the next renewal names it in the lock's body.
    run: Arc<std::sync::Mutex<Option<i64>>>,
}

/// Why a session could not open or close.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// What an immediate exit (a second interrupt) still does first: free a remote lock, so the next apply need not
/// wait for its lease (it recovers the run from the journal last uploaded, as after a crash).
type AbortHook = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;
static ON_ABORT: std::sync::Mutex<Option<AbortHook>> = std::sync::Mutex::new(None);

/// Runs the abort hook, if a remote session is open (bounded: at most 3 seconds).
pub async fn before_abort() {
    let hook = ON_ABORT.lock().expect("lock").take();
    if let Some(h) = hook {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), h()).await;
    }
}

/// A remote task's pause between requests: false when the session closed meanwhile.
async fn pause(d: std::time::Duration, closed: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = closed.wait_for(|c| *c) => false,
    }
}

/// Where the remote tasks find the running apply's stop switch.
type StopSlot = Arc<std::sync::Mutex<Option<Arc<tokio::sync::watch::Sender<bool>>>>>;

/// Records what stopped the remote side (the first thing only) and stops the running apply.
fn fail(failed: &std::sync::Mutex<Option<RemoteError>>, stop: &StopSlot, e: RemoteError) {
    failed.lock().expect("lock").get_or_insert(e);
    if let Some(s) = stop.lock().expect("lock").as_ref() {
        let _ = s.send(true);
    }
}

/// At most one journal upload a second while an apply runs.
const UPLOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What an apply did.
pub struct ApplyOutcome {
    pub run: i64,
    pub report: ExecReport,
    pub tally: Tally,
    pub status: RunStatus,
    /// Actions never started (the apply was stopped).
    pub not_started: usize,
    /// Journal writes that failed during the walk (the apply went on).
    pub journal_errors: Vec<String>,
}

pub use crate::util::{actor, hostname};

impl Session {
    /// Takes the lock beside `journal_path` (`apply.lock`), then opens the journal, recovers and prunes it.
    pub fn open(journal_path: &Path, retention: Retention) -> Result<Session, JournalError> {
        let lock = ApplyLock::acquire(&journal_path.with_file_name("apply.lock"))?;
        let journal = Journal::open(journal_path)?;
        let orphaned = journal.recover()?;
        journal.prune(retention)?;
        Ok(Session { journal, _lock: Some(lock), remote: None, orphaned, command: "apply".into() })
    }

    /// Takes the remote lock (renewed from then on, until [`Session::close`]), downloads the journal to
    /// `working` (the first time: uploads the local journal there, if any; a working copy that is replaced is
    /// kept as `<file>.previous`), recovers and prunes it, and uploads it. Must run inside a Tokio runtime.
    pub async fn open_remote(state: S3State, working: &Path, retention: Retention) -> Result<Session, SessionError> {
        let lock = Arc::new(tokio::sync::Mutex::new(state.acquire("apply").await?));
        let failed = Arc::new(std::sync::Mutex::new(None));
        let stop: StopSlot = Arc::new(std::sync::Mutex::new(None));
        let (closing, closed) = tokio::sync::watch::channel(false);
        let run: Arc<std::sync::Mutex<Option<i64>>> = Arc::new(std::sync::Mutex::new(None));
        // Renewed from the moment it is taken: a long download never lets the lease run out.
        let renewer = {
            let (state, lock, failed, stop, mut closed, run) =
                (state.clone(), lock.clone(), failed.clone(), stop.clone(), closed.clone(), run.clone());
            tokio::spawn(async move {
                let mut since_renewed = std::time::Instant::now();
                loop {
                    // Only the pause is cut short when the session closes: a renewal in flight completes, so the
                    // lock's ETag stays known.
                    if !pause(state.lease() / 3, &mut closed).await {
                        return;
                    }
                    let mut held = lock.lock().await;
                    let run = *run.lock().expect("lock");
                    match state.renew_with_run(&mut held, run).await {
                        Ok(()) => since_renewed = std::time::Instant::now(),
                        // A passing S3 error: try again at the next pause while the lease lasts.
                        Err(e @ RemoteError::S3 { .. }) if since_renewed.elapsed() < state.lease() * 2 / 3 => {
                            tracing::warn!(error = %e, "the state lock's renewal failed; retrying");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the state lock could not be renewed");
                            fail(&failed, &stop, e);
                            return;
                        }
                    }
                }
            })
        };
        let opened = async {
            let etag = match state.download().await? {
                Some((image, etag)) => {
                    if working.exists() {
                        let _ = std::fs::copy(working, working.with_extension("db.previous"));
                    }
                    Journal::restore(working, &image)?;
                    Some(etag)
                }
                None => None,
            };
            let journal = Journal::open(working)?;
            let orphaned = journal.recover()?;
            journal.prune(retention)?;
            let etag = state.upload(journal.snapshot()?, etag.as_deref()).await?;
            // The uploader's own connection to the working copy: a snapshot sees everything committed so far.
            let reader = Journal::open(working)?;
            Ok::<_, SessionError>((journal, orphaned, etag, reader))
        }
        .await;
        let (journal, orphaned, etag, reader) = match opened {
            Ok(x) => x,
            Err(e) => {
                let _ = closing.send(true);
                let _ = renewer.await;
                let _ = state.release(&*lock.lock().await).await;
                return Err(e);
            }
        };
        let etag = Arc::new(tokio::sync::Mutex::new(Some(etag)));
        let (dirty, mut rx) = tokio::sync::watch::channel(0u64);
        let uploader = {
            let (state, etag, failed, stop, mut closed) =
                (state.clone(), etag.clone(), failed.clone(), stop.clone(), closed);
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    rx.borrow_and_update();
                    let image = match reader.snapshot() {
                        Ok(i) => i,
                        Err(e) => {
                            tracing::warn!(error = %e, "the journal could not be read for upload");
                            continue;
                        }
                    };
                    let mut current = etag.lock().await;
                    let mut tries = 0;
                    loop {
                        match state.upload(image.clone(), current.as_deref()).await {
                            Ok(new) => *current = Some(new),
                            // A passing S3 error: the next tries (the SDK has retried already).
                            Err(e @ RemoteError::S3 { .. }) if tries < 3 => {
                                tries += 1;
                                tracing::warn!(error = %e, "a journal upload failed; retrying");
                                tokio::time::sleep(UPLOAD_INTERVAL * tries).await;
                                continue;
                            }
                            Err(e) => {
                                fail(&failed, &stop, e);
                                return;
                            }
                        }
                        break;
                    }
                    drop(current);
                    if !pause(UPLOAD_INTERVAL, &mut closed).await {
                        return;
                    }
                }
            })
        };
        {
            let (state, lock) = (state.clone(), lock.clone());
            let hook: AbortHook = Arc::new(move || {
                let (state, lock) = (state.clone(), lock.clone());
                Box::pin(async move {
                    let held = lock.lock().await;
                    let _ = state.release(&held).await;
                })
            });
            *ON_ABORT.lock().expect("lock") = Some(hook);
        }
        let remote = Remote { state, lock, etag, failed, stop, dirty, closing, renewer, uploader, run };
        Ok(Session { journal, _lock: None, remote: Some(remote), orphaned, command: "apply".into() })
    }

    /// Ends the session: for remote state, a last upload of the journal (unless another writer changed it), then
    /// the lock is released. A local session's lock goes with the value.
    pub async fn close(self) -> Result<(), SessionError> {
        let Some(r) = self.remote else { return Ok(()) };
        ON_ABORT.lock().expect("lock").take();
        // Both tasks end at their next pause; a request in flight completes first.
        let _ = r.closing.send(true);
        drop(r.dirty);
        let _ = r.renewer.await;
        let _ = r.uploader.await;
        let failed = r.failed.lock().expect("lock").take();
        // After a lost lock the last upload is still made: its compare-and-swap refuses it if anyone else wrote.
        let uploaded = match &failed {
            Some(RemoteError::Conflict { .. }) => Ok(()),
            _ => {
                let mut etag = r.etag.lock().await;
                match self.journal.snapshot() {
                    Ok(image) => match r.state.upload(image, etag.as_deref()).await {
                        Ok(new) => {
                            *etag = Some(new);
                            Ok(())
                        }
                        Err(e) => Err(SessionError::Remote(e)),
                    },
                    Err(e) => Err(SessionError::Journal(e)),
                }
            }
        };
        let released = r.state.release(&*r.lock.lock().await).await;
        if let Some(e) = failed {
            return Err(SessionError::Remote(e));
        }
        uploaded?;
        released.map_err(SessionError::Remote)
    }

    /// The session's run is in the journal: the lock's body names it from its next renewal on.
    fn run_recorded(&self, run: i64) {
        if let Some(r) = &self.remote {
            *r.run.lock().expect("lock") = Some(run);
        }
    }

    /// Tells the uploader the journal changed (it uploads at most once per [`UPLOAD_INTERVAL`]).
    fn journal_changed(&self) {
        if let Some(r) = &self.remote {
            r.dirty.send_modify(|n| *n += 1);
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Where action logs of `run` go: beside the journal, absolute so the paths work from any folder.
    pub fn log_dir(&self, run: i64) -> PathBuf {
        let p = self.journal.path().with_file_name("logs");
        std::path::absolute(&p).unwrap_or(p).join(format!("run-{run:05}"))
    }

    /// Records an apply that had nothing to do.
    pub fn record_noop(&mut self, tenant: &str, fleet_path: &str) -> Result<i64, JournalError> {
        self.record_noop_by(tenant, fleet_path, "apply", "cli")
    }

    /// Records a run of `command` by `actor` (`cli`, `api`, `reconcile`) that had nothing to do.
    pub fn record_noop_by(
        &mut self,
        tenant: &str,
        fleet_path: &str,
        command: &str,
        by: &str,
    ) -> Result<i64, JournalError> {
        let run = self.journal.start_run_by(command, by, tenant, fleet_path)?;
        self.journal_changed();
        let summary = json!({ "added": 0, "changed": 0, "destroyed": 0, "actions": 0, "failed": 0, "skipped": 0 });
        self.journal.finish_run(run, true, &summary)?;
        self.journal.event(
            Some(run),
            Category::Audit,
            "info",
            &actor(),
            &format!("{command} finished: no changes"),
            Some(summary),
        )?;
        Ok(run)
    }

    /// Starts a run of `doc` in the journal; returns its id (for the log folder).
    pub fn start(
        &mut self,
        doc: &PlanDocument,
        fleet_path: &str,
        planfile: Option<&Path>,
    ) -> Result<i64, JournalError> {
        self.start_by(doc, fleet_path, planfile, "apply", "cli")
    }

    /// Starts a run of `command` by `actor` (`cli`, `api`, `reconcile`).
    pub fn start_by(
        &mut self,
        doc: &PlanDocument,
        fleet_path: &str,
        planfile: Option<&Path>,
        command: &str,
        by: &str,
    ) -> Result<i64, JournalError> {
        let run = self.journal.start_run_by(command, by, &doc.tenant, fleet_path)?;
        self.command = command.to_string();
        self.run_recorded(run);
        self.journal_changed();
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
        self.journal.add_actions(run, &rows)?;
        self.journal.event(
            Some(run),
            Category::Audit,
            "info",
            &actor(),
            &format!("{command} started: {}", crate::cli::views::summary_line(&doc.summary)),
            Some(json!({ "run_id": run, "summary": doc.summary, "planfile": planfile, "by": by })),
        )?;
        tracing::info!(event = "nimbus.apply.start", tenant = %doc.tenant, run, actions = doc.actions.len(), "nimbus.apply.start");
        Ok(run)
    }

    /// Walks `doc`'s actions (run `run`) with `runner`, at most `parallelism` at a time, until done or until
    /// `stop` turns true (then nothing new starts and running actions finish). A journal write that fails turns
    /// `stop` on too (an apply nobody can account for must not go on), and the run ends in error. Records the
    /// end of the run.
    pub async fn execute(
        &mut self,
        run: i64,
        doc: &PlanDocument,
        runner: Arc<dyn ActionRunner>,
        parallelism: usize,
        stop: Arc<tokio::sync::watch::Sender<bool>>,
        hooks: &mut [&mut dyn Hook],
    ) -> Result<ApplyOutcome, JournalError> {
        // The document came from the planner (a saved plan is always planned again), so it is a DAG.
        let graph = Arc::new(doc.graph().expect("a plan made by the planner is a DAG"));
        let mut journal_errors = Vec::new();
        let journal = &self.journal;
        let remote = self.remote.as_ref();
        if let Some(r) = remote {
            // From now on a lost lock or a second writer stops the walk at once; one already lost stops it
            // before anything starts.
            *r.stop.lock().expect("lock") = Some(stop.clone());
            if r.failed.lock().expect("lock").is_some() {
                let _ = stop.send(true);
            }
        }
        let mut remote_failed = false;
        let report = execute_until(graph.clone(), runner.clone(), parallelism, stop.subscribe(), |ev| {
            let id = match ev {
                ExecEvent::Started { id, .. } | ExecEvent::Finished { id, .. } => *id,
            };
            let action = &graph[petgraph::graph::NodeIndex::new(id)];
            if let Err(e) = journal_event(journal, run, action, ev) {
                journal_errors.push(e.to_string());
                let _ = stop.send(true);
            }
            if let Some(r) = remote {
                r.dirty.send_modify(|n| *n += 1);
                // A lost lock or a second writer: nothing new starts.
                if let Some(e) = r.failed.lock().expect("lock").as_ref()
                    && !remote_failed
                {
                    remote_failed = true;
                    journal_errors.push(format!("{e} ({})", e.hint()));
                    let _ = stop.send(true);
                }
            }
            for h in hooks.iter_mut() {
                h.event(action, ev);
            }
        })
        .await;
        if let Some(e) = remote
            .filter(|_| !remote_failed)
            .and_then(|r| r.failed.lock().expect("lock").as_ref().map(|e| format!("{e} ({})", e.hint())))
        {
            journal_errors.push(e);
        }

        let tally = Tally::of(doc, &report, &runner.made_nothing_new());
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
        let status = if !journal_errors.is_empty() {
            RunStatus::Error
        } else if report.interrupted {
            RunStatus::Interrupted
        } else if report.succeeded() {
            RunStatus::Success
        } else {
            RunStatus::Error
        };
        self.journal.finish_run_as(run, status, &summary)?;
        self.journal_changed();
        self.journal.event(
            Some(run),
            Category::Audit,
            "info",
            &actor(),
            &format!("{} finished: {}", self.command, status.as_str().to_lowercase()),
            Some(summary),
        )?;
        tracing::info!(event = "nimbus.apply.complete", tenant = %doc.tenant, run, duration_ms = report.wall.as_millis() as u64, success = report.succeeded(), "nimbus.apply.complete");
        Ok(ApplyOutcome { run, report, tally, status, not_started, journal_errors })
    }
}

/// The journal's own record of each action.
fn journal_event(journal: &Journal, run: i64, a: &Action, ev: &ExecEvent) -> Result<(), JournalError> {
    match ev {
        ExecEvent::Started { id, log_path } => journal.action_started(run, *id, log_path.as_deref()),
        ExecEvent::Finished { id, outcome, .. } => {
            let (status, code, error) = match outcome {
                Outcome::Success => ("SUCCESS", None, None),
                Outcome::Failed(e) if e.timed_out => ("TIMEOUT", e.exit_code, Some(e.to_string())),
                Outcome::Failed(e) => ("ERROR", e.exit_code, Some(e.to_string())),
                Outcome::Deferred(why) => ("SKIPPED", None, Some(format!("deferred: {why}"))),
                Outcome::Skipped { root_cause } => {
                    ("SKIPPED", None, Some(format!("skipped: action {root_cause} failed")))
                }
            };
            journal.action_finished(run, *id, status, code, error.as_deref())?;
            if let Outcome::Failed(e) = outcome {
                journal.event(
                    Some(run),
                    Category::Error,
                    "error",
                    "nimbus",
                    &format!("{} {} failed: {e}", a.address, a.kind.name()),
                    Some(json!({ "action_id": id, "exit_code": e.exit_code })),
                )?;
            }
            Ok(())
        }
    }
}

/// What an apply did, counted per resource change.
pub struct Tally {
    pub done: Summary,
    /// Changes that were begun but not finished: (address, what is missing).
    pub incomplete: Vec<(String, String)>,
}

impl Tally {
    /// A resource counts once the action that makes or removes it succeeded, even when a later step of the
    /// same change did not (that change is listed as incomplete).
    /// A creation whose launch was answered with what an earlier run made (`made_nothing_new`) adds nothing.
    pub fn of(doc: &PlanDocument, report: &ExecReport, made_nothing_new: &std::collections::HashSet<usize>) -> Tally {
        let ok = |i: &usize| report.outcomes.get(i) == Some(&Outcome::Success);
        let launched_again = |c: &crate::core::plan::ResourceChange| {
            c.action_ids.iter().any(|i| {
                made_nothing_new.contains(i)
                    && matches!(doc.actions.get(*i).map(|a| &a.action.kind), Some(ActionKind::LaunchInstance { .. }))
            })
        };
        let kind_of = |i: &usize| doc.actions.get(*i).map(|a| &a.action.kind);
        let mut done = Summary::default();
        let mut incomplete = Vec::new();
        for c in &doc.resource_changes {
            let again = launched_again(c);
            if c.action_ids.iter().all(ok) && !again {
                done.count(c);
                continue;
            }
            let made = !again
                && c.action_ids.iter().any(|i| ok(i) && matches!(kind_of(i), Some(ActionKind::LaunchInstance { .. })));
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
            if any && !c.action_ids.iter().all(ok) {
                let missing: Vec<String> = c
                    .action_ids
                    .iter()
                    .filter(|i| !ok(i))
                    .filter_map(|i| {
                        let k = kind_of(i)?.name();
                        Some(match report.outcomes.get(i) {
                            Some(Outcome::Failed(_)) => format!("{k} failed"),
                            Some(Outcome::Deferred(_)) => format!("{k} deferred"),
                            Some(Outcome::Skipped { .. }) => format!("{k} skipped"),
                            _ => format!("{k} not started"),
                        })
                    })
                    .collect();
                incomplete.push((format!("{} ({})", c.address, c.name), missing.join(", ")));
            }
        }
        Tally { done, incomplete }
    }
}
