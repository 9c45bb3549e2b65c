//! The journal: orphan recovery, retention, and the apply lock.

use chrono::{Duration, Utc};
use nimbus::state::journal::{ApplyLock, Category, Journal, JournalError, Retention};
use serde_json::json;

#[test]
fn executing_actions_of_a_killed_run_become_orphaned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    {
        let mut j = Journal::open(&path).unwrap();
        let run = j.start_run("apply", "acme", "fleet.yaml").unwrap();
        j.add_actions(
            run,
            &[
                (0, "a[0]".into(), "launch_instance".into(), json!({})),
                (1, "a[0]".into(), "run_setup".into(), json!({})),
            ],
        )
        .unwrap();
        j.action_started(run, 0, None).unwrap();
        // The process dies here.
    }
    let j = Journal::open(&path).unwrap();
    assert_eq!(j.recover().unwrap(), 1);
    let actions = j.actions(1).unwrap();
    assert_eq!(actions[0].status, "ORPHANED");
    assert_eq!(actions[1].status, "PENDING");
    assert_eq!(j.runs(10).unwrap()[0].status, "INTERRUPTED");
    let events = j.events(10).unwrap();
    assert!(events.iter().any(|e| e.category == "system" && e.message.contains("marked ORPHANED")), "{events:?}");
    // Idempotent.
    assert_eq!(j.recover().unwrap(), 0);
}

#[test]
fn retention_prunes_old_runs_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.db")).unwrap();
    let old = j.start_run("apply", "acme", "f").unwrap();
    j.event(Some(old), Category::Audit, "info", "me", "old", None).unwrap();
    j.finish_run(old, true, &json!({})).unwrap();
    j.backdate(old, Utc::now() - Duration::days(31)).unwrap();
    let mid = j.start_run("apply", "acme", "f").unwrap();
    j.event(Some(mid), Category::Audit, "info", "me", "mid", None).unwrap();
    j.finish_run(mid, true, &json!({})).unwrap();
    j.backdate(mid, Utc::now() - Duration::days(8)).unwrap();
    let new = j.start_run("apply", "acme", "f").unwrap();
    j.event(Some(new), Category::Audit, "info", "me", "new", None).unwrap();
    let (runs, events) = j.prune(Retention::default()).unwrap();
    assert_eq!((runs, events), (1, 2));
    let ids: Vec<i64> = j.runs(10).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![new, mid]);
    let msgs: Vec<String> = j.events(10).unwrap().into_iter().map(|e| e.message).collect();
    assert_eq!(msgs, vec!["new"]);
}

#[test]
fn a_second_apply_is_refused_while_the_lock_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("apply.lock");
    let held = ApplyLock::acquire(&lock).unwrap();
    match ApplyLock::acquire(&lock) {
        Err(JournalError::Locked { holder, .. }) => {
            assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}")
        }
        other => panic!("expected Locked, got {:?}", other.err()),
    }
    drop(held);
    // Another test thread's fork (to spawn a child) holds a copy of the lock's descriptor until the child execs
    // (close-on-exec): allow that moment to pass.
    let mut again = ApplyLock::acquire(&lock);
    for _ in 0..50 {
        if again.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        again = ApplyLock::acquire(&lock);
    }
    again.expect("free again once released");
}

#[test]
fn an_idempotency_key_is_kept_until_forgotten_and_then_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    let first = Journal::open(&path).unwrap().idempotency_key("aws|RunInstances|acme-linux-0").unwrap();
    // A rerun (a new process, the journal reopened) gets the same key; another scope gets its own.
    let j = Journal::open(&path).unwrap();
    assert_eq!(j.idempotency_key("aws|RunInstances|acme-linux-0").unwrap(), first);
    assert_ne!(j.idempotency_key("aws|RunInstances|acme-linux-1").unwrap(), first);
    assert!(first.len() <= 64 && first.chars().all(|c| c.is_ascii_alphanumeric()), "{first}");
    // Once what it made was seen (or the machine ended), the same name gets a new key.
    j.forget_key("aws|RunInstances|acme-linux-0").unwrap();
    assert_ne!(j.idempotency_key("aws|RunInstances|acme-linux-0").unwrap(), first);
}

