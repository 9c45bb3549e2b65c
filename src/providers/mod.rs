//! Providers: where machines come from. Each one discovers the resources
//! carrying a tenant's tags (read-only) and, for apply, carries out the
//! provider actions. The network sits behind this trait; the planner never
//! sees it.

pub mod aws;
pub mod hetzner;
pub mod local;

use std::path::PathBuf;

use crate::config::ProviderConfig;
use crate::transport::ssh::SshConnector;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::core::model::{ActualMachine, Host, MachineSpec, Unusable, UserTags};
use crate::transport::Transport;

/// Why a provider call failed, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The resource does not exist (any more).
    #[error("provider `{provider}`: {message}")]
    NotFound { provider: String, message: String },
    /// The provider is limiting requests (EC2 `RequestLimitExceeded`); retried with backoff before this.
    #[error("provider `{provider}`: throttled: {message}")]
    Throttled { provider: String, message: String },
    /// Credentials missing, wrong, or without permission.
    #[error("provider `{provider}`: not authorised: {message}")]
    Auth { provider: String, message: String },
    /// No capacity of that kind now (EC2 `InsufficientHostCapacity`, a host limit).
    #[error("provider `{provider}`: no capacity: {message}")]
    Capacity { provider: String, message: String },
    /// The resource is not in a state that allows it, or not this fleet's: nimbus refused, or the provider did.
    #[error("provider `{provider}`: {message}")]
    Conflict { provider: String, message: String },
    #[error("provider `{provider}`: {message}")]
    Other {
        provider: String,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl ProviderError {
    pub fn other(provider: &str, message: impl Into<String>) -> Self {
        ProviderError::Other { provider: provider.into(), message: message.into(), source: None }
    }

    pub fn conflict(provider: &str, message: impl Into<String>) -> Self {
        ProviderError::Conflict { provider: provider.into(), message: message.into() }
    }

    pub fn io(provider: &str, source: std::io::Error) -> Self {
        ProviderError::Other { provider: provider.into(), message: source.to_string(), source: Some(Box::new(source)) }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ProviderError::NotFound { .. } => "it was removed outside nimbus, or never made; plan again",
            ProviderError::Throttled { .. } => {
                "the provider is limiting requests and nimbus already retried with backoff; try again later, or lower `--parallelism`"
            }
            ProviderError::Auth { .. } => {
                "check the credentials and what they may do (for AWS: the provider's `profile`, `role_arn` and `external_id`, else the standard chain; `apply` needs the policy in examples/aws-mac/iam-policy.json, `plan` only examples/aws-mac/iam-policy-plan.json; an assumed role also needs a trust policy that lets the base identity assume it)"
            }
            ProviderError::Capacity { .. } => {
                "the provider has no capacity of this kind now; try again later, or another zone or instance type"
            }
            ProviderError::Conflict { .. } => "what exists changed, or the resource is not this fleet's; plan again",
            ProviderError::Other { .. } => "RUST_LOG=debug with `--log-format json` shows the provider's raw response",
        }
    }
}

/// A provider's refusal to change a reserved tag (`nimbus:*`, `aws:*`) through `Provider::update_tags`.
pub fn refuse_reserved_tags(provider: &str, set: &UserTags, remove: &[String]) -> Result<(), ProviderError> {
    match set.keys().chain(remove).find(|k| crate::core::model::is_reserved_tag(k)) {
        Some(k) => Err(ProviderError::conflict(provider, format!("refusing to change reserved tag `{k}`"))),
        None => Ok(()),
    }
}

/// What a provider found for one tenant.
#[derive(Debug, Default, Clone)]
pub struct Discovered {
    pub hosts: Vec<Host>,
    pub machines: Vec<ActualMachine>,
    /// This tenant's resources that could not be read or attributed to this provider.
    pub unusable: Vec<Unusable>,
    /// This tenant's and provider's resources that another fleet file manages.
    pub other_fleets: Vec<crate::core::model::OtherFleetResource>,
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub tenant: String,
    pub pool: String,
    pub machine: String,
    pub spec: MachineSpec,
    pub host_id: Option<String>,
    /// The idempotency key (EC2 ClientToken) the journal holds for this launch: the same on a rerun of an
    /// interrupted launch, new for a machine created again later. `None`: the provider picks one per run.
    pub idempotency_key: Option<String>,
}

/// What to allocate.
#[derive(Debug, Clone)]
pub struct HostRequest {
    pub tenant: String,
    pub pool: String,
    pub machine: String,
    pub instance_type: String,
    pub availability_zone: String,
    /// More zones to try, in order, when `availability_zone` has no capacity.
    pub fallback_zones: Vec<String>,
    /// Hosts the plan already knows (and has decided about): a lookup by tag must never return one of
    /// them, so one host is never promised to two machines.
    pub exclude_hosts: Vec<String>,
    /// The idempotency key the journal holds for this allocation (see [`LaunchRequest::idempotency_key`]).
    pub idempotency_key: Option<String>,
    /// The user's tags for the host (the pool's `tags`, merged with the fleet's and the provider's).
    pub tags: UserTags,
}

