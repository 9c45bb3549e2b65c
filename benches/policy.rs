//! Policy benchmark (issue 21): the example policies and a conftest-style rule evaluated by regorus against
//! the JSON plan of a 10,000-machine fleet (every machine created: the largest plan of that fleet), and the
//! same plan checked against `schemas/plan.schema.json`. Goal: policy evaluation under 200 ms.
//! `cargo bench --bench policy`. Figures are printed, never asserted.

use std::time::Instant;

use chrono::{TimeZone, Utc};
use nimbus::core::model::*;
use nimbus::core::plan::document::{PlanDocument, check_against, schema_text};
use nimbus::core::plan::plan;
use nimbus::engine::policy::Policies;
use nimbus::testing::{desired, pool};

fn main() {
    let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
    let d = desired(
        "acme",
        (0..20)
            .map(|i| {
                if i % 2 == 0 {
                    pool(&format!("mac-{i}"), "aws", 500, "mac2.metal", "ami-0abc")
                } else {
                    pool(&format!("linux-{i}"), "aws", 500, "t3.large", "ami-0def")
                }
            })
            .collect(),
    );
    let world = Actual { runners: Some(vec![]), ..Actual::default() };
    let doc = PlanDocument::from_plan(&plan(&d, &world, t), None, None).with_cost(&d);
    let json = doc.to_json();
    println!(
        "policy/plan: {} machines, {} actions, {:.1} MB of JSON",
        doc.resource_changes.len(),
        doc.actions.len(),
        json.len() as f64 / 1e6
    );
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir("examples/policies")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rego"))
        .collect();
    files.push("tests/it/policies/terraform_style.rego".into());
    let t0 = Instant::now();
    let mut policies = Policies::load(&files).unwrap();
    let load = t0.elapsed();
    for round in 0..3 {
        let t0 = Instant::now();
        let report = policies.evaluate(&json).unwrap();
        println!(
            "policy/evaluate round {round}: {:.0} ms (load {:.0} ms), {} deny, {} warn (goal < 200 ms)",
            t0.elapsed().as_secs_f64() * 1000.0,
            load.as_secs_f64() * 1000.0,
            report.denies.len(),
            report.warnings.len()
        );
    }
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let schema = schema_text();
    for round in 0..3 {
        let t0 = Instant::now();
        check_against(&schema, &value).unwrap();
        println!(
            "policy/schema round {round}: {:.0} ms (compiling the schema included)",
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
}
