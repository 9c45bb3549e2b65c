//! Issue 21: Rego policy checks on plans. Every example policy and a conftest-style rule are evaluated by
//! regorus (nimbus) and by regopy (rego-cpp, a second implementation from PyPI, in the peers' venv), and must
//! give the same deny and warn messages; `plan` fails and `apply` refuses a denied plan.

use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use nimbus::core::model::*;
use nimbus::core::plan::document::PlanDocument;
use nimbus::core::plan::plan;
use nimbus::engine::policy::{Policies, PolicyReport};
use nimbus::testing::{Simulator, desired, pool};

use crate::common::*;

fn policy_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("examples/policies")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rego"))
        .collect();
    v.push(PathBuf::from("tests/it/policies/terraform_style.rego"));
    v.sort();
    v
}

/// Plans of the situations the example policies are about.
fn scenarios() -> Vec<(&'static str, PlanDocument)> {
    let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
    let empty = Actual { runners: Some(vec![]), ..Actual::default() };
    let doc = |d: &Desired, w: &Actual, at| PlanDocument::from_plan(&plan(d, w, at), None, None).with_cost(d);
    let mut out = Vec::new();
    // Five new Mac hosts ($78 committed): over the host cap, under the cost cap.
    let five = desired("acme", vec![pool("mac", "aws", 5, "mac2.metal", "ami-0abc")]);
    out.push(("five mac hosts", doc(&five, &empty, t)));
    // Seven: over both caps; and a warning-free daily cost.
    let seven = desired("acme", vec![pool("mac", "aws", 7, "mac2.metal", "ami-0abc")]);
    out.push(("seven mac hosts", doc(&seven, &empty, t)));
    // An image nobody approved.
    let bad = desired("acme", vec![pool("linux", "aws", 2, "t3.large", "ami-unapproved")]);
    out.push(("unapproved image", doc(&bad, &empty, t)));
    // A replacement that kills a running job, and an idle host released past its window.
    let d = desired(
        "acme",
        vec![pool("linux", "aws", 1, "t3.large", "ami-0abc"), pool("mac", "aws", 1, "mac2.metal", "ami-0abc")],
    );
    let mut world = empty.clone();
    let first = plan(&d, &world, t);
    Simulator::default().apply(&d, &mut world, &first, t);
    for r in world.runners.iter_mut().flatten() {
        r.busy = true;
    }
    // And an idle host left from an earlier machine, past its window.
    world.hosts.push(Host {
        provider: "aws".into(),
        id: "h-idle".into(),
        tags: machine_tags("acme", "aws", "mac", "nimbus.acme.mac.5", None),
        instance_type: "mac2.metal".into(),
        availability_zone: "us-east-1a".into(),
        state: HostState::Available,
        allocated_at: t - chrono::Duration::hours(2),
        available_since: None,
        instance_ids: vec![],
    });
    let later = t + chrono::Duration::hours(30);
    let mut changed = desired(
        "acme",
        vec![pool("linux", "aws", 1, "t3.large", "ami-0def"), pool("mac", "aws", 0, "mac2.metal", "ami-0abc")],
    );
    changed.interrupt_jobs = true;
    out.push(("interrupted jobs, a replacement, a released host", doc(&changed, &world, later)));
    // Nothing to say.
    out.push(("converged", doc(&d, &world, t)));
    out
}

