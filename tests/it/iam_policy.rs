//! The example IAM policies. `iam-policy.json` (apply) allows every EC2 operation nimbus calls, nothing else, and
//! every mutating one only on resources carrying the tenant's tag (`aws:ResourceTag/nimbus:tenant`) or created
//! with it (`aws:RequestTag/nimbus:tenant`), checked key by key, so a typo fails. `iam-policy-plan.json` (plan)
//! allows the Describe calls only. Against moto with IAM enforced: plan passes with the plan policy, apply with it
//! is refused with AccessDenied and says so, apply passes with the apply policy.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use crate::common::*;
use nimbus::providers::aws::EC2_OPERATIONS;
use serde_json::{Value, json};

const APPLY_POLICY: &str = "examples/aws-mac/iam-policy.json";
const PLAN_POLICY: &str = "examples/aws-mac/iam-policy-plan.json";
const TENANT_KEYS: [&str; 2] = ["aws:ResourceTag/nimbus:tenant", "aws:RequestTag/nimbus:tenant"];

fn load(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => vec![],
    }
}

fn mutating(op: &str) -> bool {
    !op.starts_with("Describe")
}

/// The resource types a mutating operation acts on that are the tenant's own (and so carry, or are created with,
/// its tag). Other resources an operation touches (the image, subnet, security group, key pair, volumes) carry no
/// tenant tag and are named by ARN instead.
fn own_types(op: &str) -> &'static [&'static str] {
    match op {
        "AllocateHosts" | "ReleaseHosts" => &["dedicated-host"],
        "RunInstances" => &["instance", "dedicated-host"],
        // Volumes carry nimbus's tags from their creation (issue 24): their tags change like their instance's.
        "CreateTags" | "DeleteTags" => &["instance", "dedicated-host", "volume"],
        "TerminateInstances" | "CreateReplaceRootVolumeTask" => &["instance"],
        other => panic!("no resource types known for {other}: add them here"),
    }
}

fn covers(resource: &str, ty: &str) -> bool {
    resource == "*" || resource.contains(&format!(":{ty}/"))
}

/// Whether a statement's condition pins the tenant with one of the exact keys, to a literal value.
fn pins_tenant(condition: &Value) -> bool {
    let Some(eq) = condition.get("StringEquals").and_then(Value::as_object) else { return false };
    TENANT_KEYS.iter().any(|k| {
        eq.get(*k).is_some_and(|v| {
            let vals = list(v);
            !vals.is_empty() && vals.iter().all(|s| !s.is_empty() && !s.contains(['*', '?', '$']))
        })
    })
}

/// Everything wrong with an apply policy; empty when it is least privilege for what nimbus calls.
fn problems(policy: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut allowed = BTreeSet::new();
    let mut covered: BTreeSet<(String, &str)> = BTreeSet::new();
    for st in policy["Statement"].as_array().unwrap() {
        let sid = st["Sid"].as_str().unwrap_or("?");
        if st["Effect"] != "Allow" {
            out.push(format!("{sid}: only Allow statements are expected"));
        }
        if st.get("NotAction").is_some() || st.get("NotResource").is_some() {
            out.push(format!("{sid}: NotAction/NotResource allow everything else"));
        }
        let resources = list(&st["Resource"]);
        for a in list(&st["Action"]) {
            if a.contains(['*', '?']) {
                out.push(format!("{sid}: wildcard action {a}"));
                continue;
            }
            let Some(op) = a.strip_prefix("ec2:") else {
                out.push(format!("{sid}: {a} is not an EC2 action"));
                continue;
            };
            allowed.insert(op.to_string());
            if !mutating(op) {
                continue;
            }
            for r in &resources {
                let own: Vec<&str> = own_types(op).iter().copied().filter(|t| covers(r, t)).collect();
                if own.is_empty() {
                    if r == "*" {
                        out.push(format!("{sid}: {a} on every resource"));
                    }
                    continue;
                }
                if !st.get("Condition").is_some_and(pins_tenant) {
                    out.push(format!(
                        "{sid}: {a} on {r} is not conditioned on {} or {} (StringEquals, a literal tenant)",
                        TENANT_KEYS[0], TENANT_KEYS[1]
                    ));
                    continue;
                }
                for t in own {
                    covered.insert((op.to_string(), t));
                }
            }
        }
    }
    for op in EC2_OPERATIONS.iter().filter(|o| mutating(o)) {
        for t in own_types(op) {
            if !covered.contains(&(op.to_string(), *t)) {
                out.push(format!("ec2:{op} is not allowed on the tenant's own {t}s"));
            }
        }
    }
    let needed: BTreeSet<String> = EC2_OPERATIONS.iter().map(|s| s.to_string()).collect();
    if allowed != needed {
        out.push(format!("allowed {allowed:?}, nimbus calls {needed:?}"));
    }
    out
}

