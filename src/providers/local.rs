//! The `local` provider: each machine is a sandbox folder under a data dir.
//!
//! A sandbox `<data_dir>/<machine name>/` holds `nimbus.json` (the provider's
//! record: tags, image, type, state, launch time, the same facts a cloud API
//! returns) and, once set up, the on-machine state database. The folder name
//! is the deterministic machine name, so creating one twice is impossible.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Discovered, Provider, ProviderError};
use crate::model::{ActualMachine, InstanceState, OnMachine, Tags, owned_by};

/// The provider's own record of a sandbox (`nimbus.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub tags: Tags,
    pub image: String,
    #[serde(default)]
    pub instance_type: Option<String>,
    pub state: InstanceState,
    pub launched_at: DateTime<Utc>,
}

pub const RECORD_FILE: &str = "nimbus.json";

pub struct LocalProvider {
    name: String,
    data_dir: PathBuf,
}

impl LocalProvider {
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        LocalProvider { name: name.into(), data_dir: data_dir.into() }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn io(&self, source: std::io::Error) -> ProviderError {
        ProviderError::Io { provider: self.name.clone(), source }
    }

    /// Reads every sandbox record, skipping folders that are not sandboxes.
    pub fn records(&self) -> Result<Vec<(PathBuf, SandboxRecord)>, ProviderError> {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(e) => e,
            // No data dir yet: nothing was ever created.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io(e))?;
            let path = entry.path();
            let rec = path.join(RECORD_FILE);
            let text = match std::fs::read_to_string(&rec) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::NotADirectory => {
                    continue;
                }
                Err(e) => return Err(self.io(e)),
            };
            let record: SandboxRecord = serde_json::from_str(&text).map_err(|e| ProviderError::Failed {
                provider: self.name.clone(),
                message: format!("`{}` is not a sandbox record: {e}", rec.display()),
            })?;
            out.push((path, record));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn discover(&self, tenant: &str) -> Result<Discovered, ProviderError> {
        let mut found = Discovered::default();
        for (path, rec) in self.records()? {
            if !owned_by(&rec.tags, tenant) {
                continue;
            }
            found.machines.push(ActualMachine {
                provider: self.name.clone(),
                instance_id: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                tags: rec.tags,
                state: rec.state,
                image: rec.image,
                instance_type: rec.instance_type,
                availability_zone: None,
                host_id: None,
                launched_at: rec.launched_at,
                address: None,
                on_machine: OnMachine::NotRead,
            });
        }
        Ok(found)
    }
}
