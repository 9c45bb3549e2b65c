//! The `local` provider: each machine is a sandbox folder under a data dir.
//!
//! A sandbox `<data_dir>/<machine name>/` holds `nimbus.json` (the provider's
//! record: tags, image, type, state, launch time, the facts a cloud API
//! returns) and `root/`, the machine's file system, where setup steps run and
//! the on-machine state database lives (`root/var/lib/nimbus/state.db`).
//!
//! The folder name is the deterministic machine name, so a machine cannot be
//! created twice. A sandbox is built under a hidden `.tmp-*` name and renamed
//! into place, and removed by renaming it to `.trash-*` first; leftovers of a
//! killed run are swept by [`LocalProvider::sweep`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Discovered, LaunchRequest, MachineRef, Provider, ProviderError};
use crate::model::{ActualMachine, InstanceState, OnMachine, Tags, machine_tags, owned_by};
use crate::transport::Transport;
use crate::transport::local::LocalTransport;

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
    delay: Duration,
}

impl LocalProvider {
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        LocalProvider { name: name.into(), data_dir: data_dir.into(), delay: Duration::ZERO }
    }

    /// Adds an artificial delay to every action.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn io(&self, source: std::io::Error) -> ProviderError {
        ProviderError::Io { provider: self.name.clone(), source }
    }

    fn sandbox(&self, machine: &str) -> Result<PathBuf, ProviderError> {
        // Machine names are validated parts joined by dots; refuse anything that could leave the data dir.
        if machine.is_empty() || machine.starts_with('.') || machine.contains(['/', '\\']) {
            return Err(ProviderError::Failed {
                provider: self.name.clone(),
                message: format!("bad machine name `{machine}`"),
            });
        }
        Ok(self.data_dir.join(machine))
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
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
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue; // being built or removed
            }
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

    /// Removes half-built and half-removed sandboxes left by a killed run. Call it only while holding the
    /// apply lock.
    pub fn sweep(&self) -> Result<usize, ProviderError> {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(e)),
        };
        let mut n = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || name.starts_with(".trash-") {
                std::fs::remove_dir_all(entry.path()).map_err(|e| self.io(e))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn discover(&self, tenant: &str) -> Result<Discovered, ProviderError> {
        let mine: Vec<(PathBuf, SandboxRecord)> =
            self.records()?.into_iter().filter(|(_, r)| owned_by(&r.tags, tenant)).collect();
        let machines = mine
            .into_iter()
            .map(|(path, rec)| ActualMachine {
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
            })
            .collect();
        Ok(Discovered { hosts: Vec::new(), machines })
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<String, ProviderError> {
        self.pause().await;
        let dir = self.sandbox(&req.machine)?;
        if dir.join(RECORD_FILE).exists() {
            return Ok(req.machine.clone()); // launched before: idempotent
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| self.io(e))?;
        let tmp = self.data_dir.join(format!(".tmp-{}-{}", req.machine, unique_suffix()));
        std::fs::create_dir_all(tmp.join("root")).map_err(|e| self.io(e))?;
        let rec = SandboxRecord {
            tags: machine_tags(&req.tenant, &req.pool, &req.machine),
            image: req.spec.image.clone(),
            instance_type: req.spec.instance_type.clone(),
            state: InstanceState::Running,
            launched_at: Utc::now(),
        };
        let json = serde_json::to_vec_pretty(&rec).expect("record serialises");
        std::fs::write(tmp.join(RECORD_FILE), json).map_err(|e| self.io(e))?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(req.machine.clone()),
            Err(_) if dir.join(RECORD_FILE).exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(req.machine.clone())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(self.io(e))
            }
        }
    }

    async fn terminate(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        self.pause().await;
        let dir = self.sandbox(&machine.name)?;
        if !dir.exists() {
            return Ok(());
        }
        let trash = self.data_dir.join(format!(".trash-{}-{}", machine.name, unique_suffix()));
        std::fs::rename(&dir, &trash).map_err(|e| self.io(e))?;
        std::fs::remove_dir_all(&trash).map_err(|e| self.io(e))
    }

    fn transport(&self, machine: &MachineRef) -> Result<Option<Arc<dyn Transport>>, ProviderError> {
        let dir = self.sandbox(&machine.name)?;
        Ok(Some(Arc::new(LocalTransport::new(machine.name.clone(), dir.join("root")))))
    }

    async fn prepare(&self) -> Result<(), ProviderError> {
        let swept = self.sweep()?;
        if swept > 0 {
            tracing::info!(event = "nimbus.provider.swept", provider = %self.name, swept, "removed {swept} leftover sandbox folder(s)");
        }
        Ok(())
    }

    fn reachable_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
}
