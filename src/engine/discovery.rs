//! Discovery: builds [`Actual`] from the providers (by tags), the forge's
//! runner list and the machines' own state databases, read-only and in
//! parallel (machines a bounded number at a time). A machine that cannot be
//! reached is recorded as unreachable, never guessed.

use std::sync::Arc;

use futures::future::join_all;
use futures::stream::{self, StreamExt};

use crate::core::model::{Actual, ActualMachine, InstanceState, MachineState, OnMachine};
use crate::forges::Forge;
use crate::providers::{MachineRef, Provider, ProviderError};

/// How many machines' state is read at once.
pub const READ_CONCURRENCY: usize = 16;

/// Runs every provider's discovery concurrently, then reads each running machine's state.
/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Forge(#[from] crate::forges::ForgeError),
}

pub async fn discover(tenant: &str, providers: &[Arc<dyn Provider>]) -> Result<Actual, DiscoveryError> {
    discover_with_forge(tenant, providers, None).await
}

/// Like [`discover`], also reading the forge's runners.
pub async fn discover_with_forge(
    tenant: &str,
    providers: &[Arc<dyn Provider>],
    forge: Option<&dyn Forge>,
) -> Result<Actual, DiscoveryError> {
    discover_inner(tenant, providers, forge, false).await
}

/// Discovery for a change (`apply`, the library's calls): as [`discover_with_forge`], and a machine database of
/// an older schema is rewritten in the current one as it is read (nothing it held is lost; see
/// [`crate::state::machine_db::SCHEMA_VERSION`]). `plan` never writes.
pub async fn discover_for_change(
    tenant: &str,
    providers: &[Arc<dyn Provider>],
    forge: Option<&dyn Forge>,
) -> Result<Actual, DiscoveryError> {
    discover_inner(tenant, providers, forge, true).await
}

async fn discover_inner(
    tenant: &str,
    providers: &[Arc<dyn Provider>],
    forge: Option<&dyn Forge>,
    migrate: bool,
) -> Result<Actual, DiscoveryError> {
    let runners = async {
        match forge {
            Some(f) => f.list_runners(tenant).await.map(Some),
            None => Ok(None),
        }
    };
    let (results, runners) = tokio::join!(
        join_all(providers.iter().map(|p| crate::util::telemetry::api_call(
            tenant,
            p.name(),
            "discover",
            "",
            p.reports_requests(),
            p.discover(tenant)
        ))),
        runners
    );
    let runners = runners.map_err(DiscoveryError::Forge)?;
    let mut actual = Actual::default();
    for r in results {
        let d = r?;
        actual.hosts.extend(d.hosts);
        actual.machines.extend(d.machines);
        actual.unusable.extend(d.unusable);
        actual.other_fleets.extend(d.other_fleets);
    }
    let machines = std::mem::take(&mut actual.machines);
    actual.machines =
        stream::iter(machines).map(|m| read_state(m, providers, migrate)).buffered(READ_CONCURRENCY).collect().await;
    actual.runners = runners;
    Ok(actual)
}