/// Issue 18.5: the event log takes the seed's `success` level, in a new journal and in one written by the
/// previous nimbus (its CHECK constraint is migrated in place, every row kept).
#[test]
fn the_event_log_takes_the_success_level_after_migrating_an_old_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE runs (id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT,
               status TEXT NOT NULL CHECK (status IN ('RUNNING', 'SUCCESS', 'ERROR', 'INTERRUPTED')),
               command TEXT NOT NULL, tenant TEXT NOT NULL, fleet_path TEXT NOT NULL, summary TEXT);
             CREATE TABLE event_log (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, run_id INTEGER,
               category TEXT NOT NULL CHECK (category IN ('audit', 'system', 'error')),
               level TEXT NOT NULL CHECK (level IN ('debug', 'info', 'warn', 'error')),
               actor TEXT NOT NULL, message TEXT NOT NULL, details TEXT);
             CREATE TABLE idempotency_keys (scope TEXT PRIMARY KEY, key TEXT NOT NULL, created_at TEXT NOT NULL);
             INSERT INTO runs VALUES (1, '2026-12-01T00:00:00.000Z', NULL, 'SUCCESS', 'apply', 't', 'f', NULL);
             INSERT INTO event_log VALUES (1, '2099-12-01T00:00:00.000Z', 1, 'audit', 'info', 'ann', 'old event', NULL);",
        )
        .unwrap();
        assert!(
            c.execute("INSERT INTO event_log VALUES (2, 'x', NULL, 'audit', 'success', 'a', 'm', NULL)", []).is_err()
        );
    }
    let j = nimbus::state::journal::Journal::open(&path).unwrap();
    j.event(None, nimbus::state::journal::Category::Audit, "success", "nimbus", "converged", None).unwrap();
    let events = j.events(10).unwrap();
    let msgs: Vec<(&str, &str)> = events.iter().map(|e| (e.level.as_str(), e.message.as_str())).collect();
    assert_eq!(msgs, [("success", "converged"), ("info", "old event")]);
    // The old run is still there, and new runs record who made them.
    let run = j.start_run_by("provision", "api", "t", "f").unwrap();
    let runs = j.runs(10).unwrap();
    assert_eq!(
        runs.iter().map(|r| (r.id, r.actor.clone())).collect::<Vec<_>>(),
        [(run, Some("api".into())), (1, None)]
    );
    drop(j);
    // Opening again migrates nothing twice.
    nimbus::state::journal::Journal::open(&path).unwrap();
}

/// Issue 18.7: the apply summary counts what was made, not what was asked for: a launch the provider answered
/// from its idempotency key with what an earlier run made adds nothing.
#[test]
fn a_launch_answered_with_an_earlier_runs_instance_adds_nothing() {
    use nimbus::core::plan::document::PlanDocument;
    use nimbus::engine::walk::{ExecReport, Outcome};
    let d = nimbus::testing::desired("acme", vec![nimbus::testing::pool("linux", "aws", 1, "t3.large", "ami-1")]);
    let p = nimbus::core::plan::plan(&d, &nimbus::core::model::Actual::default(), Utc::now());
    let doc = PlanDocument::from_plan(&p, None, None);
    let report = ExecReport {
        outcomes: doc.actions.iter().map(|a| (a.id, Outcome::Success)).collect(),
        root_causes: vec![],
        wall: std::time::Duration::ZERO,
        interrupted: false,
        deferred: vec![],
    };
    let launch = doc.actions.iter().find(|a| a.action.kind.name() == "launch_instance").unwrap().id;
    let made = nimbus::engine::apply::Tally::of(&doc, &report, &Default::default());
    assert_eq!(made.done.add, 1);
    let again = nimbus::engine::apply::Tally::of(&doc, &report, &[launch].into_iter().collect());
    assert_eq!(again.done.add, 0, "nothing new was made");
    assert!(again.incomplete.is_empty());
}
