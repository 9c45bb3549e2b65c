//! The `aws` provider's section of the fleet file, its rules (instance types, zones, SSH) and its
//! capabilities (EC2 Mac dedicated hosts with AWS's 24-hour minimum allocation).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::validate::{At, Problem, problem};
use crate::config::{FleetConfig, HumanDuration, Os, PoolConfig};
use crate::core::model::{BillingUnit, Capabilities, HostPolicy};

/// AWS bills an EC2 Mac dedicated host for at least 24 hours.
pub const MAC_HOST_MIN_ALLOCATION: Duration = Duration::from_secs(24 * 3600);

/// Released this long after the window at the earliest, so clock skew never makes a release early.
pub const DEFAULT_WINDOW_MARGIN: Duration = Duration::from_secs(300);

/// Amazon EC2: Linux instances, and macOS on dedicated hosts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region; default from the standard AWS configuration chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// When idle dedicated hosts past their minimum window are released (`release:`); a pool's `hosts:` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<crate::config::HostsConfig>,
    /// Minimum time between allocating and releasing a dedicated host.
    /// Default: `24h` for EC2 Mac (`mac*.metal`) types, as AWS bills them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_allocation: Option<HumanDuration>,
    /// After a Mac host's scrub, how long it stays unusable once it reports available (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_available_delay: Option<HumanDuration>,
    /// Extra time past the minimum allocation before a host is released, against clock skew (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_margin: Option<HumanDuration>,
    /// Subnet to launch instances in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Security groups for launched instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// EC2 key pair name for launched instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// A named profile of the shared AWS config (`~/.aws/config`, `AWS_CONFIG_FILE`): its credentials only,
    /// never the environment's. Default: the standard chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// An IAM role to assume through STS, from the base credentials (`profile`, or the standard chain), e.g.
    /// a role in another account. Temporary credentials are cached and refreshed before they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// The external id the role's trust policy requires (`sts:ExternalId`): text, `{env: VAR}` or `{file: path}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<crate::providers::aws::credentials::ExternalId>,
    /// The role session's name, seen in CloudTrail (default `nimbus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
    /// How long a role session lasts, 15m to 12h (default: STS's, one hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<HumanDuration>,
    /// A CI's OIDC token exchanged for `role_arn` (`AssumeRoleWithWebIdentity`): `{file: path}` (a token file,
    /// read again at every refresh) or `{env: VAR}` (the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_identity: Option<crate::config::SecretRef>,
    /// Tags on every instance, host and volume this provider makes (with the fleet's; a pool's win).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// EC2 Mac instance types (`mac*.metal`) run on dedicated hosts.
pub fn is_mac_metal(instance_type: &str) -> bool {
    instance_type.starts_with("mac") && instance_type.ends_with(".metal")
}

impl AwsConfig {
    /// Who this provider's clients act as.
    pub fn identity(&self) -> crate::providers::aws::credentials::AwsIdentity {
        crate::providers::aws::credentials::AwsIdentity::from_fields(
            &self.profile,
            &self.role_arn,
            &self.external_id,
            &self.session_name,
            self.duration,
            &self.web_identity,
        )
    }

    /// Mac types on dedicated hosts, billed by the second after the host's 24-hour minimum.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            hosts: vec![HostPolicy {
                instance_types: "mac*.metal".into(),
                min_allocation: self.min_allocation.map(|d| d.0).unwrap_or(MAC_HOST_MIN_ALLOCATION),
                // A new root volume (CreateReplaceRootVolumeTask) keeps the instance and its host: no new
                // 24-hour host, no scrub.
                reimage: true,
                margin: self.window_margin.map(|d| d.0).unwrap_or(DEFAULT_WINDOW_MARGIN),
                // EC2: a scrubbed host is usable a few minutes after it reports available; a scrub takes from
                // 50 minutes to 4.5 hours.
                post_available_delay: self.post_available_delay.map(|d| d.0).unwrap_or(Duration::from_secs(300)),
                scrub_estimate: Duration::from_secs(4 * 3600 + 1800),
            }],
            billing_unit: BillingUnit::Second,
            // Other instances are replaced (terminate and launch): as quick, and nothing to keep.
            reimage: false,
            // EC2 bills Linux instances per second with a 60-second minimum.
            minimum_billed: Duration::from_secs(60),
        }
    }

    /// How long after its allocation a host for `instance_type` may be released (window plus margin).
    pub fn window(&self, instance_type: &str) -> Duration {
        self.capabilities().releasable_after(instance_type)
    }

    /// Rules for a pool on AWS: an instance type that fits the OS, a zone for dedicated hosts, and SSH when
    /// the pool runs commands on its machines.
    pub fn validate_pool(&self, fleet: &FleetConfig, i: usize, pool: &PoolConfig, out: &mut Vec<Problem>) {
        let at = |k: &str| format!("pools[{i}].{k}");
        match &pool.machine.instance_type {
            None => out.push(problem(
                at("machine"),
                At::Key,
                format!("pool `{}` is on AWS and needs `machine.instance_type`", pool.name),
                "instance_type missing",
                "e.g. `instance_type: mac2.metal` for macOS, `t3.large` for Linux".to_string(),
            )),
            Some(t) if pool.machine.os == Os::Macos && !is_mac_metal(t) => out.push(problem(
                at("machine.instance_type"),
                At::Value,
                format!("macOS on EC2 needs a `mac*.metal` instance type, not `{t}`"),
                "not an EC2 Mac type",
                "use e.g. `mac2.metal` (Apple silicon) or `mac1.metal` (Intel)".to_string(),
            )),
            Some(t) if pool.machine.os == Os::Linux && is_mac_metal(t) => out.push(problem(
                at("machine.instance_type"),
                At::Value,
                format!("`{t}` is an EC2 Mac type, but the pool's `os` is `linux`"),
                "macOS-only type",
                "set `os: macos`, or pick a Linux type such as `t3.large`".to_string(),
            )),
            Some(_) => {}
        }
        if fleet.ssh.is_none() && (!pool.setup.is_empty() || pool.runner.is_some()) {
            out.push(problem(
                at(if pool.setup.is_empty() { "runner" } else { "setup" }),
                At::Key,
                format!("pool `{}` runs commands on its machines, but the fleet file has no `ssh:` section", pool.name),
                "needs ssh",
                "add `ssh:` (user, key, known_hosts, and a proxy_command such as SSM) so nimbus can reach AWS machines"
                    .to_string(),
            ));
        }
        if pool.machine.os == Os::Macos
            && pool.machine.availability_zone.is_none()
            && pool.machine.availability_zones.is_none()
        {
            out.push(problem(
                at("machine"),
                At::Key,
                format!("pool `{}` runs macOS on dedicated hosts and needs `machine.availability_zone`", pool.name),
                "availability_zone missing",
                "dedicated hosts live in one zone, e.g. `availability_zone: us-east-1a`".to_string(),
            ));
        }
    }
}
