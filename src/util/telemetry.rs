//! Structured logs: tracing events (`nimbus.machine.provision_start`, …, each
//! with tenant, machine and duration) written to stderr as text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the subscriber. `NIMBUS_LOG` overrides the filter (default `nimbus=info`).
pub fn init(format: LogFormat, color: bool) {
    let filter = EnvFilter::try_from_env("NIMBUS_LOG").unwrap_or_else(|_| EnvFilter::new("nimbus=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.with_ansi(color).try_init(),
    };
}

/// Emits one of the seed's telemetry events (`nimbus.machine.provision_start`, `nimbus.ssh.command_failure`, …)
/// with its fields: `tenant_id` and `machine_id` (the tenant is the machine name's second part), `duration`
/// (milliseconds; 0 for a start) and, on a failure, `error`; `alias` is the name the event had before (README lists both). The older field
/// names (`tenant`, `machine`, `duration_ms`) are kept beside them.
pub fn seed_event(
    event: &str,
    alias: Option<&str>,
    machine: &str,
    duration: Option<std::time::Duration>,
    error: Option<&str>,
) {
    let tenant = crate::core::names::parse_machine_name(machine).map(|(t, _, _)| t).unwrap_or_default();
    // A start has lasted nothing yet: 0.
    let duration = duration.map(|d| d.as_millis() as u64).unwrap_or(0);
    match error {
        None => tracing::info!(
            event,
            alias,
            tenant_id = tenant,
            machine_id = machine,
            duration,
            tenant,
            machine,
            duration_ms = duration,
            "{event}"
        ),
        Some(error) => tracing::warn!(
            event,
            alias,
            tenant_id = tenant,
            machine_id = machine,
            duration,
            error,
            tenant,
            machine,
            duration_ms = duration,
            "{event}"
        ),
    }
}

tokio::task_local! {
    /// The machine the provider calls in this task are for (empty for fleet-wide calls), so that requests a
    /// provider reports itself carry it.
    pub static API_MACHINE: String;
}

/// How an API request ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiOutcome {
    Ok,
    Error,
    /// Refused for the rate limit (HTTP 429/503 from a cloud, a rate-limited 403/429 from a forge).
    Throttled,
}

impl ApiOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiOutcome::Ok => "ok",
            ApiOutcome::Error => "error",
            ApiOutcome::Throttled => "throttled",
        }
    }
}

/// API requests of this process: (`provider`/`forge`, its name, outcome) → count.
static API_STATS: std::sync::Mutex<std::collections::BTreeMap<(String, String, ApiOutcome), u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts one API request of a provider or forge (`kind`: `provider` or `forge`).
pub fn count_api_request(kind: &str, name: &str, outcome: ApiOutcome) {
    let mut m = API_STATS.lock().unwrap_or_else(|e| e.into_inner());
    *m.entry((kind.to_string(), name.to_string(), outcome)).or_default() += 1;
}

/// Every API request counted so far: ((kind, name, outcome), count).
pub fn api_requests() -> Vec<((String, String, ApiOutcome), u64)> {
    API_STATS.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// One call nimbus makes to a provider (`operation`: `launch`, `terminate`, `discover`, …) for `machine` (empty
/// for fleet-wide calls). When the provider reports its requests itself (`per_request`: the AWS SDK's, each
/// `RunInstances`, `DescribeInstances`, … with its own `nimbus.cloud_provider.api_call_*` events), the call
/// only tells them the machine; otherwise the call is reported as one request.
pub async fn api_call<T, E: std::fmt::Display>(
    tenant: &str,
    provider: &str,
    operation: &str,
    machine: &str,
    per_request: bool,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    if per_request {
        return API_MACHINE.scope(machine.to_string(), call).await;
    }
    api_request_start(tenant, provider, operation, machine);
    let t = std::time::Instant::now();
    let r = call.await;
    let error = r.as_ref().err().map(|e| e.to_string());
    api_request_end(tenant, provider, operation, machine, t.elapsed(), error.as_deref(), ApiOutcome::Ok);
    r
}

/// `nimbus.cloud_provider.api_call_start` for one request.
pub fn api_request_start(tenant: &str, provider: &str, operation: &str, machine: &str) {
    seed_event_with("nimbus.cloud_provider.api_call_start", tenant, provider, operation, machine, None, None);
}

/// `nimbus.cloud_provider.api_call_{success,failure}` for one request, counted (`outcome` is used for a failure:
/// `Throttled` or `Error`).
pub fn api_request_end(
    tenant: &str,
    provider: &str,
    operation: &str,
    machine: &str,
    took: std::time::Duration,
    error: Option<&str>,
    outcome: ApiOutcome,
) {
    let (event, outcome) = match error {
        None => ("nimbus.cloud_provider.api_call_success", ApiOutcome::Ok),
        Some(_) => (
            "nimbus.cloud_provider.api_call_failure",
            if outcome == ApiOutcome::Ok { ApiOutcome::Error } else { outcome },
        ),
    };
    count_api_request("provider", provider, outcome);
    seed_event_with(event, tenant, provider, operation, machine, Some(took), error);
}

/// The machine of the provider call running in this task (empty when none was said).
pub fn api_machine() -> String {
    API_MACHINE.try_with(|m| m.clone()).unwrap_or_default()
}

fn seed_event_with(
    event: &str,
    tenant: &str,
    provider: &str,
    operation: &str,
    machine: &str,
    duration: Option<std::time::Duration>,
    error: Option<&str>,
) {
    let duration = duration.map(|d| d.as_millis() as u64);
    match error {
        None => {
            tracing::info!(event, provider, operation, tenant_id = tenant, machine_id = machine, duration, "{event}")
        }
        Some(error) => {
            tracing::warn!(
                event,
                provider,
                operation,
                tenant_id = tenant,
                machine_id = machine,
                duration,
                error,
                "{event}"
            )
        }
    }
}
