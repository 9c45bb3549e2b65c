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
    assert_eq!(sqlite3(&db, "SELECT tenant FROM machine_state"), "quickstart\n");
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
    let _held = nimbus::state::journal::ApplyLock::acquire(&dir.path().join(".nimbus/apply.lock")).unwrap();
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
    // Issue 9.12: the machines were launched, so they count, and each is named as incomplete.
    assert!(err.contains("Apply failed. Resources: 2 added, 0 changed, 0 destroyed."), "{err}");
    assert!(err.contains("Incomplete: p[0] (nimbus.t.p.0): run_setup failed"), "{err}");
    assert!(err.contains("Incomplete: p[1] (nimbus.t.p.1)"), "{err}");
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
    // Issue 19.4: the seed's events, each with tenant_id, machine_id and duration (and error on failures);
    // the old names ride along as `alias`.
    for (n, alias) in [
        ("nimbus.machine.provision_success", Some("nimbus.machine.provision_complete")),
        ("nimbus.machine.setup_start", Some("nimbus.setup.start")),
        ("nimbus.machine.setup_success", Some("nimbus.setup.complete")),
        ("nimbus.machine.ready", None),
        ("nimbus.machine.reachable", None),
        ("nimbus.setup.step_complete", None),
        ("nimbus.cloud_provider.api_call_success", None),
    ] {
        let evs = named(n);
        assert!(!evs.is_empty(), "no {n}");
        for e in &evs {
            assert!(e["fields"]["duration"].is_u64(), "{n} without duration: {e}");
            assert_eq!(e["fields"]["tenant_id"], "quickstart", "{e}");
            if let Some(a) = alias {
                assert_eq!(e["fields"]["alias"], a, "{e}");
            }
        }
    }
    assert_eq!(named("nimbus.machine.ready").len(), 2, "each machine became ready once");
    assert!(!named("nimbus.cloud_provider.api_call_start").is_empty());
    assert!(
        named("nimbus.cloud_provider.api_call_success").iter().any(|e| e["fields"]["operation"] == "launch"
            && e["fields"]["machine_id"].as_str().is_some_and(|m| m.starts_with("nimbus.quickstart.linux."))),
        "a launch is a provider API call"
    );
    // A failure carries the error.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fleet.yaml"), FAILING).unwrap();
    let o = nimbus(dir.path(), &["--log-format", "json", "apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1));
    let failures: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["fields"]["event"] == "nimbus.machine.setup_failure")
        .collect();
    assert_eq!(failures.len(), 2);
    assert!(failures.iter().all(|e| e["fields"]["error"].as_str().is_some_and(|m| m.contains("exit code 7"))));
    assert_eq!(named("nimbus.apply.complete").len(), 1);
}

// ---------------------------------------------------------------- issue 9 regressions

fn write_fleet(dir: &Path, text: &str) {
    std::fs::write(dir.join("fleet.yaml"), text).unwrap();
}

