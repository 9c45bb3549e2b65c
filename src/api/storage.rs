//! Where tenants and their fleets come from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::config::{ConfigError, FleetConfig, LoadedConfig};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Other(String),
}

/// Supplies tenants, their providers and their forge configuration, from wherever the application keeps
/// them. The fleet is the same model `fleet.yaml` holds, validated the same way.
#[async_trait]
pub trait Storage: Send + Sync {
    /// The tenants it knows.
    async fn tenants(&self) -> Result<Vec<String>, StorageError>;
    /// A tenant's fleet, validated, with the folder its relative paths resolve against.
    async fn fleet(&self, tenant: &str) -> Result<LoadedConfig, StorageError>;
}

/// A `fleet.yaml` file: one tenant.
pub struct FileStorage {
    path: PathBuf,
}

impl FileStorage {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileStorage { path: path.into() }
    }
}

#[async_trait]
impl Storage for FileStorage {
    async fn tenants(&self) -> Result<Vec<String>, StorageError> {
        Ok(vec![crate::config::load(&self.path)?.config.tenant])
    }
    async fn fleet(&self, tenant: &str) -> Result<LoadedConfig, StorageError> {
        let loaded = crate::config::load(&self.path)?;
        if loaded.config.tenant != tenant {
            return Err(StorageError::UnknownTenant(tenant.into()));
        }
        Ok(loaded)
    }
}

/// Fleets kept in memory, by tenant (what an application fills from its database).
#[derive(Default)]
pub struct MemoryStorage {
    fleets: Mutex<BTreeMap<String, LoadedConfig>>,
}

impl MemoryStorage {
    /// Adds or replaces the fleet of `config.tenant`; relative paths in it resolve against `base_dir`.
    pub fn put(&self, config: FleetConfig, base_dir: &Path) -> Result<(), StorageError> {
        let tenant = config.tenant.clone();
        let loaded = LoadedConfig::from_config(&format!("storage:{tenant}"), config, base_dir)?;
        self.fleets.lock().expect("lock").insert(tenant, loaded);
        Ok(())
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn tenants(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.fleets.lock().expect("lock").keys().cloned().collect())
    }
    async fn fleet(&self, tenant: &str) -> Result<LoadedConfig, StorageError> {
        self.fleets.lock().expect("lock").get(tenant).cloned().ok_or_else(|| StorageError::UnknownTenant(tenant.into()))
    }
}
