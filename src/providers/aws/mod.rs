//! The `aws` provider: EC2 Mac dedicated hosts and Linux instances through
//! nimbus's own small EC2 client ([`ec2`]; credentials and region from aws-config).
//!
//! - Credentials and region come from the standard AWS chain; the endpoint
//!   from `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_EC2` (how tests reach moto).
//! - Discovery is one paginated DescribeHosts and one paginated
//!   DescribeInstances per page of results, filtered by the tenant's tags on
//!   the server and again here, so another tenant's resources never get
//!   through even when a server ignores a filter.
//! - Every create first looks for the resource by its deterministic tags, so
//!   a re-run never allocates or launches twice; a ClientToken covers retries.
//! - nimbus enforces its own rules before releasing a host: it must be ours,
//!   idle, and past its minimum allocation window.
//! - Throttling (`RequestLimitExceeded`) is retried with backoff by the client;
//!   a client-side token bucket keeps within EC2's request buckets.

pub mod clock;
pub mod config;
pub mod credentials;
pub mod ec2;
pub mod limits;
pub mod reach;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use chrono::{DateTime, Utc};
use ec2::{Ec2Client, Ec2Error, Ec2Host, Ec2Instance, Filter, Params};

use super::{AllocatedHost, Discovered, HostRequest, LaunchRequest, MachineRef, Provider, ProviderError};
use crate::core::model::{
    ActualMachine, FleetScope, Host, HostState, InstanceState, OnMachine, OtherFleetResource, Ownership, Tags,
    Unusable, machine_tags, owned_by, ownership, tags, with_user_tags,
};
use crate::transport::Transport;
pub use limits::{Limits, TokenBucket};

/// Every EC2 operation this provider calls; `examples/aws-mac/iam-policy.json` must allow each.
pub const EC2_OPERATIONS: &[&str] = &[
    "DescribeHosts",
    "DescribeInstances",
    "AllocateHosts",
    "RunInstances",
    "CreateTags",
    "DeleteTags",
    "TerminateInstances",
    "ReleaseHosts",
    "CreateReplaceRootVolumeTask",
    "DescribeReplaceRootVolumeTasks",
];

/// Provider settings from the fleet file.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    pub region: Option<String>,
    /// EC2 endpoint instead of the standard chain's (a VPC endpoint; a test peer).
    pub endpoint_url: Option<String>,
    /// Results per Describe* page (default 100 hosts, 1,000 instances; EC2 allows 5 to 1,000).
    pub page_size: Option<i32>,
    /// Attempts per call, retries of throttling and transient errors included (default 8).
    pub max_attempts: Option<u32>,
    /// Time past a host's window before it may be released (default 5 minutes).
    pub window_margin: Option<Duration>,
    pub min_allocation: Option<Duration>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    /// Who the provider's clients act as (default: the standard chain).
    pub identity: credentials::AwsIdentity,
    /// Resolves relative `{file:}` paths of the identity (the fleet file's folder).
    pub base_dir: std::path::PathBuf,
}

/// Builds a transport to a machine (SSH, in issue 5's terms); `None` when machines cannot be reached.
pub type TransportFactory = Arc<dyn Fn(&MachineRef) -> Option<Arc<dyn Transport>> + Send + Sync>;

pub struct AwsProvider {
    name: String,
    tenant: String,
    client: Ec2Client,
    settings: AwsSettings,
    limits: Limits,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    transport: Option<TransportFactory>,
    /// Part of every ClientToken: one run's retries share a token, a later run never reuses it.
    run_token: String,
    adopt_legacy: bool,
    /// The fleet file it works for; `None`: all of the tenant's resources.
    fleet: Option<FleetScope>,
    clock: clock::ClockWatch,
}

/// The generation tag of a host allocated under an idempotency key: not the key itself (it is not a secret,
/// but there is no need to show it), a short digest of it.
fn generation(key: &str) -> String {
    crate::core::model::sha256_hex(format!("generation|{key}").as_bytes())[..16].to_string()
}

fn err(provider: &str, op: &str, e: impl std::fmt::Display) -> ProviderError {
    let message = format!("{op}: {e}");
    if message.contains("refusing") {
        ProviderError::conflict(provider, message)
    } else {
        ProviderError::other(provider, message)
    }
}

