//! The provider's clock, as EC2's HTTP `Date` header tells it. Host windows are compared on this computer's
//! clock (with `window_margin` to spare); a large difference is worth a warning.

use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use chrono::{DateTime, Utc};

/// The last skew seen: the provider's time minus this computer's, when a response carried a `Date`.
#[derive(Debug, Clone, Default)]
pub struct ClockWatch(Arc<Mutex<Option<chrono::Duration>>>);

impl ClockWatch {
    pub fn skew(&self) -> Option<chrono::Duration> {
        *self.0.lock().expect("lock")
    }
}

impl Intercept for ClockWatch {
    fn name(&self) -> &'static str {
        "nimbus.ClockWatch"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let theirs = context.response().headers().get("date").and_then(|d| DateTime::parse_from_rfc2822(d).ok());
        if let Some(t) = theirs {
            *self.0.lock().expect("lock") = Some(t.with_timezone(&Utc) - Utc::now());
        }
        Ok(())
    }
}
