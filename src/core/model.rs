//! The unified machine model: what the fleet should be ([`Desired`], from the
//! config) and what exists ([`Actual`], from discovery). Both are plain data,
//! serialisable, so a discovery can be recorded (`nimbus discover`) and
//! planned against offline.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Arch, FleetConfig, Os, RunnerMode};

pub use super::names::*;

// ---------------------------------------------------------------- desired

/// What the fleet should be, derived from a validated config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Desired {
    pub tenant: String,
    pub providers: BTreeMap<String, ProviderInfo>,
    /// Whether a forge is configured (runner actions are planned only then).
    pub forge: bool,
    pub pools: Vec<DesiredPool>,
    /// Remove or replace machines whose runners are running a job, killing the job (`--interrupt-jobs`).
    /// Without it, a busy runner is never deregistered, relabelled or terminated: its removal waits.
    #[serde(default)]
    pub interrupt_jobs: bool,
    /// Machines a scale-down removes before any other (the library's `terminate` names the one that goes).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub remove_first: std::collections::BTreeSet<String>,
    /// Spending limits (`budget:`): allocations past them are deferred, never made silently.
    #[serde(default)]
    pub budget: crate::core::cost::Budget,
    /// The forge cannot change a runner's labels through its API (Forgejo, Gitea): a label change deregisters
    /// the runner and registers it again.
    #[serde(default)]
    pub forge_cannot_relabel: bool,
}

/// A provider as the planner sees it: its kind (for messages only) and its capabilities. The planner never
/// compares kinds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ProviderInfo {
    pub kind: String,
    pub capabilities: Capabilities,
    /// Dollars per hour by instance type, for this provider's region (defaults under `pricing:`).
    #[serde(default)]
    pub prices: BTreeMap<String, f64>,
    /// When its idle hosts past their window are released (`hosts.release`; a pool's wins).
    #[serde(default)]
    pub host_release: Option<crate::core::cost::ReleasePolicy>,
}

/// What a provider can do, as it describes itself (`providers::<kind>::config`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Capabilities {
    /// Instance types that run on a dedicated host, and that host's minimum allocation.
    #[serde(default)]
    pub hosts: Vec<HostPolicy>,
    /// How machines (or their hosts) are billed.
    #[serde(default)]
    pub billing_unit: BillingUnit,
    /// Whether a machine can be reimaged in place, keeping its host.
    #[serde(default)]
    pub reimage: bool,
    /// The least time a machine not on a dedicated host is billed for (EC2: 60 s).
    #[serde(default, with = "secs")]
    #[schemars(with = "u64")]
    pub minimum_billed: Duration,
}

/// Machines of some instance types live on a dedicated host that must be kept at least `min_allocation`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct HostPolicy {
    /// A pattern of instance types; `*` matches any run of characters (`mac*.metal`).
    pub instance_types: String,
    #[serde(with = "secs")]
    #[schemars(with = "u64")]
    pub min_allocation: Duration,
    /// Machines on such hosts are reimaged in place (keeping the host) rather than replaced.
    #[serde(default)]
    pub reimage: bool,
    /// Extra time past the window before a release (clock skew, billing granularity): fail late, never early.
    #[serde(default, with = "secs")]
    #[schemars(with = "u64")]
    pub margin: Duration,
    /// After a scrub, how long a host that reports available is still not usable.
    #[serde(default, with = "secs")]
    #[schemars(with = "u64")]
    pub post_available_delay: Duration,
    /// How long a scrub usually takes at most (for "expected by" in plans).
    #[serde(default, with = "secs")]
    #[schemars(with = "u64")]
    pub scrub_estimate: Duration,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BillingUnit {
    #[default]
    Free,
    Second,
    Hour,
}

impl HostPolicy {
    pub fn matches(&self, instance_type: &str) -> bool {
        glob_match(&self.instance_types, instance_type)
    }
}

