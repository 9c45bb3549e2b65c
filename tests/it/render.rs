//! Renderers: terminal, JSON and Markdown views of one plan document, with
//! snapshots; colour only when asked; Markdown within GitHub's comment limit.

use chrono::{DateTime, Duration, TimeZone, Utc};
use nimbus::cli::views::{plan_markdown as markdown, plan_text as text};
use nimbus::core::model::*;
use nimbus::core::plan::document::PlanDocument;
use nimbus::core::plan::plan;
use nimbus::testing::{Simulator, desired, pool, step};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

/// A plan with every kind of change: create, update, replace, destroy, a ghost runner,
/// a deferred release and a warning.
fn mixed_document() -> PlanDocument {
    let d0 = desired(
        "acme",
        vec![
            pool("mac", "aws", 3, "mac2.metal", "ami-1"),
            pool("linux", "aws", 2, "t3.large", "ami-1"),
            pool("old", "aws", 1, "t3.large", "ami-1"),
        ],
    );
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    let mut sim = Simulator::default();
    let p = plan(&d0, &world, t0());
    sim.apply(&d0, &mut world, &p, t0());
    world.runners.as_mut().unwrap().push(ForgeRunner {
        id: 77,
        name: "nimbus.acme.mac.9".into(),
        labels: vec!["ci".into()],
        online: false,
        busy: false,
        offline_since: None,
        idle_since: None,
    });
    let linux1 = world.machines.iter_mut().find(|m| m.name() == Some("nimbus.acme.linux.1")).unwrap();
    linux1.on_machine = OnMachine::Unreachable { reason: "connection timed out".into() };

    let mut mac = pool("mac", "aws", 2, "mac2.metal", "ami-2");
    mac.setup.push(step("xcode", "xcode-select -s /Applications/Xcode_16.app"));
    let mut linux = pool("linux", "aws", 3, "t3.large", "ami-1");
    linux.runner.as_mut().unwrap().labels.push("docker".into());
    let d1 = desired("acme", vec![mac, linux]);
    let p = plan(&d1, &world, t0() + Duration::hours(5));
    PlanDocument::from_plan(&p, None, None)
}

#[test]
fn terminal_view() {
    let doc = mixed_document();
    let out = text::render(&doc, text::Style { color: false });
    assert!(!out.contains('\x1b'));
    insta::assert_snapshot!(out);
}

#[test]
fn terminal_view_colours_only_when_asked() {
    let doc = mixed_document();
    let coloured = text::render(&doc, text::Style { color: true });
    assert!(coloured.contains("\x1b[32m+\x1b[0m"));
    // The same words without the escapes.
    let stripped = coloured
        .replace("\x1b[0m", "")
        .replace("\x1b[1m", "")
        .replace("\x1b[31m", "")
        .replace("\x1b[32m", "")
        .replace("\x1b[33m", "")
        .replace("\x1b[36m", "");
    assert_eq!(stripped, text::render(&doc, text::Style { color: false }));
}

#[test]
fn empty_plan_says_no_changes() {
    let d = desired("acme", vec![]);
    let doc = PlanDocument::from_plan(&plan(&d, &Actual::default(), t0()), None, None);
    let out = text::render(&doc, text::Style { color: false });
    assert!(out.starts_with("No changes."), "{out}");
    assert!(markdown::render(&doc).contains("**No changes.**"));
}

#[test]
fn json_document() {
    let doc = mixed_document();
    let json: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
    assert_eq!(json["format_version"], "1.7");
    // `actions` is always a list, also on a single action.
    for c in json["resource_changes"].as_array().unwrap() {
        assert!(c["actions"].is_array());
    }
    // Round trip: the document is the model.
    let back: PlanDocument = serde_json::from_str(&doc.to_json()).unwrap();
    assert_eq!(back, doc);
    insta::assert_json_snapshot!(json, { ".nimbus_version" => "[version]" });
}

#[test]
fn json_consumers_may_ignore_unknown_keys() {
    let doc = mixed_document();
    let mut v: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
    v["added_in_1_1"] = serde_json::json!({"x": 1});
    v["resource_changes"][0]["new_field"] = serde_json::json!(true);
    let back: PlanDocument = serde_json::from_value(v).unwrap();
    assert_eq!(back.summary, doc.summary);
}

