//! Views: turn a plan document (and apply progress, history) into text for people.

pub mod apply_progress;
pub mod history;
pub mod plan_markdown;
pub mod plan_text;

use crate::core::plan::Summary;

/// "Plan: 1 to add, 0 to change, 2 to destroy."
pub fn summary_line(s: &Summary) -> String {
    format!("Plan: {} to add, {} to change, {} to destroy.", s.add, s.change, s.destroy)
}

/// A compact rendering of a JSON value for diffs: `"a"`, `["a", "b"]`, `3`.
pub fn value_str(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => format!("{s:?}"),
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(value_str).collect::<Vec<_>>().join(", "))
        }
        serde_json::Value::Null => "null".into(),
        other => other.to_string(),
    }
}
