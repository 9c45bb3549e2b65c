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
    #[error("tenant `{tenant}` has no pool `{pool}`")]
    UnknownPool { tenant: String, pool: String },
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
    /// Sets the desired `count` of a tenant's pool: where [`crate::api::Nimbus::provision`] and
    /// [`crate::api::Nimbus::terminate`] record what they change, so the next apply agrees with them.
    async fn set_count(&self, tenant: &str, pool: &str, count: u32) -> Result<(), StorageError>;
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

    /// Rewrites the pool's `count:` value in the file, in place (comments and layout kept), atomically; the
    /// result is validated before it replaces the file.
    async fn set_count(&self, tenant: &str, pool: &str, count: u32) -> Result<(), StorageError> {
        let loaded = self.fleet(tenant).await?;
        let i = loaded
            .config
            .pools
            .iter()
            .position(|p| p.name == pool)
            .ok_or_else(|| StorageError::UnknownPool { tenant: tenant.into(), pool: pool.into() })?;
        let text = loaded.source.as_str();
        let spans = crate::config::span::SpanIndex::build(text).map_err(|e| StorageError::Other(e.message))?;
        let span = spans.value_span(&format!("pools[{i}].count")).ok_or_else(|| {
            StorageError::Other(format!("pool `{pool}` in `{}` has no `count:` to change", self.path.display()))
        })?;
        let edited = format!("{}{count}{}", &text[..span.offset()], &text[span.offset() + span.len()..]);
        crate::config::parse(&self.path.display().to_string(), &edited)?;
        let tmp = self.path.with_extension("yaml.nimbus-tmp");
        let io = |e: std::io::Error| StorageError::Other(format!("`{}`: {e}", self.path.display()));
        std::fs::write(&tmp, &edited).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
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

    async fn set_count(&self, tenant: &str, pool: &str, count: u32) -> Result<(), StorageError> {
        let mut fleets = self.fleets.lock().expect("lock");
        let loaded = fleets.get(tenant).ok_or_else(|| StorageError::UnknownTenant(tenant.into()))?;
        let mut config = loaded.config.clone();
        let p = config
            .pools
            .iter_mut()
            .find(|p| p.name == pool)
            .ok_or_else(|| StorageError::UnknownPool { tenant: tenant.into(), pool: pool.into() })?;
        p.count = Some(count);
        let updated = LoadedConfig::from_config(&loaded.path.display().to_string(), config, &loaded.base_dir)?;
        fleets.insert(tenant.to_string(), updated);
        Ok(())
    }
}
