//! The example IAM policy allows every EC2 operation nimbus calls, scopes
//! every mutating one, and allows nothing nimbus does not call.

use std::collections::BTreeSet;

use nimbus::providers::aws::EC2_OPERATIONS;

fn actions(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => vec![],
    }
}

#[test]
fn policy_is_least_privilege_for_what_nimbus_calls() {
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/aws-mac/iam-policy.json").unwrap()).unwrap();
    let mut allowed = BTreeSet::new();
    for st in policy["Statement"].as_array().unwrap() {
        assert_eq!(st["Effect"], "Allow");
        for a in actions(&st["Action"]) {
            assert!(!a.contains('*'), "wildcard action {a}");
            let op = a.strip_prefix("ec2:").expect("only EC2 actions").to_string();
            let mutating = !op.starts_with("Describe");
            let scoped = st.get("Condition").is_some() || actions(&st["Resource"]).iter().all(|r| r != "*");
            assert!(!mutating || scoped, "{a} is allowed on every resource without a condition");
            allowed.insert(op);
        }
    }
    let needed: BTreeSet<String> = EC2_OPERATIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(allowed, needed);
}
