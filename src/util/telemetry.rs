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

/// `nimbus.cloud_provider.api_call_{start,success,failure}` around one call nimbus makes to a provider
/// (`operation`: `RunInstances`, `TerminateInstances`, `discover`, …) for `machine` (empty for fleet-wide calls).
pub async fn api_call<T, E: std::fmt::Display>(
    tenant: &str,
    provider: &str,
    operation: &str,
    machine: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    seed_event_with("nimbus.cloud_provider.api_call_start", tenant, provider, operation, machine, None, None);
    let t = std::time::Instant::now();
    let r = call.await;
    match &r {
        Ok(_) => seed_event_with(
            "nimbus.cloud_provider.api_call_success",
            tenant,
            provider,
            operation,
            machine,
            Some(t.elapsed()),
            None,
        ),
        Err(e) => seed_event_with(
            "nimbus.cloud_provider.api_call_failure",
            tenant,
            provider,
            operation,
            machine,
            Some(t.elapsed()),
            Some(&e.to_string()),
        ),
    }
    r
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
