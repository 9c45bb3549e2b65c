//! The `fleet.yaml` document model: the serde types the file is read into and
//! the JSON schema (`schemas/fleet.schema.json`) is generated from.
//!
//! Everything here is plain data. Rules a schema cannot state live in
//! [`super::validate`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The root of `fleet.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "nimbus fleet", description = "A declarative description of a CI runner fleet.")]
pub struct FleetConfig {
    /// Version of the fleet file format. Only `1` exists.
    pub version: u32,
    /// Tenant that owns every resource of this fleet. Resources are tagged `nimbus:tenant=<tenant>`;
    /// a run never touches another tenant's resources.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"), length(max = 32))]
    pub tenant: String,
    /// This fleet's id among the tenant's fleet files, tagged `nimbus:fleet=<id>` on everything it makes; a
    /// fleet file leaves another fleet's resources alone. Default: the file's path in its git repository
    /// (`fleets/mac.yaml`), or its name outside one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub fleet: Option<String>,
    /// Other fleets (by id) whose resources this fleet takes over: after a fleet file was moved or renamed, or
    /// to merge two fleets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_fleets: Option<Vec<String>>,
    /// Variables of nimbus's environment that every child it starts on this computer (`ssh.proxy_command`, a
    /// `local` provider's setup steps) gets besides PATH, HOME, LANG, LC_ALL, USER, LOGNAME, TMPDIR and TERM.
    /// `ssh.env_passthrough` and a provider's `env_passthrough` add to it for their own children.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_passthrough: Option<Vec<String>>,
    /// Your tags on every instance, host and volume nimbus makes (`team`, `cost-center`), for cost allocation;
    /// a provider's `tags` and a pool's add to them and win. Keys `nimbus:*` and `aws:*` are reserved.
    /// Applied by providers with tags (`aws`, `local`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Where machines come from, by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Where runners register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<ForgeConfig>,
    /// More forges, by name, for a fleet whose pools register with different forges: a pool names its own
    /// (`pools[].forge`); a pool that names none uses `forge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forges: Option<BTreeMap<String, ForgeConfig>>,
    /// How nimbus reaches machines over SSH (remote providers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshConfig>,
    /// Named groups of identical machines.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// The operator-side journal of runs, actions and events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalConfig>,
    /// Where the apply lock and the journal live: `local` (default: beside the fleet file) or `s3`, shared by
    /// every checkout of the fleet (CI jobs and laptops alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateConfig>,
    /// The long-running controller (`nimbus reconcile`): its interval and what it applies by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<ReconcileConfig>,
    /// Dollars per hour by instance type (`mac2.metal: 0.65`), or for one region (`"mac2.metal@eu-west-1": 0.74`),
    /// over nimbus's defaults (on-demand, us-east-1; `nimbus hosts` and plans say when they were taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<BTreeMap<String, f64>>,
    /// Spending limits: allocations past them are deferred with the reason, never made silently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
    /// Rego policies every plan and apply is checked against (conftest's conventions: `deny`/`warn` in package
    /// `main` or `nimbus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
}

/// `policy:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Files or folders of `.rego` policies, relative to the fleet file.
    pub paths: Vec<String>,
}

/// `budget:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// At most this many dedicated hosts of each instance type (`{mac2.metal: 10}`), allocated ones included.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max_hosts: BTreeMap<String, u32>,
    /// At most this much money committed by one plan (`"$500"`): host allocations' minimum windows and new
    /// instances' minimum billing, at the prices in `pricing:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_commit_per_plan: Option<String>,
}

impl BudgetConfig {
    pub fn to_budget(&self) -> crate::core::cost::Budget {
        crate::core::cost::Budget {
            max_hosts: self.max_hosts.clone(),
            max_commit_per_plan: self.max_commit_per_plan.as_deref().and_then(crate::core::cost::parse_money),
        }
    }
}

/// `hosts:` of a provider or a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostsConfig {
    /// When an idle host past its minimum window is released: `asap` (default), `end-of-window`,
    /// `{idle-for: 2h}`, or `never`. An idle host inside its paid window is always kept for demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<crate::core::cost::ReleasePolicy>,
}

