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
    ApplyLock::acquire(&lock).expect("free again once released");
}
