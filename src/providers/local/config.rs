//! The `local` provider's section of the fleet file, its rules and its capabilities.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::validate::Problem;
use crate::config::{FleetConfig, HumanDuration, PoolConfig};
use crate::core::model::{BillingUnit, Capabilities};

/// Sandboxes on this computer: the default for trying nimbus and for tests.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Folder that holds the sandboxes, relative to the fleet file.
    /// Default: `.nimbus/local` beside the fleet file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Minimum time between creating and removing a machine's host (default `0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_allocation: Option<HumanDuration>,
    /// An artificial delay added to every provider action, to watch an apply unfold (default `0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_delay: Option<HumanDuration>,
    /// Variables of nimbus's environment that setup steps get besides PATH, HOME, LANG, LC_ALL, USER, LOGNAME,
    /// TMPDIR and TERM. Nothing else reaches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_passthrough: Option<Vec<String>>,
}

impl LocalConfig {
    /// Sandboxes have no hosts and cost nothing; a sandbox is rebuilt, not reimaged.
    pub fn capabilities(&self) -> Capabilities {
        // A sandbox is reimaged by rebuilding its file system.
        Capabilities {
            hosts: Vec::new(),
            billing_unit: BillingUnit::Free,
            reimage: true,
            minimum_billed: Default::default(),
        }
    }

    /// Rules for a pool on this provider: none beyond the shared ones.
    pub fn validate_pool(&self, _fleet: &FleetConfig, _index: usize, _pool: &PoolConfig, _out: &mut Vec<Problem>) {}
}
