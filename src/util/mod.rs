//! Small shared pieces: shell quoting, secrets, time, telemetry setup.

pub mod failpoint;
pub mod http;
pub mod secrets;
pub mod shell;
pub mod telemetry;
pub mod text;
pub mod time;

/// This computer's name, if it has one (`/proc/sys/kernel/hostname`).
pub fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(h.trim().to_string()).filter(|h| !h.is_empty())
}

/// Who runs nimbus, for the audit log and lock records.
pub fn actor() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}
