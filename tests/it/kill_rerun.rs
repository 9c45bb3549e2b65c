//! Crash safety: a 5-machine apply is killed (SIGKILL) at many points and
//! run again. Every time the fleet converges, with no duplicate machine, no
//! leaked sandbox or temporary file, and the journal explains the crash.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const FLEET: &str = r#"version: 1
tenant: crash
providers:
  local:
    type: local
    action_delay: 40ms
pools:
  - name: p
    provider: local
    count: 5
    machine: {os: linux, arch: x86_64, image: img}
    setup:
      - name: a
        run: sleep 0.05; echo a >> a.count
      - name: b
        run: sleep 0.05; echo b >> b.count
      - name: c
        run: sleep 0.05; echo c >> c.count
"#;

fn nimbus(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nimbus")).args(args).current_dir(dir).env("NO_COLOR", "1").output().unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn killed_applies_converge_on_rerun() {
    let mut orphaned_seen = 0;
    let mut partial_seen = 0;
    for step in 0..16u64 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fleet.yaml"), FLEET).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["apply", "--auto-approve", "--parallelism", "2"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + step * 45));
        // SIGKILL: no cleanup runs.
        let _ = child.kill();
        let _ = child.wait();
        let data = dir.path().join(".nimbus/local");
        let before = entries(&data).iter().filter(|n| !n.starts_with('.')).count();
        if before < 5 {
            partial_seen += 1;
        }

        let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
        assert_eq!(o.status.code(), Some(0), "kill at step {step}: {}", String::from_utf8_lossy(&o.stderr));
        if String::from_utf8_lossy(&o.stderr).contains("ORPHANED") {
            orphaned_seen += 1;
        }
        // Exactly the five machines; nothing half-built or half-removed.
        let names = entries(&data);
        let want: Vec<String> = (0..5).map(|i| format!("nimbus.crash.p.{i}")).collect();
        assert_eq!(names, want, "kill at step {step}");
        for m in &want {
            let root = data.join(m).join("root");
            for f in ["a.count", "b.count", "c.count"] {
                assert!(root.join(f).exists(), "kill at step {step}: {m} lacks {f}");
            }
            // Orphaned scripts of the killed run may still be finishing; give them a moment.
            let state_dir = root.join("var/lib/nimbus");
            // The killed apply's setup lock may stay behind on a machine the rerun did not need to set up: it
            // is this fleet's own, and the next setup there takes it back at once.
            let ours = |e: &Vec<String>| {
                e.iter().filter(|f| *f != ".setup.lock").cloned().collect::<Vec<_>>() == ["state.db"]
                    && (!e.contains(&".setup.lock".to_string())
                        || std::fs::read_to_string(state_dir.join(".setup.lock/holder"))
                            .is_ok_and(|h| h.contains(&dir.path().join(".nimbus").display().to_string())))
            };
            for _ in 0..50 {
                if ours(&entries(&state_dir)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                ours(&entries(&state_dir)),
                "kill at step {step}: temporary state file left on {m}: {:?}",
                entries(&state_dir)
            );
        }
        let plan = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
        assert_eq!(plan.status.code(), Some(0), "kill at step {step}: {}", String::from_utf8_lossy(&plan.stdout));
    }
    assert!(partial_seen >= 3, "kills should land mid-run (only {partial_seen} did)");
    assert!(orphaned_seen >= 1, "no kill left an EXECUTING action to orphan");
}

/// An apply aborted right after each replacement of a sandbox's state database (the `after:state-write`
/// failpoint): the rerun converges and no machine keeps a setup step's pid file. The file goes before the state
/// that says its step is done: killed after that state but before the file went, no later setup would come back
/// to remove it.
#[test]
fn an_apply_killed_after_any_state_write_leaves_no_pid_file() {
    const ONE: &str = "version: 1\ntenant: pidfile\nproviders:\n  local:\n    type: local\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {os: linux, arch: x86_64, image: img}\n    setup:\n      - name: a\n        run: echo a >> a.count\n      - name: b\n        run: echo b >> b.count\n";
    let mut aborted = 0;
    for n in 1..=8 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fleet.yaml"), ONE).unwrap();
        let killed = Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["apply", "--auto-approve"])
            .current_dir(dir.path())
            .env("NIMBUS_FAILPOINT", format!("after:state-write:{n}"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&killed.stderr).contains("failpoint after:state-write") {
            aborted += 1;
        }
        let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
        assert_eq!(o.status.code(), Some(0), "abort after state write {n}: {}", String::from_utf8_lossy(&o.stderr));
        let state = dir.path().join(".nimbus/local/nimbus.pidfile.p.0/root/var/lib/nimbus");
        let left = entries(&state);
        assert!(
            !left.contains(&".setup-step.pid".to_string()),
            "abort after state write {n}: a setup step's pid file is left: {left:?}"
        );
        let plan = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
        assert_eq!(
            plan.status.code(),
            Some(0),
            "abort after state write {n}: {}",
            String::from_utf8_lossy(&plan.stdout)
        );
    }
    assert!(aborted >= 3, "the failpoint aborted the apply after the state writes ({aborted} times)");
}