/// Where a fleet's lock and journal live.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `local` (the default) or `s3`.
    pub backend: StateBackend,
    /// The S3 bucket (`s3` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The journal's object key (`s3` only), e.g. `nimbus/acme/journal.db`; the lock is `<key>.lock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The bucket's region (default: the AWS chain's, e.g. AWS_REGION).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// An S3-compatible endpoint (path-style addressing), e.g. a MinIO or test server. Default: AWS, or
    /// AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// How long the lock holds without renewal (default `2m`; renewed every third of it). A lock past it is
    /// reported as stale, never broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_lease: Option<HumanDuration>,
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
}

impl StateConfig {
    /// Who the S3 client acts as (`s3` only).
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
}

/// A state backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    #[default]
    Local,
    S3,
}

/// Where the journal lives and how long it keeps rows.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Journal database, relative to the fleet file (default `.nimbus/journal.db`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// How long runs and their actions are kept (default `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_actions: Option<HumanDuration>,
    /// How long events are kept (default `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_events: Option<HumanDuration>,
}

// Each kind's section is the provider's own type (`providers::<kind>::config`); a new provider adds one
// variant here, and every match on it is exhaustive.
/// A machine provider.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// Sandboxes on this computer: the default for trying nimbus and for tests.
    Local(crate::providers::local::config::LocalConfig),
    /// Amazon EC2: Linux instances, and macOS on dedicated hosts.
    Aws(crate::providers::aws::config::AwsConfig),
    /// Hetzner Cloud: servers, billed per started hour.
    Hetzner(crate::providers::hetzner::config::HetznerConfig),
}

impl ProviderConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Local(_) => "local",
            ProviderConfig::Aws(_) => "aws",
            ProviderConfig::Hetzner(_) => "hetzner",
        }
    }

    /// The provider's region, for prices.
    pub fn region(&self) -> Option<&str> {
        match self {
            ProviderConfig::Local(_) => None,
            ProviderConfig::Aws(c) => c.region.as_deref().or(Some("us-east-1")),
            ProviderConfig::Hetzner(c) => c.location.as_deref(),
        }
    }

    /// The provider's own `tags`; `None` when the provider cannot tag what it makes.
    pub fn tags(&self) -> Option<&BTreeMap<String, String>> {
        static NONE: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
        match self {
            ProviderConfig::Local(_) => Some(NONE.get_or_init(BTreeMap::new)),
            ProviderConfig::Aws(c) => Some(&c.tags),
            ProviderConfig::Hetzner(_) => None,
        }
    }

    /// `hosts.release` of the provider.
    pub fn host_release(&self) -> Option<crate::core::cost::ReleasePolicy> {
        match self {
            ProviderConfig::Local(_) => None,
            ProviderConfig::Aws(c) => c.hosts.and_then(|h| h.release),
            ProviderConfig::Hetzner(_) => None,
        }
    }

    /// What the planner needs to know about the provider (hosts and their windows, billing, reimage).
    pub fn capabilities(&self) -> crate::core::model::Capabilities {
        match self {
            ProviderConfig::Local(c) => c.capabilities(),
            ProviderConfig::Aws(c) => c.capabilities(),
            ProviderConfig::Hetzner(c) => c.capabilities(),
        }
    }

    /// The provider's own rules for a pool on it.
    pub fn validate_pool(
        &self,
        fleet: &FleetConfig,
        index: usize,
        pool: &PoolConfig,
        out: &mut Vec<super::validate::Problem>,
    ) {
        match self {
            ProviderConfig::Local(c) => c.validate_pool(fleet, index, pool, out),
            ProviderConfig::Aws(c) => c.validate_pool(fleet, index, pool, out),
            ProviderConfig::Hetzner(c) => c.validate_pool(fleet, index, pool, out),
        }
    }
}

// Each kind's section is the forge's own type (`forges::<kind>::config`).
/// The forge runners register with.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ForgeConfig {
    /// GitHub, through a GitHub App installed on the organisation.
    Github(crate::forges::github::config::GithubConfig),
    /// GitLab (gitlab.com or self-managed), through an access token.
    Gitlab(crate::forges::gitlab::config::GitlabConfig),
    /// Forgejo (or Gitea, `flavour: gitea`), through an access token.
    Forgejo(crate::forges::forgejo::config::ForgejoConfig),
}

