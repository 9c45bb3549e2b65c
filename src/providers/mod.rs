//! Providers: where machines come from. Each one discovers the resources
//! carrying a tenant's tags (read-only) and, for apply, carries out the
//! provider actions. The network sits behind this trait; the planner never
//! sees it.

pub mod local;

use async_trait::async_trait;

use crate::model::{ActualMachine, Host};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider `{provider}`: {message}")]
    Failed { provider: String, message: String },
    #[error("provider `{provider}`: {source}")]
    Io {
        provider: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a provider found for one tenant.
#[derive(Debug, Default, Clone)]
pub struct Discovered {
    pub hosts: Vec<Host>,
    pub machines: Vec<ActualMachine>,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's name in the fleet file.
    fn name(&self) -> &str;
    /// Finds this tenant's resources by their tags. Never returns another tenant's or untagged ones.
    async fn discover(&self, tenant: &str) -> Result<Discovered, ProviderError>;
}