#[test]
fn apply_policy_pins_every_mutating_action_to_the_tenant() {
    let policy = load(APPLY_POLICY);
    assert_eq!(problems(&policy), Vec::<String>::new());
    // Retagging a reused host writes exactly the tags nimbus puts on a machine: the policy lets each of them
    // through (`aws:TagKeys`), or real EC2 refuses the retag.
    let retag = policy["Statement"].as_array().unwrap().iter().find(|s| s["Sid"] == "RetagOwnHostsOnReuse").unwrap();
    let allowed: BTreeSet<String> =
        list(&retag["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]).into_iter().collect();
    let mut written: BTreeSet<String> =
        nimbus::core::model::machine_tags("acme", "aws", "mac", "nimbus.acme.mac.0", Some("fleet.yaml"))
            .into_keys()
            .collect();
    // A reused host also gets the user's tags: the example fleet's (issue 24).
    let cfg = nimbus::config::load(std::path::Path::new("examples/aws-mac/fleet.yaml")).unwrap();
    let user: BTreeSet<String> = nimbus::core::model::Desired::from_config(&cfg.config)
        .pools
        .iter()
        .flat_map(|p| p.spec.tags.keys().cloned())
        .collect();
    assert!(!user.is_empty(), "the example fleet shows `tags:`");
    written.extend(user.iter().cloned());
    assert_eq!(allowed, written);
    // The user's tags change in place on the tenant's own resources, and only the user's keys (never nimbus:*).
    let update =
        policy["Statement"].as_array().unwrap().iter().find(|s| s["Sid"] == "UpdateUserTagsOnOwnResources").unwrap();
    assert_eq!(list(&update["Action"]), ["ec2:CreateTags", "ec2:DeleteTags"]);
    let keys: BTreeSet<String> =
        list(&update["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]).into_iter().collect();
    assert_eq!(keys, user, "exactly the fleet's own tag keys");
}

/// The check above has teeth: each of these edits to the shipped policy is caught.
#[test]
fn the_policy_check_catches_typos_and_loosening() {
    let policy = load(APPLY_POLICY);
    let statements = policy["Statement"].as_array().unwrap().len();
    let mut tried = 0;
    for i in 0..statements {
        let Some(eq) = policy["Statement"][i]["Condition"]["StringEquals"].as_object() else { continue };
        for key in TENANT_KEYS.iter().filter(|k| eq.contains_key(**k)) {
            let edits: [(&str, Edit); 5] = [
                ("a mistyped tag key", Box::new(|c: &mut Value| rename(c, key, &key.replace("tenant", "tennant")))),
                ("a mistyped prefix", Box::new(|c: &mut Value| rename(c, key, &key.replace("aws:", "aws-")))),
                ("a wildcard tenant", Box::new(|c: &mut Value| c["StringEquals"][*key] = json!("*"))),
                (
                    "StringLike",
                    Box::new(|c: &mut Value| {
                        let eq = c.as_object_mut().unwrap().remove("StringEquals").unwrap();
                        c["StringLike"] = eq;
                    }),
                ),
                ("no condition", Box::new(|c: &mut Value| *c = json!({}))),
            ];
            for (what, edit) in edits {
                let mut bad = policy.clone();
                // Only the pinning keys of this statement change: strip the other one, so it cannot mask the edit.
                let cond = &mut bad["Statement"][i]["Condition"];
                for other in TENANT_KEYS.iter().filter(|k| *k != key) {
                    cond["StringEquals"].as_object_mut().unwrap().remove(*other);
                }
                edit(cond);
                let found = problems(&bad);
                assert!(!found.is_empty(), "statement {i} with {what} ({key}) passed the check");
                tried += 1;
            }
        }
    }
    assert!(tried >= 25, "only {tried} edits tried");
    // A wildcard action, and a mutating action on every resource, are caught as well.
    let mut bad = policy.clone();
    bad["Statement"][0]["Action"] = json!("ec2:*");
    assert!(!problems(&bad).is_empty());
    let mut bad = policy.clone();
    bad["Statement"]
        .as_array_mut()
        .unwrap()
        .push(json!({"Sid": "Loose", "Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "*"}));
    assert!(!problems(&bad).is_empty());
}

/// One change to a statement's condition.
type Edit<'a> = Box<dyn Fn(&mut Value) + 'a>;

fn rename(cond: &mut Value, from: &str, to: &str) {
    let eq = cond["StringEquals"].as_object_mut().unwrap();
    let v = eq.remove(from).unwrap();
    eq.insert(to.to_string(), v);
}

#[test]
fn plan_policy_allows_the_describe_calls_only() {
    let policy = load(PLAN_POLICY);
    let mut allowed = BTreeSet::new();
    for st in policy["Statement"].as_array().unwrap() {
        assert_eq!(st["Effect"], "Allow");
        for a in list(&st["Action"]) {
            let op = a.strip_prefix("ec2:").expect("EC2 actions only");
            assert!(!op.contains('*') && op.starts_with("Describe"), "{a} in the plan policy");
            allowed.insert(op.to_string());
        }
    }
    let reads: BTreeSet<String> = EC2_OPERATIONS.iter().filter(|o| !mutating(o)).map(|s| s.to_string()).collect();
    assert_eq!(allowed, reads);
}

// ---- moto with IAM enforced ----

/// A POST to the moto peer; the body of the answer.
fn post(url: &str, path: &str, content_type: &str, body: &str) -> String {
    post_in(url, None, path, content_type, body)
}

/// A request to moto, in `account` when given (moto's `x-moto-account-id`), else its default account.
pub(crate) fn post_in(url: &str, account: Option<&str>, path: &str, content_type: &str, body: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let account = account.map(|a| format!("x-moto-account-id: {a}\r\n")).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{account}\
         Authorization: AWS4-HMAC-SHA256 Credential=setup/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

pub(crate) fn between<'a>(s: &'a str, open: &str, close: &str) -> &'a str {
    let start = s.find(open).unwrap_or_else(|| panic!("no {open} in {s}")) + open.len();
    &s[start..start + s[start..].find(close).unwrap()]
}

/// An IAM user with one inline policy, and its access key. moto lets the next three requests through
/// unauthenticated (`/moto-api/reset-auth`), enough to make the user; every request after them is checked.
fn iam_user(url: &str, name: &str, policy: &Value) -> (String, String) {
    let reset = post(url, "/moto-api/reset-auth", "text/plain", "3");
    assert!(reset.contains("\"ok\""), "{reset}");
    let iam = "application/x-www-form-urlencoded";
    let v = ("Version", "2010-05-08");
    let r = post(url, "/", iam, &form(&[("Action", "CreateUser"), ("UserName", name), v]));
    assert!(r.contains("<CreateUserResult>"), "{r}");
    let doc = policy.to_string();
    let r = post(
        url,
        "/",
        iam,
        &form(&[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "nimbus"),
            ("PolicyDocument", &doc),
            v,
        ]),
    );
    assert!(r.contains("PutUserPolicyResponse"), "{r}");
    let r = post(url, "/", iam, &form(&[("Action", "CreateAccessKey"), ("UserName", name), v]));
    (between(&r, "<AccessKeyId>", "<").to_string(), between(&r, "<SecretAccessKey>", "<").to_string())
}

/// moto checks a request against a policy's actions, with every request's resource as `*`, and passes every
/// condition it has no value for (all of EC2's). So the apply policy is given to moto with its resources widened
/// to `*`: moto proves the actions suffice; the tag conditions are the policy check's (above) to prove.
fn for_moto(policy: &Value) -> Value {
    let mut p = policy.clone();
    for st in p["Statement"].as_array_mut().unwrap() {
        st["Resource"] = json!("*");
        st.as_object_mut().unwrap().remove("Condition");
    }
    p
}

fn iam_fleet(tenant: &str, mac: u32, linux: u32) -> String {
    format!(
        "version: 1\ntenant: {tenant}\nproviders:\n  aws:\n    type: aws\n    region: us-east-1\n    post_available_delay: 0s\npools:\n  - name: mac\n    provider: aws\n    count: {mac}\n    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: us-east-1a}}\n  - name: linux\n    provider: aws\n    count: {linux}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: us-east-1a}}\n"
    )
}

#[test]
fn plan_needs_only_the_read_only_policy() {
    let Some(url) = peer("NIMBUS_MOTO_IAM_URL", "moto with IAM enforced") else { return };
    let _iam = iam_moto_lock();
    let tenant = unique_tenant("iam");
    let plan_keys = iam_user(&url, &format!("{tenant}-plan"), &load(PLAN_POLICY));
    let apply_keys = iam_user(&url, &format!("{tenant}-apply"), &for_moto(&load(APPLY_POLICY)));
    let dir = tempfile::tempdir().unwrap();
    let with = |keys: &(String, String)| {
        let mut env = aws_env(&url);
        env.retain(|(k, _)| !k.starts_with("AWS_ACCESS_KEY_ID") && !k.starts_with("AWS_SECRET_ACCESS_KEY"));
        env.push(("AWS_ACCESS_KEY_ID", keys.0.clone()));
        env.push(("AWS_SECRET_ACCESS_KEY", keys.1.clone()));
        env
    };
    let (plan_env, apply_env) = (with(&plan_keys), with(&apply_keys));
    let run = |args: &[&str], env: &[(&str, String)]| nimbus_env(dir.path(), args, env);
    let write = |mac, linux| std::fs::write(dir.path().join("fleet.yaml"), iam_fleet(&tenant, mac, linux)).unwrap();

    // Unknown keys are refused: enforcement is on.
    write(1, 1);
    let o = run(&["plan"], &aws_env(&url));
    assert_eq!(o.status.code(), Some(1), "moto must refuse the default test keys\n{}", text(&o));

    let o = run(&["plan", "--detailed-exitcode"], &plan_env);
    assert_eq!(o.status.code(), Some(2), "plan with the plan policy\n{}", text(&o));
    let summary = |env: &[(&str, String)]| {
        let o = run(&["plan", "--json"], env);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["summary"].clone()
    };
    let before = summary(&plan_env);
    assert_eq!(before["add"], 2, "two machines: {before}");

    // Apply with the plan policy: refused by the cloud, said clearly, nothing made.
    let o = run(&["apply", "--auto-approve"], &plan_env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("AccessDenied") && err.contains("not authorized to perform: ec2:"), "{err}");
    assert!(err.contains("iam-policy.json"), "the hint names the apply policy: {err}");
    assert_eq!(summary(&plan_env), before, "nothing was made");

    // Apply with the apply policy converges; the plan policy then sees a fleet with nothing to do, and plans a change.
    let o = run(&["apply", "--auto-approve"], &apply_env);
    assert_eq!(o.status.code(), Some(0), "apply with the apply policy\n{}", text(&o));
    let o = run(&["plan", "--detailed-exitcode"], &plan_env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    write(0, 2);
    let o = run(&["plan", "--detailed-exitcode"], &plan_env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = run(&["apply", "--auto-approve"], &plan_env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = run(&["apply", "--auto-approve"], &apply_env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run(&["plan", "--detailed-exitcode"], &plan_env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