/// `*`-only glob matching.
fn glob_match(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else { return false };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

impl Capabilities {
    /// The host policy for machines of `instance_type`, if they need a dedicated host.
    pub fn host_policy(&self, instance_type: &str) -> Option<&HostPolicy> {
        self.hosts.iter().find(|h| h.matches(instance_type))
    }

    /// The minimum time between allocating and releasing a host of `instance_type` (zero without hosts).
    pub fn min_allocation_for(&self, instance_type: &str) -> Duration {
        self.host_policy(instance_type).map(|h| h.min_allocation).unwrap_or_default()
    }

    /// How long after its allocation a host of `instance_type` may be released: its window plus the margin.
    pub fn releasable_after(&self, instance_type: &str) -> Duration {
        self.host_policy(instance_type).map(|h| h.min_allocation + h.margin).unwrap_or_default()
    }
}

impl ProviderInfo {
    /// Whether a machine of `instance_type` is reimaged in place (keeping its host) rather than replaced.
    pub fn reimages_in_place(&self, instance_type: Option<&str>) -> bool {
        match instance_type.and_then(|t| self.capabilities.host_policy(t)) {
            Some(h) => h.reimage,
            None => self.capabilities.reimage,
        }
    }

    /// The minimum time between allocating and releasing a host of `instance_type`.
    pub fn min_allocation_for(&self, instance_type: &str) -> Duration {
        self.capabilities.min_allocation_for(instance_type)
    }

    /// How long after its allocation a host of `instance_type` may be released (window plus margin).
    pub fn releasable_after(&self, instance_type: &str) -> Duration {
        self.capabilities.releasable_after(instance_type)
    }

    /// Whether machines of this type live on a dedicated host.
    pub fn needs_host(&self, instance_type: Option<&str>) -> bool {
        instance_type.is_some_and(|t| self.capabilities.host_policy(t).is_some())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct DesiredPool {
    pub name: String,
    pub provider: String,
    /// How many machines: the fleet file's `count`, or (a pool that follows demand) what
    /// [`crate::core::scale::follow_demand`] decided; `scale.min` until then.
    pub count: u32,
    /// The pool follows demand within these bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleSpec>,
    pub spec: MachineSpec,
    pub runner: Option<RunnerSpec>,
    pub setup: Vec<StepSpec>,
    /// A replacement on a dedicated host may allocate a new host rather than wait for the old one's scrub.
    #[serde(default)]
    pub allocate_on_replace: bool,
    /// When this pool's idle hosts past their window are released (`pools[].hosts.release`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_release: Option<crate::core::cost::ReleasePolicy>,
}

/// A pool's demand bounds (`scale:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct ScaleSpec {
    pub min: u32,
    pub max: u32,
    pub idle: u32,
    #[serde(with = "secs")]
    #[schemars(with = "u64")]
    pub idle_timeout: Duration,
    /// Windows overriding `min`/`idle` (`scale.schedule`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<WindowSpec>,
}

/// A validated `scale.schedule` window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct WindowSpec {
    /// Days it holds on: 0 = Monday … 6 = Sunday; empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<u8>,
    /// Minutes of the day, start included, end excluded; `None`: all day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<(u32, u32)>,
    /// IANA time zone.
    pub time_zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<u32>,
}

/// `scale.idle_timeout` unless the fleet file says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub struct MachineSpec {
    pub os: Os,
    pub arch: Arch,
    pub instance_type: Option<String>,
    pub image: String,
    pub availability_zone: Option<String>,
    /// More zones to try, in order, when `availability_zone` has no capacity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_zones: Vec<String>,
    /// The user's tags (`tags:` of the fleet, provider and pool, merged; the pool's win) on the machine, its
    /// host and its volumes. A change is made in place, never by a replacement.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// The user's tags among a resource's tags: every key but nimbus's own (`nimbus:*`) and AWS's (`aws:*`).
pub fn user_tags(t: &Tags) -> BTreeMap<String, String> {
    t.iter().filter(|(k, _)| !is_reserved_tag(k)).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Keys nimbus (`nimbus:`) or AWS (`aws:`, any case) reserve: never the user's.
pub fn is_reserved_tag(key: &str) -> bool {
    key.starts_with("nimbus:") || key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
}

impl MachineSpec {
    /// Whether a machine in `zone` fits the spec.
    pub fn allows_zone(&self, zone: Option<&str>) -> bool {
        match &self.availability_zone {
            None => true,
            Some(z) => {
                zone == Some(z.as_str()) || zone.is_some_and(|zone| self.fallback_zones.iter().any(|f| f == zone))
            }
        }
    }

    /// Every zone, in the order to try them.
    pub fn zones(&self) -> Vec<String> {
        self.availability_zone.iter().chain(self.fallback_zones.iter()).cloned().collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct RunnerSpec {
    pub labels: Vec<String>,
    pub mode: RunnerMode,
    /// How long the runner may be offline before it is repaired (`runner.offline_grace`).
    #[serde(default = "default_offline_grace", with = "secs")]
    #[schemars(with = "u64")]
    pub offline_grace: Duration,
    /// Reimage the machine after each job of an ephemeral runner (`runner.reimage`, on unless `never`).
    #[serde(default)]
    pub reimage_after_job: bool,
    /// The agent release the forge installs (`forge.runner_version`); a persistent runner with an older one is
    /// updated in place while idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// `runner.offline_grace` unless the fleet file says otherwise.
pub const DEFAULT_OFFLINE_GRACE: Duration = Duration::from_secs(600);

fn default_offline_grace() -> Duration {
    DEFAULT_OFFLINE_GRACE
}

impl RunnerSpec {
    pub fn new(labels: Vec<String>, mode: RunnerMode) -> Self {
        let reimage_after_job = mode == RunnerMode::Ephemeral;
        RunnerSpec { labels, mode, offline_grace: DEFAULT_OFFLINE_GRACE, reimage_after_job, agent_version: None }
    }
}

/// A setup step as the planner sees it: its name and a hash of its script.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct StepSpec {
    pub name: String,
    pub hash: String,
    /// The script itself. Not part of plan output (only name and hash are).
    pub run: String,
    /// How long it may run.
    #[serde(default = "default_step_timeout", with = "secs")]
    #[schemars(with = "u64")]
    pub timeout: Duration,
}

/// A setup step's `timeout` unless the fleet file says otherwise.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn default_step_timeout() -> Duration {
    DEFAULT_STEP_TIMEOUT
}

pub fn step_hash(run: &str) -> String {
    sha256_hex(run.as_bytes())[..16].to_string()
}

/// Lowercase hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Desired {
    /// Whether `h` is settled at `now`: EC2 Mac hosts are unusable for a while after they report available
    /// again after a scrub (the provider's `post_available_delay`). A host nimbus never saw scrubbing is.
    pub fn host_settled(&self, h: &Host, now: DateTime<Utc>) -> bool {
        let delay = self
            .providers
            .get(&h.provider)
            .and_then(|p| p.capabilities.host_policy(&h.instance_type))
            .map(|p| p.post_available_delay)
            .unwrap_or_default();
        h.available_since.is_none_or(|t| window_end_at(t, delay) <= now)
    }

    pub fn from_config(c: &FleetConfig) -> Desired {
        Desired {
            tenant: c.tenant.clone(),
            providers: c
                .providers
                .iter()
                .map(|(n, p)| {
                    (
                        n.clone(),
                        ProviderInfo {
                            kind: p.kind().to_string(),
                            capabilities: p.capabilities(),
                            prices: crate::core::cost::prices_for(p.region(), &c.pricing.clone().unwrap_or_default()),
                            host_release: p.host_release(),
                        },
                    )
                })
                .collect(),
            forge: c.has_forge(),
            interrupt_jobs: false,
            remove_first: Default::default(),
            budget: c.budget.as_ref().map(|b| b.to_budget()).unwrap_or_default(),
            forge_cannot_relabel: c
                .forge
                .iter()
                .chain(c.forges.iter().flat_map(|f| f.values()))
                .any(|f| !f.relabels_in_place()),
            pools: c
                .pools
                .iter()
                .map(|p| DesiredPool {
                    allocate_on_replace: p.mac_replacement == Some(crate::config::MacReplacement::Allocate),
                    host_release: p.hosts.as_ref().and_then(|h| h.release),
                    name: p.name.clone(),
                    provider: p.provider.clone(),
                    count: p.count.or(p.scale.as_ref().map(|s| s.min)).unwrap_or(0),
                    scale: p.scale.as_ref().map(|s| ScaleSpec {
                        min: s.min,
                        max: s.max,
                        idle: s.idle.unwrap_or(0),
                        idle_timeout: s.idle_timeout.map(|d| d.0).unwrap_or(DEFAULT_IDLE_TIMEOUT),
                        schedule: s
                            .schedule
                            .iter()
                            .map(|w| WindowSpec {
                                days: w.days.iter().map(|d| *d as u8).collect(),
                                hours: w.hours.as_deref().and_then(crate::core::scale::parse_hours),
                                time_zone: w.time_zone.clone().unwrap_or_else(|| "UTC".into()),
                                min: w.min,
                                idle: w.idle,
                            })
                            .collect(),
                    }),
                    spec: MachineSpec {
                        os: p.machine.os,
                        arch: p.machine.arch,
                        instance_type: p.machine.instance_type.clone(),
                        image: p.machine.image.clone(),
                        availability_zone: p
                            .machine
                            .availability_zone
                            .clone()
                            .or_else(|| p.machine.availability_zones.as_ref().and_then(|z| z.first().cloned())),
                        fallback_zones: p.machine.availability_zones.iter().flatten().skip(1).cloned().collect(),
                        tags: c.providers.get(&p.provider).and_then(|pc| pc.tags()).map_or_else(BTreeMap::new, |pt| {
                            let mut t = c.tags.clone();
                            t.extend(pt.iter().map(|(k, v)| (k.clone(), v.clone())));
                            t.extend(p.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
                            t
                        }),
                    },
                    runner: p.runner.as_ref().map(|r| RunnerSpec {
                        labels: r.labels.clone(),
                        mode: r.mode,
                        offline_grace: r.offline_grace.map(|d| d.0).unwrap_or(DEFAULT_OFFLINE_GRACE),
                        reimage_after_job: r.mode == RunnerMode::Ephemeral
                            && r.reimage != Some(crate::config::Reimage::Never),
                        agent_version: c.forge_of(p).map(|f| f.runner_version().to_string()),
                    }),
                    setup: p
                        .setup
                        .iter()
                        .map(|s| StepSpec {
                            name: s.name.clone(),
                            hash: step_hash(&s.run),
                            run: s.run.clone(),
                            timeout: s.timeout.map(|d| d.0).unwrap_or(DEFAULT_STEP_TIMEOUT),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn provider_kind(&self, name: &str) -> Option<&str> {
        self.providers.get(name).map(|p| p.kind.as_str())
    }
}

// ---------------------------------------------------------------- actual

/// What exists, as discovered (read-only) from providers, the forge and machines.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Actual {
    pub hosts: Vec<Host>,
    pub machines: Vec<ActualMachine>,
    /// Runners registered on the forge; `None` when no forge was read.
    pub runners: Option<Vec<ForgeRunner>>,
    /// Resources of this tenant that a provider found but could not read or attribute. They are left alone,
    /// and their machine names are never reused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unusable: Vec<Unusable>,
    /// Machines of this tenant that other fleet files manage: left alone, their names not reused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_fleets: Vec<OtherFleetResource>,
    /// The pools this fleet's journal has acted on. When known, a leftover runner is removed only if its pool is
    /// declared in the fleet file or is one of these: another fleet file's runners are never this fleet's
    /// ghosts. `None` (no journal read): every runner named for the tenant is a candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_pools: Option<std::collections::BTreeSet<String>>,
    /// Resources this fleet's runs made (the journal recorded what their idempotent calls returned) that
    /// discovery does not show yet: EC2's reads lag behind its writes. The plan waits for them, for a while,
    /// instead of making them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub made_unseen: Vec<MadeUnseen>,
}

/// A resource a run made that discovery has not seen yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MadeUnseen {
    pub provider: String,
    /// The machine it was made for.
    pub machine: String,
    /// `instance` or `host`.
    pub kind: String,
    /// The provider's id of what was made.
    pub id: String,
    /// The journal's run that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    pub made_at: DateTime<Utc>,
}

/// A resource of this tenant and provider that another fleet file manages (its `nimbus:fleet` tag): left alone,
/// and its machine name is not reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OtherFleetResource {
    pub provider: String,
    /// Provider id (instance id, host id, sandbox folder).
    pub id: String,
    /// The machine name it stands for, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The fleet it belongs to; empty when it has no `nimbus:fleet` tag (made before nimbus recorded fleets)
    /// and its pool is not in this fleet file.
    pub fleet: String,
}

/// A resource that carries this tenant's name but cannot be used: a damaged record, or a resource that
/// no provider can claim as its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Unusable {
    pub provider: String,
    /// Provider id (instance id, host id, sandbox folder).
    pub id: String,
    /// The machine name it stands for, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// What is wrong.
    pub reason: String,
    /// How to fix it.
    pub hint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Available,
    /// Being scrubbed after an instance stopped; cannot be used or released yet.
    Pending,
    UnderAssessment,
    PermanentFailure,
    Released,
}

/// The allocation time of a host that reports none: so late that its window never ends (fail closed).
pub const UNKNOWN_ALLOCATION: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

/// The end of a host's window: `allocated_at + after`, and never for an unknown allocation time.
pub fn window_end_at(allocated_at: DateTime<Utc>, after: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(after)
        .ok()
        .and_then(|d| allocated_at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// When `host` may be released: its allocation plus its provider's minimum window and margin. Hosts of
/// providers not in the fleet file are never planned for; should one get here, it is never due.
pub fn host_window_end(providers: &BTreeMap<String, ProviderInfo>, host: &Host) -> DateTime<Utc> {
    let Some(p) = providers.get(&host.provider) else { return DateTime::<Utc>::MAX_UTC };
    window_end_at(host.allocated_at, p.releasable_after(&host.instance_type))
}

/// A dedicated host (EC2 Mac).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Host {
    pub provider: String,
    pub id: String,
    pub tags: Tags,
    pub instance_type: String,
    pub availability_zone: String,
    pub state: HostState,
    /// When it was allocated. A host that does not say is given [`UNKNOWN_ALLOCATION`]: never releasable.
    pub allocated_at: DateTime<Utc>,
    /// When it came back available after a scrub nimbus saw (from the journal); `None` when nimbus never saw
    /// it scrubbing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_since: Option<DateTime<Utc>>,
    /// Instances currently placed on the host.
    #[serde(default)]
    pub instance_ids: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceState {
    /// Gone or going: not counted as a machine.
    pub fn is_gone(self) -> bool {
        matches!(self, InstanceState::ShuttingDown | InstanceState::Terminated)
    }
}

/// One machine: an instance (or sandbox) plus what it says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ActualMachine {
    pub provider: Sym,
    /// Provider id (EC2 instance id, sandbox folder).
    pub instance_id: String,
    pub tags: Tags,
    pub state: InstanceState,
    pub image: Sym,
    pub instance_type: Option<Sym>,
    pub availability_zone: Option<Sym>,
    pub host_id: Option<String>,
    pub launched_at: DateTime<Utc>,
    /// When nimbus first failed to reach it (kept in the journal across runs); `None` while reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<DateTime<Utc>>,
    /// Address to reach it on (never used in tests unless loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub on_machine: OnMachine,
}

impl ActualMachine {
    pub fn name(&self) -> Option<&str> {
        self.tags.get(tags::MACHINE)
    }
    pub fn pool(&self) -> Option<&str> {
        self.tags.get(tags::POOL)
    }
}

/// What the machine's own state database says, if it could be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OnMachine {
    /// Not read (the instance is not running yet, or discovery skipped it).
    NotRead,
    /// Tried and failed: the plan shows the machine as unreachable.
    Unreachable { reason: String },
    /// The machine answered, but its state database is empty or damaged. The plan repairs it.
    BadState { reason: String },
    /// Read successfully.
    Read { state: MachineState },
}

/// The on-machine state database, as the planner needs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MachineState {
    /// Completed (or failed) setup steps, in the order they ran.
    pub steps: Vec<StepRecord>,
    /// The runner the machine believes it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerRecord>,
    /// Where it is in its life, as its database says (`provisioning`, `image_installing`, `ready`, `running`,
    /// `stopping`, `terminated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Running,
    Done,
    Failed,
    /// Ran past its `timeout` and was killed.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepRecord {
    pub name: String,
    pub hash: String,
    pub status: StepStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunnerRecord {
    pub name: String,
    pub labels: Vec<String>,
    /// The forge's id of the runner the machine registered (when it recorded one): of two copies of one machine,
    /// the one whose id the forge knows is the one that stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<u64>,
    /// The runner agent release nimbus installed on the machine; `None`: unknown (an agent that came with the
    /// image, or a machine set up before nimbus recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// A runner registered on the forge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ForgeRunner {
    pub id: u64,
    pub name: String,
    pub labels: Vec<String>,
    pub online: bool,
    pub busy: bool,
    /// When nimbus first saw it offline (kept in the journal across runs); `None` while online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<DateTime<Utc>>,
    /// Since when it has been online and idle without a break (kept in the journal across runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<DateTime<Utc>>,
}

/// A job queued on the forge, waiting for a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QueuedJob {
    pub id: u64,
    /// The labels it asks for (`runs-on`): a runner must have every one.
    pub labels: Vec<String>,
    pub queued_at: DateTime<Utc>,
}

/// The JSON schema of an inventory (`schemas/inventory.schema.json`, `nimbus schema inventory`).
pub fn inventory_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&schemars::schema_for!(Inventory)).expect("schema serialises");
    s.push('\n');
    s
}

/// A recorded discovery, for `nimbus discover -o` / `plan --inventory`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Inventory {
    pub format_version: String,
    pub tenant: String,
    pub observed_at: DateTime<Utc>,
    pub actual: Actual,
}

pub const INVENTORY_FORMAT_VERSION: &str = "1.0";

impl Actual {
    /// A stable fingerprint of what was observed, for refusing stale saved plans.
    pub fn fingerprint(&self) -> String {
        let mut a = self.clone();
        a.hosts.sort_by(|x, y| (&x.provider, &x.id).cmp(&(&y.provider, &y.id)));
        a.machines.sort_by(|x, y| (&x.provider, &x.instance_id).cmp(&(&y.provider, &y.instance_id)));
        a.unusable.sort_by(|x, y| (&x.provider, &x.id).cmp(&(&y.provider, &y.id)));
        a.other_fleets.sort_by(|x, y| (&x.provider, &x.id).cmp(&(&y.provider, &y.id)));
        // What this fleet's journal remembers is not what exists.
        a.known_pools = None;
        a.made_unseen.clear();
        if let Some(r) = a.runners.as_mut() {
            r.sort_by_key(|r| r.id);
            // Online/busy flip constantly and do not change the plan.
            for x in r.iter_mut() {
                x.online = false;
                x.busy = false;
                x.offline_since = None;
                x.idle_since = None;
            }
        }
        sha256_hex(&serde_json::to_vec(&a).expect("actual serialises"))
    }
}

pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}
