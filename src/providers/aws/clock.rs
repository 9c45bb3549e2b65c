//! The provider's clock, as EC2's HTTP `Date` header tells it. Host windows are compared on this computer's
//! clock (with `window_margin` to spare); a large difference is worth a warning.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// The last skew seen: the provider's time minus this computer's, when a response carried a `Date`.
#[derive(Debug, Clone, Default)]
pub struct ClockWatch(Arc<Mutex<Option<chrono::Duration>>>);

impl ClockWatch {
    pub fn skew(&self) -> Option<chrono::Duration> {
        *self.0.lock().expect("lock")
    }

    /// An answer's `Date` header (RFC 2822 / IMF-fixdate); one that does not parse is ignored.
    pub fn observe(&self, date: &str) {
        if let Ok(t) = DateTime::parse_from_rfc2822(date) {
            *self.0.lock().expect("lock") = Some(t.with_timezone(&Utc) - Utc::now());
        }
    }
}
