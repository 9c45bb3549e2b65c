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

pub mod config;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Discovered, LaunchRequest, MachineRef, Provider, ProviderError};
use crate::core::model::{
    ActualMachine, FleetScope, InstanceState, OnMachine, OtherFleetResource, Ownership, Tags, Unusable, machine_tags,
    ownership, parse_machine_name, with_user_tags,
};
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
    tenant: String,
    data_dir: PathBuf,
    delay: Duration,
    adopt_legacy: bool,
    passthrough: Vec<String>,
    /// The fleet file it works for; `None`: all of the tenant's sandboxes.
    fleet: Option<FleetScope>,
}

/// A sandbox folder as discovery found it.
pub enum SandboxEntry {
    Record(PathBuf, SandboxRecord),
    /// A folder with a `nimbus.json` that cannot be read.
    Damaged {
        path: PathBuf,
        reason: String,
    },
}

impl LocalProvider {
    /// A provider named `name` (in the fleet file) for `tenant`, with its sandboxes under `data_dir`. The data
    /// dir is made absolute: every path handed to a machine is.
    pub fn new(name: impl Into<String>, tenant: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir: PathBuf = data_dir.into();
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        LocalProvider {
            name: name.into(),
            tenant: tenant.into(),
            data_dir,
            delay: Duration::ZERO,
            adopt_legacy: false,
            passthrough: Vec::new(),
            fleet: None,
        }
    }

    /// The provider of a fleet file's `local` section: sandboxes under `data_dir` (default `.nimbus/local`
    /// beside the fleet file).
    pub fn from_config(name: &str, c: &config::LocalConfig, ctx: &super::BuildContext) -> Self {
        let dir = match &c.data_dir {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => ctx.base_dir.join(p),
            None => ctx.base_dir.join(".nimbus").join("local"),
        };
        LocalProvider::new(name, ctx.tenant.clone(), dir)
            .with_delay(c.action_delay.map(|d| d.0).unwrap_or_default())
            .adopting_legacy(ctx.sole_of_kind)
            .with_passthrough(crate::util::shell::passthrough(&ctx.env_passthrough, c.env_passthrough.as_deref()))
            .with_fleet(ctx.fleet.clone())
    }

    /// Works for one fleet file: its sandboxes carry the fleet's `nimbus:fleet` tag, and another fleet's are
    /// left alone.
    pub fn with_fleet(mut self, fleet: FleetScope) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Lets these variables of nimbus's environment through to setup steps (`env_passthrough`).
    pub fn with_passthrough(mut self, names: Vec<String>) -> Self {
        self.passthrough = names;
        self
    }

    /// Sandboxes without a `nimbus:provider` tag (made by nimbus before it recorded providers) are this
    /// provider's. Set it only when this is the fleet's one `local` provider.
    pub fn adopting_legacy(mut self, adopt: bool) -> Self {
        self.adopt_legacy = adopt;
        self
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
        ProviderError::io(&self.name, source)
    }

