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