#[test]
fn markdown_view() {
    insta::assert_snapshot!(markdown::render(&mixed_document()));
}

#[test]
fn markdown_stays_under_githubs_comment_limit() {
    for machines in [300u32, 3_000, 40_000] {
        let pools: Vec<DesiredPool> =
            (0..40).map(|i| pool(&format!("pool-{i}"), "aws", machines / 40, "t3.large", "ami-1")).collect();
        let d = desired("acme", pools);
        let doc = PlanDocument::from_plan(
            &plan(&d, &Actual { runners: Some(vec![]), ..Default::default() }, t0()),
            None,
            None,
        );
        let md = markdown::render(&doc);
        let n = md.chars().count();
        assert!(n < markdown::GITHUB_COMMENT_LIMIT, "{machines} machines: {n} characters");
        let total = machines / 40 * 40;
        assert!(md.contains(&format!("Plan: {total} to add, 0 to change, 0 to destroy.")), "summary kept");
        if machines >= 3_000 {
            assert!(
                md.contains("summarised by pool") || md.contains("more change(s) not shown"),
                "{machines}: no summary note"
            );
        }
    }
}

/// Issue 13: text from machines, forges and clouds (here: an unreachable machine's error and a ghost runner's
/// name) reaches neither the terminal with control characters nor Markdown as live mentions, links, images or
/// HTML.
#[test]
fn hostile_values_are_defused_in_both_views() {
    let hostile = "\x1b[2J\x1b]8;;https://evil.example\x07click\r@octocat [x](https://evil.example) ![i](https://evil.example/p.png) <img src=x onerror=alert(1)>\u{202E}";
    let d = desired("acme", vec![pool("linux", "aws", 1, "t3.large", "ami-1")]);
    let mut world = Actual { runners: Some(vec![]), ..Default::default() };
    let mut sim = Simulator::default();
    let p = plan(&d, &world, t0());
    sim.apply(&d, &mut world, &p, t0());
    world.machines[0].on_machine = OnMachine::Unreachable { reason: hostile.into() };
    world.runners.as_mut().unwrap().push(ForgeRunner {
        id: 9,
        name: format!("nimbus.acme.linux.7{hostile}"),
        labels: vec![],
        online: false,
        busy: false,
        offline_since: None,
        idle_since: None,
    });
    let doc = PlanDocument::from_plan(&plan(&d, &world, t0()), None, None);
    let term = text::render(&doc, text::Style { color: false });
    assert!(term.contains("octocat"), "the hostile text is in the plan: {term}");
    assert!(!term.chars().any(|c| c.is_control() && c != '\n'), "{term:?}");
    assert!(!term.contains('\u{202E}'));
    let md = markdown::render(&doc);
    assert!(md.contains("octocat"), "{md}");
    assert!(!md.chars().any(|c| c.is_control() && c != '\n'), "{md:?}");
    for live in ["@octocat", "](https", "<img", "https://evil"] {
        assert!(!md.contains(live), "`{live}` is live in: {md}");
    }
}

/// Issue 20: the terminal and Markdown views end with what the plan commits and what the fleet costs per day.
#[test]
fn both_views_show_the_cost_line() {
    let d = desired("acme", vec![pool("mac", "aws", 2, "mac2.metal", "ami-1")]);
    let world = Actual { runners: Some(vec![]), ..Actual::default() };
    let t = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
    let doc = PlanDocument::from_plan(&plan(&d, &world, t), None, None).with_cost(&d);
    let want = "Cost: this plan commits $31.20 (48.0 host-hours); the fleet costs $31.20/day at its planned size";
    let out = text::render(&doc, text::Style { color: false });
    assert!(out.contains(want), "{out}");
    let md = markdown::render(&doc);
    assert!(md.contains("Cost: this plan commits $31.20") && md.contains("48.0 host-hours"), "{md}");
    let json: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
    assert_eq!(json["cost"]["actions"].as_array().unwrap().len(), 2, "one entry per allocation");
    assert_eq!(json["cost"]["actions"][0]["kind"], "allocate_host");
    assert_eq!(json["cost"]["actions"][0]["hours"], 24.0);
}