impl FleetConfig {
    /// The forge of pool `pool`: the one it names in `forges`, or `forge`.
    pub fn forge_of(&self, pool: &PoolConfig) -> Option<&ForgeConfig> {
        match &pool.forge {
            Some(name) => self.forges.as_ref().and_then(|f| f.get(name)),
            None => self.forge.as_ref(),
        }
    }

    /// Whether any forge is configured.
    pub fn has_forge(&self) -> bool {
        self.forge.is_some() || self.forges.as_ref().is_some_and(|f| !f.is_empty())
    }
}

impl ForgeConfig {
    pub fn validate(&self, out: &mut Vec<super::validate::Problem>) {
        match self {
            ForgeConfig::Github(c) => c.validate(out),
            ForgeConfig::Gitlab(c) => c.validate(out),
            ForgeConfig::Forgejo(c) => c.validate(out),
        }
    }

    /// Whether the forge changes a runner's labels through its API (Forgejo and Gitea do not: the runner
    /// declares them, so a label change registers it again).
    pub fn relabels_in_place(&self) -> bool {
        !matches!(self, ForgeConfig::Forgejo(_))
    }

    /// The runner agent release machines run (`runner_version`, or the release this nimbus pins).
    pub fn runner_version(&self) -> &str {
        match self {
            ForgeConfig::Github(c) => {
                c.runner_version.as_deref().unwrap_or(crate::forges::github::agent::DEFAULT_RUNNER_VERSION)
            }
            ForgeConfig::Gitlab(c) => {
                c.runner_version.as_deref().unwrap_or(crate::forges::gitlab::DEFAULT_RUNNER_VERSION)
            }
            ForgeConfig::Forgejo(c) => c.runner_version.as_deref().unwrap_or(match c.flavour {
                crate::forges::forgejo::config::Flavour::Forgejo => {
                    crate::forges::forgejo::DEFAULT_FORGEJO_RUNNER_VERSION
                }
                crate::forges::forgejo::config::Flavour::Gitea => crate::forges::forgejo::DEFAULT_GITEA_RUNNER_VERSION,
            }),
        }
    }
}

/// SSH settings for reaching machines.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// Login user.
    pub user: String,
    /// Private key: `{env: VAR}` or `{file: path}`. Without it, ssh-agent is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SecretRef>,
    /// known_hosts file used to verify host keys. Keys first seen are pinned here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<PathBuf>,
    /// Command whose stdin/stdout is the SSH connection; OpenSSH tokens `%h %p %r %%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_command: Option<String>,
    /// Jump host, `user@host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_host: Option<String>,
    /// Port (default 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Where the state database lives on machines (default `/var/lib/nimbus/state.db`);
    /// `{machine}` is replaced by the machine's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_path: Option<String>,
    /// Seconds to wait for one SSH connection (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<HumanDuration>,
    /// `pin-on-first-apply` (default): `apply` records a new machine's host key on first contact, `plan`
    /// never writes known_hosts. `require-known`: every host key must already be in known_hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_policy: Option<HostKeyPolicy>,
    /// Variables of nimbus's environment that `proxy_command` gets besides PATH, HOME, LANG, LC_ALL, USER,
    /// LOGNAME, TMPDIR and TERM (e.g. `AWS_PROFILE` for SSM). Nothing else reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_passthrough: Option<Vec<String>>,
}

/// How nimbus trusts a machine's SSH host key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    PinOnFirstApply,
    RequireKnown,
}