/// A dedicated host allocated (or found again) for a machine, and the zone it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedHost {
    pub host_id: String,
    pub availability_zone: String,
}

/// A machine as the provider addresses it.
#[derive(Debug, Clone, Default)]
pub struct MachineRef {
    pub name: String,
    pub instance_id: Option<String>,
    pub address: Option<String>,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's name in the fleet file.
    fn name(&self) -> &str;

    /// Finds this tenant's resources by their tags. Never returns another tenant's or untagged ones.
    async fn discover(&self, tenant: &str) -> Result<Discovered, ProviderError>;

    /// Allocates a dedicated host, or finds the one already allocated for this machine (by tags).
    async fn allocate_host(&self, req: &HostRequest) -> Result<String, ProviderError> {
        Err(self.unsupported(&format!("dedicated hosts (for `{}`)", req.machine)))
    }

    /// Like [`Provider::allocate_host`], also saying which zone the host is in: a pool may list several, tried
    /// in order, and the journal records the one used. A provider that falls back through
    /// `HostRequest::fallback_zones` overrides this (the default says the first zone).
    async fn allocate_host_in_zone(&self, req: &HostRequest) -> Result<AllocatedHost, ProviderError> {
        let host_id = self.allocate_host(req).await?;
        Ok(AllocatedHost { host_id, availability_zone: req.availability_zone.clone() })
    }

    /// Launches the machine, or finds the one already launched (by its deterministic name). Returns its id.
    async fn launch(&self, req: &LaunchRequest) -> Result<String, ProviderError>;

    /// Terminates a machine. Terminating one that is already gone succeeds.
    async fn terminate(&self, machine: &MachineRef) -> Result<(), ProviderError>;

    /// Gives the machine a fresh root file system from `image`, keeping the instance (and its host); returns
    /// once it runs again. Only providers whose capabilities say they reimage are asked.
    async fn reimage(&self, machine: &MachineRef, image: &str) -> Result<(), ProviderError> {
        let _ = image;
        Err(self.unsupported(&format!("reimaging `{}`", machine.name)))
    }

    /// Releases a dedicated host. The provider re-checks that it is idle and past its window.
    async fn release_host(&self, host_id: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(&format!("releasing host `{host_id}`")))
    }

    /// Waits until the provider reports the machine running (before trying to reach it).
    async fn wait_running(&self, _machine: &MachineRef) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Sets the user's tags `set` and removes the keys `remove` on a machine's instance, its volumes and its
    /// dedicated `host`, in place. Never touches nimbus's own tags (`nimbus:*`), nor another tenant's, provider's
    /// or fleet's resources.
    async fn update_tags(
        &self,
        machine: &MachineRef,
        _host: Option<&str>,
        _set: &UserTags,
        _remove: &[String],
    ) -> Result<(), ProviderError> {
        Err(ProviderError::other(self.name(), format!("cannot tag `{}`: this provider has no tags", machine.name)))
    }

    /// A shell on the machine; `None` when this fleet cannot reach machines (no `ssh:`).
    fn transport(&self, machine: &MachineRef) -> Result<Option<Arc<dyn Transport>>, ProviderError>;

    /// Called once at the start of an apply, under the apply lock: clean up what a killed run left.
    async fn prepare(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The provider's clock minus this computer's, as last seen in a response; `None` when not known.
    fn clock_skew(&self) -> Option<chrono::Duration> {
        None
    }

    /// Whether the provider reports each request it sends to its API itself (`nimbus.cloud_provider.api_call_*`
    /// per request, and the API call counters); otherwise each call of this trait is reported as one.
    fn reports_requests(&self) -> bool {
        false
    }

    /// How long to wait for a new machine to answer.
    fn reachable_timeout(&self) -> Duration {
        Duration::from_secs(600)
    }

    fn unsupported(&self, what: &str) -> ProviderError {
        ProviderError::other(self.name(), format!("{what} is not supported"))
    }
}

/// What building a provider from its fleet-file section needs besides the section.
pub struct BuildContext {
    pub tenant: String,
    /// The fleet file's folder (absolute): relative paths in the section resolve against it.
    pub base_dir: PathBuf,
    /// The fleet's SSH connector, when it has an `ssh:` section.
    pub ssh: Option<Arc<SshConnector>>,
    /// Whether this is the fleet's only provider of its kind (it then adopts resources made before nimbus
    /// recorded providers).
    pub sole_of_kind: bool,
    /// The fleet file the provider works for.
    pub fleet: crate::core::model::FleetScope,
    /// The fleet's `env_passthrough`: variables children on this computer get besides the minimal ones.
    pub env_passthrough: Vec<String>,
}

/// Builds the provider named `name` from its section: the one registration point for provider kinds.
pub async fn build(
    name: &str,
    config: &ProviderConfig,
    ctx: &BuildContext,
) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match config {
        ProviderConfig::Local(c) => Arc::new(local::LocalProvider::from_config(name, c, ctx)),
        ProviderConfig::Aws(c) => Arc::new(aws::AwsProvider::from_config(name, c, ctx).await?),
        ProviderConfig::Hetzner(c) => Arc::new(hetzner::HetznerProvider::from_config(name, c, ctx)?),
    })
}
