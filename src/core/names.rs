//! Names: the deterministic machine name (also the runner's name), plan addresses, and the tags that say
//! whose a resource is.

use std::fmt;

use std::collections::{BTreeMap, BTreeSet};

/// A machine's name, `nimbus.<tenant>.<pool>.<index>`: deterministic, so a rerun finds what an earlier run
/// made, and the runner registered for the machine has the same name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineName {
    tenant: String,
    pool: String,
    index: u32,
}

impl MachineName {
    pub fn new(tenant: &str, pool: &str, index: u32) -> Self {
        MachineName { tenant: tenant.into(), pool: pool.into(), index }
    }

    /// Parses a machine (or runner) name; `None` for anything nimbus did not name.
    pub fn parse(name: &str) -> Option<Self> {
        parse_machine_name(name).map(|(t, p, i)| MachineName::new(t, p, i))
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }
    pub fn pool(&self) -> &str {
        &self.pool
    }
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The machine's address in a plan: `pool[index]`.
    pub fn address(&self) -> Address {
        Address::machine(&self.pool, self.index)
    }
}

impl fmt::Display for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nimbus.{}.{}.{}", self.tenant, self.pool, self.index)
    }
}

/// Where a change stands in a plan: `pool[index]` for a machine, `host.<id>`, `runner.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(String);

impl Address {
    pub fn machine(pool: &str, index: u32) -> Self {
        Address(format!("{pool}[{index}]"))
    }
    pub fn host(id: &str) -> Self {
        Address(format!("host.{id}"))
    }
    pub fn runner(name: &str) -> Self {
        Address(format!("runner.{name}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.0
    }
}

/// Tag keys nimbus puts on every resource it creates.
pub mod tags {
    pub const TENANT: &str = "nimbus:tenant";
    pub const POOL: &str = "nimbus:pool";
    pub const MACHINE: &str = "nimbus:machine";
    /// Which creation of a machine a dedicated host was allocated for (from the journaled idempotency key of
    /// the allocation): a host of an earlier generation of the same machine is never adopted by tag.
    pub const GENERATION: &str = "nimbus:generation";
    /// The name (in the fleet file) of the provider a resource belongs to.
    pub const PROVIDER: &str = "nimbus:provider";
    /// The fleet file a resource belongs to ([`super::FleetScope::id`]): a second fleet file of the same tenant
    /// leaves it alone.
    pub const FLEET: &str = "nimbus:fleet";
    pub const MANAGED_BY: &str = "nimbus:managed-by";
    pub const MANAGED_BY_VALUE: &str = "nimbus";
}

pub use super::tagset::{Sym, Tags};

/// The user's own tags (`tags:` in the fleet file), as the fleet file and the plan hold them.
pub type UserTags = BTreeMap<String, String>;

/// True when `tags` mark a resource as nimbus-managed and owned by `tenant`.
pub fn owned_by(tags: &Tags, tenant: &str) -> bool {
    tags.get(tags::MANAGED_BY) == Some(tags::MANAGED_BY_VALUE) && tags.get(tags::TENANT) == Some(tenant)
}

/// Which fleet file a provider works for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetScope {
    /// The fleet's id: the `nimbus:fleet` tag on everything it makes.
    pub id: String,
    /// Other fleets whose resources this one takes over (`adopt_fleets`).
    pub adopt: Vec<String>,
    /// The pools the fleet file declares: a resource made before nimbus recorded fleets (no `nimbus:fleet`
    /// tag) belongs to the fleet that declares its pool.
    pub pools: BTreeSet<String>,
}

impl FleetScope {
    /// Whether a resource with `tags` (already known to be this tenant's and this provider's) is this fleet's.
    pub fn claims(&self, tags: &Tags) -> bool {
        match tags.get(tags::FLEET) {
            Some(f) => f == self.id || self.adopt.iter().any(|a| a == f),
            None => tags.get(tags::POOL).is_some_and(|p| self.pools.contains(p)),
        }
    }
}

/// Whose a resource is, as one provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Tagged for this tenant and this provider (or adopted, see [`ownership`]).
    Mine,
    /// Tagged for this tenant but for another provider: invisible to this one.
    OtherProvider,
    /// Tagged for this tenant, with no `nimbus:provider` tag (made before nimbus recorded providers), and
    /// this provider may not adopt it because another provider of the same kind could own it.
    Unattributed,
    /// This tenant's and this provider's, but another fleet file's (`nimbus:fleet`): left alone.
    OtherFleet,
    /// Not this tenant's, or not nimbus-managed.
    NotOurs,
}

/// Classifies `tags` for `provider` of `tenant`, working for `fleet` (`None`: every fleet of the tenant). A
/// resource without a provider tag is adopted when `adopt_legacy` (the provider is the only one of its kind in
/// the fleet).
pub fn ownership(
    tags: &Tags,
    tenant: &str,
    provider: &str,
    adopt_legacy: bool,
    fleet: Option<&FleetScope>,
) -> Ownership {
    if !owned_by(tags, tenant) {
        return Ownership::NotOurs;
    }
    let mine = match tags.get(tags::PROVIDER) {
        Some(p) if p == provider => Ownership::Mine,
        Some(_) => Ownership::OtherProvider,
        None if adopt_legacy => Ownership::Mine,
        None => Ownership::Unattributed,
    };
    match fleet {
        Some(f) if mine != Ownership::OtherProvider && !f.claims(tags) => Ownership::OtherFleet,
        _ => mine,
    }
}

/// The deterministic name of machine `index` of `pool`: also its runner name.
/// Dots separate the parts because tenant and pool names cannot contain them.
pub fn machine_name(tenant: &str, pool: &str, index: u32) -> String {
    MachineName::new(tenant, pool, index).to_string()
}

/// Splits a machine/runner name into `(tenant, pool, index)`.
pub fn parse_machine_name(name: &str) -> Option<(&str, &str, u32)> {
    let rest = name.strip_prefix("nimbus.")?;
    let mut parts = rest.split('.');
    let (tenant, pool, index) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || tenant.is_empty() || pool.is_empty() {
        return None;
    }
    Some((tenant, pool, index.parse().ok()?))
}

/// What a resource nimbus makes carries: the user's tags (`tags:`), and nimbus's own `own` over them.
pub fn with_user_tags(user: &BTreeMap<String, String>, own: Tags) -> Tags {
    let mut t = Tags::from(user);
    t.extend(own.iter());
    t
}

/// The standard tags for a machine (and its host); `fleet` is the fleet's id, when the provider works for one.
pub fn machine_tags(tenant: &str, provider: &str, pool: &str, machine: &str, fleet: Option<&str>) -> Tags {
    let mut t = Tags::from([
        (tags::TENANT, tenant),
        (tags::PROVIDER, provider),
        (tags::POOL, pool),
        (tags::MACHINE, machine),
        (tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
    ]);
    if let Some(f) = fleet {
        t.insert(tags::FLEET, f);
    }
    t
}
