//! Attribute-level differences of a resource change, for the views.

use super::ResourceChange;
use crate::cli::views::value_str;

/// Attribute-level differences of a change: (name, before, after, forces replacement).
pub fn attribute_diff(c: &ResourceChange) -> Vec<(String, Option<String>, Option<String>, bool)> {
    let empty = serde_json::Map::new();
    let (before, after) = (c.before.as_ref().map(|a| a.to_json()), c.after.as_ref().map(|a| a.to_json()));
    let before = before.as_ref().and_then(|v| v.as_object()).unwrap_or(&empty);
    let after = after.as_ref().and_then(|v| v.as_object()).unwrap_or(&empty);
    let mut keys: Vec<&String> = after.keys().collect();
    for k in before.keys() {
        if !after.contains_key(k) {
            keys.push(k);
        }
    }
    let shown = |v: Option<&serde_json::Value>| v.filter(|v| !v.is_null()).map(value_str);
    keys.into_iter()
        .filter_map(|k| {
            let (b, a) = (shown(before.get(k)), shown(after.get(k)));
            let forces = c.replace_paths.iter().any(|p| p == k);
            match (c.before.is_some(), c.after.is_some()) {
                (false, _) => a.map(|a| (k.clone(), None, Some(a), false)),
                (_, false) => b.map(|b| (k.clone(), Some(b), None, false)),
                // In-place and replacement: attributes both sides know, that differ.
                _ if b != a && after.contains_key(k) && before.contains_key(k) => Some((k.clone(), b, a, forces)),
                _ => None,
            }
        })
        .collect()
}