    fn sandbox(&self, machine: &str) -> Result<PathBuf, ProviderError> {
        // Machine names are validated parts joined by dots; refuse anything that could leave the data dir.
        if machine.is_empty() || machine.starts_with('.') || machine.contains(['/', '\\']) {
            return Err(ProviderError::Other {
                provider: self.name.clone(),
                message: format!("bad machine name `{machine}`"),
                source: None,
            });
        }
        Ok(self.data_dir.join(machine))
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    /// Reads every sandbox record, skipping folders that are not sandboxes. A damaged record is returned
    /// as such, naming its file; it never fails the whole listing.
    pub fn records(&self) -> Result<Vec<SandboxEntry>, ProviderError> {
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
            let bytes = match std::fs::read(&rec) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::NotADirectory => {
                    continue;
                }
                Err(e) => {
                    out.push(SandboxEntry::Damaged { path, reason: format!("cannot read `{}`: {e}", rec.display()) });
                    continue;
                }
            };
            match serde_json::from_slice::<SandboxRecord>(&bytes) {
                Ok(record) => out.push(SandboxEntry::Record(path, record)),
                Err(e) => out.push(SandboxEntry::Damaged {
                    path,
                    reason: format!("`{}` is not a sandbox record: {e}", rec.display()),
                }),
            }
        }
        out.sort_by(|a, b| a.path().cmp(b.path()));
        Ok(out)
    }

    fn ownership(&self, tags: &Tags) -> Ownership {
        ownership(tags, &self.tenant, &self.name, self.adopt_legacy, self.fleet.as_ref())
    }

    /// The record of sandbox `dir`, if it is one. Errors when the record is unreadable.
    fn record_of(&self, dir: &Path) -> Result<Option<SandboxRecord>, ProviderError> {
        let rec = dir.join(RECORD_FILE);
        match std::fs::read(&rec) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| ProviderError::Other {
                provider: self.name.clone(),
                message: format!("`{}` is not a sandbox record: {e}", rec.display()),
                source: None,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Refuses unless the sandbox is this tenant's and this provider's.
    fn check_owned(&self, machine: &str, rec: &SandboxRecord, what: &str) -> Result<(), ProviderError> {
        match self.ownership(&rec.tags) {
            Ownership::Mine => Ok(()),
            other => Err(ProviderError::Conflict {
                provider: self.name.clone(),
                message: format!(
                    "refusing to {what} `{machine}`: it is not tagged for tenant `{}` and provider `{}` ({})",
                    self.tenant,
                    self.name,
                    match other {
                        Ownership::OtherProvider => format!(
                            "it belongs to provider `{}`",
                            rec.tags.get(crate::core::model::tags::PROVIDER).unwrap_or("?")
                        ),
                        Ownership::Unattributed => "it has no `nimbus:provider` tag".to_string(),
                        Ownership::OtherFleet => format!(
                            "it belongs to fleet `{}`",
                            rec.tags.get(crate::core::model::tags::FLEET).unwrap_or("?")
                        ),
                        _ => "another tenant's, or not managed by nimbus".to_string(),
                    }
                ),
            }),
        }
    }

    /// Removes half-built and half-removed sandboxes left by a killed run: those whose process is gone, and those
    /// untouched for an hour; another fleet's apply sharing the folder (its own lock) keeps the ones it is
    /// building now.
    pub fn sweep(&self) -> Result<usize, ProviderError> {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(e)),
        };
        let mut n = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600))
                .unwrap_or(false);
            // A folder of a process that is gone (its name ends in `-<pid>-<nanos>`, and sandboxes are on this
            // computer) is left over too, however fresh.
            let dead = name
                .rsplit('-')
                .nth(1)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists());
            if (name.starts_with(".tmp-") || name.starts_with(".trash-")) && (stale || dead) {
                std::fs::remove_dir_all(entry.path()).map_err(|e| self.io(e))?;
                n += 1;
            } else if !name.starts_with('.') {
                n += sweep_state_dir(&entry.path().join("root").join(LOCAL_STATE_DIR));
            }
        }
        Ok(n)
    }
}

/// A sandbox's state folder, under its root.
const LOCAL_STATE_DIR: &str = "var/lib/nimbus";

/// Removes the temporary state databases a killed apply left in a sandbox's state folder (a write is a temporary
/// file, then a rename: `.state.db.tmp.<pid>.<n>`), those of a process that is gone or an hour old. Returns how
/// many.
fn sweep_state_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".state.db.tmp.") else { continue };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        let dead =
            pid.is_some_and(|pid| pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists());
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600));
        if (dead || stale) && std::fs::remove_file(entry.path()).is_ok() {
            n += 1;
        }
    }
    n
}

