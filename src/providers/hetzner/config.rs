//! The `hetzner` provider's section of the fleet file, its rules and its capabilities (servers billed per
//! started hour, no minimum; rebuilt in place).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::validate::{At, Problem, problem, secret_rules};
use crate::config::{FleetConfig, PoolConfig, SecretRef};
use crate::core::model::{BillingUnit, Capabilities};

/// The public API.
pub const DEFAULT_API_URL: &str = "https://api.hetzner.cloud/v1";
/// The API's budget: 3,600 requests an hour per project.
pub const DEFAULT_REQUESTS_PER_HOUR: u32 = 3600;

/// Hetzner Cloud: servers, found by their labels.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HetznerConfig {
    /// An API token of the project (Read & Write): `{env: VAR}` or `{file: path}`, never inline.
    pub token: SecretRef,
    /// Where servers go unless the pool says (`machine.availability_zone`): a location such as `fsn1`, `nbg1`,
    /// `hel1`, `ash`, `hil`, `sin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// SSH keys of the project (names or ids) put on every server, for `ssh:` to reach it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// cloud-init user data for every server (not a secret: it is visible in the console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// The API's base URL (a test peer, or a proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// Requests an hour nimbus allows itself (default 3,600, the API's limit per project).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_hour: Option<u32>,
}

impl HetznerConfig {
    /// Servers billed per started hour, no minimum, no dedicated hosts; a server is rebuilt in place.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            hosts: Vec::new(),
            billing_unit: BillingUnit::Hour,
            reimage: true,
            minimum_billed: std::time::Duration::ZERO,
        }
    }

    pub fn validate(&self, name: &str, out: &mut Vec<Problem>) {
        secret_rules(out, &format!("providers.{name}.token"), &self.token);
        if self.requests_per_hour == Some(0) {
            out.push(problem(
                format!("providers.{name}.requests_per_hour"),
                At::Value,
                "`requests_per_hour` is 0".into(),
                "no requests",
                "leave it out (3,600, the API's limit) or give a positive number".to_string(),
            ));
        }
    }

    /// A pool on Hetzner names a server type and an image; a location comes from the pool or the provider.
    pub fn validate_pool(&self, fleet: &FleetConfig, i: usize, pool: &PoolConfig, out: &mut Vec<Problem>) {
        let at = |k: &str| format!("pools[{i}].{k}");
        if pool.machine.instance_type.is_none() {
            out.push(problem(
                at("machine"),
                At::Key,
                format!("pool `{}` on Hetzner needs `machine.instance_type` (a server type such as `cx22`)", pool.name),
                "no server type",
                "add `instance_type: cx22` (or another server type of the location)".to_string(),
            ));
        }
        if pool.machine.os == crate::config::Os::Macos {
            out.push(problem(
                at("machine.os"),
                At::Value,
                format!("pool `{}`: Hetzner Cloud has no macOS servers", pool.name),
                "not on Hetzner",
                "run macOS pools on `aws` (EC2 Mac)".to_string(),
            ));
        }
        if self.location.is_none() && pool.machine.availability_zone.is_none() {
            out.push(problem(
                at("machine"),
                At::Key,
                format!("pool `{}` on Hetzner has no location", pool.name),
                "no location",
                "set `location:` on the provider or `availability_zone: fsn1` on the pool's machine".to_string(),
            ));
        }
        if (pool.runner.is_some() || !pool.setup.is_empty()) && fleet.ssh.is_none() {
            out.push(problem(
                at("setup"),
                At::Key,
                format!("pool `{}` runs commands on its servers, but the fleet has no `ssh:` section", pool.name),
                "needs ssh",
                "add `ssh: {user: root, key: {file: ~/.ssh/nimbus}}` and the key to the provider's `ssh_keys`"
                    .to_string(),
            ));
        }
    }
}