fn regopy(input: &std::path::Path, files: &[PathBuf]) -> Option<PolicyReport> {
    let python = peer_value("NIMBUS_REGOPY_PYTHON", "regopy (the second Rego implementation)")?;
    let o = std::process::Command::new(python)
        .arg("tests/it/regopy_eval.py")
        .arg(input)
        .args(files)
        .output()
        .expect("python runs");
    assert!(o.status.success(), "regopy: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = |k: &str| v[k].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    Some(PolicyReport { files: Vec::new(), denies: list("denies"), warnings: list("warnings") })
}

/// Every example policy and the conftest-style rule, on every scenario: regorus and regopy give the same
/// messages, and the messages are the ones the policies are written to give.
#[test]
fn regorus_and_regopy_agree_on_every_example_policy() {
    let files = policy_files();
    let dir = tempfile::tempdir().unwrap();
    let mut policies = Policies::load(&files).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (what, doc) in scenarios() {
        let json = doc.to_json();
        let input = dir.path().join("plan.json");
        std::fs::write(&input, &json).unwrap();
        let ours = policies.evaluate(&json).unwrap();
        seen.extend(ours.denies.iter().cloned());
        seen.extend(ours.warnings.iter().cloned());
        let Some(theirs) = regopy(&input, &files) else { return };
        assert_eq!((&ours.denies, &ours.warnings), (&theirs.denies, &theirs.warnings), "{what}");
        match what {
            "five mac hosts" => {
                assert_eq!(ours.denies, ["the plan allocates 5 Mac hosts; at most 4 may be allocated by one plan"])
            }
            "seven mac hosts" => {
                assert!(
                    ours.denies.contains(&"the plan commits about 109 dollars, over the cap of 100".to_string()),
                    "{ours:?}"
                )
            }
            "unapproved image" => assert_eq!(ours.denies.len(), 2, "{ours:?}"),
            "interrupted jobs, a replacement, a released host" => {
                assert!(ours.denies.iter().any(|d| d.starts_with("the plan interrupts")), "{ours:?}");
                assert!(
                    ours.denies
                        .contains(&"host.h-idle: releasing a dedicated host needs a person's review".to_string()),
                    "{ours:?}"
                );
                assert!(ours.warnings.iter().any(|w| w == "linux[0] is replaced"), "{ours:?}");
            }
            "converged" => assert!(ours.denies.is_empty() && ours.warnings.is_empty(), "{ours:?}"),
            _ => unreachable!(),
        }
    }
    assert!(seen.len() >= 7, "the scenarios make every policy speak: {seen:?}");
}

fn quickstart(dir: &std::path::Path, image: &str, policy: Option<&str>) {
    let mut f = std::fs::read_to_string("examples/quickstart/fleet.yaml").unwrap().replace("ubuntu-24.04", image);
    if let Some(p) = policy {
        f.push_str(&format!("policy:\n  paths: [{p}]\n"));
    }
    std::fs::write(dir.join("fleet.yaml"), f).unwrap();
}

/// `plan --policy` fails (exit 1) on a `deny` and shows its messages in all three views; `apply` with the fleet
/// file's `policy.paths` refuses before it touches anything; a passing plan applies.
#[test]
fn a_denied_plan_fails_and_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let examples = std::env::current_dir().unwrap().join("examples/policies");
    let examples = examples.to_str().unwrap();
    quickstart(dir.path(), "ubuntu-99.04", None);
    let o = nimbus_env(dir.path(), &["plan", "--policy", examples], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Policy denied this plan"), "{out}");
    assert!(out.contains("linux[0] would be made from image ubuntu-99.04, which is not approved"), "{out}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("the policies deny this plan"), "{}", text(&o));
    let o = nimbus_env(dir.path(), &["plan", "--policy", examples, "--markdown"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("#### Policy: denied"), "{}", text(&o));
    let o = nimbus_env(dir.path(), &["plan", "--policy", examples, "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["policy"]["denies"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["resource_changes"][0]["change"]["actions"], serde_json::json!(["create"]));
    assert_eq!(v["resource_changes"][0]["type"], "nimbus_machine");
    assert_eq!(v["resource_changes"][0]["provider_name"], "local");

    // The fleet file names the policies: apply refuses, and no sandbox is made.
    quickstart(dir.path(), "ubuntu-99.04", Some(examples));
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing was applied"), "{}", text(&o));
    assert!(
        !dir.path().join(".nimbus/local").exists()
            || std::fs::read_dir(dir.path().join(".nimbus/local")).unwrap().count() == 0
    );
    // An approved image passes and applies.
    quickstart(dir.path(), "ubuntu-24.04", Some(examples));
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // A policy that does not parse is an error naming the file.
    std::fs::write(dir.path().join("broken.rego"), "package main\ndeny contains msg if {").unwrap();
    let o = nimbus_env(dir.path(), &["plan", "--policy", "broken.rego"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("broken.rego"), "{}", text(&o));
}

/// The published plan and inventory schemas are the ones the code generates.
#[test]
fn plan_and_inventory_schemas_are_published() {
    for (file, generated) in [
        ("schemas/plan.schema.json", nimbus::core::plan::document::schema_text()),
        ("schemas/inventory.schema.json", nimbus::core::model::inventory_schema_text()),
    ] {
        if std::env::var_os("NIMBUS_UPDATE_SCHEMA").is_some() {
            std::fs::write(file, &generated).unwrap();
        }
        assert!(
            std::fs::read_to_string(file).unwrap_or_default() == generated,
            "{file} is out of date; regenerate it with `nimbus schema plan|inventory > {file}`"
        );
    }
}

/// A hand-edited plan file that breaks the schema is refused by `apply` with the JSON path of the error, before
/// the fleet is locked or anything is read; so is an inventory. (Every plan the suite prints is checked against
/// the schema by debug builds: `PlanDocument::to_json`.)
#[test]
fn documents_are_checked_against_their_schemas_at_the_door() {
    let dir = tempfile::tempdir().unwrap();
    quickstart(dir.path(), "ubuntu-24.04", None);
    let o = nimbus_env(dir.path(), &["plan", "-out", "plan.json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("plan.json")).unwrap()).unwrap();
    v["resource_changes"][1]["actions"] = serde_json::json!("create");
    std::fs::write(dir.path().join("edited.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let journal = dir.path().join(".nimbus/journal.db");
    let stamp = || std::fs::metadata(&journal).and_then(|m| m.modified()).ok();
    let before = stamp();
    let o = nimbus_env(dir.path(), &["apply", "edited.json"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    // (miette wraps long lines: compare without the wrapping.)
    let flat = |s: &str| s.chars().filter(|c| !c.is_whitespace() && *c != '│').collect::<String>();
    assert!(flat(&err).contains(&flat("does not match the plan schema at `/resource_changes/1/actions`")), "{err}");
    assert_eq!(stamp(), before, "refused before the journal was opened: {err}");
    assert!(!dir.path().join(".nimbus/local").exists(), "nothing was made");
    // An action of a kind no nimbus knows.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("plan.json")).unwrap()).unwrap();
    v["actions"][0]["type"] = serde_json::json!("format_disk");
    std::fs::write(dir.path().join("edited.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let o = nimbus_env(dir.path(), &["apply", "edited.json"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(flat(&String::from_utf8_lossy(&o.stderr)).contains("at`/actions/0`"), "{}", text(&o));
    // An inventory: recorded, accepted; edited, refused with its path.
    let o = nimbus_env(dir.path(), &["discover", "-o", "inv.json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(nimbus_env(dir.path(), &["plan", "--inventory", "inv.json"], &[]).status.code(), Some(0));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("inv.json")).unwrap()).unwrap();
    v["observed_at"] = serde_json::json!(12);
    std::fs::write(dir.path().join("inv.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let o = nimbus_env(dir.path(), &["plan", "--inventory", "inv.json"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        flat(&String::from_utf8_lossy(&o.stderr))
            .contains(&flat("does not match the inventory schema at `/observed_at`")),
        "{}",
        text(&o)
    );
}

/// A changed setup script shows its diff — from what last ran on the machines (the journal keeps each script
/// that ran) and from a trusted base fleet file — in the terminal, JSON and Markdown views.
#[test]
fn a_changed_script_shows_its_diff_in_every_view() {
    let dir = tempfile::tempdir().unwrap();
    quickstart(dir.path(), "ubuntu-24.04", None);
    let base = std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap();
    std::fs::write(dir.path().join("base.yaml"), &base).unwrap();
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let changed = base.replace("echo \"git make\" > tools/installed", "echo \"git make cmake\" > tools/installed");
    assert_ne!(changed, base);
    std::fs::write(dir.path().join("fleet.yaml"), &changed).unwrap();

    let o = nimbus_env(dir.path(), &["plan"], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("script of step `tools` changed (from the machine)"), "{out}");
    assert!(out.contains("-echo \"git make\" > tools/installed"), "{out}");
    assert!(out.contains("+echo \"git make cmake\" > tools/installed"), "{out}");

    let o = nimbus_env(dir.path(), &["plan", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = &v["resource_changes"][0]["script_diffs"][0];
    assert_eq!((d["step"].as_str(), d["from"].as_str()), (Some("tools"), Some("machine")), "{v}");
    let diff = d["diff"].as_str().unwrap();
    assert!(diff.starts_with("--- tools (as it last ran)\n+++ tools (fleet file)\n@@"), "{diff}");

    let o = nimbus_env(dir.path(), &["plan", "--markdown"], &[]);
    let md = String::from_utf8_lossy(&o.stdout);
    assert!(md.contains("<details><summary>Script of step <code>tools</code> changed (from the machine): `linux[0]`, `linux[1]`</summary>"), "{md}");
    assert!(md.contains("```diff\n--- tools (as it last ran)"), "{md}");

    // A pull request's plan against the protected branch's file: the diff from the base too.
    let o = nimbus_env(dir.path(), &["plan", "--trusted-base", "base.yaml", "--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let froms: Vec<&str> = v["resource_changes"][0]["script_diffs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["from"].as_str().unwrap())
        .collect();
    assert_eq!(froms, ["machine", "trusted base"]);
}