fn tags_of(dir: &Path, machine: &str) -> serde_json::Value {
    let rec = std::fs::read_to_string(dir.join(".nimbus/local").join(machine).join("nimbus.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&rec).unwrap()["tags"].clone()
}

const TWO_LOCALS: &str = r#"version: 1
tenant: t
providers:
  fast: {type: local}
  slow: {type: local}
pools:
  - name: a
    provider: slow
    count: 2
    machine: {os: linux, arch: x86_64, image: img}
  - name: b
    provider: fast
    count: 1
    machine: {os: linux, arch: x86_64, image: img}
"#;

/// Issue 9.1: two providers of one kind (sharing a data dir) each see only their own machines.
#[test]
fn two_local_providers_keep_their_own_machines() {
    let dir = tempfile::tempdir().unwrap();
    write_fleet(dir.path(), TWO_LOCALS);
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(tags_of(dir.path(), "nimbus.t.a.0")["nimbus:provider"], "slow");
    assert_eq!(tags_of(dir.path(), "nimbus.t.b.0")["nimbus:provider"], "fast");
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "the very next plan has nothing to do: {}", text(&o));
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("No changes."), "{}", text(&o));
    assert_eq!(sandboxes(dir.path()).len(), 3);

    // Moving a pool is done only when the fleet file says so, and the plan says it plainly.
    let f = TWO_LOCALS.replace("    provider: slow\n", "    provider: fast\n");
    write_fleet(dir.path(), &f);
    let o = nimbus(dir.path(), &["plan"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("pool `a` moved from provider `slow` to `fast` in the fleet file"), "{}", text(&o));
    assert!(out.contains("Plan: 2 to add, 0 to change, 2 to destroy."), "{}", text(&o));
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(sandboxes(dir.path()).len(), 3);
    assert_eq!(tags_of(dir.path(), "nimbus.t.a.0")["nimbus:provider"], "fast");
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 9.1: a sandbox made before nimbus recorded providers belongs to the fleet's only `local` provider;
/// with two, it is left alone, reported, and its name is not reused.
#[test]
fn legacy_sandboxes_without_a_provider_tag() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    let rec = dir.path().join(".nimbus/local/nimbus.quickstart.linux.0/nimbus.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rec).unwrap()).unwrap();
    v["tags"].as_object_mut().unwrap().remove("nimbus:provider");
    std::fs::write(&rec, serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0), "adopted");
    let fleet = dir.path().join("fleet.yaml");
    let f = std::fs::read_to_string(&fleet)
        .unwrap()
        .replace("    type: local\n", "    type: local\n  spare:\n    type: local\n");
    std::fs::write(&fleet, f).unwrap();
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no `nimbus:provider` tag"), "{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("to add"), "nothing is created in its place: {}", text(&o));
}

/// Issue 9.3: a hand-edited saved plan is refused; the local provider refuses to destroy what is not its own.
#[test]
fn an_edited_saved_plan_is_refused_and_nothing_is_touched() {
    let dir = quickstart();
    // Another tenant's sandbox in the same folder.
    let other =
        std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap().replace("tenant: quickstart", "tenant: other");
    std::fs::write(dir.path().join("other.yaml"), other).unwrap();
    assert_eq!(nimbus(dir.path(), &["apply", "-f", "other.yaml", "--auto-approve"]).status.code(), Some(0));
    let victim = dir.path().join(".nimbus/local/nimbus.other.linux.0");
    assert!(victim.join("nimbus.json").exists());

    let o = nimbus(dir.path(), &["plan", "-out", "p.json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
    assert!(
        saved["fleet"]["content"].as_str().unwrap().contains("tenant: quickstart"),
        "the plan carries its fleet file"
    );

    let mut edited = saved.clone();
    edited["actions"] = serde_json::json!([{
        "id": 0, "depends_on": [], "address": "linux[0]", "type": "terminate_instance",
        "provider": "local", "machine": "nimbus.other.linux.0", "instance_id": "nimbus.other.linux.0"
    }]);
    std::fs::write(dir.path().join("edited.json"), edited.to_string()).unwrap();
    let o = nimbus(dir.path(), &["apply", "edited.json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("refusing to apply the saved plan"), "{}", text(&o));
    assert!(victim.join("nimbus.json").exists(), "the other tenant's sandbox is gone");

    let mut edited = saved.clone();
    edited["tenant"] = "other".into();
    std::fs::write(dir.path().join("tenant.json"), edited.to_string()).unwrap();
    let o = nimbus(dir.path(), &["apply", "tenant.json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("names tenant `other`"), "{}", text(&o));
    assert!(sandboxes(dir.path()).iter().all(|s| !s.contains("quickstart")), "nothing was created");

    // The unedited plan still applies.
    let o = nimbus(dir.path(), &["apply", "p.json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(victim.join("nimbus.json").exists());

    // The provider itself refuses: another tenant's sandbox, or another provider's.
    use nimbus::providers::{MachineRef, Provider, local::LocalProvider};
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let data = dir.path().join(".nimbus/local");
    let by_name = |n: &str| MachineRef { name: n.into(), instance_id: Some(n.into()), address: None };
    let p = LocalProvider::new("local", "quickstart", &data);
    let e = rt.block_on(p.terminate(&by_name("nimbus.other.linux.0"))).unwrap_err();
    assert!(e.to_string().contains("refusing to terminate"), "{e}");
    let p = LocalProvider::new("elsewhere", "quickstart", &data);
    let e = rt.block_on(p.terminate(&by_name("nimbus.quickstart.linux.0"))).unwrap_err();
    assert!(e.to_string().contains("belongs to provider `local`"), "{e}");
    assert!(victim.exists() && data.join("nimbus.quickstart.linux.0").exists());
}

/// Issue 9.6: an empty or damaged state database is said as such, and repaired; it is not "unreachable".
#[test]
fn empty_and_damaged_state_databases_are_repaired() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    std::fs::write(state_db(dir.path(), "nimbus.quickstart.linux.0"), b"").unwrap();
    std::fs::write(state_db(dir.path(), "nimbus.quickstart.linux.1"), b"garbage, not sqlite at all").unwrap();
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(2), "drift with a repair: {}", text(&o));
    let t = text(&o);
    assert!(t.contains("is empty (0 bytes)") && t.contains("is not a SQLite database"), "{t}");
    assert!(t.contains("runs again from the first"), "{t}");
    assert!(!t.contains("unreachable") && !t.contains("malloc"), "{t}");
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        sqlite3(
            &state_db(dir.path(), "nimbus.quickstart.linux.0"),
            "SELECT name, status FROM setup_steps ORDER BY position"
        ),
        "tools|done\nwarm-cache|done\n"
    );
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 9.6: a machine that cannot be reached is never "no changes" for a drift check.
#[test]
fn an_unreachable_machine_fails_a_drift_check() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    std::fs::remove_dir_all(dir.path().join(".nimbus/local/nimbus.quickstart.linux.1/root")).unwrap();
    let o = nimbus(dir.path(), &["plan"]);
    assert_eq!(o.status.code(), Some(0), "a plain plan shows the warning: {}", text(&o));
    assert!(text(&o).contains("unreachable"), "{}", text(&o));
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("could not be checked"), "{}", text(&o));
}

/// Issue 9.7: garbage in one sandbox's record names the file and breaks that machine only.
#[test]
fn a_damaged_sandbox_record_breaks_one_machine_not_the_fleet() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    let rec = dir.path().join(".nimbus/local/nimbus.quickstart.linux.1/nimbus.json");
    std::fs::write(&rec, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let o = nimbus(dir.path(), &["plan"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains(&rec.display().to_string()), "names the file: {t}");
    assert!(t.contains("No changes."), "the other machine is fine, and the broken one is not re-created: {t}");
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read(&rec).unwrap(), [0xff, 0xfe, 0x00, 0x41], "left alone");
}

/// Issue 9.8: an apply with nothing to do still opens the journal and records its run.
#[test]
fn a_no_op_apply_recreates_the_journal() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    std::fs::remove_file(dir.path().join(".nimbus/journal.db")).unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = nimbus(dir.path(), &["history", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 1);
    assert_eq!(v["runs"][0]["status"], "SUCCESS");
}

fn slow_fleet(dir: &Path, seconds: u32) {
    write_fleet(
        dir,
        &format!(
            "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\npools:\n  - name: p\n    provider: local\n    count: 3\n    machine: {{os: linux, arch: x86_64, image: img}}\n    setup:\n      - name: slow\n        run: touch started; sleep {seconds}; touch finished\n"
        ),
    );
}

fn spawn_apply(dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["apply", "--auto-approve", "--parallelism", "1"])
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to a minute) until some sandbox's slow step has started.
fn wait_started(dir: &Path) -> PathBuf {
    for _ in 0..600 {
        for m in sandboxes(dir) {
            let p = dir.join(".nimbus/local").join(&m).join("root");
            if p.join("started").exists() {
                return p;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no setup step started");
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
}

/// Issue 9.9: the first SIGINT lets running actions finish, starts nothing new, journals INTERRUPTED, exits 130.
#[test]
fn sigint_finishes_running_actions_and_records_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    slow_fleet(dir.path(), 1);
    let child = spawn_apply(dir.path());
    let root = wait_started(dir.path());
    signal(&child, "INT");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("Interrupt received"), "{}", text(&o));
    assert!(root.join("finished").exists(), "the running step was let finish");
    let h = nimbus(dir.path(), &["history", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&h.stdout).unwrap();
    assert_eq!(v["runs"][0]["status"], "INTERRUPTED", "{v}");
    let h = nimbus(dir.path(), &["history", "--run", "latest", "--json"]);
    let actions: serde_json::Value = serde_json::from_slice(&h.stdout).unwrap();
    let statuses: Vec<&str> = actions.as_array().unwrap().iter().map(|a| a["status"].as_str().unwrap()).collect();
    assert!(statuses.contains(&"PENDING"), "some actions were never started: {statuses:?}");
    assert!(!statuses.contains(&"EXECUTING"), "{statuses:?}");
    // Running again continues and converges.
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 9.9: a second signal exits at once, without waiting for the running step.
#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    slow_fleet(dir.path(), 30);
    let child = spawn_apply(dir.path());
    let root = wait_started(dir.path());
    signal(&child, "TERM");
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, "INT");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("Second interrupt"), "{}", text(&o));
    assert!(!root.join("finished").exists(), "it did not wait for the 30 s step");
}

/// Issue 9.11: paths handed to machines are absolute, whatever the working directory and `-f`.
#[test]
fn relative_fleet_paths_give_machines_absolute_homes() {
    let top = tempfile::tempdir().unwrap();
    let sub = top.path().join("fleet-dir");
    std::fs::create_dir(&sub).unwrap();
    write_fleet(
        &sub,
        "version: 1\ntenant: t\nproviders:\n  local: {type: local}\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {os: linux, arch: x86_64, image: img}\n    setup:\n      - name: home\n        run: cd \"$HOME\" && pwd > where && printf '%s' \"$HOME\" > home\n",
    );
    // From the fleet's folder with a relative -f, as the README shows ...
    let o = nimbus(&sub, &["apply", "-f", "fleet.yaml", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root = sub.join(".nimbus/local/nimbus.t.p.0/root");
    let home = std::fs::read_to_string(root.join("home")).unwrap();
    assert!(Path::new(&home).is_absolute(), "HOME is `{home}`");
    assert_eq!(Path::new(&home).canonicalize().unwrap(), root.canonicalize().unwrap());
    assert!(!root.join(".nimbus").exists(), "no stray nested tree inside the sandbox");
    // ... and from another folder.
    let o = nimbus(top.path(), &["plan", "-f", "fleet-dir/fleet.yaml", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    std::fs::write(
        sub.join("fleet.yaml"),
        std::fs::read_to_string(sub.join("fleet.yaml")).unwrap().replace("count: 1", "count: 2"),
    )
    .unwrap();
    let o = nimbus(top.path(), &["apply", "-f", "fleet-dir/fleet.yaml", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root1 = sub.join(".nimbus/local/nimbus.t.p.1/root");
    assert_eq!(
        Path::new(&std::fs::read_to_string(root1.join("home")).unwrap()).canonicalize().unwrap(),
        root1.canonicalize().unwrap()
    );
    assert!(!top.path().join(".nimbus").exists(), "nothing is made relative to the working directory");
}

/// Issue 9.10: a closed pipe ends output quietly, without a panic.
#[test]
fn a_closed_pipe_does_not_panic() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let big = std::fs::read_to_string("examples/quickstart/fleet.yaml").unwrap().replace("count: 2", "count: 300");
    write_fleet(dir.path(), &big);
    let mut child = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["plan"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap();
    lines.next().unwrap().unwrap();
    drop(lines); // as `head -2` does
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}

/// Issue 9.10: nothing in `src/` prints with a macro that can panic.
#[test]
fn no_printing_macro_can_panic() {
    let mut bad = Vec::new();
    let mut stack = vec![PathBuf::from("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("printer.rs") {
                for (i, line) in std::fs::read_to_string(&p).unwrap().lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    let found = ["println!", "print!", "eprintln!", "eprint!"].iter().any(|m| {
                        code.match_indices(m).any(|(at, _)| {
                            !code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_')
                        })
                    });
                    if found {
                        bad.push(format!("{}:{}: {line}", p.display(), i + 1));
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "use outln!/errln! (src/printer.rs):\n{}", bad.join("\n"));
}

/// Issue 12: a damaged journal is one clear error before anything else happens, naming the file and the fix.
#[test]
fn a_damaged_journal_is_refused_up_front() {
    let dir = quickstart();
    std::fs::create_dir_all(dir.path().join(".nimbus")).unwrap();
    std::fs::write(dir.path().join(".nimbus/journal.db"), "this is not a database, not even close; ".repeat(200))
        .unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("journal.db` is damaged") && err.contains("move it aside"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("will perform"), "it failed before planning: {}", text(&o));
    assert!(sandboxes(dir.path()).is_empty(), "nothing touched");
}

/// Issue 12: a journal write that fails during an apply stops new actions (running ones finish) and exits 1.
#[test]
fn a_journal_write_failure_stops_the_apply() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fleet.yaml"),
        "version: 1\ntenant: t\nproviders:\n  local: {type: local}\npools:\n  - name: p\n    provider: local\n    count: 3\n    machine: {os: linux, arch: x86_64, image: img}\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["apply", "--auto-approve", "--parallelism", "1"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("NIMBUS_FAILPOINT", "fail:journal-write:3")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the journal could not be written, so no new actions were started"), "{err}");
    assert!(sandboxes(dir.path()).len() < 3, "it went on after the journal failed: {:?}", sandboxes(dir.path()));
    // Without the failure, the next apply finishes the job.
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    assert_eq!(sandboxes(dir.path()).len(), 3);
}

/// Issue 12: a setup step past its `timeout:` is killed with everything it started; the journal says TIMEOUT,
/// the machine's state says timed out, and the next apply runs the step again.
#[test]
fn a_setup_step_past_its_timeout_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = |timeout: &str| {
        format!(
            "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {{os: linux, arch: x86_64, image: img}}\n    setup:\n      - name: hang\n        timeout: {timeout}\n        run: |\n          if [ -f ../../../../finish-fast ]; then exit 0; fi\n          sleep 300 &\n          echo $! > sleeper.pid\n          wait\n"
        )
    };
    write_fleet(dir.path(), &fleet("2s"));
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("ran past its timeout of 2s"), "{}", text(&o));
    let root = dir.path().join(".nimbus/local/nimbus.t.p.0/root");
    let pid = std::fs::read_to_string(root.join("sleeper.pid")).unwrap();
    let alive = Command::new("kill").args(["-0", pid.trim()]).status().unwrap().success();
    assert!(!alive, "the step's child process {pid} was left running");
    let h = nimbus(dir.path(), &["history", "--run", "latest", "--json"]);
    let actions: serde_json::Value = serde_json::from_slice(&h.stdout).unwrap();
    let setup = actions.as_array().unwrap().iter().find(|a| a["kind"] == "run_setup").unwrap();
    assert_eq!(setup["status"], "TIMEOUT", "{setup}");
    assert_eq!(
        sqlite3(&state_db(dir.path(), "nimbus.t.p.0"), "SELECT status, exit_code FROM setup_steps"),
        "timeout|124\n"
    );
    let plan = nimbus(dir.path(), &["plan"]);
    assert!(String::from_utf8_lossy(&plan.stdout).contains("setup step `hang` (timed out before)"), "{}", text(&plan));
    std::fs::write(dir.path().join("finish-fast"), "").unwrap();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 12: a machine-side lock (only a POSIX shell: `mkdir`) keeps two applies from running setup on one
/// machine at once; the second says who holds it. A lock older than every step's timeout is taken back.
#[test]
fn two_applies_never_run_setup_on_one_machine_at_once() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    let state = dir.path().join(".nimbus/local/nimbus.quickstart.linux.0/root/var/lib/nimbus");
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(&fleet, std::fs::read_to_string(&fleet).unwrap().replace("echo warmed", "echo warmed again"))
        .unwrap();
    // Another operator's apply is running setup on linux.0 right now.
    let now = chrono::Utc::now().timestamp();
    std::fs::create_dir(state.join(".setup.lock")).unwrap();
    std::fs::write(
        state.join(".setup.lock/holder"),
        format!("nimbus on other-laptop (/home/ann/fleet/.nimbus/journal.db)\n{now}\n"),
    )
    .unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("another apply is running setup on `nimbus.quickstart.linux.0`") && err.contains("other-laptop"),
        "{err}"
    );
    assert!(state.join(".setup.lock").exists(), "someone else's lock was removed");
    // The other machine's setup went ahead; linux.0's did not.
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(2));
    // That apply died an hour ago: its lock is stale and taken back.
    std::fs::write(state.join(".setup.lock/holder"), format!("nimbus on other-laptop (x)\n{}\n", now - 3 * 3600))
        .unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!state.join(".setup.lock").exists(), "the lock is released after setup");
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 18.5: the seed's documented debugging queries work on the machine's database, the lifecycle is
/// written as the machine moves through it, and a failed step leaves its last lines (secrets redacted).
#[test]
fn the_seeds_debugging_queries_work_on_the_machine_database() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    let db = state_db(dir.path(), "nimbus.quickstart.linux.0");
    let row = sqlite3(&db, "SELECT state, updated_at FROM machine_state");
    let (state, at) = row.trim().split_once('|').unwrap();
    assert_eq!(state, "ready", "set up, no runner: {row}");
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{row}");
    let steps =
        sqlite3(&db, "SELECT step, status, started_at, completed_at, error_message FROM setup_steps ORDER BY position");
    let lines: Vec<&str> = steps.lines().collect();
    assert_eq!(lines.len(), 2, "{steps}");
    for (l, name) in lines.iter().zip(["tools", "warm-cache"]) {
        let f: Vec<&str> = l.split('|').collect();
        assert_eq!((f[0], f[1], f[4]), (name, "done", ""), "{l}");
        assert!(!f[2].is_empty() && !f[3].is_empty(), "started and completed: {l}");
    }
    let indexes =
        sqlite3(&db, "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx_%' ORDER BY name");
    assert_eq!(indexes, "idx_machine_state_state\nidx_setup_steps_status\n");

    // A failed step: its last lines, with a token it printed hidden.
    let dir = tempfile::tempdir().unwrap();
    write_fleet(
        dir.path(),
        "version: 1\ntenant: t\nproviders:\n  local: {type: local}\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {os: linux, arch: x86_64, image: img}\n    setup:\n      - name: boom\n        run: |\n          echo \"using ghp_abcdefghijklmnopqrstuvwxyz0123456789\" >&2\n          echo \"the disk is full\" >&2\n          exit 3\n",
    );
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(1));
    let db = state_db(dir.path(), "nimbus.t.p.0");
    let msg = sqlite3(&db, "SELECT error_message FROM setup_steps WHERE step = 'boom'");
    assert!(msg.contains("the disk is full"), "{msg}");
    assert!(!msg.contains("abcdefghijklmnopqrstuvwxyz0123456789"), "a secret reached the machine's state: {msg}");
    assert_eq!(sqlite3(&db, "SELECT state FROM machine_state"), "image_installing\n");
}

/// The on-machine schema nimbus wrote before issue 18 (schema 1).
const SCHEMA_1: &str = "
CREATE TABLE machine_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE image_state (image TEXT NOT NULL, applied_at TEXT NOT NULL);
CREATE TABLE setup_steps (position INTEGER NOT NULL, name TEXT PRIMARY KEY, hash TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'timeout')), started_at TEXT, finished_at TEXT,
  exit_code INTEGER);
CREATE TABLE runner_state (name TEXT PRIMARY KEY, labels TEXT NOT NULL, mode TEXT NOT NULL, registered_at TEXT NOT NULL,
  runner_id INTEGER);
";

/// Issue 18.5: a machine set up by the previous version keeps what it holds, is migrated in place by the next
/// apply, and is not set up again.
#[test]
fn a_database_of_the_previous_schema_is_migrated_and_not_set_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let run = "echo run >> one.count";
    write_fleet(
        dir.path(),
        &format!(
            "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {{os: linux, arch: x86_64, image: img}}\n    setup:\n      - name: one\n        run: {run}\n"
        ),
    );
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    // The same machine as the previous nimbus left it: schema 1, step `one` done.
    let db = state_db(dir.path(), "nimbus.t.p.0");
    std::fs::remove_file(&db).unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(SCHEMA_1).unwrap();
    for (k, v) in [
        ("machine", "nimbus.t.p.0"),
        ("tenant", "t"),
        ("pool", "p"),
        ("provider", "local"),
        ("schema_version", "1"),
        ("note", "kept"),
    ] {
        c.execute("INSERT INTO machine_state (key, value) VALUES (?1, ?2)", [k, v]).unwrap();
    }
    c.execute("INSERT INTO image_state VALUES ('img', '2026-11-01T00:00:00Z')", []).unwrap();
    let hash = nimbus::core::model::step_hash(run);
    c.execute(
        "INSERT INTO setup_steps VALUES (0, 'one', ?1, 'done', '2026-11-01T00:00:00Z', '2026-11-01T00:00:01Z', 0)",
        [&hash],
    )
    .unwrap();
    drop(c);
    // Plan (read-only) sees a set-up machine, and leaves the file as it is.
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(sqlite3(&db, "SELECT value FROM machine_state WHERE key = 'note'"), "kept\n");
    // Apply migrates it in place: the seed's columns, everything it held, and no setup again.
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(sqlite3(&db, "SELECT state, tenant, pool, schema_version FROM machine_state"), "ready|t|p|2\n");
    assert_eq!(sqlite3(&db, "SELECT value FROM machine_info WHERE key = 'note'"), "kept\n");
    assert_eq!(
        sqlite3(&db, "SELECT step, status, started_at, completed_at, exit_code FROM setup_steps"),
        "one|done|2026-11-01T00:00:00Z|2026-11-01T00:00:01Z|0\n"
    );
    assert_eq!(sqlite3(&db, "SELECT image FROM image_state"), "img\n");
    let root = dir.path().join(".nimbus/local/nimbus.t.p.0/root");
    assert_eq!(std::fs::read_to_string(root.join("one.count")).unwrap(), "run\n", "the step ran once only");
    assert_eq!(nimbus(dir.path(), &["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 18.2: of two applies started together, the loser always names the holder: pid, user, host and start
/// time (it may read the lock file before the winner has written itself into it).
#[test]
fn the_loser_of_a_lock_race_always_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apply.lock");
    for round in 0..40 {
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let looked = std::sync::Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (b, l, p) = (start.clone(), looked.clone(), path.clone());
                std::thread::spawn(move || {
                    b.wait();
                    // Both racers are this process, so the loser would wait for the winner to let go: a short wait
                    // (for a record, or a release) makes it report instead.
                    let r = nimbus::state::journal::ApplyLock::acquire_with(&p, std::time::Duration::from_millis(100));
                    // The winner holds its lock until the loser has looked.
                    l.wait();
                    r.map(|_| ()).map_err(|e| e.to_string())
                })
            })
            .collect();
        let results: Vec<Result<(), String>> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1, "round {round}: one wins, one loses: {results:?}");
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                e.contains("another apply of this fleet is running (pid ")
                    && e.contains(", user ")
                    && e.contains(", host ")
                    && e.contains(", since 20"),
                "round {round}: {e}"
            );
            assert!(!e.contains("unknown process") && !e.contains("no record"), "round {round}: {e}");
        }
    }
}