/// Fills in since when each offline runner has been offline and each unreachable machine unreachable,
/// from the journal's record of earlier runs (and records this run's view).
pub fn annotate_with_history(
    actual: &mut Actual,
    journal: &crate::state::journal::Journal,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), crate::state::journal::JournalError> {
    actual.known_pools = Some(journal.pools_seen()?);
    // What runs made that discovery does not show yet (the provider's reads lag behind its writes).
    actual.made_unseen.clear();
    for (scope, run, id, made_at) in journal.made_unseen()? {
        let mut parts = scope.splitn(3, '|');
        let (Some(provider), Some(op), Some(machine)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let kind = match op {
            "RunInstances" => "instance",
            "AllocateHosts" => "host",
            _ => continue,
        };
        let visible = match kind {
            "instance" => actual
                .machines
                .iter()
                .any(|m| m.provider == provider && (m.instance_id == id || m.name() == Some(machine))),
            _ => actual.hosts.iter().any(|h| h.provider == provider && h.id == id),
        };
        let Ok(made_at) = chrono::DateTime::parse_from_rfc3339(&made_at) else { continue };
        if !visible {
            actual.made_unseen.push(crate::core::model::MadeUnseen {
                provider: provider.to_string(),
                machine: machine.to_string(),
                kind: kind.to_string(),
                id,
                run,
                made_at: made_at.to_utc(),
            });
        }
    }
    let offline: Vec<String> = actual.runners.iter().flatten().filter(|r| !r.online).map(|r| r.name.clone()).collect();
    let since = journal.observe("runner_offline", &offline, now)?;
    for r in actual.runners.iter_mut().flatten() {
        r.offline_since = if r.online { None } else { since.get(&r.name).copied() };
    }
    // Since when online runners have been idle: scale-in waits for `idle_timeout`.
    let idle: Vec<String> =
        actual.runners.iter().flatten().filter(|r| r.online && !r.busy).map(|r| r.name.clone()).collect();
    let since = journal.observe("runner_idle", &idle, now)?;
    for r in actual.runners.iter_mut().flatten() {
        r.idle_since = since.get(&r.name).copied();
    }
    let unreachable: Vec<String> = actual
        .machines
        .iter()
        .filter(|m| matches!(m.on_machine, OnMachine::Unreachable { .. }))
        .filter_map(|m| m.name().map(str::to_string))
        .collect();
    let since = journal.observe("machine_unreachable", &unreachable, now)?;
    for m in actual.machines.iter_mut() {
        m.unreachable_since = m.name().and_then(|n| since.get(n).copied());
    }
    // A host seen scrubbing and now available is settling: EC2 makes it usable a few minutes later.
    let was_pending = journal.observed("host_pending")?;
    let was_settling = journal.observed("host_settling")?;
    let pending: Vec<String> = actual
        .hosts
        .iter()
        .filter(|h| h.state == crate::core::model::HostState::Pending)
        .map(|h| h.id.clone())
        .collect();
    journal.observe("host_pending", &pending, now)?;
    let settling: Vec<String> = actual
        .hosts
        .iter()
        .filter(|h| h.state == crate::core::model::HostState::Available)
        .filter(|h| was_pending.contains(&h.id) || was_settling.contains(&h.id))
        .map(|h| h.id.clone())
        .collect();
    let since = journal.observe("host_settling", &settling, now)?;
    for h in actual.hosts.iter_mut() {
        h.available_since = since.get(&h.id).copied();
    }
    Ok(())
}

async fn read_state(mut m: ActualMachine, providers: &[Arc<dyn Provider>], migrate: bool) -> ActualMachine {
    if m.state != InstanceState::Running || m.on_machine != OnMachine::NotRead {
        return m;
    }
    let Some(p) = providers.iter().find(|p| p.name() == m.provider) else { return m };
    let r = MachineRef {
        name: m.name().unwrap_or(&m.instance_id).to_string(),
        instance_id: Some(m.instance_id.clone()),
        address: m.address.clone(),
    };
    m.on_machine = match p.transport(&r) {
        Ok(None) => OnMachine::NotRead,
        Err(e) => OnMachine::Unreachable { reason: e.to_string() },
        Ok(Some(t)) => {
            let read = match crate::state::machine_db::read(t.as_ref()).await {
                Ok(Some(db)) => {
                    if migrate && db.needs_migration() {
                        match crate::state::machine_db::write(t.as_ref(), &db).await {
                            Ok(()) => tracing::info!(
                                event = "nimbus.machine.state_migrated",
                                machine = %r.name,
                                from = db.read_schema.as_deref().unwrap_or("?"),
                                to = crate::state::machine_db::SCHEMA_VERSION,
                                "nimbus.machine.state_migrated"
                            ),
                            Err(e) => {
                                tracing::warn!(machine = %r.name, error = %e, "the machine's state database could not be migrated; it is read as it is")
                            }
                        }
                    }
                    OnMachine::Read { state: db.to_model() }
                }
                Ok(None) => OnMachine::Read { state: MachineState::default() },
                Err(e) if e.is_bad_state() => OnMachine::BadState { reason: e.to_string() },
                Err(e) => OnMachine::Unreachable { reason: e.to_string() },
            };
            // Discovery is done with the machine: no connection is kept per machine of a large fleet.
            t.close().await;
            read
        }
    };
    m
}