/// The service's error code and message (`InsufficientHostCapacity: ...`), by what the caller can do about it.
fn ec2_err(provider: &str, op: &str, e: Ec2Error) -> ProviderError {
    tracing::debug!(provider, op, error = ?e, "EC2 call failed");
    let message = format!("{op}: {e}");
    let provider = provider.to_string();
    if matches!(e, Ec2Error::Credentials(_)) {
        return ProviderError::Auth { provider, message };
    }
    match e.code().map(classify) {
        Some(Class::NotFound) => ProviderError::NotFound { provider, message },
        Some(Class::Throttled) => ProviderError::Throttled { provider, message },
        Some(Class::Auth) => ProviderError::Auth { provider, message },
        Some(Class::Capacity) => ProviderError::Capacity { provider, message },
        Some(Class::Conflict) => ProviderError::Conflict { provider, message },
        _ => ProviderError::Other { provider, message, source: Some(Box::new(e)) },
    }
}

enum Class {
    NotFound,
    Throttled,
    Auth,
    Capacity,
    Conflict,
    Other,
}

/// EC2 error codes by what the caller can do about them.
fn classify(code: &str) -> Class {
    match code {
        c if ec2::THROTTLING_CODES.contains(&c) => Class::Throttled,
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "AccessDenied"
        | "AccessDeniedException"
        | "OptInRequired" => Class::Auth,
        "InsufficientHostCapacity"
        | "InsufficientInstanceCapacity"
        | "HostLimitExceeded"
        | "InstanceLimitExceeded"
        | "InsufficientCapacity" => Class::Capacity,
        "IncorrectState" | "IncorrectInstanceState" | "IdempotentParameterMismatch" | "InvalidHost.Occupied" => {
            Class::Conflict
        }
        c if c.ends_with(".NotFound") || c.ends_with(".Malformed") && c.starts_with("InvalidInstanceID") => {
            Class::NotFound
        }
        _ => Class::Other,
    }
}

/// A host's allocation time; one that is missing or unreadable is never releasable (fail closed).
fn allocation_time(h: &Ec2Host) -> DateTime<Utc> {
    h.allocated_at.unwrap_or(crate::core::model::UNKNOWN_ALLOCATION)
}

const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down"];

