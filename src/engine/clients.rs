//! Building the real clients of a fleet: its providers (each from its own section), its forge, and the SSH
//! connector machines are reached through. Shared by the CLI and the library facade.

use std::sync::Arc;

use crate::config::LoadedConfig;
use crate::forges::{Forge, ForgeError};
use crate::providers::{Provider, ProviderError};
use crate::transport::ssh::{JumpHost, SshAuth, SshConnector, SshSettings};

/// Why a fleet's clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Forge(#[from] ForgeError),
    /// The `ssh:` section cannot be used (its key, its jump host).
    #[error("{message}")]
    Ssh { message: String, hint: String },
}

impl ClientError {
    fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        ClientError::Ssh { message: message.into(), hint: hint.into() }
    }
}

/// The forge of the fleet file's `forge:` section.
pub fn build_forge(loaded: &LoadedConfig) -> Result<Option<Arc<dyn Forge>>, ClientError> {
    let c = &loaded.config;
    let Some(named) = c.forges.as_ref().filter(|f| !f.is_empty()) else {
        return match &c.forge {
            Some(f) => Ok(Some(crate::forges::build(f, &loaded.base_dir)?)),
            None => Ok(None),
        };
    };
    // Several forges: one router over them, each serving the pools that name it (`forge` the others).
    let pools_of = |name: Option<&str>| -> Vec<String> {
        c.pools.iter().filter(|p| p.forge.as_deref() == name).map(|p| p.name.clone()).collect()
    };
    let mut all = Vec::new();
    if let Some(f) = &c.forge {
        all.push((
            "forge".to_string(),
            crate::forges::build(f, &loaded.base_dir)?,
            crate::forges::runner_dir(f),
            pools_of(None),
        ));
    }
    for (name, f) in named {
        all.push((
            name.clone(),
            crate::forges::build(f, &loaded.base_dir)?,
            crate::forges::runner_dir(f),
            pools_of(Some(name)),
        ));
    }
    Ok(Some(Arc::new(crate::forges::multi::MultiForge::new(all)?)))
}

/// Where runners are installed on machines (the forge's `runner_dir`; with several forges each agent uses its
/// own).
pub fn runner_dir(loaded: &LoadedConfig) -> Option<String> {
    if loaded.config.forges.as_ref().is_some_and(|f| !f.is_empty()) {
        return None;
    }
    loaded.config.forge.as_ref().and_then(crate::forges::runner_dir)
}

/// The SSH connector of the fleet file's `ssh:` section, with its key read.
/// What the clients are for: a read-only look (`plan`, `discover`) or changes (`apply`). Only changes may
/// record new SSH host keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Look,
    Change,
}

pub fn ssh_connector(loaded: &LoadedConfig, purpose: Purpose) -> Result<Option<Arc<SshConnector>>, ClientError> {
    let Some(ssh) = &loaded.config.ssh else { return Ok(None) };
    let auth = match &ssh.key {
        None => SshAuth::Agent,
        Some(r) => {
            let text = crate::util::secrets::read("ssh.key", r, &loaded.base_dir)
                .map_err(|e| ClientError::usage(e.to_string(), "set the variable or fix the path in `ssh.key`"))?;
            let key = russh::keys::decode_secret_key(&text, None).map_err(|e| {
                // The error never includes the key.
                ClientError::usage(
                    format!("`ssh.key` is not a usable private key: {e}"),
                    "use an unencrypted OpenSSH or PEM private key",
                )
            })?;
            SshAuth::Key(Arc::new(key))
        }
    };
    let known_hosts = match &ssh.known_hosts {
        Some(p) => loaded.resolve(&crate::util::secrets::expand_home(p)),
        None => loaded.base_dir.join(".nimbus").join("known_hosts"),
    };
    let jump = match &ssh.jump_host {
        Some(j) => Some(JumpHost::parse(j, &ssh.user).ok_or_else(|| {
            ClientError::usage(
                format!("`ssh.jump_host` `{j}` is not `user@host:port`"),
                "e.g. `jump_host: ec2-user@bastion.example.com:22`",
            )
        })?),
        None => None,
    };
    Ok(Some(SshConnector::new(SshSettings {
        user: ssh.user.clone(),
        port: ssh.port.unwrap_or(22),
        auth,
        known_hosts,
        proxy_command: ssh.proxy_command.clone(),
        jump,
        connect_timeout: ssh.connect_timeout.map(|d| d.0).unwrap_or(std::time::Duration::from_secs(20)),
        state_path: ssh.state_path.clone().unwrap_or_else(|| crate::transport::ssh::REMOTE_STATE_PATH.to_string()),
        pin_new_keys: purpose == Purpose::Change
            && ssh.host_key_policy.unwrap_or(crate::config::HostKeyPolicy::PinOnFirstApply)
                == crate::config::HostKeyPolicy::PinOnFirstApply,
        env_passthrough: crate::util::shell::passthrough(
            loaded.config.env_passthrough.as_deref().unwrap_or_default(),
            ssh.env_passthrough.as_deref(),
        ),
    })))
}

/// The fleet file's scope: its id, the fleets it adopts, and its pools.
pub fn fleet_scope(loaded: &LoadedConfig) -> crate::core::model::FleetScope {
    crate::core::model::FleetScope {
        id: loaded.fleet_id(),
        adopt: loaded.config.adopt_fleets.clone().unwrap_or_default(),
        pools: loaded.config.pools.iter().map(|p| p.name.clone()).collect(),
    }
}

/// Builds the providers the fleet file names.
pub async fn build_providers(loaded: &LoadedConfig, purpose: Purpose) -> Result<Vec<Arc<dyn Provider>>, ClientError> {
    let ssh = ssh_connector(loaded, purpose)?;
    let mut out = Vec::new();
    for (name, p) in &loaded.config.providers {
        let ctx = crate::providers::BuildContext {
            tenant: loaded.config.tenant.clone(),
            base_dir: loaded.base_dir.clone(),
            ssh: ssh.clone(),
            // Resources made before nimbus tagged providers belong to the only provider of their kind.
            sole_of_kind: loaded.config.providers.values().filter(|q| q.kind() == p.kind()).count() == 1,
            fleet: fleet_scope(loaded),
            env_passthrough: loaded.config.env_passthrough.clone().unwrap_or_default(),
        };
        out.push(crate::providers::build(name, p, &ctx).await?);
    }
    Ok(out)
}