/// Issue 18.1: a setup lock held by another fleet is respected, and the error names who holds it since when,
/// as a time and how long ago (never epoch seconds).
#[test]
fn another_fleets_setup_lock_is_respected_and_named_with_times() {
    let dir = quickstart();
    assert_eq!(nimbus(dir.path(), &["apply", "--auto-approve"]).status.code(), Some(0));
    let state = dir.path().join(".nimbus/local/nimbus.quickstart.linux.0/root/var/lib/nimbus");
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(&fleet, std::fs::read_to_string(&fleet).unwrap().replace("echo warmed", "echo warmed again"))
        .unwrap();
    let since = chrono::Utc::now().timestamp() - 180;
    std::fs::create_dir(state.join(".setup.lock")).unwrap();
    std::fs::write(
        state.join(".setup.lock/holder"),
        format!("fleet=quickstart/other.yaml@s3://bucket/other\nrun=4 2026-12-01T00:00:00.000Z\nwho=ann@ci-7 pid 99\nsince={since}\n"),
    )
    .unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).replace('│', " ").split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(err.contains("fleet `quickstart/other.yaml@s3://bucket/other`, run 4 (ann@ci-7 pid 99)"), "{err}");
    assert!(err.contains("(3 min ago)") && err.contains(&crate::common::rfc3339(since)), "{err}");
    assert!(!err.contains(&since.to_string()), "epoch seconds shown: {err}");
    assert!(state.join(".setup.lock").exists(), "another fleet's lock was removed");
}

