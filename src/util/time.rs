//! Time formatting shared by views, the journal and the on-machine state.

use chrono::{DateTime, Utc};

/// `2026-11-25T10:00:00Z`
pub fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// "in 3h 20m" / "now" relative to `now`.
pub fn until(due: &DateTime<Utc>, now: &DateTime<Utc>) -> String {
    let secs = (*due - *now).num_seconds();
    if secs <= 0 {
        return "now".into();
    }
    let (d, h, m) = (secs / 86400, (secs % 86400) / 3600, (secs % 3600) / 60);
    let mut parts = Vec::new();
    if d > 0 {
        parts.push(format!("{d}d"));
    }
    if h > 0 {
        parts.push(format!("{h}h"));
    }
    if m > 0 && d == 0 {
        parts.push(format!("{m}m"));
    }
    if parts.is_empty() {
        parts.push(format!("{secs}s"));
    }
    format!("in {}", parts.join(" "))
}

/// "3 min ago" / "just now" / "2h 5m ago" for a past time (a future one reads "in …").
pub fn ago(t: &DateTime<Utc>, now: &DateTime<Utc>) -> String {
    let secs = (*now - *t).num_seconds();
    if secs < 0 {
        return until(t, now);
    }
    if secs < 60 {
        return if secs < 5 { "just now".into() } else { format!("{secs} s ago") };
    }
    let (d, h, m) = (secs / 86400, (secs % 86400) / 3600, (secs % 3600) / 60);
    match (d, h) {
        (0, 0) => format!("{m} min ago"),
        (0, _) => format!("{h}h {m}m ago"),
        _ => format!("{d}d {h}h ago"),
    }
}

/// `2026-11-25T10:00:00Z (3 min ago)`.
pub fn at_ago(t: &DateTime<Utc>, now: &DateTime<Utc>) -> String {
    format!("{} ({})", ts(t), ago(t, now))
}