impl SandboxEntry {
    pub fn path(&self) -> &Path {
        match self {
            SandboxEntry::Record(p, _) | SandboxEntry::Damaged { path: p, .. } => p,
        }
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
        if tenant != self.tenant {
            return Err(ProviderError::Other {
                provider: self.name.clone(),
                message: format!("provider was built for tenant `{}`", self.tenant),
                source: None,
            });
        }
        let folder = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut mine = Vec::new();
        let mut unusable = Vec::new();
        let mut other_fleets = Vec::new();
        for entry in self.records()? {
            match entry {
                SandboxEntry::Record(path, rec) => match self.ownership(&rec.tags) {
                    Ownership::Mine => mine.push((path, rec)),
                    Ownership::Unattributed => unusable.push(Unusable {
                        provider: self.name.clone(),
                        id: folder(&path),
                        machine: rec.tags.get(crate::core::model::tags::MACHINE).map(str::to_string),
                        reason: format!(
                            "sandbox `{}` has no `nimbus:provider` tag, and more than one `local` provider shares its folder",
                            path.display()
                        ),
                        hint: format!(
                            "add `\"{}\": \"PROVIDER\"` to the tags in `{}`, naming the provider it belongs to",
                            crate::core::model::tags::PROVIDER,
                            path.join(RECORD_FILE).display()
                        ),
                    }),
                    Ownership::OtherFleet => other_fleets.push(OtherFleetResource {
                        provider: self.name.clone(),
                        id: folder(&path),
                        machine: rec.tags.get(crate::core::model::tags::MACHINE).map(str::to_string),
                        fleet: rec.tags.get(crate::core::model::tags::FLEET).map(str::to_string).unwrap_or_default(),
                    }),
                    Ownership::OtherProvider | Ownership::NotOurs => {}
                },
                // Only a folder named for one of this tenant's machines is reported; others are not ours to judge.
                SandboxEntry::Damaged { path, reason } => {
                    let name = folder(&path);
                    if parse_machine_name(&name).is_some_and(|(t, _, _)| t == tenant) {
                        unusable.push(Unusable {
                            provider: self.name.clone(),
                            id: name.clone(),
                            machine: Some(name),
                            reason,
                            hint: format!(
                                "repair `{}`, or remove the folder `{}` to let nimbus create the machine again",
                                path.join(RECORD_FILE).display(),
                                path.display()
                            ),
                        });
                    }
                }
            }
        }
        let machines = mine
            .into_iter()
            .map(|(path, rec)| ActualMachine {
                provider: self.name.as_str().into(),
                instance_id: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                tags: rec.tags,
                state: rec.state,
                image: rec.image.into(),
                instance_type: rec.instance_type.map(crate::core::model::Sym::from),
                availability_zone: None,
                host_id: None,
                launched_at: rec.launched_at,
                address: None,
                on_machine: OnMachine::NotRead,
                unreachable_since: None,
            })
            .collect();
        Ok(Discovered { hosts: Vec::new(), machines, unusable, other_fleets })
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<String, ProviderError> {
        self.pause().await;
        let dir = self.sandbox(&req.machine)?;
        if let Some(rec) = self.record_of(&dir)? {
            // Launched before (idempotent), but only if it is ours.
            self.check_owned(&req.machine, &rec, "reuse")?;
            return Ok(req.machine.clone());
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| self.io(e))?;
        let tmp = self.data_dir.join(format!(".tmp-{}-{}", req.machine, unique_suffix()));
        std::fs::create_dir_all(tmp.join("root")).map_err(|e| self.io(e))?;
        let rec = SandboxRecord {
            tags: with_user_tags(
                &req.spec.tags,
                machine_tags(
                    &self.tenant,
                    &self.name,
                    &req.pool,
                    &req.machine,
                    self.fleet.as_ref().map(|f| f.id.as_str()),
                ),
            ),
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
        // Destroy only what is provably this tenant's and this provider's: a saved plan may have been edited.
        match self.record_of(&dir)? {
            Some(rec) => self.check_owned(&machine.name, &rec, "terminate")?,
            None => {
                return Err(ProviderError::Conflict {
                    provider: self.name.clone(),
                    message: format!("refusing to terminate `{}`: `{}` is not a sandbox", machine.name, dir.display()),
                });
            }
        }
        if let Some(id) = &machine.instance_id
            && id != &machine.name
        {
            return Err(ProviderError::Conflict {
                provider: self.name.clone(),
                message: format!("refusing to terminate `{}`: the plan names sandbox `{id}`", machine.name),
            });
        }
        let trash = self.data_dir.join(format!(".trash-{}-{}", machine.name, unique_suffix()));
        std::fs::rename(&dir, &trash).map_err(|e| self.io(e))?;
        std::fs::remove_dir_all(&trash).map_err(|e| self.io(e))
    }

    /// Rebuilds the sandbox's file system: a new, empty `root/` and the new image in its record.
    async fn reimage(&self, machine: &MachineRef, image: &str) -> Result<(), ProviderError> {
        self.pause().await;
        let dir = self.sandbox(&machine.name)?;
        let Some(mut rec) = self.record_of(&dir)? else {
            return Err(ProviderError::NotFound {
                provider: self.name.clone(),
                message: format!("sandbox `{}` does not exist", machine.name),
            });
        };
        self.check_owned(&machine.name, &rec, "reimage")?;
        let old = self.data_dir.join(format!(".trash-{}-root-{}", machine.name, unique_suffix()));
        if dir.join("root").exists() {
            std::fs::rename(dir.join("root"), &old).map_err(|e| self.io(e))?;
        }
        std::fs::create_dir_all(dir.join("root")).map_err(|e| self.io(e))?;
        rec.image = image.to_string();
        rec.launched_at = Utc::now();
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&rec).expect("record serialises")).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, dir.join(RECORD_FILE)).map_err(|e| self.io(e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The user's tags in the sandbox's record (a sandbox has no volumes nor hosts).
    async fn update_tags(
        &self,
        machine: &MachineRef,
        _host: Option<&str>,
        set: &crate::core::model::UserTags,
        remove: &[String],
    ) -> Result<(), ProviderError> {
        self.pause().await;
        super::refuse_reserved_tags(&self.name, set, remove)?;
        let dir = self.sandbox(&machine.name)?;
        let Some(mut rec) = self.record_of(&dir)? else {
            return Err(ProviderError::NotFound {
                provider: self.name.clone(),
                message: format!("sandbox `{}` does not exist", machine.name),
            });
        };
        self.check_owned(&machine.name, &rec, "tag")?;
        for k in remove {
            rec.tags.remove(k);
        }
        rec.tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&rec).expect("record serialises")).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, dir.join(RECORD_FILE)).map_err(|e| self.io(e))
    }

    fn transport(&self, machine: &MachineRef) -> Result<Option<Arc<dyn Transport>>, ProviderError> {
        let dir = self.sandbox(&machine.name)?;
        Ok(Some(Arc::new(
            LocalTransport::new(machine.name.clone(), dir.join("root")).with_passthrough(self.passthrough.clone()),
        )))
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