impl AwsProvider {
    /// Loads the AWS configuration (credentials, region, endpoint) from the standard chain.
    pub async fn new(name: &str, tenant: &str, settings: AwsSettings) -> Result<Self, ProviderError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &settings.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }

        let sdk = settings
            .identity
            .load(loader, &settings.base_dir)
            .await
            .map_err(|e| ProviderError::Auth { provider: name.to_string(), message: e })?;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(err(name, "configuration", "no AWS region: set `region:` on the provider, or AWS_REGION"));
        };
        let run_token = format!("{:x}", Utc::now().timestamp_millis());
        let clock = clock::ClockWatch::default();
        // An explicit endpoint is set on the client, above any AWS_ENDPOINT_URL* setting.
        let endpoint = ec2::resolve_endpoint(settings.endpoint_url.as_deref(), &sdk, &region);
        let client = Ec2Client::new(
            endpoint,
            region,
            sdk.credentials_provider(),
            settings.max_attempts.unwrap_or(8),
            name,
            tenant,
            clock.clone(),
        )
        .map_err(|e| err(name, "configuration", e))?;
        Ok(AwsProvider {
            name: name.to_string(),
            tenant: tenant.to_string(),
            client,
            settings,
            limits: Limits::default(),
            calls: Mutex::new(BTreeMap::new()),
            transport: None,
            run_token,
            adopt_legacy: false,
            fleet: None,
            clock,
        })
    }

    /// Resources without a `nimbus:provider` tag (made before nimbus recorded providers) are this
    /// provider's. Set it only when this is the fleet's one `aws` provider.
    pub fn adopting_legacy(mut self, adopt: bool) -> Self {
        self.adopt_legacy = adopt;
        self
    }

    /// Works for one fleet file: what it makes carries the fleet's `nimbus:fleet` tag, and another fleet's
    /// resources are left alone.
    pub fn with_fleet(mut self, fleet: FleetScope) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// The service's error, as [`ec2_err`] says it; a refusal also says who this provider acted as.
    fn ec2_err(&self, op: &str, e: Ec2Error) -> ProviderError {
        match ec2_err(&self.name, op, e) {
            ProviderError::Auth { provider, message } => ProviderError::Auth {
                message: format!("{message} (provider `{provider}` acts as {})", self.settings.identity.describe()),
                provider,
            },
            other => other,
        }
    }

    fn ownership(&self, t: &Tags) -> Ownership {
        ownership(t, &self.tenant, &self.name, self.adopt_legacy, self.fleet.as_ref())
    }

    fn tags_for(&self, pool: &str, machine: &str) -> Tags {
        machine_tags(&self.tenant, &self.name, pool, machine, self.fleet.as_ref().map(|f| f.id.as_str()))
    }

    fn mine(&self, t: &Tags) -> bool {
        self.ownership(t) == Ownership::Mine
    }

    fn not_mine(&self, what: &str, id: &str, t: &Tags) -> ProviderError {
        let why = match self.ownership(t) {
            Ownership::OtherProvider => {
                format!("it belongs to provider `{}`", t.get(tags::PROVIDER).unwrap_or("?"))
            }
            Ownership::Unattributed => "it has no `nimbus:provider` tag".to_string(),
            Ownership::OtherFleet => {
                format!("it belongs to fleet `{}`", t.get(tags::FLEET).unwrap_or("?"))
            }
            _ => "it is not tagged for this tenant".to_string(),
        };
        err(
            &self.name,
            what,
            format!("refusing: `{id}` is not tenant `{}`'s resource of provider `{}` ({why})", self.tenant, self.name),
        )
    }

    /// The provider of a fleet file's `aws` section; machines are reached over the fleet's SSH, if any.
    pub async fn from_config(
        name: &str,
        c: &config::AwsConfig,
        ctx: &super::BuildContext,
    ) -> Result<Self, ProviderError> {
        let settings = AwsSettings {
            region: c.region.clone(),
            endpoint_url: None,
            page_size: None,
            max_attempts: None,
            window_margin: c.window_margin.map(|d| d.0),
            min_allocation: c.min_allocation.map(|d| d.0),
            subnet_id: c.subnet_id.clone(),
            security_group_ids: c.security_group_ids.clone(),
            key_name: c.key_name.clone(),
            identity: c.identity(),
            base_dir: ctx.base_dir.clone(),
        };
        let mut aws = AwsProvider::new(name, &ctx.tenant, settings)
            .await?
            .adopting_legacy(ctx.sole_of_kind)
            .with_fleet(ctx.fleet.clone());
        if let Some(ssh) = &ctx.ssh {
            aws = aws.with_transport(reach::over_ssh(ssh.clone()));
        }
        Ok(aws)
    }

    /// Machines are reached through this factory (SSH).
    pub fn with_transport(mut self, f: TransportFactory) -> Self {
        self.transport = Some(f);
        self
    }

    /// How many calls of each EC2 operation this provider made.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().expect("lock").clone()
    }

    fn count(&self, op: &'static str) {
        debug_assert!(EC2_OPERATIONS.contains(&op), "{op} is missing from EC2_OPERATIONS");
        *self.calls.lock().expect("lock").entry(op).or_default() += 1;
    }

    fn window(&self, instance_type: &str) -> Duration {
        config::AwsConfig {
            min_allocation: self.settings.min_allocation.map(crate::config::HumanDuration),
            window_margin: self.settings.window_margin.map(crate::config::HumanDuration),
            ..Default::default()
        }
        .window(instance_type)
    }

    /// The ClientToken of one call: from the journal's idempotency key when the engine gave one (a rerun of an
    /// interrupted action sends the same token, so EC2 returns what the first call made), else this run's.
    fn token(&self, what: &str, machine: &str, key: Option<&str>) -> String {
        // ≤ 64 ASCII characters.
        let key = key.unwrap_or(&self.run_token);
        let h = crate::core::model::sha256_hex(format!("{}|{what}|{machine}|{key}", self.tenant).as_bytes());
        format!("nimbus-{}", &h[..40])
    }

    fn tenant_filters(&self) -> Vec<Filter> {
        vec![
            Filter::new(&format!("tag:{}", tags::TENANT), &[&self.tenant]),
            Filter::new(&format!("tag:{}", tags::MANAGED_BY), &[tags::MANAGED_BY_VALUE]),
        ]
    }

    /// Every page of a Describe* call (`req` without its NextToken), one call per page, keeping only this
    /// tenant's resources (again here, should a server ignore a filter).
    async fn describe_all<T>(
        &self,
        req: Params,
        read: impl Fn(&ec2::El<'_>) -> (Vec<T>, Option<String>),
        tags: impl Fn(&T) -> &Tags,
    ) -> Result<Vec<T>, ProviderError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            self.limits.describe.acquire().await;
            self.count(req.action());
            let page = req.clone().set_opt("NextToken", next.take());
            let (items, token) = self.client.call(&page, &read).await.map_err(|e| self.ec2_err(req.action(), e))?;
            out.extend(items.into_iter().filter(|i| owned_by(tags(i), &self.tenant)));
            match token {
                Some(t) => next = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// This tenant's hosts (paginated; one call per page).
    async fn list_hosts(&self, extra: Vec<Filter>, ids: Vec<String>) -> Result<Vec<Ec2Host>, ProviderError> {
        let mut req = Params::new("DescribeHosts");
        if ids.is_empty() {
            let filters: Vec<Filter> = self.tenant_filters().into_iter().chain(extra).collect();
            req = req.filters(&filters).set("MaxResults", self.settings.page_size.unwrap_or(100).to_string());
        } else {
            req = req.list("HostId", &ids);
        }
        self.describe_all(req, ec2::read_hosts, |h| &h.tags).await
    }

    /// One host by id, whoever owns it (the caller checks): a host of another tenant is refused as such, not
    /// mistaken for one EC2 does not show yet.
    async fn describe_host(&self, id: &str) -> Result<Option<Ec2Host>, ProviderError> {
        self.limits.describe.acquire().await;
        self.count("DescribeHosts");
        let req = Params::new("DescribeHosts").list("HostId", &[id]);
        let (hosts, _) = self.client.call(&req, ec2::read_hosts).await.map_err(|e| self.ec2_err("DescribeHosts", e))?;
        Ok(hosts.into_iter().find(|h| h.id == id))
    }

    /// This tenant's live instances (paginated; one call per page).
    async fn list_instances(&self, extra: Vec<Filter>) -> Result<Vec<Ec2Instance>, ProviderError> {
        let mut filters = self.tenant_filters();
        filters.push(Filter::new("instance-state-name", LIVE_STATES));
        filters.extend(extra);
        let req = Params::new("DescribeInstances")
            .filters(&filters)
            .set("MaxResults", self.settings.page_size.unwrap_or(1000).to_string());
        self.describe_all(req, ec2::read_instances, |i| &i.tags).await
    }

    async fn describe_instance(&self, id: &str) -> Result<Option<Ec2Instance>, ProviderError> {
        self.limits.describe.acquire().await;
        self.count("DescribeInstances");
        let req = Params::new("DescribeInstances").list("InstanceId", &[id]);
        match self.client.call(&req, ec2::read_instances).await {
            Ok((instances, _)) => Ok(instances.into_iter().find(|i| i.id == id)),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(None),
            Err(e) => Err(self.ec2_err("DescribeInstances", e)),
        }
    }

    async fn create_tags(&self, resources: &[String], t: &Tags) -> Result<(), ProviderError> {
        self.limits.mutate.acquire().await;
        self.count("CreateTags");
        let req = Params::new("CreateTags").list("ResourceId", resources).tags("Tag", t);
        self.client.call(&req, ec2::read_nothing).await.map_err(|e| self.ec2_err("CreateTags", e))
    }

    /// Removes the tags `keys` (whatever their values) from `resources`.
    async fn delete_tags(&self, resources: &[String], keys: &[String]) -> Result<(), ProviderError> {
        self.limits.mutate.acquire().await;
        self.count("DeleteTags");
        let req = Params::new("DeleteTags").list("ResourceId", resources).tag_keys("Tag", keys);
        self.client.call(&req, ec2::read_nothing).await.map_err(|e| self.ec2_err("DeleteTags", e))
    }
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn discover(&self, tenant: &str) -> Result<Discovered, ProviderError> {
        if tenant != self.tenant {
            return Err(err(&self.name, "discover", format!("provider was built for tenant `{}`", self.tenant)));
        }
        let (hosts, instances) = tokio::try_join!(self.list_hosts(vec![], vec![]), self.list_instances(vec![]))?;
        let mut unusable = Vec::new();
        let mut other_fleets = Vec::new();
        let mut keep = |id: &str, t: &Tags| match self.ownership(t) {
            Ownership::Mine => true,
            Ownership::Unattributed => {
                unusable.push(Unusable {
                    provider: self.name.clone(),
                    id: id.to_string(),
                    machine: t.get(tags::MACHINE).map(str::to_string),
                    reason: format!(
                        "`{id}` has no `{}` tag, and the fleet has more than one `aws` provider",
                        tags::PROVIDER
                    ),
                    hint: format!(
                        "tag it `{}={}` or with the name of the provider it belongs to",
                        tags::PROVIDER,
                        self.name
                    ),
                });
                false
            }
            Ownership::OtherFleet => {
                other_fleets.push(OtherFleetResource {
                    provider: self.name.clone(),
                    id: id.to_string(),
                    machine: t.get(tags::MACHINE).map(str::to_string),
                    fleet: t.get(tags::FLEET).map(str::to_string).unwrap_or_default(),
                });
                false
            }
            Ownership::OtherProvider | Ownership::NotOurs => false,
        };
        let hosts: Vec<_> = hosts.into_iter().filter(|h| keep(&h.id, &h.tags)).collect();
        let instances: Vec<_> = instances.into_iter().filter(|i| keep(&i.id, &i.tags)).collect();
        // Which instance runs on which host: from the host, and from the instance's placement.
        let mut on_host: HashMap<String, Vec<String>> = HashMap::new();
        let mut machines = Vec::new();
        for i in instances {
            if let Some(h) = &i.host_id
                && !i.state.is_gone()
            {
                on_host.entry(h.clone()).or_default().push(i.id.clone());
            }
            machines.push(ActualMachine {
                provider: self.name.as_str().into(),
                instance_id: i.id,
                tags: i.tags,
                state: i.state,
                image: i.image_id.as_str().into(),
                instance_type: i.instance_type.as_deref().map(crate::core::model::Sym::from),
                availability_zone: i.availability_zone.as_deref().map(crate::core::model::Sym::from),
                host_id: i.host_id,
                launched_at: i.launched_at.unwrap_or(DateTime::UNIX_EPOCH),
                address: i.private_ip,
                on_machine: OnMachine::NotRead,
                unreachable_since: None,
            });
        }
        let hosts = hosts
            .into_iter()
            .map(|h| {
                let allocated_at = allocation_time(&h);
                let mut instance_ids = h.instances;
                for i in on_host.remove(&h.id).unwrap_or_default() {
                    if !instance_ids.contains(&i) {
                        instance_ids.push(i);
                    }
                }
                Host {
                    provider: self.name.clone(),
                    instance_type: h.instance_type.unwrap_or_default(),
                    availability_zone: h.availability_zone,
                    state: h.state,
                    allocated_at,
                    available_since: None,
                    tags: h.tags,
                    instance_ids,
                    id: h.id,
                }
            })
            .filter(|h| h.state != HostState::Released)
            .collect();
        Ok(Discovered { hosts, machines, unusable, other_fleets })
    }

    async fn allocate_host(&self, req: &HostRequest) -> Result<String, ProviderError> {
        self.allocate_host_in_zone(req).await.map(|h| h.host_id)
    }

    async fn allocate_host_in_zone(&self, req: &HostRequest) -> Result<AllocatedHost, ProviderError> {
        let generation = req.idempotency_key.as_deref().map(generation);
        // Found by its tags first: a re-run never allocates twice.
        let existing = self
            .list_hosts(vec![Filter::new(&format!("tag:{}", tags::MACHINE), &[&req.machine])], vec![])
            .await?
            .into_iter()
            .find(|h| {
                let t = &h.tags;
                // Hosts the plan knows about are decided already (kept, reused, or released): a stale tag on
                // one of them must not promise it to this machine too.
                !req.exclude_hosts.contains(&h.id)
                    && self.mine(t)
                    && t.get(tags::MACHINE) == Some(&req.machine)
                    // With a journaled key, only this creation's host (a killed run's): not an earlier one's.
                    && generation.as_ref().is_none_or(|g| t.get(tags::GENERATION) == Some(g))
                    && h.instances.is_empty()
                    // Only a usable host of the kind asked for: never one being scrubbed (it cannot take an
                    // instance for hours), never one of an old instance type or another zone.
                    && h.state == HostState::Available
                    && h.instance_type.as_deref() == Some(req.instance_type.as_str())
                    && (h.availability_zone == req.availability_zone
                        || req.fallback_zones.contains(&h.availability_zone))
            });
        if let Some(h) = existing {
            return Ok(AllocatedHost { host_id: h.id, availability_zone: h.availability_zone });
        }
        // nimbus's own tags always win over the user's (validation refuses reserved keys anyway).
        let mut host_tags = with_user_tags(&req.tags, self.tags_for(&req.pool, &req.machine));
        if let Some(g) = &generation {
            host_tags.insert(tags::GENERATION, g.clone());
        }
        // The pool's zones in order: a zone without capacity gives way to the next.
        let zones: Vec<&String> = std::iter::once(&req.availability_zone).chain(req.fallback_zones.iter()).collect();
        let mut last = None;
        for (i, zone) in zones.iter().enumerate() {
            self.limits.mutate.acquire().await;
            self.count("AllocateHosts");
            let call = Params::new("AllocateHosts")
                .set("InstanceType", req.instance_type.as_str())
                .set("AvailabilityZone", zone.as_str())
                .set("Quantity", "1")
                .set("ClientToken", self.token(&format!("host@{zone}"), &req.machine, req.idempotency_key.as_deref()))
                .tag_specification(1, "dedicated-host", &host_tags);
            let sent = self.client.call(&call, ec2::read_host_ids).await.map_err(|e| self.ec2_err("AllocateHosts", e));
            if sent.is_ok() {
                crate::util::failpoint::after("AllocateHosts");
            }
            match sent {
                Ok(out) => {
                    let id = out
                        .into_iter()
                        .next()
                        .ok_or_else(|| err(&self.name, "AllocateHosts", "no host id returned"))?;
                    if i > 0 {
                        tracing::warn!(event = "nimbus.host.zone_fallback", machine = %req.machine, zone = %zone, host = %id, "allocated `{id}` for `{}` in {zone}: the zones before it had no capacity", req.machine);
                    }
                    return Ok(AllocatedHost { host_id: id, availability_zone: zone.to_string() });
                }
                Err(e @ ProviderError::Capacity { .. }) if i + 1 < zones.len() => {
                    tracing::warn!(event = "nimbus.host.zone_no_capacity", machine = %req.machine, zone = %zone, error = %e, "no capacity in {zone}; trying the next zone");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| err(&self.name, "AllocateHosts", "no zone to allocate in")))
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<String, ProviderError> {
        let tags = self.tags_for(&req.pool, &req.machine);
        // What the instance, its volumes and a reused host carry: the user's tags, and nimbus's (which win).
        let all_tags = with_user_tags(&req.spec.tags, tags.clone());
        let existing = self
            .list_instances(vec![Filter::new(&format!("tag:{}", tags::MACHINE), &[&req.machine])])
            .await?
            .into_iter()
            .find(|i| self.mine(&i.tags) && i.tags.get(tags::MACHINE) == Some(&req.machine) && !i.state.is_gone());
        if let Some(i) = existing {
            return Ok(i.id);
        }
        if let Some(h) = &req.host_id {
            // EC2 places one instance on a Mac host (moto allows more): never ask for a second.
            let mut host = self.describe_host(h).await?;
            // EC2's reads lag its writes: a host allocated a moment ago may not show yet.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut delay = Duration::from_millis(250);
            while host.is_none() && Instant::now() < deadline {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                host = self.describe_host(h).await?;
            }
            match host {
                Some(host) if self.mine(&host.tags) && host.state != HostState::Available => {
                    return Err(ProviderError::Conflict {
                        provider: self.name.clone(),
                        message: format!(
                            "RunInstances: host `{h}` is {:?} (being scrubbed after its last instance); plan again once it is available",
                            host.state
                        ),
                    });
                }
                Some(host) if self.mine(&host.tags) => {}
                Some(host) => return Err(self.not_mine("RunInstances", h, &host.tags)),
                None => {
                    return Err(err(
                        &self.name,
                        "RunInstances",
                        format!("host `{h}` is not this tenant's (not found)"),
                    ));
                }
            }
            let occupied = self
                .list_instances(vec![])
                .await?
                .into_iter()
                .find(|i| i.host_id.as_deref() == Some(h.as_str()) && !i.state.is_gone());
            if let Some(i) = occupied {
                return Err(err(
                    &self.name,
                    "RunInstances",
                    format!("refusing: host `{h}` already runs instance `{}`; plan again", i.id),
                ));
            }
        }
        let itype =
            req.spec.instance_type.clone().ok_or_else(|| err(&self.name, "RunInstances", "no instance_type"))?;
        let mut call = Params::new("RunInstances")
            .set("ImageId", req.spec.image.as_str())
            .set("InstanceType", itype)
            .set("MinCount", "1")
            .set("MaxCount", "1")
            .set("ClientToken", self.token("instance", &req.machine, req.idempotency_key.as_deref()));
        // On a host, the host decides the zone (it may be a fallback zone).
        if let (Some(az), None) = (&req.spec.availability_zone, &req.host_id) {
            call = call.set("Placement.AvailabilityZone", az.as_str());
        }
        if let Some(h) = &req.host_id {
            // A reused host now belongs to this machine.
            self.create_tags(std::slice::from_ref(h), &all_tags).await?;
            call = call.set("Placement.HostId", h.as_str()).set("Placement.Tenancy", "host");
        }
        let call = call
            .set_opt("SubnetId", self.settings.subnet_id.clone())
            .list("SecurityGroupId", &self.settings.security_group_ids)
            .set_opt("KeyName", self.settings.key_name.clone())
            .tag_specification(1, "instance", &all_tags)
            .tag_specification(2, "volume", &all_tags);
        self.limits.run_instances.acquire().await;
        self.count("RunInstances");
        let out =
            self.client.call(&call, ec2::read_run_instances).await.map_err(|e| self.ec2_err("RunInstances", e))?;
        crate::util::failpoint::after("RunInstances");
        out.into_iter().next().ok_or_else(|| err(&self.name, "RunInstances", "no instance returned"))
    }

    /// The user's tags on the instance, its EBS volumes and its host: CreateTags for the keys set, DeleteTags for
    /// the keys removed, nothing else. Refuses a resource that is not this provider's, and a reserved key.
    async fn update_tags(
        &self,
        machine: &MachineRef,
        host: Option<&str>,
        set: &crate::core::model::UserTags,
        remove: &[String],
    ) -> Result<(), ProviderError> {
        super::refuse_reserved_tags(&self.name, set, remove)?;
        let id = machine
            .instance_id
            .clone()
            .ok_or_else(|| err(&self.name, "CreateTags", format!("`{}` has no instance id", machine.name)))?;
        let Some(i) = self.describe_instance(&id).await? else {
            return Err(ProviderError::NotFound { provider: self.name.clone(), message: format!("instance `{id}`") });
        };
        if !self.mine(&i.tags) {
            return Err(self.not_mine("CreateTags", &id, &i.tags));
        }
        let mut resources = vec![id];
        resources.extend(i.volume_ids);
        if let Some(h) = host {
            match self.describe_host(h).await? {
                Some(d) if self.mine(&d.tags) => resources.push(h.to_string()),
                Some(d) => return Err(self.not_mine("CreateTags", h, &d.tags)),
                None => {
                    return Err(ProviderError::NotFound {
                        provider: self.name.clone(),
                        message: format!("host `{h}`"),
                    });
                }
            }
        }
        if !set.is_empty() {
            self.create_tags(&resources, &Tags::from(set)).await?;
        }
        if !remove.is_empty() {
            self.delete_tags(&resources, remove).await?;
        }
        Ok(())
    }

    /// A fresh root volume from `image` (EC2's CreateReplaceRootVolumeTask): the instance and its dedicated host
    /// stay, so there is no new 24-hour allocation and no scrub. Waits for the task, then for the instance.
    async fn reimage(&self, machine: &MachineRef, image: &str) -> Result<(), ProviderError> {
        let id = machine
            .instance_id
            .clone()
            .ok_or_else(|| err(&self.name, "reimage", format!("`{}` has no instance id", machine.name)))?;
        let Some(i) = self.describe_instance(&id).await? else {
            return Err(ProviderError::NotFound { provider: self.name.clone(), message: format!("instance `{id}`") });
        };
        if !self.mine(&i.tags) {
            return Err(self.not_mine("CreateReplaceRootVolumeTask", &id, &i.tags));
        }
        self.limits.mutate.acquire().await;
        self.count("CreateReplaceRootVolumeTask");
        let call = Params::new("CreateReplaceRootVolumeTask")
            .set("InstanceId", id.as_str())
            .set("ImageId", image)
            .set("DeleteReplacedRootVolume", "true")
            .set("ClientToken", self.token("reimage", &machine.name, None));
        let task_id = self
            .client
            .call(&call, ec2::read_replace_task_id)
            .await
            .map_err(|e| self.ec2_err("CreateReplaceRootVolumeTask", e))?
            .ok_or_else(|| err(&self.name, "CreateReplaceRootVolumeTask", "no task id returned"))?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut delay = Duration::from_millis(200);
        loop {
            self.limits.describe.acquire().await;
            self.count("DescribeReplaceRootVolumeTasks");
            let call = Params::new("DescribeReplaceRootVolumeTasks").list("ReplaceRootVolumeTaskId", &[&task_id]);
            let state = self
                .client
                .call(&call, ec2::read_replace_task_state)
                .await
                .map_err(|e| self.ec2_err("DescribeReplaceRootVolumeTasks", e))?;
            match state.as_deref() {
                Some("succeeded") => break,
                Some(s @ ("failed" | "failed-detached" | "failing" | "failing-detached")) => {
                    return Err(err(&self.name, "CreateReplaceRootVolumeTask", format!("task `{task_id}` is {s}")));
                }
                _ if Instant::now() > deadline => {
                    return Err(err(
                        &self.name,
                        "CreateReplaceRootVolumeTask",
                        format!("task `{task_id}` did not finish"),
                    ));
                }
                _ => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        self.wait_running(machine).await
    }

    async fn wait_running(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        let id = machine
            .instance_id
            .clone()
            .ok_or_else(|| err(&self.name, "wait", format!("`{}` has no instance id", machine.name)))?;
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut delay = Duration::from_millis(200);
        loop {
            let state = self.describe_instance(&id).await?.map(|i| i.state);
            match state {
                Some(InstanceState::Running) => return Ok(()),
                Some(InstanceState::Pending) | None if Instant::now() < deadline => {}
                other => return Err(err(&self.name, "wait", format!("instance `{id}` is {other:?}, not running"))),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn terminate(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        let id = machine
            .instance_id
            .clone()
            .ok_or_else(|| err(&self.name, "terminate", format!("`{}` has no instance id", machine.name)))?;
        let Some(i) = self.describe_instance(&id).await? else { return Ok(()) };
        if !self.mine(&i.tags) {
            return Err(self.not_mine("TerminateInstances", &id, &i.tags));
        }
        if i.state.is_gone() {
            return Ok(());
        }
        self.limits.mutate.acquire().await;
        self.count("TerminateInstances");
        let call = Params::new("TerminateInstances").list("InstanceId", &[&id]);
        self.client.call(&call, ec2::read_nothing).await.map_err(|e| self.ec2_err("TerminateInstances", e))?;
        crate::util::failpoint::after("TerminateInstances");
        Ok(())
    }

    async fn release_host(&self, host_id: &str) -> Result<(), ProviderError> {
        // moto enforces none of AWS's host rules, and AWS bills early releases anyway: check them here.
        let host = self.list_hosts(vec![], vec![host_id.to_string()]).await?.into_iter().next();
        let Some(h) = host else {
            return Err(err(
                &self.name,
                "ReleaseHosts",
                format!("refusing: host `{host_id}` is not tagged for tenant `{}`", self.tenant),
            ));
        };
        if !self.mine(&h.tags) {
            return Err(self.not_mine("ReleaseHosts", host_id, &h.tags));
        }
        if h.state == HostState::Released {
            return Ok(());
        }
        let busy = !h.instances.is_empty()
            || self
                .list_instances(vec![])
                .await?
                .iter()
                .any(|i| i.host_id.as_deref() == Some(host_id) && !i.state.is_gone());
        if busy {
            return Err(err(&self.name, "ReleaseHosts", format!("refusing: host `{host_id}` still has an instance")));
        }
        let itype = h.instance_type.as_deref().unwrap_or_default();
        let due = crate::core::model::window_end_at(allocation_time(&h), self.window(itype));
        if due > Utc::now() {
            return Err(err(
                &self.name,
                "ReleaseHosts",
                format!(
                    "refusing: host `{host_id}` is inside its minimum allocation window until {}",
                    crate::util::time::ts(&due)
                ),
            ));
        }
        self.limits.mutate.acquire().await;
        self.count("ReleaseHosts");
        let call = Params::new("ReleaseHosts").list("HostId", &[host_id]);
        let unsuccessful =
            self.client.call(&call, ec2::read_unsuccessful).await.map_err(|e| self.ec2_err("ReleaseHosts", e))?;
        crate::util::failpoint::after("ReleaseHosts");
        if let Some((id, why)) = unsuccessful.first() {
            return Err(err(&self.name, "ReleaseHosts", format!("`{id}` was not released: {why}")));
        }
        Ok(())
    }

    fn transport(&self, machine: &MachineRef) -> Result<Option<Arc<dyn Transport>>, ProviderError> {
        Ok(self.transport.as_ref().and_then(|f| f(machine)))
    }

    fn reports_requests(&self) -> bool {
        true
    }

    fn clock_skew(&self) -> Option<chrono::Duration> {
        self.clock.skew()
    }
}