/// A named group of identical machines.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name, unique in the fleet.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"), length(max = 40))]
    pub name: String,
    /// Name of an entry under `providers`.
    pub provider: String,
    /// How many machines the pool holds. A pool has either `count` or `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Follow demand instead of a fixed `count` (`nimbus reconcile`): queued jobs this pool can serve, its busy
    /// runners, and warm idle ones, within `min`..`max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleConfig>,
    /// What each machine is.
    pub machine: MachineSpecConfig,
    /// The runner each machine registers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerConfig>,
    /// Named setup steps, run in order once per machine (a changed step runs again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<SetupStepConfig>,
    /// On dedicated hosts (EC2 Mac): what a replacement does while its old host is scrubbed after the old
    /// instance ends (50 minutes to hours on EC2). `wait` (default): launch on that host once it is usable again,
    /// or on another idle usable host now; no new host is paid for. `allocate`: allocate a new host at once
    /// (at least 24 more host-hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_replacement: Option<MacReplacement>,
    /// When this pool's idle hosts are released (over the provider's `hosts:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostsConfig>,
    /// The forge (a name in `forges:`) this pool's runners register with; default: `forge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<String>,
    /// Tags on this pool's instances, hosts and volumes, over the fleet's and the provider's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// A pool that follows demand: desired size = clamp(busy + queued jobs it can serve + `idle`, `min`, `max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// Never fewer machines than this.
    #[serde(default)]
    pub min: u32,
    /// Never more machines than this.
    pub max: u32,
    /// Warm idle runners to keep for the next jobs (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<u32>,
    /// How long a runner must have been idle before scale-in may remove its machine (default `10m`): a
    /// short lull never removes a machine the next job needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<HumanDuration>,
    /// Windows (days, hours, a time zone) that override `min` and `idle` while they last, e.g. business
    /// hours. The first window that holds wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleWindow>,
}

/// A time window of a pool's `scale.schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleWindow {
    /// Days of the week (`mon` … `sun`) it holds on, in its time zone; default every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
    /// `HH:MM-HH:MM` in its time zone, end excluded (`22:00-06:00` crosses midnight); default all day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<String>,
    /// An IANA time zone, e.g. `Europe/Berlin` (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// `min` while the window holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// `idle` while the window holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<u32>,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// What `nimbus reconcile` applies on its own (`reconcile.auto_apply`); the rest waits for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutoApply {
    /// Creating and removing machines as a pool's count or demand says.
    Scale,
    /// In-place changes: setup steps, runner labels, runner registration.
    Update,
    /// Repairs: damaged state databases, stopped or unreachable machines, copies of a machine, ghost runners.
    Repair,
    /// Restarting offline runners' agents.
    Restart,
    /// Reimaging (or replacing) an ephemeral runner's machine after its job.
    Reimage,
    /// Releasing idle hosts whose minimum allocation window has passed.
    ReleaseHosts,
    /// Replacements the fleet file asks for (a new image, instance type or zone). Not by default.
    Replace,
    /// Removing a pool (or moving it to another provider). Not by default.
    RemovePool,
}

/// The controller's settings (`nimbus reconcile`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Time between iterations (default `30s`); `--interval` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
    /// What it applies by itself. Default: `[scale, update, repair, restart, reimage, release_hosts]`; the rest
    /// (`replace`, `remove_pool`) is logged, shown in `nimbus plan`, and counted as pending review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_apply: Option<Vec<AutoApply>>,
    /// How long a stopping controller lets running actions finish before it abandons them (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<HumanDuration>,
    /// How long a queued job may wait with no pool able to take it (labels no pool has, or `max` reached)
    /// before the plan, the iteration line and the metrics say so (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_after: Option<HumanDuration>,
    /// The secret GitHub signs webhook deliveries with (`X-Hub-Signature-256`): `{env: VAR}` or `{file: path}`,
    /// never inline. With it, `POST /webhook` on `--listen` accepts `workflow_job` events, only to start the
    /// next iteration early; the loop reads the forge every interval anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<SecretRef>,
}

/// See [`PoolConfig::mac_replacement`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MacReplacement {
    #[default]
    Wait,
    Allocate,
}

/// Operating system of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Macos,
    Linux,
}

/// CPU architecture of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Arm64,
    X86_64,
}

/// The machine spec of a pool.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineSpecConfig {
    pub os: Os,
    pub arch: Arch,
    /// Provider instance type (`mac2.metal`, `t3.large`, …); free text for `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Image (an AMI id on AWS; a label for `local`). A change replaces the machine.
    pub image: String,
    /// Availability zone (AWS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// Several zones, tried in order when one has no capacity (instead of `availability_zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zones: Option<Vec<String>>,
}

