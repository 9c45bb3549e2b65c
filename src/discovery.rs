//! Discovery: builds [`Actual`] from the providers (by tags), the forge's
//! runner list and the machines' own state, read-only and in parallel.

use std::sync::Arc;

use futures::future::join_all;

use crate::model::Actual;
use crate::providers::{Provider, ProviderError};

/// Runs every provider's discovery concurrently and merges the results.
pub async fn discover(tenant: &str, providers: &[Arc<dyn Provider>]) -> Result<Actual, ProviderError> {
    let results = join_all(providers.iter().map(|p| p.discover(tenant))).await;
    let mut actual = Actual::default();
    for r in results {
        let d = r?;
        actual.hosts.extend(d.hosts);
        actual.machines.extend(d.machines);
    }
    Ok(actual)
}