/// Issue 23.1: a setup step is recorded as running by the shell that runs it (one spawn per step). When that
/// record cannot be written, the step does not run and the error says what failed.
#[test]
fn a_step_runs_only_after_its_record_is_written() {
    use nimbus::core::model::StepStatus;
    use nimbus::state::machine_db::{self, StateDb};
    use nimbus::transport::local::LocalTransport;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let t = LocalTransport::new("nimbus.t.p.0", &root);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut db = StateDb::default();
    db.machine.insert("machine".into(), "nimbus.t.p.0".into());
    db.set_step(0, "a", "h", StepStatus::Running, None);
    rt.block_on(async {
        let out = machine_db::write_then(&t, &db, "echo ran > ran; echo \"p=$p d=$d\"; exit 7", None).await.unwrap();
        assert_eq!(out.code, 7, "the step's own exit code");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "p= d=", "the step sees none of the write's variables");
        let back = machine_db::read(&t).await.unwrap().unwrap();
        assert_eq!(back.steps[0].status, StepStatus::Running, "recorded before the step ran");
    });
    assert!(root.join("ran").exists());
    // The state folder is a file now: the record cannot be written, so the step must not run.
    std::fs::remove_file(root.join("ran")).unwrap();
    std::fs::remove_dir_all(root.join("var/lib/nimbus")).unwrap();
    std::fs::write(root.join("var/lib/nimbus"), b"not a folder").unwrap();
    let e =
        rt.block_on(machine_db::write_then(&t, &db, "echo ran > ran", None)).expect_err("the write fails").to_string();
    assert!(e.contains("nimbus.t.p.0"), "{e}");
    assert!(!root.join("ran").exists(), "the step ran without its record");
}

