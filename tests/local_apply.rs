//! `nimbus apply` end to end on the local provider: the quickstart flow,
//! confirmation, saved and stale plans, the lock, failed-step resume, the
//! journal and history, telemetry, and the on-machine state read by `sqlite3`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn nimbus_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nimbus runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn nimbus(dir: &Path, args: &[&str]) -> Output {
    nimbus_in(dir, args, None)
}

fn text(o: &Output) -> String {
    format!("--- stdout\n{}--- stderr\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn quickstart() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    dir
}

fn sandboxes(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(".nimbus/local"))
        .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn state_db(dir: &Path, machine: &str) -> PathBuf {
    dir.join(".nimbus/local").join(machine).join("root/var/lib/nimbus/state.db")
}

fn sqlite3(db: &Path, sql: &str) -> String {
    let o = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 command is installed (scripts/test.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn quickstart_flow_converges_and_detects_drift() {
    let dir = quickstart();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Apply complete! Resources: 2 added, 0 changed, 0 destroyed."));
    assert_eq!(sandboxes(dir.path()), ["nimbus.quickstart.linux.0", "nimbus.quickstart.linux.1"]);

    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("No changes."));

    // The setup really ran in the sandbox, and its state is readable with the sqlite3 command.
    let root = dir.path().join(".nimbus/local/nimbus.quickstart.linux.0/root");
    assert_eq!(std::fs::read_to_string(root.join("tools/installed")).unwrap().trim(), "git make");
    let db = state_db(dir.path(), "nimbus.quickstart.linux.0");
    assert_eq!(sqlite3(&db, "SELECT name, status FROM setup_steps ORDER BY position"), "tools|done\nwarm-cache|done\n");
    assert_eq!(sqlite3(&db, "SELECT value FROM machine_state WHERE key = 'tenant'"), "quickstart\n");
    assert_eq!(sqlite3(&db, "SELECT image FROM image_state"), "ubuntu-24.04\n");
    let tables = sqlite3(&db, ".tables");
    for t in ["machine_state", "image_state", "setup_steps", "runner_state"] {
        assert!(tables.contains(t), "{tables}");
    }
    // No temporary file is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(db.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("state.db")]);

    // Scale: the count changes, so the plan has changes.
    let fleet = dir.path().join("fleet.yaml");
    let f = std::fs::read_to_string(&fleet).unwrap().replace("count: 2", "count: 3");
    std::fs::write(&fleet, f).unwrap();
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let f = std::fs::read_to_string(&fleet).unwrap().replace("count: 3", "count: 1");
    std::fs::write(&fleet, f).unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 added, 0 changed, 2 destroyed."), "{}", text(&o));
    assert_eq!(sandboxes(dir.path()), ["nimbus.quickstart.linux.0"]);
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));

    // history shows the runs.
    let o = nimbus(dir.path(), &["history", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 3);
    assert!(v["runs"].as_array().unwrap().iter().all(|r| r["status"] == "SUCCESS"));
}

#[test]
fn apply_asks_first() {
    let dir = quickstart();
    let o = nimbus_in(dir.path(), &["apply"], Some("no\n"));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Apply cancelled."));
    assert!(sandboxes(dir.path()).is_empty(), "nothing touched");
    let o = nimbus_in(dir.path(), &["apply"], None);
    assert_eq!(o.status.code(), Some(1), "no answer (closed stdin) is no");
    let o = nimbus_in(dir.path(), &["apply"], Some("yes\n"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(sandboxes(dir.path()).len(), 2);
}

#[test]
fn saved_plans_apply_once_and_stale_ones_are_refused() {
    let dir = quickstart();
    let o = nimbus(dir.path(), &["plan", "-out", "p.json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = nimbus(dir.path(), &["apply", "p.json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(sandboxes(dir.path()).len(), 2);
    // The world changed since: the same plan is stale now.
    let o = nimbus(dir.path(), &["apply", "p.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("stale plan"), "{}", text(&o));

    // A changed fleet file makes a plan stale too.
    let o = nimbus(dir.path(), &["plan", "-out", "q.json"]);
    assert_eq!(o.status.code(), Some(0));
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(&fleet, std::fs::read_to_string(&fleet).unwrap() + "\n# edited\n").unwrap();
    let o = nimbus(dir.path(), &["apply", "q.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("changed since the plan was made"), "{}", text(&o));

    // A plan made as of the future is for review only.
    let o = nimbus(dir.path(), &["plan", "-out", "f.json", "--at", "+25h"]);
    assert_eq!(o.status.code(), Some(0));
    let o = nimbus(dir.path(), &["apply", "f.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in the future"), "{}", text(&o));
}

#[test]
fn a_held_lock_refuses_a_second_apply() {
    let dir = quickstart();
    let _held = nimbus::journal::ApplyLock::acquire(&dir.path().join(".nimbus/apply.lock")).unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another apply of this fleet is running"), "{}", text(&o));
    assert!(sandboxes(dir.path()).is_empty());
}

const FAILING: &str = r#"version: 1
tenant: t
providers:
  local: {type: local}
pools:
  - name: p
    provider: local
    count: 2
    machine: {os: linux, arch: x86_64, image: img}
    setup:
      - name: one
        run: echo run >> one.count
      - name: two
        run: |
          echo "trying two"
          test -f ../../../../allow-two || { echo "two is not allowed yet" >&2; exit 7; }
      - name: three
        run: echo run >> three.count
"#;

#[test]
fn failed_step_is_reported_once_and_resumes_from_that_step() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fleet.yaml"), FAILING).unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.matches("Error: ").count(), 2, "one root cause per machine: {err}");
    assert!(
        err.contains("setup step `two` failed with exit code 7") && err.contains("two is not allowed yet"),
        "{err}"
    );

    let h = nimbus(dir.path(), &["history", "--run", "latest", "--json"]);
    let actions: serde_json::Value = serde_json::from_slice(&h.stdout).unwrap();
    let setup = actions.as_array().unwrap().iter().find(|a| a["kind"] == "run_setup").unwrap();
    assert_eq!(setup["status"], "ERROR");
    assert_eq!(setup["exit_code"], 7);
    let log = std::fs::read_to_string(setup["log_path"].as_str().unwrap()).unwrap();
    assert!(log.contains("==> step two") && log.contains("trying two"), "{log}");

    let db = state_db(dir.path(), "nimbus.t.p.0");
    assert_eq!(
        sqlite3(&db, "SELECT name, status, exit_code FROM setup_steps ORDER BY position"),
        "one|done|0\ntwo|failed|7\n"
    );
    let plan = nimbus(dir.path(), &["plan", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(v["resource_changes"][0]["run_steps"], serde_json::json!(["two", "three"]));

    std::fs::write(dir.path().join("allow-two"), "").unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root = dir.path().join(".nimbus/local/nimbus.t.p.0/root");
    assert_eq!(std::fs::read_to_string(root.join("one.count")).unwrap(), "run\n", "step one ran once");
    assert_eq!(std::fs::read_to_string(root.join("three.count")).unwrap(), "run\n");
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

#[test]
fn hostile_step_names_and_values_are_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let fleet = format!(
        r#"version: 1
tenant: t
providers:
  local: {{type: local}}
pools:
  - name: p
    provider: local
    count: 1
    machine: {{os: linux, arch: x86_64, image: "img'; touch {m}; echo '"}}
    setup:
      - name: "a'; touch {m}; echo '$(touch {m})`touch {m}`"
        run: printf '%s' "$NIMBUS_STEP" > step-name
"#,
        m = marker.display()
    );
    std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!marker.exists(), "a value escaped its quotes");
    let got = std::fs::read_to_string(dir.path().join(".nimbus/local/nimbus.t.p.0/root/step-name")).unwrap();
    assert_eq!(got, format!("a'; touch {m}; echo '$(touch {m})`touch {m}`", m = marker.display()));
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

#[test]
fn telemetry_as_json_lines() {
    let dir = quickstart();
    let o = nimbus(dir.path(), &["--log-format", "json", "apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let named = |n: &str| events.iter().filter(|e| e["fields"]["event"] == n).cloned().collect::<Vec<_>>();
    let starts = named("nimbus.machine.provision_start");
    assert_eq!(starts.len(), 2);
    for e in &starts {
        assert_eq!(e["fields"]["tenant"], "quickstart");
        assert!(e["fields"]["machine"].as_str().unwrap().starts_with("nimbus.quickstart.linux."));
    }
    for n in [
        "nimbus.machine.provision_complete",
        "nimbus.machine.reachable",
        "nimbus.setup.complete",
        "nimbus.setup.step_complete",
    ] {
        let evs = named(n);
        assert!(!evs.is_empty(), "no {n}");
        assert!(evs.iter().all(|e| e["fields"]["duration_ms"].is_u64()), "{n} without duration");
    }
    assert_eq!(named("nimbus.apply.complete").len(), 1);
}