/// How runners behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunnerMode {
    /// One runner that takes job after job.
    #[default]
    Persistent,
    /// A just-in-time runner that takes one job.
    Ephemeral,
}

/// The runner registered on each machine of a pool.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// Labels (in addition to the forge's defaults). A change is made in place.
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub mode: RunnerMode,
    /// How long a registered runner may be offline (on a reachable machine) before nimbus restarts its
    /// agent, or its machine unreachable before nimbus replaces it (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_grace: Option<HumanDuration>,
    /// `after_job` (the default for `mode: ephemeral`): the machine is reimaged after each job, before it
    /// registers again, so no job sees another's files. `never` opts out (a warning says what that means).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reimage: Option<Reimage>,
}

/// When an ephemeral runner's machine is reimaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reimage {
    AfterJob,
    Never,
}

/// A named setup step: a POSIX shell script run on the machine.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupStepConfig {
    /// Step name, unique in the pool.
    pub name: String,
    /// Shell script.
    pub run: String,
    /// How long the step may run (default `30m`). On expiry its process group on the machine is killed, and
    /// the journal (TIMEOUT) and the machine's state say it timed out; the next apply runs it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

/// A duration written as `24h`, `90m`, `1h 30m`, `0s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(HumanDuration).map_err(|e| {
            de::Error::custom(format_args!("invalid duration `{s}`: {e}; write it like `24h`, `90m` or `1h 30m`"))
        })
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as `24h`, `90m` or `1h 30m`.",
            "pattern": r"^\s*[0-9]+\s*[a-zA-Z]+(\s*[0-9]+\s*[a-zA-Z]+)*\s*$"
        })
    }
}

/// A reference to a secret. Secrets are never written inline in the fleet file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretRef {
    /// Read from this environment variable.
    Env(String),
    /// Read from this file (relative to the fleet file).
    File(PathBuf),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(v) => write!(f, "{{env: {v}}}"),
            SecretRef::File(p) => write!(f, "{{file: {}}}", p.display()),
        }
    }
}

/// The marker nimbus puts in error messages for a secret written inline;
/// the validator turns it into a diagnostic with a hint.
pub const INLINE_SECRET: &str = "a secret must not be written inline";

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`{env: VAR}` or `{file: path}`")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretRef, E> {
                // Never echo the value: it may be the secret itself.
                Err(E::custom(INLINE_SECRET))
            }
            // A secret that YAML reads as a number or a boolean is still a secret written inline, and the
            // default error ("invalid type: integer `8675309…`") would echo it.
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretRef, E> {
                Err(E::custom(INLINE_SECRET))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretRef, E> {
                Err(E::custom(INLINE_SECRET))
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<SecretRef, E> {
                Err(E::custom(INLINE_SECRET))
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<SecretRef, E> {
                Err(E::custom(INLINE_SECRET))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretRef, E> {
                Err(E::custom(INLINE_SECRET))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretRef, E> {
                Err(E::custom(INLINE_SECRET))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
                let mut out: Option<SecretRef> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if out.is_some() {
                        return Err(de::Error::custom("a secret reference takes exactly one of `env` or `file`"));
                    }
                    if value.trim().is_empty() {
                        return Err(de::Error::custom(format_args!("`{key}` must not be empty")));
                    }
                    out = Some(match key.as_str() {
                        "env" => SecretRef::Env(value),
                        "file" => SecretRef::File(PathBuf::from(value)),
                        other => {
                            return Err(de::Error::unknown_field(other, &["env", "file"]));
                        }
                    });
                }
                out.ok_or_else(|| de::Error::custom("a secret reference needs `env` or `file`"))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for SecretRef {
    fn schema_name() -> Cow<'static, str> {
        "SecretRef".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A secret, read from the environment or a file; never written inline.",
            "oneOf": [
                {
                    "type": "object",
                    "properties": { "env": { "type": "string", "minLength": 1 } },
                    "required": ["env"],
                    "additionalProperties": false
                },
                {
                    "type": "object",
                    "properties": { "file": { "type": "string", "minLength": 1 } },
                    "required": ["file"],
                    "additionalProperties": false
                }
            ]
        })
    }
}