/// Issue 24.3: the user's tags (fleet < provider < pool) go on what is made, and a change is made in place:
/// the keys set and the keys removed, nothing else, never a replacement.
#[test]
fn tags_are_applied_at_creation_and_changed_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = |fleet_tags: &str, pool_tags: &str| {
        format!(
            "version: 1\ntenant: tags\ntags: {{{fleet_tags}}}\nproviders:\n  local: {{type: local}}\npools:\n  - name: ci\n    provider: local\n    count: 1\n    tags: {{{pool_tags}}}\n    machine: {{os: linux, arch: x86_64, image: img}}\n"
        )
    };
    let record = |dir: &Path| -> serde_json::Value {
        let p = dir.join(".nimbus/local/nimbus.tags.ci.0/nimbus.json");
        serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
    };
    std::fs::write(dir.path().join("fleet.yaml"), fleet("team: platform, cost-center: cc-1", "team: mobile")).unwrap();
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rec = record(dir.path());
    assert_eq!(rec["tags"]["team"], "mobile", "the pool's wins: {rec}");
    assert_eq!(rec["tags"]["cost-center"], "cc-1", "{rec}");
    assert_eq!(rec["tags"]["nimbus:tenant"], "tags", "nimbus's own stay: {rec}");
    let launched = rec["launched_at"].clone();

    // One key changes, one goes: an in-place update naming both, in the plan and its JSON.
    std::fs::write(dir.path().join("fleet.yaml"), fleet("team: platform", "team: ios")).unwrap();
    let o = nimbus(dir.path(), &["plan", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["summary"]["change"], 1, "{}", plan["summary"]);
    assert_eq!((plan["summary"]["add"].as_u64(), plan["summary"]["destroy"].as_u64()), (Some(0), Some(0)));
    let a = &plan["actions"][0];
    assert_eq!(a["type"], "update_tags", "{a}");
    assert_eq!(a["set"], serde_json::json!({"team": "ios"}), "{a}");
    assert_eq!(a["remove"], serde_json::json!(["cost-center"]), "{a}");
    let change = &plan["resource_changes"][0];
    assert_eq!(change["reason"], "tags set in place: `team`; removed: `cost-center`", "{change}");
    assert_eq!(change["before"]["tags"], serde_json::json!({"cost-center": "cc-1", "team": "mobile"}));
    assert_eq!(change["after"]["tags"], serde_json::json!({"team": "ios"}));
    let o = nimbus(dir.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rec = record(dir.path());
    assert_eq!(rec["tags"]["team"], "ios", "{rec}");
    assert!(rec["tags"].get("cost-center").is_none(), "{rec}");
    assert_eq!(rec["tags"]["nimbus:machine"], "nimbus.tags.ci.0", "{rec}");
    assert_eq!(rec["launched_at"], launched, "the same sandbox: not replaced");
    let o = nimbus(dir.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "converged: {}", text(&o));
}
