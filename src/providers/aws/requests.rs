//! Every request the AWS SDK sends for a provider, reported: `nimbus.cloud_provider.api_call_{start,success,
//! failure}` per attempt (a retry is a request of its own), with the operation's name (`RunInstances`, …), the
//! machine the call is for, its duration and error, and counted per provider as ok, error or throttled (HTTP
//! 429 or 503, which is how EC2 answers `RequestLimitExceeded`).

use std::time::Instant;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

use crate::util::telemetry::{ApiOutcome, api_machine, api_request_end, api_request_start};

#[derive(Debug, Clone)]
pub struct RequestWatch {
    pub provider: String,
    pub tenant: String,
}

#[derive(Debug, Clone)]
struct AttemptStart(Instant);

impl Storable for AttemptStart {
    type Storer = StoreReplace<Self>;
}

fn operation(cfg: &ConfigBag) -> String {
    cfg.load::<Metadata>().map(|m| m.name().to_string()).unwrap_or_else(|| "unknown".into())
}

impl Intercept for RequestWatch {
    fn name(&self) -> &'static str {
        "nimbus.RequestWatch"
    }

    fn read_before_attempt(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        api_request_start(&self.tenant, &self.provider, &operation(cfg), &api_machine());
        cfg.interceptor_state().store_put(AttemptStart(Instant::now()));
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let took = cfg.load::<AttemptStart>().map(|s| s.0.elapsed()).unwrap_or_default();
        let status = context.response().map(|r| r.status().as_u16());
        let failed = match (status, context.output_or_error()) {
            (_, Some(Err(e))) => Some(match status {
                Some(s) => format!("HTTP {s}: {e:?}").chars().take(300).collect::<String>(),
                None => format!("{e:?}").chars().take(300).collect(),
            }),
            (Some(s), _) if s >= 400 => Some(format!("HTTP {s}")),
            (None, None) => Some("no response".to_string()),
            _ => None,
        };
        let outcome = match status {
            Some(429) | Some(503) => ApiOutcome::Throttled,
            _ => ApiOutcome::Error,
        };
        api_request_end(
            &self.tenant,
            &self.provider,
            &operation(cfg),
            &api_machine(),
            took,
            failed.as_deref(),
            outcome,
        );
        Ok(())
    }
}
